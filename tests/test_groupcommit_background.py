"""Background items in the group commit (a delivery's removals) and the syncs
a delivery owes: a commit that arrives during a removal's flush is flushed in
that same hand-off, and a stop right after a delivery leaves its DONE durable."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from relay.errors import SpoolError
from relay.groupcommit import GroupCommit
from relay.scheduler import QueueRunner
from relay.spool import Spool
from tests.test_groupcommit import until
from tests.test_scheduler import runner_for, spool_job


class Gated:
    """A flush recording its batches; a batch holding ``gate_on`` waits for ``open()``."""

    def __init__(self, gate_on: int, fail: frozenset[int] = frozenset()) -> None:
        self.batches: list[list[int]] = []
        self.gate_on = gate_on
        self.fail = fail
        self.gate = threading.Event()
        self.after = 0

    def __call__(self, items: list[int]) -> list[Exception | None]:
        self.batches.append(list(items))
        if self.gate_on in items:
            assert self.gate.wait(10), "test never opened the flush"
        return [SpoolError(f"item {i}") if i in self.fail else None for i in items]

    def count_after(self) -> None:
        self.after += 1


async def background(group: GroupCommit[int], item: int) -> None:
    await group.submit(item, background=True)


def test_a_commit_during_a_background_flush_rides_its_hand_off() -> None:
    flush = Gated(gate_on=0)
    group: GroupCommit[int] = GroupCommit(flush, after=flush.count_after)
    acked: list[int] = []

    async def commit(i: int) -> None:
        await group.submit(i)
        acked.append(i)

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(background, group, 0)   # background: a removal's sync
                await until(lambda: flush.batches == [[0]])
                nursery.start_soon(commit, 1)
                await until(lambda: bool(group._pending))
                flush.gate.set()

    trio.run(main)
    # Two flushes in one hand-off: the commit did not wait for the event loop
    # to take it back and lead a second one (``after`` ran once, after both).
    assert flush.batches == [[0], [1]] and acked == [1]
    assert flush.after == 1
    assert group.statistics().batches == 1 and group.statistics().items == 2


def test_a_commit_behind_an_acknowledged_batch_waits_for_its_own_flush() -> None:
    flush = Gated(gate_on=0, fail=frozenset({2}))
    group: GroupCommit[int] = GroupCommit(flush, after=flush.count_after)
    outcome: dict[int, str] = {}

    async def commit(i: int) -> None:
        try:
            await group.submit(i)
            outcome[i] = "ok"
        except SpoolError as exc:
            outcome[i] = str(exc)

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(commit, 0)   # a commit: its ack must not wait for more
                await until(lambda: flush.batches == [[0]])
                nursery.start_soon(commit, 2)
                await until(lambda: bool(group._pending))
                flush.gate.set()

    trio.run(main)
    assert flush.batches == [[0], [2]] and flush.after == 2
    assert outcome == {0: "ok", 2: "item 2"}   # each item still gets its own result


def test_a_cancelled_commit_taken_by_the_flush_thread_waits_for_it() -> None:
    flush = Gated(gate_on=0)
    release = threading.Event()
    original = flush.__call__

    def slow(items: list[int]) -> list[Exception | None]:
        result = original(items)
        if 1 in items:
            assert release.wait(10)
        return result

    group: GroupCommit[int] = GroupCommit(slow)
    returned: list[str] = []

    async def commit(scope: trio.CancelScope) -> None:
        with scope:
            await group.submit(1)
        returned.append("cancelled" if scope.cancelled_caught else "done")

    async def main() -> None:
        with trio.fail_after(10):
            scope = trio.CancelScope()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(background, group, 0)
                await until(lambda: flush.batches == [[0]])
                nursery.start_soon(commit, scope)
                await until(lambda: bool(group._pending))
                flush.gate.set()
                await until(lambda: flush.batches == [[0], [1]])
                scope.cancel()        # the flush thread holds the item now
                await trio.sleep(0.05)
                assert returned == []  # not returned while the thread writes it
                release.set()

    trio.run(main)
    assert returned == ["cancelled"]   # written, but never acknowledged: the caller discards it


def _fsync_runner(tmp_path: Path) -> QueueRunner:
    runner = runner_for(tmp_path / "unused", [f"dir://{tmp_path / 'out'}"])
    spool = Spool(tmp_path / "spool", fsync=True)   # the daemon's: removals owe a sync
    spool.recover()
    return QueueRunner(runner.queue, runner.sinks, spool, runner.metrics)


def test_a_stop_right_after_a_delivery_leaves_its_done_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _fsync_runner(tmp_path)
    spool = runner.spool
    synced: list[bool] = []

    async def main() -> None:
        with trio.fail_after(20):
            runner.submit(await spool_job(spool, 1))
            # The removal's sync is cut off by the stop before it runs.
            monkeypatch.setattr(spool, "sync", trio.sleep_forever)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(runner.run)
                await until(lambda: spool.jobs() == [])   # delivered, DONE written
                nursery.cancel_scope.cancel()
            monkeypatch.undo()
            log = spool._seg.log
            assert log is not None and log.dirty   # the DONE record is not durable yet
            real_sync = log.sync

            def counting(*, collect: bool = False) -> int:
                synced.append(collect)
                return real_sync(collect=collect)

            monkeypatch.setattr(log, "sync", counting)
            with trio.CancelScope(shield=True):
                await spool.aclose()
            assert synced and not log.dirty

    trio.run(main)
    again = Spool(tmp_path / "spool", fsync=True)
    again.recover()
    assert again.jobs() == []   # delivered once: no job comes back
    trio.run(again.aclose)
