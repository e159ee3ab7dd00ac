"""Faults in the middle of a job end that connection only (issue: one connection can
never stop the server): out of file descriptors, an unwritable spool (EACCES), a
read-only file system (EROFS), a job with more data files than the limit.  After
each, the real relay process still answers, takes a normal job, leaves no debris
and logged no traceback."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import orjson
import pytest

from relay.spool import MAX_FILES_PER_JOB
from tests.daemon import RelayProcess, relay_config, write_config_file
from tests.lpdwire import Job, Wire, send_job, start_data_file
from tests.peers.tcp import tcp_pairs
from tests.test_server import wait_for

_LIVE = re.compile(r"(\d{12,20})\.(json|cf|state|d\d{1,4})")


def log_wrapper(log: Path) -> tuple[str, ...]:
    """An argv prefix keeping the relay's log (its stderr) in ``log``."""
    return ("sh", "-c", f'exec "$0" "$@" 2>>"{log}"')


def fault_config(home: Path, **server: object) -> Path:
    data = relay_config(home, server={"graceful_timeout": "1s", **server},
                        metrics={"listen": ""}, log={"format": "json", "level": "info"})
    return write_config_file(home / "relay.toml", data)


def debris(spool: Path) -> list[str]:
    """Files in the spool that belong to no job: partial jobs, temp files."""
    names = [p.name for p in (spool / "jobs").iterdir()]
    jobs = {n[:-5] for n in names if n.endswith(".json")}
    return [n for n in names if not ((m := _LIVE.fullmatch(n)) and m.group(1) in jobs)]


def delivered_count(home: Path) -> int:
    return sum(1 for _ in (home / "out").rglob("*.json")) if (home / "out").exists() else 0


def assert_healthy(relay: RelayProcess, home: Path, log: Path, number: str) -> None:
    """Alive, takes and delivers a normal job, no debris, no traceback in the log."""
    assert relay.proc is not None and relay.proc.poll() is None, "the relay exited"
    before = delivered_count(home)
    replies = send_job(relay.port, Job(number=number))
    assert all(r == 0 for r in replies), f"normal job refused: replies {replies}"
    wait_for(lambda: delivered_count(home) > before)
    wait_for(lambda: not debris(home / "spool") or None)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "Exceptions from Trio" not in text, text[-2000:]


def refusal_events(log: Path) -> list[dict]:  # type: ignore[type-arg]
    lines = [orjson.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    return [e for e in lines if e.get("event") == "job_refused"]


def test_more_data_files_than_the_limit_is_refused_at_that_header(tmp_path: Path) -> None:
    log = tmp_path / "relay.log"
    with RelayProcess(fault_config(tmp_path), wrapper=log_wrapper(log)) as relay:
        with Wire(relay.port) as w:
            w.send(b"\x02q\n")
            assert w.reply() == 0
            for i in range(MAX_FILES_PER_JOB + 1):
                w.send(f"\x031 dfA{i:03d}client\n".encode())
                code = w.reply()
                if i < MAX_FILES_PER_JOB:
                    assert code == 0, i
                    w.send(b"x\x00")
                    assert w.reply() == 0
            assert code == 0x03
            assert b"data files" in w.read_all()
        assert_healthy(relay, tmp_path, log, "501")
    assert [e["reason"] for e in refusal_events(log)] == ["too_large"]


# workers = 2: a worker's connections hold no data file (a small job waits in
# memory); out of descriptors it accepts the next client with its spare one to refuse it.
@pytest.mark.parametrize("workers", [1, 2])
def test_out_of_file_descriptors_refuses_that_job_and_keeps_serving(tmp_path: Path,
                                                                    workers: int) -> None:
    """A tiny RLIMIT_NOFILE; connections each holding an open data file exhaust it."""
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux)")
    log = tmp_path / "relay.log"
    # Jobs with files of their own: a small job's data waits in memory, no descriptor.
    cfg = fault_config(tmp_path, max_connections=500, max_connections_per_host=500,
                       segment_threshold=0, workers=workers)
    wrapper = ("prlimit", "--nofile=64:64", *log_wrapper(log))
    with RelayProcess(cfg, wrapper=wrapper) as relay:
        spare = Wire(relay.port)          # holds one descriptor, and no data file
        spare.send(b"\x02q\n")
        assert spare.reply() == 0
        holders: list[Wire] = []
        answer = b""
        try:
            for i in range(100):
                answer = _open_one(relay.port, holders, f"{100 + i}", spare)
                if answer:
                    break
            assert answer.startswith(b"\x02lpd-relay: "), answer[:100]
        finally:
            for w in [spare, *holders]:
                w.close()
        # Until the relay has closed its side of those connections (CLOSE_WAIT
        # here), it still holds their descriptors and rightly refuses with 0x02.
        wait_for(lambda: not any(p == relay.port for p, _ in tcp_pairs("08")))
        assert_healthy(relay, tmp_path, log, "601")
    errors = " ".join(e["error"] for e in refusal_events(log) if e["reason"] == "spool_error")
    assert "Too many open files" in errors, refusal_events(log)


def _open_one(port: int, holders: list[Wire], number: str, spare: Wire) -> bytes:
    """One more connection with an open data file; its refusal when the relay ran out.

    When the relay has no descriptor left even to accept, the connection waits in
    the backlog: closing ``spare`` frees exactly one, so the connection is accepted
    and its data file is the open that fails.
    """
    w = Wire(port, timeout=2)
    holders.append(w)
    w.send(b"\x02q\n")
    try:
        code = w.reply()
    except TimeoutError:
        spare.close()
        w.sock.settimeout(10)
        code = w.reply()
    if code != 0:
        return bytes([code]) + w.read_all()
    job = Job(number=number, files=[b"x" * 100])
    cf = job.control()
    for header, body in ((f"\x02{len(cf)} {job.cf_name}\n", cf + b"\x00"),):
        w.send(header.encode())
        if (code := w.reply()) != 0:
            return bytes([code]) + w.read_all()
        w.send(body)
        if (code := w.reply()) != 0:
            return bytes([code]) + w.read_all()
    w.send(f"\x03100 {job.df_names()[0]}\n".encode())
    code = w.reply()
    return b"" if code == 0 else bytes([code]) + w.read_all()


def _without_dac_override(log: Path) -> tuple[str, ...]:
    # Root ignores file permissions through CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH;
    # without them in the bounding set the relay meets them like any user.
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search", *log_wrapper(log))


def _refused_mid_job(port: int, job: Job, broken: object, repair: object,
                     files_before: int) -> bytes:
    """Send ``job``; break the spool after ``files_before`` data files; the answer.

    The spool is repaired before this client closes, i.e. before the relay
    discards the partial job, so the discard itself can succeed.
    """
    with Wire(port) as w:
        start_data_file(w, job)
        for i, data in enumerate(job.files):
            if i:
                w.send(f"\x03{len(data)} {job.df_names()[i]}\n".encode())
                if (code := w.reply()) != 0:
                    answer = bytes([code]) + w.read_all()
                    repair()  # type: ignore[operator]
                    return answer
            if i + 1 == files_before:
                broken()  # type: ignore[operator]
            w.send(data + b"\x00")
            if (code := w.reply()) != 0:
                answer = bytes([code]) + w.read_all()
                repair()  # type: ignore[operator]
                return answer
    repair()  # type: ignore[operator]
    return b"\x00"


@pytest.mark.root
def test_unwritable_spool_mid_job_says_retry_later(tmp_path: Path) -> None:
    """EACCES for real: the relay, without root's permission override, loses write
    permission on its jobs folder."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE")
    log = tmp_path / "relay.log"
    # The jobs folder is what loses write permission: jobs with files of their own.
    cfg = fault_config(tmp_path, segment_threshold=0)
    with RelayProcess(cfg, wrapper=_without_dac_override(log)) as relay:
        jobs = tmp_path / "spool" / "jobs"
        lock, unlock = (lambda: jobs.chmod(0o550)), (lambda: jobs.chmod(0o750))
        # At the open of the second data file, then at the commit of the job.
        two = Job(number="701", files=[b"first\n", b"second\n"])
        answer = _refused_mid_job(relay.port, two, lock, unlock, files_before=1)
        assert answer.startswith(b"\x02lpd-relay: "), answer
        assert_healthy(relay, tmp_path, log, "702")
        one = Job(number="703", files=[b"only\n"])
        answer = _refused_mid_job(relay.port, one, lock, unlock, files_before=1)
        assert answer.startswith(b"\x02lpd-relay: "), answer
        assert_healthy(relay, tmp_path, log, "704")
    errors = [e["error"] for e in refusal_events(log) if e["reason"] == "spool_error"]
    assert len(errors) == 2 and all("Permission denied" in e for e in errors), errors


@pytest.mark.root
def test_read_only_spool_mid_job_says_retry_later(tmp_path: Path) -> None:
    """EROFS for real: the jobs folder re-mounted read-only in the relay's own namespace."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "nsenter")):
        pytest.skip("needs root, unshare and nsenter for a private read-only mount")
    log = tmp_path / "relay.log"
    cfg = fault_config(tmp_path, segment_threshold=0)   # the jobs folder goes read-only
    wrapper = ("unshare", "-m", "--propagation", "private", *log_wrapper(log))
    with RelayProcess(cfg, wrapper=wrapper) as relay:
        assert relay.proc is not None
        jobs = tmp_path / "spool" / "jobs"
        ns = ("nsenter", "-t", str(relay.proc.pid), "-m", "--")

        def read_only() -> None:
            subprocess.run([*ns, "sh", "-c", f'mount --bind "{jobs}" "{jobs}" && '
                            f'mount -o remount,bind,ro "{jobs}"'], check=True, timeout=10)

        def writable() -> None:
            subprocess.run([*ns, "umount", "-l", str(jobs)], check=True, timeout=10)

        job = Job(number="801", files=[b"first\n", b"second\n"])
        answer = _refused_mid_job(relay.port, job, read_only, writable, files_before=1)
        assert answer.startswith(b"\x02lpd-relay: "), answer
        assert_healthy(relay, tmp_path, log, "802")
    errors = [e["error"] for e in refusal_events(log) if e["reason"] == "spool_error"]
    assert len(errors) == 1 and "Read-only file system" in errors[0], errors


def test_reset_by_a_client_mid_job_is_no_error(tmp_path: Path) -> None:
    log = tmp_path / "relay.log"
    with RelayProcess(fault_config(tmp_path), wrapper=log_wrapper(log)) as relay:
        for n in range(20):
            w = Wire(relay.port)
            start_data_file(w, Job(number=f"{900 + n}", files=[b"x" * 1000]))
            w.send(b"x" * 10)
            w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.close()   # SO_LINGER 0: a reset
        assert_healthy(relay, tmp_path, log, "950")
