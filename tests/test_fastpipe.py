"""A session's later jobs pipelined on the loop (relay.fastpipe) against Connection's path.

Sessions of several jobs, as another lpd-relay writes them ahead, are sent
split in two at every byte offset (and reset there), and whole with a
commit that fails or a disk that fills at the third job: the replies, the
log lines, the counts and the jobs committed must be those of the same
session served by ``Connection`` alone (``relay.server.FAST_LOOP`` off).
Then, with intake workers: a graceful stop mid-run finishes the run, and a
``kill -9`` of the workers mid-run loses no acknowledged job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import relay.server
from relay import _core
from relay.errors import DiskFull
from relay.jobsteps import JobSteps
from tests.daemon import RelayProcess, relay_config, write_config_file
from tests.relayproc import LoggedRelay
from tests.test_ackqueue import _failing_commit
from tests.test_fastsession import (
    _connect,
    _counts,
    _daemon,
    _delivered,
    _exchange,
    _read,
    _source,
    assert_every_split_ends_as_connection_ends_it,
)
from tests.test_server import wait_for
from tests.test_workers import _workers


def _job(n: int, *, data_first: bool = False, name: str = "") -> bytes:
    """Job ``n`` of a session: user ``u<n>``, one data file (``name``: another name)."""
    df = f"dfA{n:03d}host"
    control = f"Hhost\nPu{n}\nJt{n}\nl{df}\n".encode()
    cf = b"\x02%d cfA%03dhost\n" % (len(control), n) + control + b"\x00"
    data = b"job %d\n" % n
    dfile = b"\x03%d %s\n" % (len(data), (name or df).encode()) + data + b"\x00"
    return dfile + cf if data_first else cf + dfile


SESSIONS = {
    "three jobs, control first": b"\x02q\n" + _job(1) + _job(2) + _job(3),
    "three jobs, data first": b"\x02q\n" + b"".join(_job(n, data_first=True)
                                                    for n in (1, 2, 3)),
    "a refusal at the third job": b"\x02q\n" + _job(1) + _job(2) + _job(3, name="dfB003host"),
    "an abort in the third, then a fourth": b"\x02q\n" + _job(1) + _job(2)
    + _job(3)[:40] + b"\x01\n" + _job(4),
    "ends in the third job": b"\x02q\n" + _job(1) + _job(2) + _job(3)[:-3],
}


@pytest.mark.parametrize("name", list(SESSIONS))
def test_every_split_of_a_run_of_jobs_ends_as_connection_ends_it(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_every_split_ends_as_connection_ends_it(tmp_path, monkeypatch, SESSIONS[name])


ACKED = (_core.ReceiveJob, _core.ControlFileStart, _core.ControlFileEnd,
         _core.DataFileStart, _core.DataFileEnd)


def _acks_for(prefix: bytes) -> int:
    """The acks a server owes for ``prefix`` of a session (one a line or file)."""
    parser, n = _core.ServerParser(), 0
    parser.receive_data(prefix)
    while (ev := parser.next_event()) is not _core.NEED_DATA:
        n += isinstance(ev, ACKED)
    parser.release()
    return n


def _reset_mid_run(port: int, prefix: bytes, host: str) -> tuple[bytes, str]:
    """Send ``prefix`` from ``host``, read every ack it is owed (each complete job
    durable by then), then reset the connection in the middle of the session;
    the acks, and the peer the server saw."""
    s, peer = _connect(port, host)
    with s:
        s.sendall(prefix)
        got = _read(s, _acks_for(prefix))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return got, peer


def test_a_reset_at_every_split_of_a_run_ends_as_connection_ends_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = SESSIONS["three jobs, control first"]
    results = []
    for fast in (True, False):
        monkeypatch.setattr(relay.server, "FAST_LOOP", fast)
        with monkeypatch.context() as patch:
            for d in _daemon(tmp_path / str(fast), patch):
                sent = {cut: _reset_mid_run(d.port, session[:cut], _source(cut))
                        for cut in range(1, len(session))}
                wait_for(lambda d=d: d.metric("lpdrelay_inbound_connections") == 0)
                peers = {peer: cut for cut, (_, peer) in sent.items()}
                lines: dict[int, list[Any]] = {cut: [] for cut in sent}
                for level, name, fields in d.events:
                    if (cut := peers.get(str(fields.get("peer")))) is not None:
                        lines[cut].append((level, name, fields.get("error")))
                counts = _counts(d)
                jobs = _delivered(tmp_path / str(fast) / "out",   # held ones stay
                                  int(counts["lpdrelay_jobs_received_total"]
                                      - counts["lpdrelay_jobs_held_total"]))
                results.append(([(cut, sent[cut][0], lines[cut]) for cut in sent],
                                counts, jobs))
    # Every complete job of each prefix was acked and kept (a control file
    # acked without its data file is held: counted too, SPEC §4.2).
    complete = sum(max(0, _acks_for(session[:cut]) - 1) // 4 for cut in range(1, len(session)))
    counts = results[0][1]
    assert counts["lpdrelay_jobs_received_total"] - counts["lpdrelay_jobs_held_total"] == complete
    for mine, theirs in zip(results[0][0], results[1][0], strict=True):
        assert mine == theirs, f"split at byte {mine[0]}"
    assert results[0][1:] == results[1][1:]


def _whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, session: bytes,
           fast: bool, patch_spool: Any) -> tuple[Any, ...]:
    """``session`` sent whole and split at each job boundary, ``patch_spool`` applied."""
    monkeypatch.setattr(relay.server, "FAST_LOOP", fast)
    outcome = []
    with monkeypatch.context() as patch:
        patch_spool(patch)
        for d in _daemon(tmp_path, patch):
            outcome.append(_exchange(d.port, [session])[0])
            wait_for(lambda d=d: d.metric("lpdrelay_inbound_connections") == 0)
            counts = _counts(d)
            jobs = _delivered(tmp_path / "out", int(counts["lpdrelay_jobs_received_total"]))
    return outcome, counts, jobs


RUN = b"\x02q\n" + b"".join(_job(n) for n in range(1, 7))


def test_a_failed_commit_mid_run_ends_as_connection_ends_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Job 3's commit fails, slowly, so jobs 4-6 commit first: 2 jobs acked and
    # kept, the rest removed, the session refused with 0x02 after job 2's ack
    # and job 3's header acks (owed behind it).
    commits: list[list[str]] = [[], []]
    results = [_whole(tmp_path / str(fast), monkeypatch, RUN, fast,
                      lambda p, c=c: _failing_commit(p, "u3", c))
               for fast, c in ((True, commits[0]), (False, commits[1]))]
    assert results[0] == results[1]
    replies = results[0][0][0]
    assert replies.startswith(b"\x00" * 12 + b"\x02") and results[0][1][
        "lpdrelay_jobs_received_total"] == 2
    assert any(u in commits[0] for u in ("u4", "u5", "u6")), commits


def test_a_full_disk_mid_run_ends_as_connection_ends_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_at_third_job(patch: pytest.MonkeyPatch) -> None:
        real, calls = JobSteps._check_space, [0]

        def check_space(self: JobSteps, need: int = 0) -> None:
            calls[0] += 1        # 0x02, then each job's begin and its data file
            if calls[0] >= 6:
                raise DiskFull("spool below min_free_disk (injected)")
            real(self, need)
        patch.setattr(JobSteps, "_check_space", check_space)

    results = [_whole(tmp_path / str(fast), monkeypatch, RUN, fast, full_at_third_job)
               for fast in (True, False)]
    assert results[0] == results[1]
    assert results[0][0][0].startswith(b"\x00" * 9 + b"\x02")
    assert results[0][1]["lpdrelay_jobs_received_total"] == 2
    assert results[0][1]["disk_full"] == 1


def _workers_relay(tmp_path: Path, **server: Any) -> RelayProcess:
    data = relay_config(tmp_path, server={"workers": 2, **server}, metrics={"listen": ""},
                        queues={"q": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    return RelayProcess(write_config_file(tmp_path / "relay.toml", data))


def _titles(out: Path) -> list[str]:
    import orjson
    metas = [orjson.loads(p.read_bytes()) for p in (out / "q").glob("*.json")]
    return [m["title"] for m in sorted(metas, key=lambda m: m["job"])]


def test_a_graceful_stop_mid_run_finishes_the_run_then_ends(tmp_path: Path) -> None:
    first, rest = RUN[:len(b"\x02q\n") + 3 * len(_job(1)) + 20], RUN[
        len(b"\x02q\n") + 3 * len(_job(1)) + 20:]
    with _workers_relay(tmp_path, graceful_timeout="20s") as proc:
        assert proc.proc is not None
        with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as s:
            s.sendall(first)
            assert _read(s, 1 + 4 * 3 + 1) == b"\x00" * 14   # jobs 1-3, job 4's header
            proc.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.proc.poll() is None      # it waits for this connection
            s.sendall(rest)
            assert _read(s, 4 * 3 - 1) == b"\x00" * 11     # the rest of the run
            s.shutdown(socket.SHUT_WR)
            assert s.recv(10) == b""
        assert proc.proc.wait(10) == 0
    with _workers_relay(tmp_path):
        wait_for(lambda: len(_titles(tmp_path / "out")) == 6, timeout=30)
    assert sorted(_titles(tmp_path / "out")) == [f"t{n}" for n in range(1, 7)]


def test_kill9_of_the_workers_mid_run_loses_no_acknowledged_job(tmp_path: Path) -> None:
    jobs = 400
    session = b"\x02q\n" + b"".join(_job(n) for n in range(1, jobs + 1))
    acks = [0]

    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            sender = threading.Thread(target=lambda: _sendall_quietly(s, session))
            sender.start()
            try:
                while chunk := s.recv(4096):
                    assert chunk == b"\x00" * len(chunk)
                    acks[0] += len(chunk)
            except OSError:
                pass
            sender.join(30)

    data = relay_config(tmp_path, server={"workers": 2, "graceful_timeout": "5s"},
                        queues={"q": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    proc = LoggedRelay(write_config_file(tmp_path / "relay.toml", data)).start()
    try:
        thread = threading.Thread(target=client, args=(proc.port,))
        thread.start()
        wait_for(lambda: acks[0] > 1 + 4 * 40, timeout=30)
        for pid in _workers(proc).values():   # the one serving it among them
            os.kill(pid, signal.SIGKILL)
        thread.join(60)
        acked = (acks[0] - 1) // 4        # 4 acks a job after the 0x02 line's
        assert 40 <= acked < jobs
        wait_for(lambda: len(_titles(tmp_path / "out")) >= acked, timeout=60)
        assert not proc.tracebacks()
    finally:
        assert proc.terminate() == 0
    titles = _titles(tmp_path / "out")
    assert {f"t{n}" for n in range(1, acked + 1)} <= set(titles)
    assert len(titles) == len(set(titles))   # in one process's spool: no duplicate


def _sendall_quietly(s: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):   # the worker was killed
        s.sendall(data)


def test_a_burst_past_the_pipeline_depth_is_read_on_after_its_acks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 300 small jobs in one write: one turn of reads completes more than
    # PIPELINE_DEPTH of them, so the connection stops being read until their
    # commits are answered -- which may all come in one pass, in any order.  It
    # must be read again then: the next job, and the EOF, are served.
    burst = b"\x02q\n" + b"".join(_job(n) for n in range(1, 301))
    with monkeypatch.context() as patch:
        for d in _daemon(tmp_path, patch):
            for _ in range(4):       # the commits' wake-up order varies: several tries
                with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
                    s.sendall(burst)
                    assert _read(s, 1 + 4 * 300) == b"\x00" * (1 + 4 * 300)
                    s.sendall(_job(301))
                    assert _read(s, 4) == b"\x00" * 4
                    s.shutdown(socket.SHUT_WR)
                    assert s.recv(1) == b""          # closed: the EOF was read
            assert d.metric("lpdrelay_jobs_received_total", queue="q") == 4 * 301
