"""The daemon's spool in memory: what it holds, and the writes the disk still owes.

Two needs share this record.  The spool gauges (SPEC §7) must equal the
spool's content at every scrape, so they are read from counts changed at the
moment a job is committed, changes state or is removed — a periodic scan of
``jobs/`` lags by its interval and showed a queue's jobs a few seconds after
they had left.  And a full (or failing) disk must not stop the delivery
bookkeeping: a state change or a removal the disk refuses is kept here,
served to every reader of this process as if written, and written again when
the disk takes it (docs/spool.md, "A full disk").

Only the process holding the spool lock (the daemon, after ``recover()``)
keeps one; the CLI reads and writes the files directly and sees any error.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from relay import log
from relay.durablefiles import disk_error, overwrite, unlink_quiet, write_atomic
from relay.spoolformat import JobMeta, SpoolUsage, encode_state

# A job's files in removal order: the .json first — from then on the job does
# not exist, whatever a crash leaves of the rest (recovery sweeps it).
_REMOVE_ORDER = ("json", "state", "cf")


def _nothing() -> None:
    pass


class SpoolIndex:
    """Jobs by id with their queue, state and bytes; counts by (queue, state).

    ``unsaved`` maps a job id to the state the disk has not taken yet,
    ``unremoved`` a removed job's id to the removal to try again (unlinking
    its files, or appending its DONE record to a segment).  The spool hands
    in the write itself, so the index does not care where a job lives.  Not
    thread-safe: the event loop owns it.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, tuple[str, str, int]] = {}
        self._counts: Counter[tuple[str, str]] = Counter()
        self.bytes = 0                              # data + control files of all jobs
        self.unsaved: dict[str, JobMeta] = {}
        self.unremoved: dict[str, Callable[[], None]] = {}
        self._writes: dict[str, Callable[[], None]] = {}  # how to write each unsaved state
        self.on_full: Callable[[], None] = _nothing  # a write refused for space (spoolspace)

    def track(self, meta: JobMeta) -> None:
        """Count ``meta`` (a new job, or a known one with a new state)."""
        self.untrack(meta.id)
        nbytes = meta.total_bytes + meta.control_bytes
        self._jobs[meta.id] = (meta.queue, meta.state, nbytes)
        self._counts[(meta.queue, meta.state)] += 1
        self.bytes += nbytes

    def untrack(self, job_id: str) -> None:
        """Stop counting a job; idempotent."""
        entry = self._jobs.pop(job_id, None)
        if entry is None:
            return
        key = entry[:2]
        self._counts[key] -= 1
        if self._counts[key] <= 0:
            del self._counts[key]
        self.bytes -= entry[2]

    def ids(self) -> set[str]:
        return set(self._jobs)

    def states(self) -> dict[str, tuple[str, str]]:
        """Each job's (queue, state), as counted."""
        return {job_id: entry[:2] for job_id, entry in self._jobs.items()}

    def counts(self) -> Mapping[tuple[str, str], int]:
        """Jobs by (queue, state); a live view, read it on the event loop."""
        return self._counts

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    # -- writes the disk refused ---------------------------------------------------------

    def set_state(self, meta: JobMeta, write: Callable[[], None]) -> None:
        """Count ``meta``'s new state and ``write`` it; a refused write is kept for ``save``.

        ``write`` raises OSError when refused and must itself skip a job that
        is no longer there (``save`` calls it again later).
        """
        self.track(meta)
        try:
            write()
        except OSError as exc:
            self._refused(exc)
            self._log_new(meta.id, "state", exc)
            self.unsaved[meta.id] = meta
            self._writes[meta.id] = write
            return
        self.unsaved.pop(meta.id, None)
        self._writes.pop(meta.id, None)

    def remove(self, job_id: str, unlink: Callable[[], None]) -> None:
        """Stop counting a job and ``unlink`` it; a refused removal is kept for ``save``."""
        self.remove_many([job_id], unlink, lambda _: unlink)

    def remove_many(self, job_ids: list[str], unlink: Callable[[], None],
                    each: Callable[[str], Callable[[], None]]) -> None:
        """``remove`` of several jobs by one ``unlink``; when it is refused, each job
        keeps its own removal (``each(job_id)``) for ``save``."""
        for job_id in job_ids:
            self.untrack(job_id)
            self.unsaved.pop(job_id, None)
            self._writes.pop(job_id, None)
        try:
            unlink()
        except OSError as exc:
            self._refused(exc)
            for job_id in job_ids:
                self._log_new(job_id, "removal", exc)
                self.unremoved[job_id] = each(job_id)

    def _refused(self, exc: OSError) -> None:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.on_full()

    def _log_new(self, job_id: str, what: str, exc: OSError) -> None:
        # One line when a job starts to owe a write, not one per retry attempt.
        if job_id not in self.unsaved and job_id not in self.unremoved:
            log.event("warning", "spool_write_deferred", job=job_id, what=what,
                      error=str(disk_error(exc, f"job {job_id} {what}")))

    def save(self) -> int:
        """Write what is owed, removals first (they free space); returns what still waits.

        Stops at the first refusal: a disk that refuses one write refuses the
        next.  Cheap when nothing waits.
        """
        before = len(self.unsaved) + len(self.unremoved)
        if not before:
            return 0
        try:
            for job_id, unlink in list(self.unremoved.items()):
                unlink()
                del self.unremoved[job_id]
            for job_id in list(self.unsaved):
                self._writes[job_id]()
                del self.unsaved[job_id]
                del self._writes[job_id]
        except OSError as exc:
            self._refused(exc)  # still refused; the next save tries again
        left = len(self.unsaved) + len(self.unremoved)
        if left < before:
            log.event("info", "spool_writes_saved", saved=before - left, waiting=left)
        return left


def usage_of(index: SpoolIndex | None, jobs: Callable[[], list[JobMeta]],
             free_bytes: int) -> SpoolUsage:
    """A spool's usage: from the daemon's ``index`` when it has one, else a scan of ``jobs()``.

    Both spool backends answer ``usage()`` with this.
    """
    if index is not None:  # the daemon's bookkeeping, no scan
        return SpoolUsage(jobs=len(index), bytes=index.bytes, free_bytes=free_bytes,
                          by_queue_state=dict(index.counts()))
    found = jobs()
    return SpoolUsage(jobs=len(found), bytes=sum(j.total_bytes + j.control_bytes for j in found),
                      free_bytes=free_bytes,
                      by_queue_state=dict(Counter((j.queue, j.state) for j in found)))


def write_state(jobs_dir: str, meta: JobMeta, *, fsync: bool, only_if_there: bool = False) -> None:
    """Replace ``<id>.state`` with the delivery state of ``meta``; OSError as is.

    ``only_if_there``: do nothing when the job's ``.json`` is gone (a write
    retried later, after another process removed the job).

    Atomic (dot-temp and rename) while the disk has room.  On a full disk an
    existing ``.state`` takes the record in place, in its own blocks, so a
    job that failed before keeps its retry count and holds on disk: a torn
    one reads as the defaults (spoolformat.with_state), what a lost write
    would cost anyway.
    """
    if only_if_there and not os.path.exists(os.path.join(jobs_dir, f"{meta.id}.json")):
        return
    path = os.path.join(jobs_dir, f"{meta.id}.state")
    record = encode_state(meta)
    try:
        write_atomic(path, record, fsync=fsync)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        try:
            overwrite(path, record, fsync=fsync)
        except OSError:
            raise exc from None


def unlink_job(jobs_dir: str, job_id: str, data_paths: Iterable[str]) -> None:
    """Unlink a job's files, its ``.json`` first; files already gone are fine."""
    for suffix in _REMOVE_ORDER:
        unlink_quiet(os.path.join(jobs_dir, f"{job_id}.{suffix}"))
    for path in data_paths:
        unlink_quiet(path)
