"""Relay -> relay: the lpd:// sink finds another lpd-relay from its lpq answer
and sends it several jobs per 0x02 session, pipelined; any other receiver keeps
one job a connection.  Order and "delivered only at its own ack" must hold."""

from __future__ import annotations

from pathlib import Path

import trio

from relay import status
from relay.sinks import SinkContext, make_sink
from relay.sinks.lpd import AUTO_BATCH, LpdSink
from relay.spool import JobMeta, Spool
from relay.uri import parse_destination
from tests.daemon import DaemonThread, relay_config
from tests.peers import LpdScript, RecordingLpdServer
from tests.relayproc import relay_lpq
from tests.test_sink_lpd import make_job, make_job_in


def _jobs(tmp_path: Path, count: int, big: int | None = None) -> tuple[Spool, list[JobMeta]]:
    spool, first = make_job(tmp_path, [b"first job\n"])
    jobs = [first] + [make_job_in(spool, n) for n in range(2, count + 1)]
    if big is not None:   # job number `big` gets a data file past the receiver's limit
        jobs[big - 1] = _big_job(spool, big)
    return spool, jobs


def _big_job(spool: Spool, n: int) -> JobMeta:
    async def build() -> JobMeta:
        job = spool.begin(queue="ward3", wire_queue="ward3", peer="10.1.2.3:721")
        name = f"dfA{n:03d}host"
        writer = job.open_data(name)
        writer.write(b"x" * 4096)
        writer.close()
        job.set_control(f"cfA{n:03d}host", f"Hhost\nPu{n}\nl{name}\n".encode(),
                        number=f"{n:03d}", user=f"u{n}", host="host", title="", job_name="",
                        formats={name: "l"})
        return await spool.commit(job)
    return trio.run(build)


def _receiver(tmp_path: Path, **server: object) -> DaemonThread:
    # B keeps what it takes (its own destination is down) so lpq shows its order.
    cfg = relay_config(tmp_path / "b", server={"spool_dir": str(tmp_path / "b-spool"),
                                               **server},
                       retry={"initial": "1h", "max": "1h"},
                       queues={"q": {"destinations": ["socket://127.0.0.1:1"]}})
    return DaemonThread(cfg)


def _deliver(sink: LpdSink, jobs: list[JobMeta]) -> tuple[int, Exception | None]:
    async def main() -> tuple[int, Exception | None]:
        with trio.fail_after(30):
            return await sink.deliver_many(jobs)
    return trio.run(main)


def _owners(lpq: str) -> list[str]:
    """The Owner column of lpq's table, in rank order (an in-flight job shows "active")."""
    rows = [line.split() for line in lpq.splitlines()]
    return [r[1] for r in rows if r and (r[0][:1].isdigit() or r[0] == "active")]


def test_relay_receiver_gets_pipelined_batches_in_order(tmp_path: Path) -> None:
    _, jobs = _jobs(tmp_path, 12)
    with _receiver(tmp_path) as b:
        sink = make_sink(parse_destination(f"lpd://127.0.0.1:{b.port}/q"), SinkContext())
        assert isinstance(sink, LpdSink) and sink.batch == 1     # not known yet
        assert _deliver(sink, jobs) == (12, None)
        assert (sink.relay_peer, sink.batch) == (True, AUTO_BATCH)
        answer = relay_lpq(b.port)
    assert status.SERVER_LINE in answer
    assert _owners(answer) == ["nurse"] + [f"u{n}" for n in range(2, 13)]


def test_a_refusal_mid_batch_keeps_the_jobs_before_it(tmp_path: Path) -> None:
    # Job 4 is larger than B takes: B refuses it, so 1-3 count, 4-6 do not.
    _, jobs = _jobs(tmp_path, 6, big=4)
    with _receiver(tmp_path, max_job_size="1KiB") as b:
        sink = make_sink(parse_destination(f"lpd://127.0.0.1:{b.port}/q"), SinkContext())
        done, error = _deliver(sink, jobs)
        assert sink.relay_peer is True
        answer = relay_lpq(b.port)
    assert done == 3 and error is not None
    assert _owners(answer) == ["nurse", "u2", "u3"]


def test_other_receivers_keep_one_job_per_connection(tmp_path: Path) -> None:
    _, jobs = _jobs(tmp_path, 3)
    with RecordingLpdServer(LpdScript(status_text=b"q is ready\nno entries\n")) as server:
        sink = make_sink(parse_destination(f"lpd://127.0.0.1:{server.port}/q"), SinkContext())
        assert isinstance(sink, LpdSink)
        for job in jobs:
            assert _deliver(sink, [job]) == (1, None)
        assert (sink.relay_peer, sink.batch) == (False, 1)
        server.wait_jobs(3)
        # One lpq, then one connection per job.
        assert len(server.connections) == 4


def test_explicit_batch_skips_detection(tmp_path: Path) -> None:
    _, jobs = _jobs(tmp_path, 2)
    with _receiver(tmp_path) as b:
        sink = make_sink(parse_destination(f"lpd://127.0.0.1:{b.port}/q?batch=1"),
                         SinkContext())
        assert isinstance(sink, LpdSink)
        assert sink.batch == 1
        assert _deliver(sink, jobs) == (2, None)
        assert sink.relay_peer is None                # never asked


def test_unreachable_receiver_is_asked_again(tmp_path: Path) -> None:
    _, jobs = _jobs(tmp_path, 1)
    sink = make_sink(parse_destination("lpd://127.0.0.1:1/q?timeout=2s"), SinkContext())
    assert isinstance(sink, LpdSink)
    done, error = _deliver(sink, jobs)
    assert done == 0 and error is not None and sink.relay_peer is None


def test_is_relay_answer() -> None:
    assert status.is_relay_answer(f"q is ready\nno entries\n{status.SERVER_LINE}\n")
    assert not status.is_relay_answer("q is ready and printing\nRank Owner Job Files\n")
    assert not status.is_relay_answer("")


def test_loadgen_processes_report_their_cpu(tmp_path: Path) -> None:
    from relay.loadgen import run_load_processes
    with _receiver(tmp_path) as b:
        result = run_load_processes(f"lpd://127.0.0.1:{b.port}/q", jobs=40, concurrency=8,
                                    size=512, processes=2)
        answer = relay_lpq(b.port)
    assert (result.ok, result.processes, result.failures) == (40, 2, {})
    assert result.cpu_seconds > 0 and result.summary()["loadgen_cpu_ms_per_job"] > 0
    # Titles are "load <n>": the two processes numbered their jobs apart.
    rows = [line.split() for line in answer.splitlines()]
    titles = sorted(int(r[4]) for r in rows if len(r) > 4 and r[3] == "load")
    assert titles == list(range(40))
