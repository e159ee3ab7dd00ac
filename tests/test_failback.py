"""Failback (docs/delivery.md): a queue on a backup destination returns to its first one.

The timing tests run real hot-folder sinks under trio's MockClock; the last
test uses two real LPD receivers on loopback, the primary closed and then
reopened on its port.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import trio
import trio.testing

from relay.scheduler import QueueRunner
from tests.peers import RecordingLpdServer
from tests.test_scheduler import runner_for, spool_job


def failovers(runner: QueueRunner, direction: str) -> float:
    child = runner.metrics.destination_failovers_total.labels(queue="ward3", direction=direction)
    return float(child._value.get())


def landed(folder: Path) -> int:
    return len(list((folder / "ward3").glob("*.json"))) if folder.exists() else 0


async def wait_for(done: Callable[[], bool], seconds: float, poll: float = 0.01) -> None:
    with trio.fail_after(seconds):
        while not done():
            await trio.sleep(poll)


def broken_primary(tmp_path: Path) -> Path:
    # A hot folder whose base path is a file: every attempt is SinkUnavailable
    # until the file is removed, and then the folder is created.
    primary = tmp_path / "primary"
    primary.write_text("not a folder")
    return primary


def primary_and_backup(tmp_path: Path, *, failover_after: int, failback_after: str,
                       initial: str = "1s", maximum: str = "1s",
                       ) -> tuple[Path, Path, QueueRunner]:
    """A runner over a broken primary hot folder and a working backup one."""
    primary, backup = broken_primary(tmp_path), tmp_path / "backup"
    runner = runner_for(tmp_path, [f"dir://{primary}", f"dir://{backup}"],
                        failover_after=failover_after, failback_after=failback_after,
                        retry={"initial": initial, "max": maximum, "give_up_after": "1h"})
    return primary, backup, runner


def test_queue_fails_back_once_the_primary_delivers(tmp_path: Path) -> None:
    primary, backup, runner = primary_and_backup(
        tmp_path, failover_after=1, failback_after="30s",
        initial="1s", maximum="4s")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run)
            started = trio.current_time()
            runner.submit(await spool_job(runner.spool, 1))
            await wait_for(lambda: landed(backup) == 1, 10)
            failed_over = trio.current_time()
            assert runner.active == 1 and failovers(runner, "failover") == 1
            # The next trial is due failback_after after the failover.
            assert started + 30 <= runner.failback_at <= failed_over + 30
            # Still within failback_after: the backup takes the next job.
            primary.unlink()
            runner.submit(await spool_job(runner.spool, 2))
            await wait_for(lambda: landed(backup) == 2, 10)
            assert trio.current_time() < failed_over + 30 and landed(primary) == 0
            state = runner.state()
            assert [(d.up, d.active) for d in state.destinations] == [(False, False),
                                                                       (True, True)]
            # Past it: the next job is the trial, it delivers, the queue is back.
            await trio.sleep(30)
            runner.submit(await spool_job(runner.spool, 3))
            await wait_for(lambda: landed(primary) == 1, 10)
            await wait_for(lambda: runner.active == 0, 1)
            assert failovers(runner, "failback") == 1 and runner.failback_at == float("inf")
            state = runner.state()
            assert [(d.up, d.active) for d in state.destinations] == [(True, True),
                                                                       (True, False)]
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))


def test_failed_trial_goes_straight_on_to_the_backup(tmp_path: Path) -> None:
    primary, backup, runner = primary_and_backup(
        tmp_path, failover_after=2, failback_after="20s",
        initial="10s", maximum="60s")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run)
            runner.submit(await spool_job(runner.spool, 1))
            await wait_for(lambda: landed(backup) == 1, 100, poll=1)
            assert runner.active == 1
            await trio.sleep(21)
            retries = runner.metrics.delivery_retries_total.labels(
                destination=f"dir://{primary}", reason="unavailable")
            before = retries._value.get()
            started = trio.current_time()
            runner.submit(await spool_job(runner.spool, 2))
            await wait_for(lambda: landed(backup) == 2, 100, poll=0.1)
            # The trial failed: no backoff (10 s here), no failure counted,
            # the next trial a whole failback_after later.
            assert trio.current_time() - started < 2
            assert runner.failures == 0 and runner.active == 1
            assert retries._value.get() == before + 1
            assert runner.failback_at >= started + 20
            assert failovers(runner, "failback") == 0
            assert "hot folder" in runner.state().destinations[0].last_error
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))


def test_failback_after_zero_never_fails_back(tmp_path: Path) -> None:
    primary, backup, runner = primary_and_backup(
        tmp_path, failover_after=1, failback_after="0s")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run)
            runner.submit(await spool_job(runner.spool, 1))
            await wait_for(lambda: landed(backup) == 1, 10)
            primary.unlink()
            await trio.sleep(3600)
            runner.submit(await spool_job(runner.spool, 2))
            await wait_for(lambda: landed(backup) == 2, 10)
            assert landed(primary) == 0 and runner.active == 1
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))


def test_wake_tries_the_primary_at_once(tmp_path: Path) -> None:
    primary, backup, runner = primary_and_backup(
        tmp_path, failover_after=1, failback_after="1h")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run)
            runner.submit(await spool_job(runner.spool, 1))
            await wait_for(lambda: landed(backup) == 1, 10)
            primary.unlink()
            runner.wake()                       # LPD 0x01 "print waiting jobs"
            runner.submit(await spool_job(runner.spool, 2))
            await wait_for(lambda: landed(primary) == 1, 10)
            assert trio.current_time() < 3600
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))


def test_real_receivers_primary_closed_then_reopened(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])       # closed: connecting is refused
    with RecordingLpdServer() as backup:
        runner = runner_for(
            tmp_path, [f"lpd://127.0.0.1:{port}/ward3", f"lpd://127.0.0.1:{backup.port}/ward3"],
            failover_after=1, failback_after="500ms",
            retry={"initial": "100ms", "max": "200ms", "give_up_after": "1h"})
        primary = RecordingLpdServer(port=port)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(runner.run)
                runner.submit(await spool_job(runner.spool, 1))
                await wait_for(lambda: len(backup.jobs) == 1, 10, 0.02)
                assert runner.state().destinations[0].up is False
                primary.start()
                # One job every 100 ms: within a failback_after one is the trial.
                for number in range(2, 40):
                    if primary.jobs:
                        break
                    runner.submit(await spool_job(runner.spool, number))
                    await trio.sleep(0.1)
                await wait_for(lambda: not runner.spool.jobs(), 10, 0.02)
                before = len(primary.jobs)
                runner.submit(await spool_job(runner.spool, 99))
                await wait_for(lambda: len(primary.jobs) == before + 1, 10, 0.02)
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        finally:
            primary.stop()
    assert runner.active == 0 and failovers(runner, "failback") == 1
    assert [d.up for d in runner.state().destinations] == [True, True]
    assert primary.jobs[-1].data == b"data\n"
