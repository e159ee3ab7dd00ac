"""The plain connections' epoll loop (relay.fastsession) against Connection's own path.

Each session is sent split in two at every byte offset, with a pause
between, so the loop has read the first part and waits when the rest comes:
whatever boundary the loop hands the connection over at, the replies, the
log lines, the counts and the jobs committed must be those of the same
session served by ``Connection`` alone (``relay.server.FAST_LOOP`` off).
Then hostile clients on the loop: a slowloris, a giant line, garbage, a
reset mid-job; the server goes on serving.
"""

from __future__ import annotations

import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import relay.log
import relay.server
from relay import fastsession
from tests.daemon import DaemonThread, RelayProcess, relay_config, write_config_file
from tests.test_server import wait_for

PAUSE = 0.02      # long enough for the loop to read the first part and wait


def _control(number: str = "001", files: tuple[str, ...] = ("dfA001host",)) -> bytes:
    lines = ["Hhost", "Palice", "Jtitle"] + [f"l{name}" for name in files]
    return ("\n".join(lines) + "\n").encode()


def _cf(number: str = "001", files: tuple[str, ...] = ("dfA001host",)) -> bytes:
    body = _control(number, files)
    return b"\x02%d cfA%shost\n" % (len(body), number.encode()) + body + b"\x00"


def _df(name: str = "dfA001host", data: bytes = b"hello fast loop\n") -> bytes:
    return b"\x03%d %s\n" % (len(data), name.encode()) + data + b"\x00"


JOB = _cf() + _df()
SESSIONS = {
    "one job, control first": b"\x02q\n" + JOB,
    "one job, data first": b"\x02q\n" + _df() + _cf(),
    "two jobs in one session": b"\x02q\n" + JOB + _cf("002", ("dfA002host",))
    + _df("dfA002host", b"second\n"),
    "lpq": b"\x03q\n",
    "abort, then a job": b"\x02q\n" + _cf() + b"\x01\n" + JOB,
    "until-close data file": b"\x02q\n" + _cf() + b"\x030 dfA001host\nuntil the end\n",
    "unknown queue": b"\x02nosuch\n" + JOB,
    "a data file not named": b"\x02q\n" + _cf() + _df("dfB001host"),
    "garbage after 0x02": b"\x02q\n\x09garbage line\n",
    "ends mid-job": b"\x02q\n" + _cf() + b"\x03100 dfA001host\npartial",
}


def _daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            **server: object) -> Iterator[Any]:
    events: list[tuple[str, str, dict[str, object]]] = []
    original = relay.log.event

    def record(level: str, name: str, /, **fields: object) -> None:
        events.append((level, name, fields))
        original(level, name, **fields)

    monkeypatch.setattr(relay.log, "event", record)
    taken = Counter[str]()
    add = fastsession.FastSessions.add

    def counted(self: Any, *args: Any) -> None:
        taken["loop"] += 1
        add(self, *args)

    monkeypatch.setattr(fastsession.FastSessions, "add", counted)
    config = relay_config(tmp_path, server={"workers": 1, "idle_timeout": "3s",
                                            "command_timeout": "2s", **server},
                          queues={"q": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    with DaemonThread(config) as d:
        d.events, d.taken = events, taken
        yield d


def _source(n: int) -> str:
    """A loopback address of its own for the ``n``-th connection of a run.

    A run's lines are told apart by the peer they name, so no two of its
    connections may be the same peer.  From 127.0.0.1 alone they were not:
    the kernel gives a client port out again to a later connection to the
    same server once its TIME_WAIT is a second old (``tcp_tw_reuse``, on by
    default for loopback), and one cut's lines were read as another's.
    """
    return f"127.1.{n // 250}.{n % 250 + 1}"


def _connect(port: int, host: str) -> tuple[socket.socket, str]:
    """A connection to the daemon from ``host``, and the peer the server sees."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(host, 0))
    return s, ":".join(map(str, s.getsockname()[:2]))


def _exchange(port: int, parts: list[bytes], *, reset: bool = False,
              host: str = "127.0.0.1") -> tuple[bytes, str]:
    """Send ``parts`` with a pause between, from ``host``; every reply byte until the
    server closes, and the peer the server saw."""
    s, peer = _connect(port, host)
    with s:
        for i, part in enumerate(parts):
            if i:
                time.sleep(PAUSE)
            s.sendall(part)
        if reset:
            time.sleep(PAUSE)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return b"", peer
        s.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except ConnectionResetError:
            got += b"<reset>"
    return got, peer


def _outcome(d: Any, session: bytes, *, reset: bool = False) -> list[Any]:
    """For each split of ``session``: the replies, and the connection's log lines."""
    results = []
    for cut in range(1, len(session)):
        # A reset comes right after the first part: mid-job at every split.  (After
        # the whole session, whether the job was read before the reset discarded
        # it is a race, on either path.)
        parts = [session[:cut]] if reset else [session[:cut], session[cut:]]
        replies, peer = _exchange(d.port, parts, reset=reset, host=_source(cut))
        results.append((cut, replies, peer))
    peers = {peer: cut for cut, _, peer in results}
    # The connection's lines come by the time its reply did, or soon after (a hold);
    # each is logged before its connection is counted out.
    wait_for(lambda: d.metric("lpdrelay_inbound_connections") == 0)
    time.sleep(0.2)
    lines: dict[int, list[Any]] = {cut: [] for cut, _, _ in results}
    for level, name, fields in d.events:
        if (cut := peers.get(str(fields.get("peer")))) is not None:
            shown = {k: v for k, v in fields.items() if k not in ("peer", "job")}
            lines[cut].append((level, name, shown))
    return [(cut, replies, lines[cut]) for cut, replies, _ in results]


def _counts(d: Any) -> dict[str, float]:
    names = ["lpdrelay_jobs_received_total", "lpdrelay_jobs_held_total"]
    out = {n: d.metric(n, queue="q") for n in names}
    for reason in ("malformed", "unknown_queue", "too_large", "timeout", "disk_full",
                   "spool_error", "acl"):
        out[reason] = d.metric("lpdrelay_jobs_rejected_total", reason=reason)
    out["connections"] = d.metric("lpdrelay_inbound_connections")
    return out


def _delivered(out: Path, n: int) -> list[tuple[bytes, ...]]:
    folder = out / "q"
    wait_for(lambda: len(list(folder.glob("*.json"))) >= n if n else True, timeout=30)
    time.sleep(0.1)
    jobs = []
    for meta in sorted(folder.glob("*.json")) if folder.exists() else []:
        files = sorted(p for p in folder.glob(meta.stem + "*") if p.suffix != ".json")
        jobs.append(tuple(p.read_bytes() for p in files))
    return sorted(jobs)


def _serve(home: Path, monkeypatch: pytest.MonkeyPatch, session: bytes, *,
           fast: bool) -> tuple[Any, ...]:
    monkeypatch.setattr(relay.server, "FAST_LOOP", fast)
    with monkeypatch.context() as patch:
        for d in _daemon(home, patch):
            outcome = [(cut, replies.replace(str(home).encode(), b"HOME"), lines)
                       for cut, replies, lines in _outcome(d, session)]
            counts = _counts(d)
            jobs = _delivered(home / "out", int(counts["lpdrelay_jobs_received_total"]))
            assert d.taken["loop"] == (len(session) - 1 if fast else 0)
    return outcome, counts, jobs


def assert_every_split_ends_as_connection_ends_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, session: bytes) -> None:
    """The loop and the Python path, each split of ``session``: the same replies and
    lines, the same counts, the same jobs delivered."""
    loop = _serve(tmp_path / "loop", monkeypatch, session, fast=True)
    python = _serve(tmp_path / "python", monkeypatch, session, fast=False)
    for mine, theirs in zip(loop[0], python[0], strict=True):
        assert mine == theirs, f"split at byte {mine[0]}"
    assert loop[1] == python[1]
    assert loop[2] == python[2]


@pytest.mark.parametrize("name", list(SESSIONS))
def test_every_split_of_a_session_ends_as_connection_ends_it(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_every_split_ends_as_connection_ends_it(tmp_path, monkeypatch, SESSIONS[name])


def test_a_reset_at_every_split_ends_as_connection_ends_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = SESSIONS["one job, control first"]
    results = []
    for fast in (True, False):
        monkeypatch.setattr(relay.server, "FAST_LOOP", fast)
        with monkeypatch.context() as patch:
            for d in _daemon(tmp_path / str(fast), patch):
                outcome = _outcome(d, session, reset=True)
                results.append((outcome, _counts(d)))
                wait_for(lambda d=d: d.metric("lpdrelay_inbound_connections") == 0)
    assert any(lines for _, _, lines in results[0][0]), "no connection_lost line at all"
    assert results[0] == results[1]


def _healthy(d: Any, out: Path) -> None:
    """A normal job is still acknowledged, and committed, in good time."""
    before = d.metric("lpdrelay_jobs_received_total", queue="q")
    started = time.monotonic()
    replies, _ = _exchange(d.port, [SESSIONS["one job, control first"]])
    assert replies == b"\x00" * 5
    assert time.monotonic() - started < 1.0
    wait_for(lambda: d.metric("lpdrelay_jobs_received_total", queue="q") == before + 1)


def test_slowloris_clients_time_out_on_the_loop_as_command_timeout_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = b"\x02%d cfA001host\n" % len(_control())
    with monkeypatch.context() as patch:
        for d in _daemon(tmp_path, patch, command_timeout="1s"):
            clients = [socket.create_connection(("127.0.0.1", d.port), timeout=10)
                       for _ in range(20)]
            try:
                for s in clients:
                    s.sendall(b"\x02q\n")
                    assert s.recv(1) == b"\x00"
                started = time.monotonic()
                for i in range(3):               # a byte of the header every 0.3 s
                    for s in clients:
                        s.sendall(line[i:i + 1])
                    time.sleep(0.3)
                _healthy(d, tmp_path / "out")
                for s in clients:
                    assert s.recv(100) == b""    # closed, nothing said (Connection's way)
                took = time.monotonic() - started
            finally:
                for s in clients:
                    s.close()
            assert 1.0 <= took < 1.6, took
            assert d.metric("lpdrelay_jobs_rejected_total", reason="timeout") == 20
            assert d.taken["loop"] == 21
            timeouts = [f for _, name, f in d.events if name == "job_refused"]
            assert {f["error"] for f in timeouts} == {
                "line not complete within 1s (command_timeout)"}


def test_a_client_gone_silent_after_a_full_turn_of_reads_times_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 64 KiB body in one write is sixteen 4 KiB reads, one turn of the loop; if
    # the last one emptied the socket, only the deadline brings the connection back.
    body = b"b" * 65536
    with monkeypatch.context() as patch:
        for d in _daemon(tmp_path, patch, idle_timeout="1s"):
            with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
                s.sendall(b"\x02q\n")
                assert s.recv(1) == b"\x00"
                s.sendall(b"\x03%d dfA001host\n" % len(body))
                assert s.recv(1) == b"\x00"
                started = time.monotonic()
                s.sendall(body)                   # then nothing, and no close
                assert s.recv(100) == b""         # closed, nothing said
                took = time.monotonic() - started
            assert 1.0 <= took < 2.0, took
            assert d.metric("lpdrelay_jobs_rejected_total", reason="timeout") == 1


@pytest.mark.parametrize("what", ["giant line", "garbage", "giant control file"])
def test_hostile_bytes_end_that_connection_only(
        what: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = __import__("random").Random(what)
    payload = {
        "giant line": b"\x02" + b"q" * 200_000,
        "garbage": bytes(rng.randrange(256) for _ in range(100_000)),
        "giant control file": b"\x02q\n\x02999999999 cfA001host\n" + b"N" * 100_000,
    }[what]
    with monkeypatch.context() as patch:
        for d in _daemon(tmp_path, patch):
            for _ in range(5):
                with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
                    try:
                        s.sendall(payload)
                        s.shutdown(socket.SHUT_WR)
                        while s.recv(4096):
                            pass
                    except (ConnectionResetError, BrokenPipeError):
                        pass
            _healthy(d, tmp_path / "out")
            refused = [f for _, name, f in d.events if name == "job_refused"]
            assert len(refused) == 5, refused
            assert d.taken["loop"] == 6
            wait_for(lambda d=d: d.metric("lpdrelay_inbound_connections") == 0)


def _read(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n and (chunk := s.recv(n - len(got))):
        got += chunk
    return got


def test_a_graceful_stop_finishes_the_loops_jobs_then_ends(tmp_path: Path) -> None:
    data = relay_config(tmp_path, server={"graceful_timeout": "20s", "workers": 2},
                        metrics={"listen": ""},
                        queues={"q": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    config = write_config_file(tmp_path / "relay.toml", data)
    with RelayProcess(config) as relay:
        assert relay.proc is not None
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            s.sendall(b"\x02q\n" + _cf())
            assert _read(s, 3) == b"\x00" * 3
            stopped = time.monotonic()
            relay.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)                     # the workers stopped accepting by now
            assert relay.proc.poll() is None    # and wait for this connection
            s.sendall(_df())
            assert _read(s, 2) == b"\x00" * 2  # its data file, and the commit's ack
        assert relay.proc.wait(10) == 0
        assert time.monotonic() - stopped < 10   # not graceful_timeout: when it ended
    with RelayProcess(config):
        wait_for(lambda: len(list((tmp_path / "out" / "q").glob("*.json"))) == 1)


def test_a_graceful_stop_ends_an_idle_loop_connection_at_graceful_timeout(
        tmp_path: Path) -> None:
    data = relay_config(tmp_path, server={"graceful_timeout": "1s", "workers": 2},
                        metrics={"listen": ""})
    with RelayProcess(write_config_file(tmp_path / "relay.toml", data)) as relay:
        assert relay.proc is not None
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            s.sendall(b"\x02q\n" + _cf())
            assert _read(s, 3) == b"\x00" * 3
            stopped = time.monotonic()
            relay.proc.send_signal(signal.SIGTERM)
            assert relay.proc.wait(10) == 0
            assert 0.9 <= time.monotonic() - stopped < 5
            s.settimeout(5)
            assert s.recv(100) == b""            # closed, the partial job discarded


def test_a_workers_commit_that_hangs_ends_at_idle_timeout_without_its_ack(
        tmp_path: Path) -> None:
    # The main process stopped: the worker's commit (written without a task) gets no
    # reply; as Connection's commit, it waits idle_timeout from the last byte, then
    # the connection ends, the job unacknowledged (the sender sends it again).
    data = relay_config(tmp_path, server={"idle_timeout": "1s", "workers": 2},
                        metrics={"listen": ""})
    with RelayProcess(write_config_file(tmp_path / "relay.toml", data)) as relay:
        assert relay.proc is not None
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            s.sendall(b"\x02q\n" + _cf() + _df()[:-1])
            assert _read(s, 4) == b"\x00" * 4
            relay.proc.send_signal(signal.SIGSTOP)
            try:
                s.sendall(b"\x00")                   # the job is complete: its commit
                started = time.monotonic()
                assert s.recv(10) == b""             # closed, no final ack
                took = time.monotonic() - started
            finally:
                relay.proc.send_signal(signal.SIGCONT)
        assert 0.9 <= took < 2.0, took
        assert _exchange(relay.port, [SESSIONS["one job, control first"]])[0] == b"\x00" * 5
