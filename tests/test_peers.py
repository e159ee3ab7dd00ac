"""Smoke tests of the tests/peers package: each helper really drives the real program.

If these fail, every test built on the peers would fail for the wrong reason,
so each helper is proved here on its own: LPRng's lpd receives what LPRng's
lpr sends (byte for byte), lpq and lprm talk to it, rlpr and lpr reach the
RecordingLpdServer with RFC 1179 jobs, p910nd prints what a socket sends, and
the RecordingLpdServer misbehaves exactly as scripted.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

import pytest
import trio

from tests.peers import (
    LpdScript,
    LprngServer,
    P910nd,
    RecordingLpdServer,
    free_port,
    lpq,
    lpr,
    lprm,
    lprng_error,
    promtool_path,
    rlpr,
)

F = TypeVar("F", bound=Callable[..., object])

# Every byte value, NULs and LFs included: nothing may be translated on the way.
BINARY = bytes(range(256)) * 3 + b"\n\x00end"


def real_peer(test: F) -> F:
    """Marks a test that runs a real peer inside private namespaces (root)."""
    return cast(F, pytest.mark.root(pytest.mark.peers(test)))


def _files(tmp_path: Path, *contents: bytes) -> list[Path]:
    paths = []
    for i, data in enumerate(contents):
        path = tmp_path / f"file{i}.bin"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --------------------------------------------------------------------------
# LPRng lpd + lpr / lpq / lprm
# --------------------------------------------------------------------------

@real_peer
def test_lpr_job_reaches_private_lprng_byte_for_byte(tmp_path: Path) -> None:
    first, second = _files(tmp_path, BINARY, b"%!PS\nshowpage\n")
    with LprngServer(tmp_path / "lprng", queues=("q", "Ward3")) as server:
        res = lpr(server.port, "Ward3", first, second, user="alice", title="Chart",
                  job_name="labs")
        assert res.returncode == 0, res.stderr
        (job,) = server.wait_jobs("Ward3", 1, timeout=5)
        assert server.jobs("q") == []
    assert [f.data for f in job.files] == [BINARY, b"%!PS\nshowpage\n"]
    assert (job.user, job.title, job.job_name, job.queue) == ("alice", "Chart", "labs", "Ward3")
    assert job.host  # LPRng records the sender's H line
    assert all(f.format == "f" for f in job.files)
    assert (server.spool_dir("Ward3") / job.files[0].name).read_bytes() == BINARY


@real_peer
def test_lprng_receives_streamed_stdin(tmp_path: Path) -> None:
    with LprngServer(tmp_path / "lprng") as server:
        res = lpr(server.port, "q", stdin=b"piped\x00data\n", stream=True)
        assert res.returncode == 0, res.stderr
        (job,) = server.wait_jobs("q", 1, timeout=5)
    assert job.data == b"piped\x00data\n"
    assert job.job_name == "(STDIN)"


@real_peer
def test_lprng_wait_jobs_counts_only_complete_jobs(tmp_path: Path) -> None:
    with LprngServer(tmp_path / "lprng") as server:
        assert lpr(server.port, "q", stdin=b"one").returncode == 0
        (job,) = server.wait_jobs("q", 1, timeout=5)
        with pytest.raises(TimeoutError, match="holds 1 of 2 jobs"):
            server.wait_jobs("q", 2, timeout=0.2)
        with pytest.raises(KeyError, match="no queue 'nope'"):
            server.wait_jobs("nope", 1, timeout=0.2)
    assert job.data == b"one"


@real_peer
def test_lpq_and_lprm_talk_to_the_private_lpd(tmp_path: Path) -> None:
    (path,) = _files(tmp_path, b"hello\n")
    with LprngServer(tmp_path / "lprng", queues=("q", "Ward3")) as server:
        assert lpr(server.port, "q", path, user="bob", job_name="report").returncode == 0
        (job,) = server.wait_jobs("q", 1, timeout=5)
        status = lpq(server.port, "q")
        assert status.returncode == 0, status.stderr
        text = status.stdout.decode()
        assert re.search(r"^Printer: q@", text, re.MULTILINE), text
        assert re.search(rf"^hold\s+bob@\S+\s+A\s+{job.number}\s+report\b", text,
                         re.MULTILINE), text
        assert "Ward3" in lpq(server.port, "Ward3").stdout.decode()
        removed = lprm(server.port, "q", str(job.number))
        assert removed.returncode == 0, removed.stderr
        assert "dequeued" in removed.stdout.decode()
        assert server.jobs("q") == []


@real_peer
def test_lprng_stop_ends_its_whole_process_tree(tmp_path: Path) -> None:
    server = LprngServer(tmp_path / "lprng")
    server.start()
    assert server.running
    assert lpr(server.port, "q", stdin=b"x").returncode == 0
    tree = [int(pid) for pid in subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(server._proc.pid if server._proc else 0)],
        capture_output=True, check=False, timeout=5).stdout.split()]
    assert tree, "lpd runs under unshare"
    server.stop()
    assert not server.running
    assert not [pid for pid in tree if _alive(pid)]


@real_peer
def test_lprng_restart_keeps_port_and_held_jobs(tmp_path: Path) -> None:
    server = LprngServer(tmp_path / "lprng", port=free_port())
    port = server.port
    assert lpr(port, "q", stdin=b"before").returncode != 0   # nothing listens yet
    server.start()
    try:
        assert lpr(port, "q", stdin=b"one").returncode == 0
        server.stop()
        assert lpr(port, "q", stdin=b"down").returncode != 0
        server.start()
        assert server.port == port
        assert lpr(port, "q", stdin=b"two").returncode == 0
        assert [job.data for job in server.wait_jobs("q", 2, timeout=5)] == [b"one", b"two"]
    finally:
        server.stop()


# --------------------------------------------------------------------------
# rlpr and lpr against the RecordingLpdServer
# --------------------------------------------------------------------------

def _assert_rfc1179_job(raw: bytes, queue: str, data: bytes) -> None:
    """The received bytes form one RFC 1179 job: 02 queue, cf and df subcommands."""
    head = f"\x02{queue}\n".encode()
    assert raw.startswith(head), raw[:50]
    subcommands = re.findall(rb"[\x02\x03](\d+) ((?:cf|df)A\d{3}[\w.-]+)\n", raw)
    kinds = sorted(name[:2] for _, name in subcommands)
    assert kinds == [b"cf", b"df"], subcommands
    df_len = next(int(n) for n, name in subcommands if name.startswith(b"df"))
    assert df_len == len(data)
    assert data + b"\x00" in raw  # counted data file, NUL-terminated


RLPR_BIND_WAIT = 65.0   # seconds: TIME_WAIT lasts 60 s on Linux


@real_peer
def test_rlpr_sends_an_rfc1179_job_from_a_reserved_port(tmp_path: Path) -> None:
    (path,) = _files(tmp_path, BINARY)
    with RecordingLpdServer() as server:
        # The relay's own default source ports are 721-731 too: tests beside
        # this one leave them in TIME_WAIT for up to 60 s, so rlpr is tried
        # again until one is free (a socket in TIME_WAIT blocks rlpr's bind).
        deadline = time.monotonic() + RLPR_BIND_WAIT
        while True:
            res = rlpr(server.port, "Ward3", path, user="carol", title="Scan")
            busy = res.returncode != 0 and b"bind" in res.stderr.lower()
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if busy:
            pytest.skip("rlpr's reserved ports 721-731 are all busy (TIME_WAIT)")
        assert res.returncode == 0, res.stderr
        (job,) = server.wait_jobs(1, timeout=5)
        (conn,) = server.connections
    _assert_rfc1179_job(bytes(conn.data), "Ward3", BINARY)
    assert 721 <= conn.peer[1] <= 731
    assert (job.user, job.title, job.data) == ("carol", "Scan", BINARY)
    assert job.raw_control is not None and job.raw_control.startswith(b"H")


@real_peer
def test_rlpr_no_bind_uses_an_ephemeral_port() -> None:
    with RecordingLpdServer() as server:
        res = rlpr(server.port, "q", stdin=b"from stdin\n", no_bind=True)
        assert res.returncode == 0, res.stderr
        (job,) = server.wait_jobs(1, timeout=5)
        (conn,) = server.connections
    assert conn.peer[1] >= 1024
    assert job.data == b"from stdin\n"


@real_peer
def test_recording_server_receives_lprng_lpr_jobs(tmp_path: Path) -> None:
    (path,) = _files(tmp_path, BINARY)
    with RecordingLpdServer() as server:
        assert lpr(server.port, "q", path, user="dan").returncode == 0
        assert lpr(server.port, "q", stdin=b"streamed", stream=True,
                   reserved_port=False).returncode == 0
        counted, streamed = server.wait_jobs(2, timeout=5)
        first, second = server.connections
    _assert_rfc1179_job(bytes(first.data), "q", BINARY)
    assert first.peer[1] < 1024 <= second.peer[1]
    assert (counted.user, counted.data, counted.files[0].declared_length) == (
        "dan", BINARY, len(BINARY))
    # LPRng's lpr -k sends length 0 and the data until it closes.
    assert (streamed.data, streamed.files[0].declared_length) == (b"streamed", 0)


@real_peer
def test_recording_server_refuses_lprng_with_0x02(tmp_path: Path) -> None:
    (path,) = _files(tmp_path, b"hello\n")
    script = LpdScript(replies={"data_file": lprng_error(2, "spool full, try later")})
    with RecordingLpdServer(script) as server:
        res = lpr(server.port, "q", path)
        (conn,) = server.wait_connections(1, timeout=5)
        assert server.jobs == []
    assert res.returncode != 0
    assert b"spool full, try later" in res.stderr
    assert conn.replies[-1] == ("data_file", b"\x02spool full, try later\n")
    assert conn.ended == "closed"


@real_peer
def test_refused_first_attempt_then_accepted(tmp_path: Path) -> None:
    (path,) = _files(tmp_path, b"retry me\n")
    script = LpdScript(replies={"job": [b"\x02", b"\x00"]})
    with RecordingLpdServer(script) as server:
        assert lpr(server.port, "q", path).returncode != 0   # lpr_send_try=1
        assert lpr(server.port, "q", path).returncode == 0
        (job,) = server.wait_jobs(1, timeout=5)
    assert job.data == b"retry me\n"
    assert [c.replies[0] for c in server.connections] == [("job", b"\x02"), ("job", b"\x00")]


@real_peer
def test_recording_server_is_usable_from_trio(tmp_path: Path) -> None:
    (path,) = _files(tmp_path, b"trio\n")

    async def main(server: RecordingLpdServer) -> None:
        with trio.fail_after(10):
            res = await trio.to_thread.run_sync(lambda: lpr(server.port, "q", path))
            assert res.returncode == 0, res.stderr
            (job,) = await server.wait_jobs_async(1)
        assert job.data == b"trio\n"

    with RecordingLpdServer() as server:
        trio.run(main, server)


# --------------------------------------------------------------------------
# RecordingLpdServer's scripted misbehaviour (plain sockets, no peer needed)
# --------------------------------------------------------------------------

def _send_job(port: int, *, data: bytes = b"abc",
              reply_timeout: float = 5.0) -> tuple[socket.socket, list[bytes]]:
    """Send a counted job step by step; return the socket and each step's reply."""
    cf = b"Hclient\nPalice\nfdfA001client\n"
    steps = [b"\x02q\n", b"\x02%d cfA001client\n" % len(cf), cf + b"\x00",
             b"\x03%d dfA001client\n" % len(data), data + b"\x00"]
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.settimeout(reply_timeout)
    replies = []
    for step in steps:
        sock.sendall(step)
        try:
            replies.append(sock.recv(100))
        except TimeoutError:
            replies.append(b"<timeout>")
            break
        if replies[-1][:1] != b"\x00":
            break
    return sock, replies


def test_scripted_trailing_lf_and_delay() -> None:
    with RecordingLpdServer(LpdScript(trailing=b"\n", delay=0.05)) as server:
        sock, replies = _send_job(server.port)
        sock.close()
        (job,) = server.wait_jobs(1, timeout=5)
    assert replies == [b"\x00\n"] * 5
    assert (job.user, job.data, job.control_name) == ("alice", b"abc", "cfA001client")


def test_scripted_silence_and_early_close() -> None:
    with RecordingLpdServer(LpdScript(silent_at="data_file")) as server:
        sock, replies = _send_job(server.port, reply_timeout=0.3)
        sock.close()
        server.wait_connections(1, timeout=5)
        assert server.jobs == []
    assert replies == [b"\x00"] * 4 + [b"<timeout>"]
    with RecordingLpdServer(LpdScript(close_at="control_header")) as server:
        sock, replies = _send_job(server.port)
        sock.close()
        (conn,) = server.wait_connections(1, timeout=5)
    assert replies == [b"\x00", b""]
    assert conn.ended == "closed"


def test_unknown_queue_and_truncated_job_are_not_jobs() -> None:
    with RecordingLpdServer(LpdScript(queues=frozenset({"Ward3"}))) as server:
        sock, replies = _send_job(server.port)
        sock.close()
        assert replies[0].startswith(b"\x01queue q")
    with RecordingLpdServer() as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"\x02q\n\x03100 dfA001client\nonly part")
        sock.close()
        (conn,) = server.wait_connections(1, timeout=5)
        assert server.jobs == []
    assert bytes(conn.data).endswith(b"only part")


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert 0 < port < 65536


# --------------------------------------------------------------------------
# p910nd and promtool
# --------------------------------------------------------------------------

def _raw_print(port: int, payload: bytes) -> bytes:
    """Send like an AppSocket client: data, half-close, wait for the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(100)


@real_peer
def test_p910nd_prints_what_each_connection_sends(tmp_path: Path) -> None:
    big = os.urandom(300_000)
    with P910nd(tmp_path / "p910nd") as printer:
        assert 9100 <= printer.port <= 9109
        assert _raw_print(printer.port, b"\x1b%-12345X@PJL\r\n") == b""
        assert _raw_print(printer.port, big) == b""
        jobs = printer.wait_jobs(2, timeout=5)
    assert jobs == [b"\x1b%-12345X@PJL\r\n", big]


@real_peer
def test_p910nd_bidirectional_printer_talks_back(tmp_path: Path) -> None:
    with P910nd(tmp_path / "p910nd", bidirectional=True) as printer, \
            socket.create_connection(("127.0.0.1", printer.port), timeout=5) as sock:
        sock.sendall(b"@PJL INFO STATUS\r\n")
        printer.reply(b"CODE=10001\r\n")
        assert sock.recv(100) == b"CODE=10001\r\n"
        sock.shutdown(socket.SHUT_WR)
        assert printer.wait_jobs(1, timeout=5) == [b"@PJL INFO STATUS\r\n"]


@pytest.mark.peers
def test_promtool_runs() -> None:
    res = subprocess.run([promtool_path(), "--version"], capture_output=True, timeout=30,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert b"promtool" in res.stdout + res.stderr
