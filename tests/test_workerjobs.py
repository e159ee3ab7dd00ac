"""A worker's commit answered by the spool's flush thread (``relay.workerjobs``).

Under ``fsync`` a small job that waits for nothing but its sync has its
``Reply`` written on the worker's channel by the flush thread right after the
batch's ``fdatasync``, before trio hears the batch is done.  These tests hold
that to SPEC §4.4 and to what the rest of the main process expects: the
reply only after the sync, the job with delivery once the commit returns, a
failed sync answered by trio with its failure, a worker gone mid-reply, a stop
in the middle of a batch, and the jobs trio must still wait for.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import cast

import trio
from prometheus_client import CollectorRegistry

from relay.context import Delivery
from relay.intakechannel import Channel
from relay.intakemessages import Commit, Reply
from relay.metrics import Metrics
from relay.spool import JobMeta, Spool
from relay.workerjobs import Prepared, WorkerJobs
from tests.test_intakemessages import _channels
from tests.test_workers import _commit_message, _Submitted


def _jobs(tmp_path: Path) -> tuple[WorkerJobs, Spool, _Submitted]:
    spool = Spool(tmp_path / "spool", fsync=True)
    spool.recover()
    metrics = Metrics(CollectorRegistry(), queues=["lp"], destinations=[])
    delivery = _Submitted()
    return WorkerJobs(spool, cast(Delivery, delivery), metrics), spool, delivery


async def _channel_pair() -> tuple[Channel, Channel]:
    main, worker = _channels()
    main.allow_posts()
    return main, worker


def test_the_flush_thread_writes_the_reply_after_the_sync_and_trio_sends_nothing(
        tmp_path: Path) -> None:
    jobs, spool, delivery = _jobs(tmp_path)
    log = spool._seg.log
    assert log is not None
    events: list[str] = []
    real_sync = log.sync

    def sync(*, collect: bool = False) -> int:
        events.append(f"sync in {threading.current_thread().name}")
        return real_sync(collect=collect)

    log.sync = sync  # type: ignore[method-assign]

    async def main() -> tuple[Reply | None, object, bool]:
        main_end, worker_end = await _channel_pair()
        with trio.fail_after(10):
            message = _commit_message(1, "w-1")
            reply = await jobs.commit(message, jobs.prepare(message), main_end)
            got = await worker_end.receive()   # written by the flush thread
        main_end.close()
        worker_end.close()
        return reply, got, not jobs.in_hop

    reply, got, settled = trio.run(main)
    assert reply is None   # nothing left for trio to send
    assert isinstance(got, Reply) and got.failure is None
    meta = cast(JobMeta, got.value)
    assert delivery.jobs == [meta.id] and [m.id for m in spool.jobs()] == [meta.id]
    assert events == ["sync in group-commit"] and settled
    trio.run(spool.aclose)


def test_a_job_behind_an_unanswered_one_or_held_is_answered_by_trio(tmp_path: Path) -> None:
    # It has to wait for the job before it (or is held): its reply follows that.
    jobs, spool, delivery = _jobs(tmp_path)

    async def main() -> list[Reply | None]:
        main_end, worker_end = await _channel_pair()
        replies: list[Reply | None] = []
        with trio.fail_after(10):
            first, second = _commit_message(1, "w-1"), _commit_message(2, "w-2",
                                                                        previous="w-1")
            held = _commit_message(3, "w-3")._replace(hold="no such printer")
            async with trio.open_nursery() as nursery:
                async def one(message: Commit, prepared: Prepared) -> None:
                    replies.append(await jobs.commit(message, prepared, main_end))
                for m in [(m, jobs.prepare(m)) for m in (first, second, held)]:
                    nursery.start_soon(one, *m)
            early = await worker_end.receive()
        main_end.close()
        worker_end.close()
        assert isinstance(early, Reply) and early.rid == 1
        return replies

    replies = trio.run(main)
    assert sorted(r.rid for r in replies if r is not None) == [2, 3]
    assert len(delivery.jobs) == 3
    trio.run(spool.aclose)


def test_a_failed_sync_is_answered_by_trio_with_its_failure(tmp_path: Path) -> None:
    jobs, spool, delivery = _jobs(tmp_path)
    log = spool._seg.log
    assert log is not None

    def broken(*, collect: bool = False) -> int:
        raise OSError(5, "Input/output error")

    log.sync = broken  # type: ignore[method-assign]

    async def main() -> Reply | None:
        main_end, worker_end = await _channel_pair()
        with trio.fail_after(10):
            message = _commit_message(1, "w-1")
            reply = await jobs.commit(message, jobs.prepare(message), main_end)
        main_end.close()
        worker_end.close()
        return reply

    reply = trio.run(main)
    assert reply is not None and reply.failure is not None   # never acknowledged
    assert delivery.jobs == [] and not jobs.in_hop


def test_a_worker_gone_mid_reply_leaves_its_job_stored_and_with_delivery(
        tmp_path: Path) -> None:
    # Its sender was not told: at-least-once, it may send the job again.
    jobs, spool, delivery = _jobs(tmp_path)

    async def main() -> Reply | None:
        main_end, worker_end = await _channel_pair()
        worker_end.close()
        with trio.fail_after(10):
            message = _commit_message(1, "w-1")
            reply = await jobs.commit(message, jobs.prepare(message), main_end)
        main_end.close()
        return reply

    assert trio.run(main) is None
    assert len(delivery.jobs) == 1 and len(spool.jobs()) == 1
    trio.run(spool.aclose)


def test_a_stop_mid_batch_still_answers_and_the_job_survives_a_restart(
        tmp_path: Path) -> None:
    # The stop (a cancel) comes while the batch's sync runs: the job is durable,
    # its reply goes out, and a restart finds it.
    jobs, spool, _ = _jobs(tmp_path)
    log = spool._seg.log
    assert log is not None
    in_sync, release = threading.Event(), threading.Event()
    real_sync = log.sync

    def slow(*, collect: bool = False) -> int:
        in_sync.set()
        release.wait(10)
        return real_sync(collect=collect)

    log.sync = slow  # type: ignore[method-assign]

    async def main() -> object:
        main_end, worker_end = await _channel_pair()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                message = _commit_message(1, "w-1")
                nursery.start_soon(jobs.commit, message, jobs.prepare(message), main_end)
                await trio.to_thread.run_sync(in_sync.wait, 10)
                nursery.cancel_scope.cancel()   # the stop, mid-batch
                release.set()
            got = await worker_end.receive()
        main_end.close()
        worker_end.close()
        return got

    got = trio.run(main)
    assert isinstance(got, Reply) and got.failure is None
    log.sync = real_sync  # type: ignore[method-assign]
    trio.run(spool.aclose)
    again = Spool(tmp_path / "spool", fsync=True)
    recovered = again.recover()
    assert [m.id for m in recovered.jobs] == [cast(JobMeta, got.value).id]
    trio.run(again.aclose)


def _pool_of(jobs: object) -> object:
    from relay.workers import WorkerPool

    class _H:
        def __init__(self) -> None:
            self.jobs = jobs

    pool = object.__new__(WorkerPool)
    pool._handles = {0: _H()}  # type: ignore[attr-defined]
    return pool


def test_a_command_waits_for_jobs_in_the_hop_back_to_trio(tmp_path: Path) -> None:
    # An lpq right after an ack must find the job: the pool's commands wait
    # until trio has handed every job the flush thread answered to delivery.
    jobs, spool, _ = _jobs(tmp_path)
    pool = _pool_of(jobs)
    answered = object()
    jobs.in_hop.add(answered)  # type: ignore[arg-type]  # answered, not handed yet

    async def main() -> list[str]:
        order: list[str] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                async def command() -> None:
                    await pool._settle()  # type: ignore[attr-defined]
                    order.append("answered")
                nursery.start_soon(command)
                await trio.sleep(0.05)
                order.append("handed")
                jobs.hand_over(answered)
        return order

    assert trio.run(main) == ["handed", "answered"]
    trio.run(spool.aclose)


def test_a_command_does_not_wait_for_jobs_answered_after_it(tmp_path: Path) -> None:
    # A busy spool always has some job in the hop: a command waits only for the
    # ones there when it came, so it is answered as soon as those are handed.
    jobs, spool, _ = _jobs(tmp_path)
    pool = _pool_of(jobs)
    first = object()
    jobs.in_hop.add(first)  # type: ignore[arg-type]

    async def main() -> float:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                async def churn() -> None:   # a new job in the hop every 1 ms, for ever
                    while True:
                        new = object()
                        jobs.in_hop.add(new)  # type: ignore[arg-type]
                        await trio.sleep(0.001)
                        jobs.hand_over(first)
                        await trio.sleep(0.001)
                nursery.start_soon(churn)
                started = trio.current_time()
                await pool._settle()  # type: ignore[attr-defined]
                took = trio.current_time() - started
                nursery.cancel_scope.cancel()
        return took

    assert trio.run(main) < 1.0      # not the 2 s bound: it never waited for the new ones
    trio.run(spool.aclose)
