"""The delivery scheduler with real sinks, a real spool and trio's MockClock:
order, backoff, failover, hold, release (SPEC §5)."""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import random
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from relay import log, status
from relay.config import config_from_dict
from relay.metrics import Metrics
from relay.scheduler import QueueRunner, backoff_delay
from relay.sinks import DeliveryJob, Sink, SinkContext, make_sink
from relay.spool import JobMeta, Spool


def closed_port() -> int:
    """A loopback port nobody listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def runner_for(tmp_path: Path, destinations: list[str], **queue: object) -> QueueRunner:
    cfg = config_from_dict({"queues": {"ward3": {"destinations": destinations, **queue}},
                            "server": {"spool_dir": str(tmp_path / "spool")}}, "<test>")
    qc = cfg.queues["ward3"]
    metrics = Metrics(CollectorRegistry(), queues=["ward3"], destinations=destinations)
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.recover()
    sinks = [make_sink(d, SinkContext()) for d in qc.destinations]
    return QueueRunner(qc, sinks, spool, metrics, rng=random.Random(7))


async def spool_job(spool: Spool, number: int, payload: bytes = b"data\n") -> JobMeta:
    job = spool.begin(queue="ward3", wire_queue="ward3", peer="127.0.0.1:721")
    writer = job.open_data(f"dfA{number:03d}client")
    writer.write(payload)
    writer.close()
    job.set_control(f"cfA{number:03d}client", b"Hclient\nPalice\nldfA%03dclient\n" % number,
                    number=f"{number:03d}", user="alice", host="client", title="t",
                    job_name="t", formats={f"dfA{number:03d}client": "l"})
    return await spool.commit(job)


async def run_until(runner: QueueRunner, done: Callable[[], bool], seconds: float,
                    poll: float = 0.05) -> None:
    """Run the runner until ``done()`` holds (at most ``seconds``), then stop it."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        with trio.fail_after(seconds):
            while not done():
                await trio.sleep(poll)
        nursery.cancel_scope.cancel()


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(n, initial=1.0, maximum=60.0, rng=rng) for n in range(1, 12)]
    for n, d in enumerate(delays, start=1):
        base = min(60.0, 2.0 ** (n - 1))
        assert base / 2 <= d <= base
    assert backoff_delay(0, initial=1.0, maximum=60.0, rng=rng) == 0.0


def test_jobs_leave_in_arrival_order(tmp_path: Path) -> None:
    log = tmp_path / "order.log"
    script = tmp_path / "record.sh"
    script.write_text(f'#!/bin/sh\ncat >/dev/null\necho "$LPD_JOB_ID" >> {log}\n')
    script.chmod(0o755)
    runner = runner_for(tmp_path, [f"cmd:{script}"])

    async def main() -> None:
        ids = [(await spool_job(runner.spool, n)).id for n in range(1, 16)]
        for job_id in ids:
            runner.submit(runner.spool.get(job_id))
        await run_until(runner, lambda: not runner.spool.jobs(), 30, 0.05)
        assert log.read_text().split() == ids

    trio.run(main)


def test_failover_after_consecutive_failures(tmp_path: Path) -> None:
    down = f"socket://127.0.0.1:{closed_port()}"
    out = tmp_path / "out"
    runner = runner_for(tmp_path, [down, f"dir://{out}"], failover_after=2,
                        retry={"initial": "1s", "max": "4s", "give_up_after": "1h"})

    async def main() -> None:
        runner.submit(await spool_job(runner.spool, 5))
        await run_until(runner, lambda: not runner.spool.jobs(), 60, 0.5)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))
    assert len(list((out / "ward3").glob("*.json"))) == 1
    state = runner.state()
    assert [d.up for d in state.destinations] == [False, True]
    assert state.destinations[1].active


def test_job_is_held_after_give_up_and_released_by_wake(tmp_path: Path) -> None:
    port = closed_port()
    runner = runner_for(tmp_path, [f"socket://127.0.0.1:{port}"],
                        retry={"initial": "1s", "max": "2s", "give_up_after": "10s"})

    async def main() -> None:
        job = await spool_job(runner.spool, 7)
        runner.submit(job)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run)
            with trio.fail_after(120):
                while runner.spool.get(job.id).state != "held":
                    await trio.sleep(0.5)
            held = runner.spool.get(job.id)
            assert held.attempts >= 5 and "gave up" in held.last_error
            assert runner.state().jobs[0].state == "held"
            assert not runner.pending
            # 0x01 / spool retry: released, queued again, retried at once.
            runner.wake()
            assert runner.spool.get(job.id).state == "queued"
            assert [j.id for j in runner.pending] == [job.id] or job.id in runner.in_flight
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))


def test_rejected_job_is_held_at_once_with_the_reason(tmp_path: Path) -> None:
    script = tmp_path / "refuse.sh"
    script.write_text("#!/bin/sh\ncat >/dev/null\necho 'printer says no' >&2\nexit 3\n")
    script.chmod(0o755)
    runner = runner_for(tmp_path, [f"cmd:{script}"])

    async def main() -> None:
        job = await spool_job(runner.spool, 9)
        runner.submit(job)
        await run_until(runner, lambda: runner.spool.get(job.id).state == "held",
                        30, 0.05)
        held = runner.spool.get(job.id)
        assert "printer says no" in held.last_error and held.attempts == 1
        assert runner.failures == 0  # a refusal is not an outage: no backoff

    trio.run(main)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_removal_skips_jobs_in_flight(tmp_path: Path, concurrency: int) -> None:
    fifo_gate = tmp_path / "gate"
    script = tmp_path / "slow.sh"
    script.write_text("#!/bin/sh\ncat >/dev/null\n"
                      f"while [ ! -e {fifo_gate} ]; do sleep 0.05; done\n")
    script.chmod(0o755)
    runner = runner_for(tmp_path, [f"cmd:{script}"], concurrency=concurrency)

    async def main() -> None:
        jobs = [await spool_job(runner.spool, n) for n in range(1, 6)]
        for job in jobs:
            runner.submit(job)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run)
            with trio.fail_after(10):
                while len(runner.in_flight) < concurrency:
                    await trio.sleep(0.02)
            removed = runner.remove([j.id for j in jobs])
            assert sorted(removed) == sorted(j.id for j in jobs[concurrency:])
            assert {j.id for j in runner.spool.jobs()} == {j.id for j in jobs[:concurrency]}
            fifo_gate.write_text("go")
            with trio.fail_after(20):
                while runner.spool.jobs():
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_batch_carries_queued_jobs_in_order_over_few_connections(tmp_path: Path) -> None:
    from tests.peers import RecordingLpdServer
    with RecordingLpdServer() as server:
        runner = runner_for(tmp_path, [f"lpd://127.0.0.1:{server.port}/q?batch=4"])

        async def main() -> None:
            jobs = [await spool_job(runner.spool, n) for n in range(1, 9)]
            for job in jobs:
                runner.submit(job)
            await run_until(runner, lambda: not runner.spool.jobs(), 30, 0.05)

        trio.run(main)
        received = server.wait_jobs(8)
        assert len(server.connections) == 2          # 8 queued jobs, 4 a session
    assert [j.data for j in received] == [b"data\n"] * 8
    # The sink numbers jobs from one counter as it sends them: consecutive
    # numbers in arrival order show the batches kept the queue's order.
    numbers = [int(j.control_name[3:6]) for j in received]
    assert all((b - a) % 1000 == 1 for a, b in itertools.pairwise(numbers))


def test_wake_with_job_ids_releases_only_those(tmp_path: Path) -> None:
    runner = runner_for(tmp_path, [f"dir://{tmp_path / 'out'}"])

    async def main() -> list[JobMeta]:
        return [await spool_job(runner.spool, n) for n in (1, 2, 3)]
    jobs = trio.run(main)
    for job in jobs:
        held = dataclasses.replace(job, state="held", last_error="gave up")
        runner.spool.update(held, durable=True)
        runner.submit(held)
    assert sorted(runner.held) == [j.id for j in jobs] and not runner.pending
    runner.wake([jobs[1].id])                  # `lpd-relay spool retry JOB`
    assert [j.id for j in runner.pending] == [jobs[1].id]
    assert [runner.spool.get(j.id).state for j in jobs] == ["held", "queued", "held"]
    runner.wake()                              # plain 0x01: everything held
    assert [j.id for j in runner.pending] == [jobs[1].id, jobs[0].id, jobs[2].id]
    assert not runner.held


def gauge(runner: QueueRunner, uri: str) -> float:
    return float(runner.metrics.destination_up.labels(destination=uri)._value.get())


def counter(runner: QueueRunner, name: str, **labels: str) -> float:
    return float(getattr(runner.metrics, name).labels(**labels)._value.get())


def test_unusable_destination_starts_down_and_its_jobs_are_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))      # nothing installed
    out = io.StringIO()
    log.configure(fmt="json", level="info", stream=out)
    try:
        runner = runner_for(tmp_path, ["cmd:lp -d ward3", f"dir://{tmp_path / 'out'}"],
                            failover_after=100,
                            retry={"initial": "1s", "max": "2s", "give_up_after": "1h"})
    finally:
        log.configure(stream=None)
    events = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [e["error"] for e in events if e["event"] == "destination_unusable"] == [
        'queues.ward3.destinations[0]: program "lp" not found on PATH']
    # Known bad: DOWN with the reason, and 0, before any job; never tried: 1.
    state = runner.state().destinations
    assert (state[0].up, state[0].last_error) == (False, 'program "lp" not found on PATH')
    assert state[1].up is None
    assert status.render(runner.state(), long=False).splitlines()[2:4] == [
        'destination cmd:lp -d ward3 DOWN (active): program "lp" not found on PATH',
        f"destination dir://{tmp_path / 'out'} not tried yet"]
    assert gauge(runner, "cmd:lp -d ward3") == 0 and gauge(runner, f"dir://{tmp_path}/out") == 1

    async def main() -> None:
        job = await spool_job(runner.spool, 4)
        runner.submit(job)
        await run_until(runner, lambda: runner.spool.get(job.id).attempts >= 3, 60, 0.5)
        assert runner.spool.get(job.id).state == "queued"        # retried, not held

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))
    assert counter(runner, "delivery_retries_total", destination="cmd:lp -d ward3",
                   reason="unavailable") >= 3
    assert counter(runner, "jobs_held_total", queue="ward3") == 0


def test_a_destination_that_refused_the_last_job_is_not_up(tmp_path: Path) -> None:
    script = tmp_path / "refuse.sh"
    script.write_text("#!/bin/sh\ncat >/dev/null\necho 'unknown destination' >&2\nexit 3\n")
    script.chmod(0o755)
    uri = f"cmd:{script}"
    runner = runner_for(tmp_path, [uri])

    async def main() -> None:
        job = await spool_job(runner.spool, 9)
        runner.submit(job)
        await run_until(runner, lambda: runner.spool.get(job.id).state == "held", 30, 0.05)

    trio.run(main)
    [dest] = runner.state().destinations
    assert dest.up is False and "unknown destination" in dest.last_error
    assert gauge(runner, uri) == 0


def test_job_purged_while_delivering_is_forgotten(tmp_path: Path) -> None:
    runner = runner_for(tmp_path, [f"dir://{tmp_path / 'out'}"])

    async def main() -> None:
        job = await spool_job(runner.spool, 3)
        runner.submit(job)
        runner.spool.remove(job.id)          # its files vanish before the attempt
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run)
            with trio.fail_after(10):
                while runner.pending or runner.in_flight:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert not runner.held and not runner.spool.jobs()
    assert counter(runner, "jobs_held_total", queue="ward3") == 0
    # Not the destination's fault: it was never really tried.
    assert runner.state().destinations[0].up is None and runner.failures == 0


def test_job_whose_data_file_vanished_is_held_with_the_path(tmp_path: Path) -> None:
    runner = runner_for(tmp_path, [f"dir://{tmp_path / 'out'}"])

    async def main() -> JobMeta:
        # Over the segment threshold: a data file of its own (a small job has none).
        job = await spool_job(runner.spool, 3, payload=b"x" * 70_000)
        os.unlink(job.files[0].path)
        runner.submit(job)
        await run_until(runner, lambda: job.id in runner.held, 10, 0.02)
        return job

    job = trio.run(main)
    held = runner.spool.get(job.id)
    assert held.state == "held" and job.files[0].path in held.last_error
    assert runner.state().destinations[0].up is None and runner.failures == 0


class _BuggySink(Sink):
    async def deliver(self, job: DeliveryJob) -> None:
        raise ZeroDivisionError("a bug, not an outage")

    def describe(self) -> str:
        return "buggy"


def test_a_sink_bug_is_retried_as_other_and_logged_with_its_type(tmp_path: Path) -> None:
    uri = f"dir://{tmp_path / 'out'}"
    runner = runner_for(tmp_path, [uri], retry={"initial": "1s", "max": "1s",
                                                "give_up_after": "1h"})
    runner.dests[0].sink = _BuggySink(runner.sinks[0].destination, SinkContext())
    out = io.StringIO()

    async def main() -> None:
        job = await spool_job(runner.spool, 2)
        runner.submit(job)
        await run_until(runner, lambda: runner.spool.get(job.id).attempts >= 1, 30, 0.5)

    log.configure(fmt="json", level="info", stream=out)
    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))
    finally:
        log.configure(stream=None)
    assert counter(runner, "delivery_retries_total", destination=uri, reason="other") >= 1
    bugs = [e for e in map(orjson.loads, out.getvalue().splitlines()) if e["event"] == "sink_bug"]
    assert bugs and bugs[0]["exception"] == "ZeroDivisionError"
    assert runner.state().destinations[0].last_error == "ZeroDivisionError: a bug, not an outage"


class _BuggyRun(Sink):
    """A dir:// sink whose own ``deliver_many`` raises what no sink should, once."""

    def __init__(self, real: Sink) -> None:
        super().__init__(real.destination, SinkContext())
        self.real, self.calls = real, 0

    async def deliver(self, job: DeliveryJob) -> None:
        await self.real.deliver(job)

    async def deliver_many(self, jobs: Sequence[DeliveryJob]) -> tuple[int, Exception | None]:
        self.calls += 1
        if self.calls == 1:
            raise KeyError("a bug, not an outage")
        return await self.real.deliver_many(jobs)

    def describe(self) -> str:
        return "dir:// with a bug in its first run"


def test_a_sink_bug_in_a_run_stops_nothing_and_is_retried(tmp_path: Path) -> None:
    # Not caught by the sink's own deliver_many: the scheduler retries it and
    # the queue (and the daemon around it) goes on.
    uri = f"dir://{tmp_path / 'out'}"
    runner = runner_for(tmp_path, [uri], retry={"initial": "1s", "max": "1s",
                                                "give_up_after": "1h"})
    buggy = runner.dests[0].sink = _BuggyRun(runner.sinks[0])
    out = io.StringIO()

    async def main() -> None:
        for n in (1, 2):
            runner.submit(await spool_job(runner.spool, n))
        await run_until(runner, lambda: not runner.spool.jobs(), 30, 0.5)

    log.configure(fmt="json", level="info", stream=out)
    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))
    finally:
        log.configure(stream=None)
    assert buggy.calls > 1 and len(list((tmp_path / "out" / "ward3").glob("*.json"))) == 2
    assert counter(runner, "delivery_retries_total", destination=uri, reason="other") == 1
    bugs = [e for e in map(orjson.loads, out.getvalue().splitlines()) if e["event"] == "sink_bug"]
    assert [b["exception"] for b in bugs] == ["KeyError"]
