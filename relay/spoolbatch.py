"""Several jobs committed by one hand-off to the group commit (``Spool.commit_many``).

The main process of a multi-process daemon reads an intake worker's
``Commit`` frames several at a time (``relay.workers``); committing each in
a task of its own cost a task, a group-commit slot wait and a wake-up a job
on the event loop.  Here the jobs read together are sealed in their order
(``Spool.stage``, the first half of ``Spool.commit``), handed to the group
commit as one list (``GroupCommit.submit_many``: they share one flush) and
finished in the same order (``Spool.finish``).  Each job keeps its own
outcome: one that fails to stage or to publish is removed (``Spool.unstage``,
as a failed ``commit`` removes its job) and its error is its result, the
others go on.  Cancelled before the flush took them, every job is removed
and the cancellation raised: none is durable, none may be acknowledged.
SPEC §4.4 is unchanged: a job's result is its metadata only once the sync
that made it durable returned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from relay import log
from relay.spoolformat import JobMeta
from relay.spooljob import IncomingJob
from relay.spoolpublish import Publish, Staged, publish

if TYPE_CHECKING:
    from relay.spool import Spool

__all__ = ["CommitEntry", "commit_many"]

# One job to commit: the job, its hold reason ("" for none), its on_durable hook.
CommitEntry = tuple[IncomingJob, str,
                    Callable[[JobMeta], Callable[[], None] | None] | None]


async def commit_many(spool: Spool, entries: list[CommitEntry]) -> list[JobMeta | Exception]:
    """``entries`` committed together; one result per entry (module docstring)."""
    results: list[JobMeta | Exception | None] = [None] * len(entries)
    staged: list[tuple[int, Staged]] = []
    try:
        for i, (job, hold, on_durable) in enumerate(entries):
            try:
                job._check_open()   # a second commit must not discard the first one's job
            except Exception as exc:
                results[i] = exc
                continue
            one = Staged()
            try:
                spool.stage(one, job, hold, on_durable)
            except Exception as exc:
                _unstage(spool, one, job, exc)
                results[i] = exc
                continue
            staged.append((i, one))
        items = [s.item for _, s in staged if s.item is not None]
        assert len(items) == len(staged)    # stage gives each job it staged its item
        errors = await _publish(spool, items)
    except BaseException as exc:   # cancelled (or worse) before the flush took them
        for i, one in staged:
            _unstage(spool, one, entries[i][0], exc)
        raise
    for (i, one), error in zip(staged, errors, strict=True):
        job = entries[i][0]
        if error is not None:
            _unstage(spool, one, job, error)
            results[i] = error
        else:
            results[i] = spool.finish(one, job)
    done = [r for r in results if r is not None]
    assert len(done) == len(entries)   # every entry has its result
    return done


def _unstage(spool: Spool, one: Staged, job: IncomingJob, exc: BaseException) -> None:
    """``Spool.unstage``, whose discard may fail (an unlink on a spool gone read-only):
    logged, the rest of the batch goes on; the next start sweeps what is left."""
    try:
        spool.unstage(one, job, exc)
    except OSError as error:
        log.event("error", "discard_failed", job=job.id, error=str(error))


async def _publish(spool: Spool, items: list[Publish]) -> list[Exception | None]:
    """Each item's error (None: durable), as ``Spool.commit`` publishes one."""
    if spool.fsync:
        return await spool._group.submit_many(items)
    await trio.lowlevel.checkpoint()
    errors: list[Exception | None] = []
    for item in items:
        try:
            publish(spool.jobs_dir, spool._seg, item)
            errors.append(None)
        except Exception as exc:
            errors.append(exc)
    return errors
