"""Intake in worker processes (``[server] workers = 2``, SPEC §12): a real daemon subprocess.

Jobs on many connections arrive once each, in per-queue order as acked;
both workers serve connections; lpq and lprm through one worker answer for
jobs the other received; ``kill -9`` of a worker loses no acknowledged job;
SIGTERM stops every process; ``kill -9`` of the main process ends the
workers and a restart delivers every acknowledged job.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import trio
from prometheus_client import CollectorRegistry

from relay.app import one_process_reason
from relay.config import config_from_dict
from relay.context import Delivery
from relay.errors import SpoolError
from relay.intakechannel import CallClient, Channel, Commit, Control, Reply
from relay.metrics import Metrics
from relay.sinks import SinkContext, make_sink
from relay.spool import JobMeta, Spool
from relay.spoolbackend import Session
from relay.spoolproxy import IncomingProxy, SpoolProxy
from relay.uri import parse_destination
from relay.workerjobs import Prepared, WorkerJobs
from tests.daemon import relay_config, write_config_file
from tests.lpdwire import Job, Wire, send_job
from tests.relayproc import LoggedRelay, wait_until
from tests.test_ackqueue import _failing_commit, _spooled_users
from tests.test_relay_batching import _deliver, _jobs, _receiver
from tests.test_tls import job_stream

DOWN = "socket://127.0.0.1:1"
SLOW_RETRY = {"initial": "1h", "max": "1h", "give_up_after": "24h"}


def _relay(tmp_path: Path, queues: dict[str, Any], **sections: Any) -> LoggedRelay:
    data = relay_config(tmp_path, server={"workers": 2, "graceful_timeout": "5s"},
                        queues=queues, **sections)
    return LoggedRelay(write_config_file(tmp_path / "relay.toml", data)).start()


def _workers(relay: LoggedRelay) -> dict[int, int]:
    """Worker index -> pid of the worker running now (the last one started)."""
    return {ev["worker"]: ev["pid"] for ev in relay.events("worker_started")}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _metric(relay: LoggedRelay, line_start: str) -> float:
    text = urllib.request.urlopen(relay.metrics_url(), timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(line_start))


def _established_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    inodes.add(fields[9])
    return inodes


def _held_by(pid: int, inodes: set[str]) -> int:
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            held += 1
    return held


def _delivered(out: Path, queue: str) -> list[dict[str, Any]]:
    folder = out / queue
    if not folder.is_dir():
        return []
    return sorted((orjson.loads(p.read_bytes()) for p in folder.glob("*.json")),
                  key=lambda m: m["job"])


def _send_acked(port: int, job: Job, tries: int = 5) -> tuple[bool, int]:
    """Send until every step is acked (at most ``tries``); (acked, failed attempts)."""
    for attempt in range(tries):
        try:
            if all(r == 0 for r in send_job(port, job)):
                return True, attempt
        except OSError:
            pass
        time.sleep(0.05)
    return False, tries


def test_jobs_on_many_connections_arrive_once_in_per_queue_order(tmp_path: Path) -> None:
    relay = _relay(tmp_path, {"lp": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    acked: dict[int, list[str]] = {t: [] for t in range(8)}

    def sender(t: int) -> None:
        for i in range(10):
            job = Job(queue="lp", number=f"{t}{i:02d}", title=f"t{t}-{i:02d}",
                      files=[f"job {t}-{i}\n".encode() * (1 + i * 900)])   # up to ~90 KiB
            ok, _ = _send_acked(relay.port, job, tries=1)
            assert ok
            acked[t].append(job.title)
    try:
        threads = [threading.Thread(target=sender, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert all(len(titles) == 10 for titles in acked.values())
        metas = wait_until(lambda: (m := _delivered(tmp_path / "out", "lp")) and
                           len(m) >= 80 and m, timeout=30)
        time.sleep(0.3)
        metas = _delivered(tmp_path / "out", "lp")
        titles = [m["title"] for m in metas]
        assert len(titles) == 80 and len(set(titles)) == 80, "each job exactly once"
        for t, sent in acked.items():   # a connection's later job has the later spool id
            assert [x for x in titles if x.startswith(f"t{t}-")] == sent
        # Delivered in order as acked: a job acked before another was sent
        # has its metadata written first.
        mtime = {m["title"]: os.stat(tmp_path / "out" / "lp" / f"{m['job']}.json").st_mtime_ns
                 for m in metas}
        for sent in acked.values():
            assert [mtime[x] for x in sent] == sorted(mtime[x] for x in sent)
        assert _metric(relay, 'lpdrelay_jobs_received_total{queue="lp"}') == 80
        assert not relay.tracebacks()
    finally:
        assert relay.terminate() == 0


def test_both_workers_serve_and_lpq_lprm_answer_for_the_whole_daemon(tmp_path: Path) -> None:
    relay = _relay(tmp_path, {"held": {"destinations": [DOWN]}}, retry=SLOW_RETRY)
    idle: list[Wire] = []
    try:
        pids = _workers(relay)
        assert len(pids) == 2
        idle = [Wire(relay.port) for _ in range(24)]
        wait_until(lambda: _metric(relay, "lpdrelay_inbound_connections") >= 24)
        inodes = _established_inodes(relay.port)
        held = {i: _held_by(pid, inodes) for i, pid in pids.items()}
        assert all(n > 0 for n in held.values()), f"connections per worker: {held}"
        assert sum(held.values()) >= 24
        for i in range(6):
            assert _send_acked(relay.port, Job(queue="held", number=f"{101 + i}"))[0]
        # lpq through every idle connection: both workers' answers list all six.
        for w in idle[:12]:
            w.send(b"\x04held\n")
            assert w.read_all().decode().count("spool id") == 6
        w = idle[12]
        w.send(b"\x05held alice 106\n")
        assert b"dequeued" in w.read_all()
        for w in idle[13:]:
            w.send(b"\x04held\n")
            answer = w.read_all().decode()
            assert answer.count("spool id") == 5 and "[job 106 " not in answer
    finally:
        for w in idle:
            w.close()
        assert relay.terminate() == 0


def test_kill9_of_a_worker_loses_no_acknowledged_job(tmp_path: Path) -> None:
    relay = _relay(tmp_path, {"lp": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    acked: list[str] = []
    failed = [0]
    lock = threading.Lock()

    def sender(t: int) -> None:
        for i in range(40):
            job = Job(queue="lp", number=f"{t}{i:02d}", title=f"k{t}-{i:02d}",
                      files=[b"x" * (100 if i % 3 else 200_000)])
            ok, failures = _send_acked(relay.port, job)
            with lock:
                failed[0] += failures
                if ok:
                    acked.append(job.title)
            time.sleep(0.005)
    try:
        victim = _workers(relay)[0]
        threads = [threading.Thread(target=sender, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        wait_until(lambda: len(acked) >= 30, timeout=30)
        os.kill(victim, signal.SIGKILL)
        for th in threads:
            th.join(120)
        assert len(acked) == 160, "every job was acked in the end (retried when refused)"
        wait_until(lambda: relay.events("worker_exited"))
        wait_until(lambda: _workers(relay)[0] != victim and _alive(_workers(relay)[0]))
        assert all(r == 0 for r in send_job(relay.port, Job(queue="lp", title="after")))
        wait_until(lambda: "after" in {m["title"] for m in _delivered(tmp_path / "out", "lp")},
                   timeout=30)
        titles = [m["title"] for m in _delivered(tmp_path / "out", "lp")]
        assert set(acked) | {"after"} <= set(titles)
        # A duplicate needs a commit whose ack the killed worker could not send.
        assert len(titles) - len(set(titles)) <= failed[0]
        assert not relay.tracebacks()
    finally:
        assert relay.terminate() == 0


def test_sigterm_stops_the_main_process_and_every_worker(tmp_path: Path) -> None:
    relay = _relay(tmp_path, {"lp": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    pids = list(_workers(relay).values())
    assert all(r == 0 for r in send_job(relay.port, Job(queue="lp")))
    started = time.monotonic()
    assert relay.terminate(timeout=30) == 0
    assert time.monotonic() - started < 10
    wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10)
    assert not relay.tracebacks()


def test_kill9_of_main_ends_the_workers_and_a_restart_recovers_every_job(
        tmp_path: Path) -> None:
    relay = _relay(tmp_path, {"held": {"destinations": [DOWN]}}, retry=SLOW_RETRY)
    pids = list(_workers(relay).values())
    for i in range(10):
        assert _send_acked(relay.port, Job(queue="held", number=f"{200 + i}",
                                           files=[b"y" * ((i + 1) * 20_000)]), tries=1)[0]
    relay.kill9()
    wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10)
    again = LoggedRelay(relay.config_file).start()
    try:
        assert any("10 job(s) recovered" in line for line in again.banner)
        with Wire(again.port) as w:
            w.send(b"\x04held\n")
            assert w.read_all().decode().count("spool id") == 10
    finally:
        assert again.terminate() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_1_is_one_process(tmp_path: Path, workers: int) -> None:
    data = relay_config(tmp_path, server={"workers": workers})
    relay = LoggedRelay(write_config_file(tmp_path / "relay.toml", data)).start()
    try:
        assert len(_workers(relay)) == (0 if workers == 1 else 2)
        assert all(r == 0 for r in send_job(relay.port, Job()))
    finally:
        assert relay.terminate() == 0


@pytest.mark.parametrize("section", ["audit", "retention"])
def test_audit_and_retention_run_in_the_workers(tmp_path: Path, section: str) -> None:
    extra: dict[str, Any] = {"audit": {"rotate_keep": 2}} if section == "audit" else \
        {"retention": {"keep": "1h"}}
    data = relay_config(tmp_path, server={"workers": 2}, **extra)
    relay = LoggedRelay(write_config_file(tmp_path / "relay.toml", data)).start()
    try:
        assert len(_workers(relay)) == 2
        assert relay.events("intake_in_one_process") == []
        assert all(r == 0 for r in send_job(relay.port, Job()))
    finally:
        assert relay.terminate() == 0


def test_the_postgresql_spool_keeps_intake_in_one_process(tmp_path: Path) -> None:
    config = config_from_dict(relay_config(tmp_path, server={"workers": 2}), "<test>")
    assert one_process_reason(config, Spool(tmp_path / "spool")) == ""
    not_local = cast(Spool, object())      # any other backend: the PostgreSQL spool
    assert "postgresql" in one_process_reason(config, not_local)


@pytest.mark.parametrize("size", [100, 200_000])   # kept in memory; streamed to a spool file
def test_a_workers_audit_records_carry_the_proxy_source_and_the_sha256s(
        tmp_path: Path, size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"end\n"
    data = relay_config(tmp_path, server={"workers": 2, "proxy_protocol": True,
                                          "proxy_trusted": ["127.0.0.1/32"]},
                        audit={"rotate_keep": 2})
    relay = LoggedRelay(write_config_file(tmp_path / "relay.toml", data)).start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            s.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 515\r\n" + job_stream("q", payload))
            got = b""
            while len(got) < 5 and (chunk := s.recv(16)):
                got += chunk
        assert got == b"\0" * 5
        # The final ack came after both records were written: they are there now.
        recs = [orjson.loads(x) for x in (tmp_path / "spool" / "audit" / "audit.log")
                .read_bytes().splitlines()]
    finally:
        assert relay.terminate() == 0
    [received] = [r for r in recs if r["event"] == "received"]
    [acked] = [r for r in recs if r["event"] == "acknowledged"]
    assert received["peer"] == acked["peer"] == "192.0.2.7:40001"
    assert received["files"] == [{"name": "dfA123client", "format": "l", "bytes": len(payload),
                                  "sha256": hashlib.sha256(payload).hexdigest()}]
    assert acked["seq"] > received["seq"] and acked["job"] == received["job"]


# -- the main process's half of a worker's commits (relay.workerjobs), in one process --

class _Submitted:
    """A ``Delivery`` that keeps what intake handed it."""

    def __init__(self) -> None:
        self.jobs: list[str] = []

    def submit(self, job: JobMeta) -> None:
        self.jobs.append(job.id)

    def remove(self, queue: str, job_ids: Sequence[str]) -> list[str]:
        return []


def _commit_message(rid: int, token: str, *, previous: str = "",
                    promoted: bool = False) -> Commit:
    control = Control(name=f"cfA{rid:03d}client", raw=b"Hclient\nPalice\nldfA001client\n",
                      number=f"{rid:03d}", user="alice", host="client", title="t",
                      job_name="t", formats={"dfA001client": "l"})
    return Commit(rid=rid, token=token, queue="lp", wire_queue="lp", peer="127.0.0.1:721",
                  tls_peer="", control=control, files=(("dfA001client", b"data\n"),),
                  promoted=promoted, hold="", previous=previous)


def _worker_jobs(tmp_path: Path) -> tuple[WorkerJobs, Spool, _Submitted, Metrics]:
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.recover()
    metrics = Metrics(CollectorRegistry(), queues=["lp"], destinations=[])
    delivery = _Submitted()
    return WorkerJobs(spool, cast(Delivery, delivery), metrics), spool, delivery, metrics


def _received(metrics: Metrics) -> float:
    return metrics.jobs_received_total.labels(queue="lp")._value.get()  # type: ignore[no-any-return]


async def _pipelined(jobs: WorkerJobs, *messages: Commit) -> list[Reply]:
    """The messages as a worker's stream brings them: prepared in order, committed at once."""
    replies: dict[int, Reply] = {}

    async def one(message: Commit, prepared: Prepared) -> None:
        replies[message.rid] = await jobs.commit(message, prepared)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for message in messages:
                nursery.start_soon(one, message, jobs.prepare(message))
    return [replies[m.rid] for m in messages]


def test_a_commit_behind_a_failed_one_on_its_connection_is_removed_and_not_counted(
        tmp_path: Path) -> None:
    # Job 1's spool file is gone (its commit fails); job 2 names it as the job
    # before it, still unanswered: never acknowledged, so removed and not counted.
    jobs, spool, delivery, metrics = _worker_jobs(tmp_path)
    first, second = _commit_message(1, "w-1", promoted=True), _commit_message(2, "w-2",
                                                                             previous="w-1")
    replies = trio.run(_pipelined, jobs, first, second)
    assert [r.failure is not None for r in replies] == [True, True]
    assert spool.jobs() == [] and delivery.jobs == []
    assert _received(metrics) == 0
    # A third naming job 2 after both were answered: refused the same way.
    [late] = trio.run(_pipelined, jobs, _commit_message(3, "w-3", previous="w-2"))
    assert late.failure is not None and spool.jobs() == [] and _received(metrics) == 0


def test_a_commit_is_with_delivery_when_its_reply_goes_and_in_connection_order(
        tmp_path: Path) -> None:
    jobs, spool, delivery, metrics = _worker_jobs(tmp_path)
    messages = [_commit_message(1, "w-1"), *(_commit_message(i, f"w-{i}", previous=f"w-{i - 1}")
                                            for i in range(2, 6))]
    replies = trio.run(_pipelined, jobs, *messages)
    ids = [cast(JobMeta, r.value).id for r in replies]
    assert delivery.jobs == ids == sorted(ids) and len(spool.jobs()) == 5
    assert _received(metrics) == 5


@pytest.mark.parametrize("workers", [1, 2])
def test_jobs_removed_behind_a_failed_pipelined_commit_are_not_counted_as_received(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    # Another lpd-relay sends 8 jobs ahead; job 4's commit fails (slowly, so
    # jobs behind it commit first): 3 acked, the rest removed, 3 counted.
    _, jobs = _jobs(tmp_path, 8)
    commits: list[str] = []
    _failing_commit(monkeypatch, "u4", commits)
    with _receiver(tmp_path, workers=workers) as b:
        sink = make_sink(parse_destination(f"lpd://127.0.0.1:{b.port}/q"), SinkContext())
        done, error = _deliver(sink, jobs)
        received = b.metric("lpdrelay_jobs_received_total", queue="q")
    assert done == 3 and error is not None
    assert any(u in commits for u in ("u5", "u6", "u7", "u8")), commits
    assert _spooled_users(tmp_path / "b-spool") == ["nurse", "u2", "u3"]
    assert received == 3


def test_a_workers_commit_names_the_unanswered_job_before_it_past_a_discarded_one(
        tmp_path: Path) -> None:
    config = config_from_dict(relay_config(tmp_path), "<test>")
    (tmp_path / "spool").mkdir()
    proxy = SpoolProxy(config, cast(Channel, None), cast(CallClient, None))
    connection = Session()

    def begin() -> IncomingProxy:
        return proxy.begin(queue="lp", wire_queue="lp", peer="127.0.0.1:721",
                           session=connection)

    async def session() -> None:   # in trio: the proxy reads trio's clock
        a, b, c = begin(), begin(), begin()
        assert not b.its_turn()             # a has not sent its Commit: b takes no id yet
        a.sent.set()                        # a's Commit is out, its reply not yet in
        b.discard()                         # b aborted: c comes right after a
        assert c.its_turn() and c.commit_message(3, "").previous == a.token
        d = begin()                         # behind c, which is not answered either
        proxy.answered(a, failed=True)      # a's commit failed: c fails here
        with pytest.raises(SpoolError):
            c.commit_message(3, "")
        d.sent.set()                        # d names c: the main process decides it after c
        e = begin()
        assert d.previous is c and e.commit_message(5, "").previous == d.token
        for job in (c, d, e):
            proxy.answered(job, failed=True)
        assert c.previous is None and d.previous is None   # answered: no chain kept
        late = begin()
        with pytest.raises(SpoolError):     # a job begun after the session's failure fails
            late.commit_message(6, "")
        proxy.answered(late, failed=True)
        assert connection.last is None      # every job answered: none kept for it
        # A new connection from the same host and port knows nothing of that one.
        fresh = proxy.begin(queue="lp", wire_queue="lp", peer="127.0.0.1:721",
                            session=Session())
        assert fresh.commit_message(7, "").previous == ""
    trio.run(session)


def test_a_new_connection_from_the_port_of_a_failed_commit_has_its_job_accepted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # RFC 1179 senders use source ports 721-731 only, so a port is soon used
    # again: a failed commit is that connection's alone, not its source port's.
    # (The same four-tuple reaches the same worker under SO_REUSEPORT.)
    commits: list[str] = []
    _failing_commit(monkeypatch, "doomed", commits)
    with _receiver(tmp_path, workers=2) as b:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        source = probe.getsockname()[1]
        probe.close()
        replies = []
        for user in ("doomed", "fine", "fine2"):
            job = Job(queue="q", number=str(100 + len(replies)), user=user)
            with Wire(b.port, source_port=source) as w:
                replies.append(_send_on(w, job))
                # Closed with a reset: no TIME_WAIT keeps the next connect off the port.
                w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        received = b.metric("lpdrelay_jobs_received_total", queue="q")
    assert replies[0][-1] != 0 and replies[1:] == [[0, 0, 0, 0, 0]] * 2, replies
    assert commits == ["fine", "fine2"] and received == 2
    assert _spooled_users(tmp_path / "b-spool") == ["fine", "fine2"]


def _send_on(w: Wire, job: Job) -> list[int]:
    """One job, control file first, on ``w``: every reply byte (stops at a refusal)."""
    w.send(b"\x02" + job.queue.encode() + b"\n")
    replies = [w.reply()]
    cf = job.control()
    for code, name, data in [(b"\x02", job.cf_name, cf),
                             (b"\x03", job.df_names()[0], job.files[0])]:
        if replies[-1] != 0:
            break
        w.send(code + str(len(data)).encode() + b" " + name.encode() + b"\n")
        replies.append(w.reply())
        if replies[-1] == 0:
            w.send(data + b"\0")
            replies.append(w.reply())
    return replies
