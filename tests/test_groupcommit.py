"""Group commit and the durability primitives: batching across tasks, per-item
errors, cancellation before and during a flush, and the sync/file helpers on
real files."""

from __future__ import annotations

import array
import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from relay.durablefiles import disk_error, read_file, unlink_quiet, write_all, write_atomic
from relay.errors import DiskFull, SpoolError
from relay.groupcommit import GroupCommit, Syncer, start_writeback


class Recorder:
    """A flush that records its batches; when gated, each flush waits for ``open()``."""

    def __init__(self, *, delay: float = 0.0, fail: frozenset[int] = frozenset(),
                 gated: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail = fail
        self.gated = gated
        self.gate = threading.Semaphore(0)
        self.finished = 0

    def open(self) -> None:
        self.gate.release()

    def __call__(self, items: list[int]) -> list[Exception | None]:
        self.batches.append(list(items))
        if self.gated:
            assert self.gate.acquire(timeout=10), "test never opened the flush"
        time.sleep(self.delay)
        self.finished += 1
        return [SpoolError(f"item {i}") if i in self.fail else None for i in items]


async def until(predicate: Callable[[], bool]) -> None:
    """Poll (bounded) until ``predicate()`` holds; the caller's fail_after bounds time."""
    for _ in range(100_000):
        if predicate():
            return
        await trio.sleep(0.001)
    raise AssertionError("condition never held")


def test_concurrent_submits_share_flushes() -> None:
    flush = Recorder(delay=0.02)
    group: GroupCommit[int] = GroupCommit(flush)

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(group.submit, i)

    trio.run(main)
    assert sorted(i for b in flush.batches for i in b) == list(range(50))
    # The first submit flushes alone; the other 49 arrive during it and share one.
    assert len(flush.batches) <= 3 and max(map(len, flush.batches)) >= 40
    stats = group.statistics()
    assert (stats.batches, stats.items) == (len(flush.batches), 50)
    assert stats.largest_batch == max(map(len, flush.batches))


def test_each_item_gets_its_own_error() -> None:
    group: GroupCommit[int] = GroupCommit(Recorder(fail=frozenset({3, 5})))
    outcome: dict[int, str] = {}

    async def one(i: int) -> None:
        try:
            await group.submit(i)
            outcome[i] = "ok"
        except SpoolError as exc:
            outcome[i] = str(exc)

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(one, i)

    trio.run(main)
    assert outcome == {i: f"item {i}" if i in (3, 5) else "ok" for i in range(8)}


def test_a_flush_that_raises_fails_its_whole_batch_then_recovers() -> None:
    calls = []

    def flush(items: list[int]) -> list[Exception | None]:
        calls.append(items)
        if len(calls) == 1:
            raise OSError(errno.EIO, "disk on fire")
        return [None] * len(items)

    group: GroupCommit[int] = GroupCommit(flush)

    async def main() -> None:
        with trio.fail_after(10):
            with pytest.raises(SpoolError, match="group commit failed"):
                await group.submit(1)
            await group.submit(2)

    trio.run(main)
    assert calls == [[1], [2]]


def test_cancelled_while_pending_is_never_flushed() -> None:
    flush = Recorder(gated=True)
    group: GroupCommit[int] = GroupCommit(flush)

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(group.submit, 1)          # leads; its flush waits
                await until(lambda: len(flush.batches) == 1)
                with trio.CancelScope() as pending_scope:
                    pending_scope.cancel()
                    await group.submit(2)                    # queued, then cancelled
                assert pending_scope.cancelled_caught
                flush.open()
            flush.gated = False
            await group.submit(3)

    trio.run(main)
    assert flush.batches == [[1], [3]]


def test_cancelled_while_flushing_returns_only_after_the_flush() -> None:
    flush = Recorder(gated=True)
    group: GroupCommit[int] = GroupCommit(flush)
    scopes: dict[int, trio.CancelScope] = {}
    finished_when_done: dict[int, int] = {}

    async def submit(i: int) -> None:
        with trio.CancelScope() as scope:
            scopes[i] = scope
            await group.submit(i)
        finished_when_done[i] = flush.finished

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(submit, 1)                # leads the first flush
                await until(lambda: len(flush.batches) == 1)
                nursery.start_soon(submit, 2)                # one of these leads the
                nursery.start_soon(submit, 3)                # second, one rides along
                await until(lambda: len(group._pending) == 2)
                flush.open()
                await until(lambda: len(flush.batches) == 2)
                scopes[1].cancel()
                scopes[2].cancel()
                scopes[3].cancel()                           # both inside flush 2
                await trio.sleep(0.02)
                assert finished_when_done == {1: 1}
                flush.open()
            await group.wait_idle()

    trio.run(main)
    assert [sorted(b) for b in flush.batches] == [[1], [2, 3]]
    assert finished_when_done == {1: 1, 2: 2, 3: 2}


def test_wait_idle_waits_for_the_running_flush() -> None:
    flush = Recorder(delay=0.05)
    group: GroupCommit[int] = GroupCommit(flush)

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(group.submit, 1)
                await until(lambda: len(flush.batches) == 1)
                await group.wait_idle()
                assert flush.finished == 1

    trio.run(main)


def test_after_runs_once_the_batch_was_woken_and_before_the_next() -> None:
    events: list[str] = []
    release = threading.Event()

    def flush(items: list[int]) -> list[Exception | None]:
        events.append(f"flush {items}")
        return [None] * len(items)

    def after() -> None:
        assert release.wait(10), "the submit never returned"
        events.append("after")

    group: GroupCommit[int] = GroupCommit(flush, after=after)

    async def main() -> None:
        with trio.fail_after(10):
            await group.submit(1)              # returns while ``after`` still waits
            events.append("returned")
            release.set()
            await group.submit(2)              # its flush follows the first ``after``
            await group.wait_idle()            # and waits for the second
            assert events[-1] == "after"

    trio.run(main)
    assert events == ["flush [1]", "returned", "after", "flush [2]", "after"]


@pytest.mark.parametrize("method", ["syncfs", "fdatasync"])
def test_syncer_makes_files_durable(tmp_path: Path, method: str) -> None:
    paths = []
    for i in range(3):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * 100)
        paths.append(str(p))
    syncer = Syncer(str(tmp_path), method)
    try:
        assert syncer.method == method
        assert syncer.sync(paths) == (1 if method == "syncfs" else 4)
    finally:
        syncer.close()
    with pytest.raises(ValueError):
        Syncer(str(tmp_path), "O_DIRECT")


@pytest.mark.parametrize("method", ["syncfs", "fdatasync"])
def test_syncer_borrows_a_given_folder_descriptor(tmp_path: Path, method: str) -> None:
    (tmp_path / "f").write_bytes(b"x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncer = Syncer(str(tmp_path), method, dir_fd=fd)
        assert syncer.sync([str(tmp_path / "f")]) == (1 if method == "syncfs" else 2)
        syncer.close()
        syncer.close()                 # idempotent
        os.fstat(fd)                   # still the caller's: not closed
    finally:
        os.close(fd)


@pytest.mark.parametrize("fsync", [True, False])
def test_write_atomic_replaces_and_leaves_no_temp(tmp_path: Path, fsync: bool) -> None:
    target = tmp_path / "state"
    write_atomic(str(target), b"one", fsync=fsync)
    write_atomic(str(target), b"two", fsync=fsync)
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["state"]
    assert read_file(str(target)) == b"two" and read_file(str(tmp_path / "none")) is None
    unlink_quiet(str(target))
    unlink_quiet(str(target))
    assert not target.exists()


def test_write_all_takes_any_buffer_and_reports_enospc(tmp_path: Path) -> None:
    words = array.array("I", range(1000))
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        assert write_all(fd, memoryview(words)) == 4000
        start_writeback(fd, 0, 4000)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == words.tobytes()
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            write_all(full, b"x")
    finally:
        os.close(full)
    assert info.value.errno == errno.ENOSPC


def test_disk_errors_map_to_the_error_tree() -> None:
    assert isinstance(disk_error(OSError(errno.ENOSPC, "x"), "job"), DiskFull)
    assert isinstance(disk_error(OSError(errno.EDQUOT, "x"), "job"), DiskFull)
    other = disk_error(OSError(errno.EIO, "I/O error"), "job 7")
    assert type(other) is SpoolError and str(other) == "job 7: I/O error"
