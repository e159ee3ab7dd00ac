"""A worker's commits read together, committed in one task (``WorkerJobs.commit_many``).

The main process takes the ``Commit`` frames one read of a worker's channel
brought as one batch: one task, one hand-off to the group commit
(``Spool.commit_many``, ``GroupCommit.submit_many``).  Each job keeps its own
outcome and SPEC §4.4: a job that fails is refused alone, a worker gone
mid-batch leaves its jobs stored and with delivery, a stop while the batch's
sync runs still answers every job, a stop before the flush took the batch
leaves no job behind, and the reader keeps the jobs that must wait for the
one before them out of the batch.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import cast

import trio

from relay.groupcommit import GroupCommit
from relay.intakemessages import Commit, Reply
from relay.spool import JobMeta, Spool
from relay.workerjobs import Prepared
from tests.test_workerjobs import _channel_pair, _jobs
from tests.test_workers import _commit_message


def _prepared(jobs: object, *messages: Commit) -> list[tuple[Commit, Prepared]]:
    from relay.workerjobs import WorkerJobs
    assert isinstance(jobs, WorkerJobs)
    return [(m, jobs.prepare(m)) for m in messages]


def test_a_batch_where_one_fails_refuses_that_one_and_answers_the_others(
        tmp_path: Path) -> None:
    # The middle one names a spool file that is gone (promoted, no partial):
    # it is refused by trio; the two others are answered by the flush thread.
    jobs, spool, delivery = _jobs(tmp_path)

    async def main() -> tuple[list[Reply], list[object]]:
        main_end, worker_end = await _channel_pair()
        with trio.fail_after(10):
            batch = _prepared(jobs, _commit_message(1, "w-1"),
                              _commit_message(2, "w-2", promoted=True),
                              _commit_message(3, "w-3"))
            left = await jobs.commit_many(batch, main_end)
            got = [await worker_end.receive(), await worker_end.receive()]
        main_end.close()
        worker_end.close()
        return left, got

    left, got = trio.run(main)
    assert [r.rid for r in left] == [2] and left[0].failure is not None
    assert all(isinstance(r, Reply) and r.failure is None for r in got)
    assert sorted(cast(Reply, r).rid for r in got) == [1, 3]
    ids = [cast(JobMeta, cast(Reply, r).value).id for r in got]
    assert delivery.jobs == ids and [m.id for m in spool.jobs()] == ids
    assert not jobs.in_hop
    trio.run(spool.aclose)


def test_a_job_answered_by_the_flush_thread_is_counted_before_its_reply_is_written(
        tmp_path: Path) -> None:
    # A client that has its ack and then scrapes /metrics must see its job: the
    # flush thread bumps the intake counters before it posts the reply, and trio
    # does not count the job again when it hands it to delivery.
    jobs, spool, _ = _jobs(tmp_path)
    counter = jobs.metrics.jobs_received_total.labels(queue="lp")
    at_post: list[float] = []

    async def main() -> None:
        main_end, worker_end = await _channel_pair()
        real_post = main_end.post

        def post(reply: Reply) -> object:
            at_post.append(counter._value.get())
            return real_post(reply)

        main_end.post = post  # type: ignore[method-assign]
        with trio.fail_after(10):
            one = _commit_message(1, "w-1")
            assert await jobs.commit(one, jobs.prepare(one), main_end) is None
            batch = _prepared(jobs, _commit_message(2, "w-2"), _commit_message(3, "w-3"))
            assert await jobs.commit_many(batch, main_end) == []
            for _ in range(3):
                await worker_end.receive()
        main_end.close()
        worker_end.close()

    trio.run(main)
    assert at_post == [1.0, 2.0, 3.0] and counter._value.get() == 3.0
    trio.run(spool.aclose)


def test_a_job_its_flush_fails_is_refused_alone(tmp_path: Path) -> None:
    # The group commit reports an error for one item of the batch only.
    jobs, spool, delivery = _jobs(tmp_path)
    real_flush = spool._group._flush

    def flush(items: list[object]) -> list[Exception | None]:
        errors = real_flush(items[:1] + items[2:])  # type: ignore[arg-type]
        return [errors[0], OSError(28, "No space left on device"), *errors[1:]]

    spool._group._flush = flush  # type: ignore[assignment]

    async def main() -> list[Reply]:
        main_end, worker_end = await _channel_pair()
        with trio.fail_after(10):
            batch = _prepared(jobs, *(_commit_message(i, f"w-{i}") for i in (1, 2, 3)))
            left = await jobs.commit_many(batch, main_end)
        main_end.close()
        worker_end.close()
        return left

    left = trio.run(main)
    assert [r.rid for r in left] == [2] and left[0].failure is not None
    assert len(delivery.jobs) == 2 and len(spool.jobs()) == 2
    trio.run(spool.aclose)


def test_a_worker_gone_mid_batch_leaves_its_jobs_stored_and_with_delivery(
        tmp_path: Path) -> None:
    jobs, spool, delivery = _jobs(tmp_path)

    async def main() -> list[Reply]:
        main_end, worker_end = await _channel_pair()
        worker_end.close()
        with trio.fail_after(10):
            batch = _prepared(jobs, *(_commit_message(i, f"w-{i}") for i in (1, 2, 3)))
            left = await jobs.commit_many(batch, main_end)
        main_end.close()
        return left

    assert trio.run(main) == []   # the flush thread wrote nothing, dropped nothing twice
    assert len(delivery.jobs) == 3 and len(spool.jobs()) == 3 and not jobs.in_hop
    trio.run(spool.aclose)


def test_a_stop_mid_batch_answers_every_job_and_they_survive_a_restart(
        tmp_path: Path) -> None:
    jobs, spool, delivery = _jobs(tmp_path)
    log = spool._seg.log
    assert log is not None
    in_sync, release = threading.Event(), threading.Event()
    real_sync = log.sync

    def slow(*, collect: bool = False) -> int:
        in_sync.set()
        release.wait(10)
        return real_sync(collect=collect)

    log.sync = slow  # type: ignore[method-assign]

    async def main() -> list[object]:
        main_end, worker_end = await _channel_pair()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                batch = _prepared(jobs, *(_commit_message(i, f"w-{i}") for i in (1, 2, 3)))
                nursery.start_soon(jobs.commit_many, batch, main_end)
                await trio.to_thread.run_sync(in_sync.wait, 10)
                nursery.cancel_scope.cancel()   # the stop, mid-batch
                release.set()
            got = [await worker_end.receive() for _ in range(3)]
        main_end.close()
        worker_end.close()
        return got

    got = trio.run(main)
    assert all(isinstance(r, Reply) and r.failure is None for r in got)
    ids = sorted(cast(JobMeta, cast(Reply, r).value).id for r in got)
    assert sorted(delivery.jobs) == ids and not jobs.in_hop
    log.sync = real_sync  # type: ignore[method-assign]
    trio.run(spool.aclose)
    again = Spool(tmp_path / "spool", fsync=True)
    assert sorted(m.id for m in again.recover().jobs) == ids
    trio.run(again.aclose)


def test_a_stop_before_the_flush_took_the_batch_leaves_no_job(tmp_path: Path) -> None:
    jobs, spool, delivery = _jobs(tmp_path)
    outcomes: list[bool] = []

    async def main() -> None:
        main_end, worker_end = await _channel_pair()
        with trio.fail_after(10):
            batch = _prepared(jobs, *(_commit_message(i, f"w-{i}") for i in (1, 2)))
            with trio.CancelScope() as scope:
                scope.cancel()
                await jobs.commit_many(batch, main_end)
            assert scope.cancelled_caught
            outcomes.extend(p.outcome.decided and not p.outcome.ok for _, p in batch)
            with trio.move_on_after(0.3) as wait:   # no reply was written, by any thread
                await worker_end.receive()
            assert wait.cancelled_caught
        main_end.close()
        worker_end.close()

    trio.run(main)
    assert outcomes == [True, True]
    assert delivery.jobs == [] and spool.jobs() == [] and not jobs.in_hop
    assert spool._group._pending == []
    trio.run(spool.aclose)
    again = Spool(tmp_path / "spool", fsync=True)
    assert again.recover().jobs == []
    trio.run(again.aclose)


def test_submit_many_shares_one_flush_and_keeps_each_items_error() -> None:
    flushes: list[list[int]] = []

    def flush(items: list[int]) -> list[Exception | None]:
        flushes.append(list(items))
        return [ValueError(str(i)) if i == 2 else None for i in items]

    group: GroupCommit[int] = GroupCommit(flush)

    async def main() -> tuple[list[Exception | None], list[Exception | None]]:
        with trio.fail_after(10):
            none = await group.submit_many([])
            return none, await group.submit_many([1, 2, 3])

    none, errors = trio.run(main)
    assert none == [] and flushes == [[1, 2, 3]]
    assert [type(e).__name__ if e else None for e in errors] == [None, "ValueError", None]


def test_the_reader_keeps_a_job_that_waits_for_the_one_before_it_out_of_the_batch(
        tmp_path: Path) -> None:
    # w-2 names w-1 (unanswered when sent): it goes in a task of its own and waits.
    from relay.workers import WorkerPool

    jobs, spool, _ = _jobs(tmp_path)
    started: list[tuple[str, list[int]]] = []

    class _Nursery:
        def start_soon(self, fn: object, handle: object, *args: object) -> None:
            name = getattr(fn, "__name__", "")
            rids = ([m.rid for m, _ in cast(list[tuple[Commit, Prepared]], args[0])]
                    if name == "_commit_many" else [cast(Commit, args[0]).rid])
            started.append((name, rids))

    class _H:
        def __init__(self) -> None:
            self.jobs = jobs

    pool = object.__new__(WorkerPool)
    batch = _prepared(jobs, _commit_message(1, "w-1"), _commit_message(2, "w-2",
                                                                      previous="w-1"),
                      _commit_message(3, "w-3"), _commit_message(4, "w-4"))
    pool._start_commits(_H(), _Nursery(), batch)  # type: ignore[arg-type]
    assert started == [("_commit_many", [1, 3, 4]), ("_commit", [2])]
    started.clear()
    pool._start_commits(_H(), _Nursery(), batch[:1])  # type: ignore[arg-type]
    assert started == [("_commit", [1])]
    trio.run(spool.aclose)


def test_receive_buffered_takes_the_frames_one_read_brought_and_no_more() -> None:
    async def main() -> tuple[object, object, object, object]:
        main_end, worker_end = await _channel_pair()
        with trio.fail_after(10):
            first, second = _commit_message(1, "w-1"), _commit_message(2, "w-2")
            nothing = main_end.receive_buffered()   # nothing read yet: no system call
            worker_end.send_nowait(first)
            worker_end.send_nowait(second)
            await trio.sleep(0.05)   # both frames in the socket: one read takes them
            got = await main_end.receive()
            then = main_end.receive_buffered()
            after = main_end.receive_buffered()
        main_end.close()
        worker_end.close()
        return nothing, got, then, after

    nothing, got, then, after = trio.run(main)
    assert nothing is None and after is None
    assert isinstance(got, Commit) and got.rid == 1
    assert isinstance(then, Commit) and then.rid == 2


def test_a_bad_frame_behind_a_commit_in_one_read_ends_that_worker_only(
        tmp_path: Path) -> None:
    # A worker writes a good Commit and, in the same write, a frame no message
    # decodes from: the reader treats the worker as gone (as for a bad first
    # frame), its nursery's cancel removes the batch; nothing escapes into the
    # pool (that would stop the daemon).
    from relay.intakechannel import _LENGTH
    from relay.intakemessages import encode
    from relay.workers import WorkerPool, _Handle

    jobs, spool, _ = _jobs(tmp_path)
    pool = object.__new__(WorkerPool)

    async def main() -> None:
        main_end, worker_end = await _channel_pair()
        handle = _Handle(index=0, channel=main_end, jobs=jobs)
        good = encode(_commit_message(1, "w-1"))
        bad = b"\xff" + b"\x00" * 7
        with trio.fail_after(10):
            await worker_end.sock.send(_LENGTH.pack(len(good)) + good
                                       + _LENGTH.pack(len(bad)) + bad)
            async with trio.open_nursery() as nursery:
                await pool._read_stream(handle, nursery)   # returns: the worker is gone
                nursery.cancel_scope.cancel()
        main_end.close()
        worker_end.close()

    trio.run(main)
    assert spool.jobs() == []          # never answered: removed with the cancel
    trio.run(spool.aclose)
