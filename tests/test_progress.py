"""Progress bars on a terminal, nothing otherwise (relay/progress.py, SPEC §6).

Each command runs as a real subprocess twice: with stderr a pipe (it must
stay empty) and with stderr the slave side of a pty (a tqdm bar must appear).
"""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from relay import progress
from tests.daemon import DaemonThread, RelayProcess, relay_config
from tests.lpdwire import Job, send_job
from tests.peers import RecordingLpdServer
from tests.test_recovery import closed_port, write_config


def relay_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "relay", *args]


def run_piped(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(relay_cmd(*args), capture_output=True, timeout=120, check=False)


def run_on_pty(*args: str, timeout: float = 120) -> tuple[int, bytes, bytes]:
    """Run with stderr on a pty; (exit code, stdout, everything the terminal got)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(relay_cmd(*args), stdout=subprocess.PIPE, stderr=slave,
                            stdin=subprocess.DEVNULL)
    os.close(slave)
    screen = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:   # EIO: the child closed its side
                    break
                if not chunk:
                    break
                screen += chunk
            elif proc.poll() is not None:
                break
        assert proc.stdout is not None
        out = proc.stdout.read()
        return proc.wait(30), out, bytes(screen)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_bar_is_silent_off_a_terminal() -> None:
    stream = io.StringIO()
    bar = progress.bar(total=10, desc="x", stream=stream)
    for _ in range(10):
        bar.update()
    bar.close()
    assert stream.getvalue() == ""


def test_send_of_a_large_file(tmp_path: Path) -> None:
    doc = tmp_path / "big.ps"
    doc.write_bytes(os.urandom(8 << 20))
    with RecordingLpdServer() as server:
        uri = f"lpd://127.0.0.1:{server.port}/q"
        piped = run_piped("send", uri, str(doc))
        assert piped.returncode == 0 and piped.stderr == b"", piped.stderr
        code, out, screen = run_on_pty("send", uri, str(doc))
        assert code == 0 and b"sent cfA" in out
        jobs = server.wait_jobs(2)
    assert b"send:" in screen and b"B/s" in screen, screen[-500:]
    # Counted through a buffer on the terminal, yet the same bytes arrive.
    assert [j.files[0].data for j in jobs] == [doc.read_bytes()] * 2


def test_small_send_shows_no_bar(tmp_path: Path) -> None:
    doc = tmp_path / "small.txt"
    doc.write_bytes(b"one page\n")
    with RecordingLpdServer() as server:
        code, _, screen = run_on_pty("send", f"lpd://127.0.0.1:{server.port}/q", str(doc))
        server.wait_jobs(1)
    assert code == 0 and b"send:" not in screen


def test_loadgen(tmp_path: Path) -> None:
    with DaemonThread(relay_config(tmp_path)) as relay:
        uri = f"lpd://127.0.0.1:{relay.port}/load"
        piped = run_piped("loadgen", uri, "--jobs", "30", "--concurrency", "4")
        assert piped.returncode == 0 and piped.stderr == b"", piped.stderr
        code, out, screen = run_on_pty("loadgen", uri, "--jobs", "30", "--concurrency", "4")
    assert code == 0 and b"30/30 jobs" in out
    assert b"loadgen:" in screen and b"/30" in screen, screen[-500:]


def test_spool_purge_of_several_jobs(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f"socket://127.0.0.1:{closed_port()}")
    with RelayProcess(cfg) as relay:
        for n in range(1, 7):
            assert all(r == 0 for r in send_job(relay.port, Job(number=f"{n:03d}")))
    listing = run_piped("spool", "list", "-c", str(cfg)).stdout.decode().splitlines()
    ids = [line.split()[0] for line in listing[1:-1]]
    assert len(ids) == 6
    piped = run_piped("spool", "purge", *ids[:3], "-c", str(cfg))
    assert piped.returncode == 0 and piped.stderr == b"", piped.stderr
    assert piped.stdout.count(b"dequeued") == 3
    code, out, screen = run_on_pty("spool", "purge", *ids[3:], "-c", str(cfg))
    assert code == 0 and out.count(b"dequeued") == 3
    assert b"purge:" in screen and b"/3 " in screen, screen[-500:]
    assert b"0 job(s)" in run_piped("spool", "list", "-c", str(cfg)).stdout
    # show and retry still take exactly one JOB.
    assert run_piped("spool", "show", "1", "2", "-c", str(cfg)).returncode == 2
