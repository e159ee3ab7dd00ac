"""The durable spool: where a job lives from its last acknowledged byte to delivery.

SPEC §4.4 promises that an acknowledged job survives ``kill -9`` and power loss
and that a partial one is discarded at restart.  The layout (docs/spool.md) is
one flat directory ``jobs/`` of files named only by spool id — wire file names
are metadata, never paths:

    <id>.d<n>   data files, written straight from the receive buffer
    <id>.cf     the raw control file
    <id>.json   immutable job metadata, written last (dot-temp + rename)
    <id>.state  delivery state, replaced atomically by the scheduler and CLI
                (in place on a full disk)

A job exists iff its ``.json`` parses and every file it lists has the recorded
size; anything else is debris, removed and counted by ``recover()``.  Under
``fsync`` the ``.json`` publications of concurrent jobs share one flush
(``relay.groupcommit``), so durability does not cost one fsync per job.

Nothing the daemon does to a stored job needs free space: a state change or
removal the disk refuses is kept in its ``SpoolIndex`` (``relay.spoolindex``,
also the source of the spool gauges) and written when the disk takes it
(docs/spool.md, "A full disk").

This module is the ``Spool`` itself: the lock, ids, commit, and reading and
changing stored jobs.  Receiving one job is ``relay.spooljob``, the start-up
sweep ``relay.spoolrecovery``, the records and their JSON codec
``relay.spoolformat``; their public names are re-exported here, so
``relay.spool`` stays the one import for the rest of the relay.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections import Counter
from dataclasses import dataclass, replace

import trio

from relay import log
from relay.errors import DiskFull, SpoolError
from relay.groupcommit import (
    GroupCommit,
    Syncer,
    create,
    disk_error,
    make_dir,
    read_file,
    unlink_quiet,
    write_atomic,
    write_file,
)
from relay.jobevents import NO_EVENTS, JobEvents
from relay.spoolbackend import Body, SpoolBackend, open_file_body
from relay.spoolformat import (
    ID_RE,
    ID_WIDTH,
    STATES,
    FileMeta,
    JobMeta,
    Recovery,
    SpoolStatistics,
    SpoolUsage,
    decode_job,
    encode_job,
    encode_state,
    with_state,
)
from relay.spoolindex import SpoolIndex, unlink_job, write_state
from relay.spooljob import MAX_FILES_PER_JOB, WRITEBACK_CHUNK, DataWriter, IncomingJob
from relay.spoolrecovery import sweep

# The public names of relay.spooljob and relay.spoolformat are this module's too.
__all__ = ["ID_BLOCK", "ID_WIDTH", "MAX_FILES_PER_JOB", "STATES", "WRITEBACK_CHUNK",
           "DataWriter", "FileMeta", "IncomingJob", "JobMeta", "Recovery", "Spool",
           "SpoolBusy", "SpoolStatistics", "SpoolUsage"]

ID_BLOCK = 1000              # ids reserved per durable write of the ``next-id`` file
# A free-space reading is trusted for this long, or until this many bytes were
# written since (docs/spool.md, "Free space"): one statvfs per interval, not 3 per job.
FREE_SPACE_TTL = 0.5
FREE_SPACE_EVERY = 8 << 20


class SpoolBusy(SpoolError):
    """Another process holds the spool lock: a daemon is running on it."""


@dataclass(frozen=True, slots=True)
class _Publish:
    """One job's ``.json`` to publish in a group commit (None: only sync)."""

    job_id: str
    record: bytes | None
    control: bytes
    paths: tuple[str, ...]
    state: bytes | None = None   # a ``.state`` to write before the ``.json`` (held jobs)


class Spool:
    """The spool directory: receive (``begin``/``commit``), read, update, remove jobs.

    ``recover()`` must run first in the daemon (it takes the spool lock and
    sweeps debris).  Readers such as the CLI may use ``jobs``/``get``/
    ``update``/``remove`` without it, also while the daemon runs.  ``commit``
    needs no background task: concurrent callers share flushes by themselves.
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True,
                 min_free_disk: int = 0, sync_method: str = "auto") -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.jobs_dir = os.path.join(self.directory, "jobs")
        self.fsync = fsync
        self.min_free_disk = min_free_disk
        self._sync_method = sync_method
        self._syncer: Syncer | None = None
        self._group: GroupCommit[_Publish] = GroupCommit(self._flush)
        self._lock_fd = -1
        self._next = 0          # next id to hand out; 0 = not recovered
        self._limit = 0         # ids below this may have been used (next-id file)
        self._cache: dict[str, JobMeta] = {}   # immutable parts of known jobs
        self._index: SpoolIndex | None = None  # the lock holder's view (recover())
        self._closed = False
        self._stats = Counter[str]()
        # The last statvfs: (free bytes, monotonic time, ``written`` then); replaced
        # whole, also by the flush thread after each batch.
        self._reading: tuple[int, float, int] | None = None
        self.written = 0        # bytes the spool wrote, ever (IncomingJob reports them)
        self._batch_reads = 0   # readings taken by the flush thread
        self.events: JobEvents = NO_EVENTS   # who hears of job state changes (the audit log)

    # -- start-up ----------------------------------------------------------------------

    def recover(self) -> Recovery:
        """Create the layout, lock it, sweep partial jobs; return the jobs in arrival order."""
        if self._next:
            raise SpoolError("recover() runs once, at start")
        try:
            make_dir(self.directory)
            make_dir(self.jobs_dir)
            self._take_lock()
            for name in os.listdir(self.directory):
                if name.startswith((".next-id.", ".daemon.json.")):  # torn writes
                    unlink_quiet(os.path.join(self.directory, name))
            jobs, highest = sweep(self.jobs_dir, os.listdir(self.jobs_dir), known=self._cache,
                                  count_discard=self.count_discard)
            if self.fsync:
                self._syncer = Syncer(self.jobs_dir, self._sync_method)
                self._syncer.sync([])  # the sweep's unlinks are durable before new ids
            stored = read_file(os.path.join(self.directory, "next-id")) or b"0"
            self._next = max(highest + 1, int(stored) if stored.strip().isdigit() else 0, 1)
        except OSError as exc:
            self._release_lock()  # a later attempt must not find its own lock taken
            raise disk_error(exc, f"spool {self.directory}") from exc
        self._index = SpoolIndex()
        for job in jobs:
            self._index.track(job)
        try:
            self._reserve()
        except OSError as exc:
            # A full disk must not keep the daemon from starting and draining;
            # begin() reserves before it hands out an id (0x02 while refused).
            log.event("warning", "spool_ids_not_reserved", error=str(disk_error(exc, "next-id")))
        self._stats["recovered"] = len(jobs)
        return Recovery(jobs=jobs, discarded=self._stats["discarded"],
                        discarded_bytes=self._stats["discarded_bytes"])

    def _take_lock(self) -> None:
        fd = create(os.path.join(self.directory, "lock"), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(f"spool {self.directory} is in use by another process") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _reserve(self) -> None:
        # Ids stay unique across restarts even after every job was removed: the
        # next-id file is moved ahead in blocks, durably, before ids are used.
        limit = self._next + ID_BLOCK
        write_atomic(os.path.join(self.directory, "next-id"), b"%d\n" % limit, fsync=self.fsync)
        self._limit = limit  # only once durable: a failed write reserves nothing

    # -- space -------------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Bytes available to this process on the spool's filesystem."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def check_space(self, need: int = 0) -> None:
        """Raise DiskFull when storing ``need`` more bytes would go below ``min_free_disk``.

        No free byte at all is full whatever ``min_free_disk`` says: no job fits.
        A recent reading less what was written since is used when it suffices;
        a refusal is always based on a fresh ``statvfs``.
        """
        free, fresh = self._free_estimate(fresh=False)
        if not fresh and (free <= 0 or free - need < self.min_free_disk):
            free, _ = self._free_estimate(fresh=True)
        if free <= 0 or free - need < self.min_free_disk:
            raise DiskFull(f"spool {self.directory}: free space below min_free_disk")

    def _free_estimate(self, *, fresh: bool) -> tuple[int, bool]:
        reading, now = self._reading, time.monotonic()
        if (fresh or reading is None or now - reading[1] > FREE_SPACE_TTL
                or self.written - reading[2] >= FREE_SPACE_EVERY):
            reading = self._read_free(now)
            self._stats["free_space_reads"] += 1
            return reading[0], True
        return reading[0] - (self.written - reading[2]), False

    def _read_free(self, now: float) -> tuple[int, float, int]:
        # ``written`` is taken first: bytes written meanwhile count twice (safe side).
        mark = self.written
        self._reading = (self.free_bytes(), now, mark)
        return self._reading

    # -- receiving -----------------------------------------------------------------------

    def begin(self, *, queue: str, wire_queue: str, peer: str) -> IncomingJob:
        """Start a job: check free space and hand out the next id (arrival order)."""
        if self._closed or not self._next:
            raise SpoolError("spool is closed" if self._closed else "recover() first")
        self.check_space()
        if self._next >= self._limit:
            try:
                self._reserve()
            except OSError as exc:
                raise disk_error(exc, "next-id") from exc
        job_id = f"{self._next:0{ID_WIDTH}d}"
        self._next += 1
        return IncomingJob(self, job_id, queue=queue, wire_queue=wire_queue, peer=peer)

    async def commit(self, job: IncomingJob, *, hold: str = "") -> JobMeta:
        """Publish the job; return once it is durable (shared flush under fsync).

        Raises SpoolError (DiskFull on ENOSPC); a commit that raises — cancelled
        included — leaves no job behind, so the caller must not acknowledge.
        ``hold``: publish it held with that reason; its ``.state`` is written
        before its ``.json``, so no crash can leave it queued.
        """
        job._check_open()  # a second commit must not discard the first one's job
        try:
            meta = job.seal()
            if hold:
                meta = replace(meta, state="held", last_error=hold[:500])
            job.mark("committing")
            state = encode_state(meta) if hold else None
            paths = (meta.control_path, *(f.path for f in meta.files),
                     *([os.path.join(self.jobs_dir, f"{meta.id}.state")] if hold else []),
                     os.path.join(self.jobs_dir, f"{meta.id}.json"))
            item = _Publish(meta.id, record=encode_job(meta), control=job.control_raw,
                            paths=paths, state=state)
            if self.fsync:
                await self._group.submit(item)
            else:
                await trio.lowlevel.checkpoint()
                self._publish(item)
        except BaseException:
            job.mark("open")
            job.discard()  # nothing the sender was not told about may stay
            raise
        job.mark("committed")
        self.written += len(job.control_raw) + len(item.record or b"")
        self._cache[meta.id] = meta
        if self._index is not None:
            self._index.track(meta)
        self._stats["commits"] += 1
        return meta

    async def sync(self) -> None:
        """Make earlier ``update``/``remove`` calls durable (joins the next group commit).

        Writes a full disk refused are tried first (a delivery may have just
        freed space).  A failed flush is logged, not raised: no caller could act.
        """
        self.save_unsaved()
        if self.fsync and self._syncer is not None:
            try:
                await self._group.submit(_Publish("", None, b"", ()))
            except SpoolError as exc:
                log.event("error", "spool_sync_failed", error=str(exc))
        else:
            await trio.lowlevel.checkpoint()

    def _publish(self, item: _Publish) -> None:
        if item.record is None:
            return
        tmp = os.path.join(self.jobs_dir, f".{item.job_id}.json.tmp")
        state = os.path.join(self.jobs_dir, f"{item.job_id}.state")
        try:
            write_file(os.path.join(self.jobs_dir, f"{item.job_id}.cf"), item.control)
            if item.state is not None:
                write_file(state, item.state)
            write_file(tmp, item.record)
            os.rename(tmp, os.path.join(self.jobs_dir, f"{item.job_id}.json"))
        except OSError as exc:
            if item.state is not None:
                unlink_quiet(state)
            raise disk_error(exc, f"job {item.job_id} control file/metadata") from exc

    def _flush(self, items: list[_Publish]) -> list[Exception | None]:
        # Runs in a worker thread, one at a time: publish every record, then one
        # sync makes the whole batch (and all earlier writes) durable.
        errors: list[Exception | None] = []
        for item in items:
            try:
                self._publish(item)
                errors.append(None)
            except SpoolError as exc:
                errors.append(exc)
        assert self._syncer is not None
        try:
            paths = [p for item, e in zip(items, errors, strict=True) if e is None
                     for p in item.paths]
            self._stats["sync_calls"] += self._syncer.sync(paths)
        except OSError as exc:
            return [e or disk_error(exc, "spool sync") for e in errors]
        with contextlib.suppress(OSError):  # one reading per batch, off the event loop
            self._read_free(time.monotonic())
            self._batch_reads += 1
        return errors

    def count_discard(self, nbytes: int) -> None:
        """Internal: ``IncomingJob.discard`` and the recovery sweep report a partial job."""
        self._stats["discarded"] += 1
        self._stats["discarded_bytes"] += nbytes

    # -- reading and changing jobs (also from the CLI, daemon running or not) ---------

    def _base(self, job_id: str) -> JobMeta | None:
        meta = self._cache.get(job_id)
        if meta is None:
            try:
                meta = decode_job(read_file(os.path.join(self.jobs_dir, f"{job_id}.json"))
                                  or b"", job_id, self.jobs_dir)
            except ValueError:  # absent, or not (yet) a job: a reader skips it
                return None
            self._cache[job_id] = meta
        return meta

    def _load(self, job_id: str, has_state: bool = True, listed: bool = False) -> JobMeta | None:
        index = self._index
        if index is not None:  # what this process changed but the disk refused comes first
            if job_id in index.unremoved:
                return None
            if (owed := index.unsaved.get(job_id)) is not None:
                return owed
        base = self._base(job_id)
        # A cached record may belong to a job another process removed since.
        if base is None or not (listed or os.path.exists(
                os.path.join(self.jobs_dir, f"{job_id}.json"))):
            self._cache.pop(job_id, None)  # removed, perhaps by another process
            return None
        state = os.path.join(self.jobs_dir, f"{job_id}.state")
        meta = with_state(base, read_file(state) if has_state else None)
        if index is not None and job_id in index:
            index.track(meta)  # the state as read: the CLI may have changed it
        return meta

    def get(self, job_id: str) -> JobMeta:
        """The job with its current delivery state; KeyError when not there."""
        meta = self._load(job_id) if ID_RE.fullmatch(job_id) else None
        if meta is None:
            raise KeyError(job_id)
        return meta

    def jobs(self, queue: str | None = None) -> list[JobMeta]:
        """Jobs on disk, arrival order, optionally only those of ``queue``."""
        try:
            names = set(os.listdir(self.jobs_dir))
        except FileNotFoundError:
            return []
        ids = sorted((n[:-5] for n in names if n.endswith(".json") and ID_RE.fullmatch(n[:-5])),
                     key=int)
        for gone in self._cache.keys() - set(ids):
            self._cache.pop(gone, None)
        if self._index is not None:
            for gone in self._index.ids() - set(ids):  # removed by another process
                self._index.untrack(gone)
                self._index.unsaved.pop(gone, None)
        found = (self._load(i, f"{i}.state" in names, listed=True) for i in ids)
        return [m for m in found if m is not None and (queue is None or m.queue == queue)]

    def update(self, meta: JobMeta, *, durable: bool = False) -> None:
        """Persist the delivery-state fields of ``meta`` atomically; KeyError if removed.

        ``durable=True`` fsyncs before returning (blocks for one flush): use it
        for transitions that must not be lost, such as holding a job.  In the
        daemon a write the disk refuses never raises: it holds in memory and
        is written later (``save_unsaved``).  Elsewhere: SpoolError/DiskFull.
        """
        if meta.state not in STATES:
            raise ValueError(f"state must be one of {STATES}, not {meta.state!r}")
        index = self._index
        if not (ID_RE.fullmatch(meta.id) and (index is None or meta.id not in index.unremoved)
                and os.path.exists(os.path.join(self.jobs_dir, f"{meta.id}.json"))):
            raise KeyError(meta.id)
        if index is not None:
            index.set_state(self.jobs_dir, meta, fsync=durable and self.fsync)
            return
        try:
            write_state(self.jobs_dir, meta, fsync=durable and self.fsync)
        except OSError as exc:
            raise disk_error(exc, f"job {meta.id} state") from exc

    def remove(self, job_id: str) -> None:
        """Remove a job (after delivery, or purge); idempotent.  See also ``sync()``.

        In the daemon a refused unlink (EROFS, EIO) is retried later, like a
        refused ``update``; the job is gone for this process at once.
        """
        if not ID_RE.fullmatch(job_id):
            return
        base = self._base(job_id)
        paths = tuple(f.path for f in base.files) if base is not None else ()
        if self._index is not None:
            self._index.remove(self.jobs_dir, job_id, paths)
        else:
            unlink_job(self.jobs_dir, job_id, paths)
        self._cache.pop(job_id, None)  # _load() asks the index first

    def open_body(self, file: FileMeta) -> Body:
        """A data file to deliver: its own spool file, from offset 0."""
        return open_file_body(file.path, 0, file.bytes)

    def open_control(self, job: JobMeta) -> Body:
        """The raw control file to deliver."""
        return open_file_body(job.control_path, 0, job.control_bytes)

    def save_unsaved(self) -> int:
        """Write what the disk refused before; returns how many changes still wait."""
        return self._index.save(self.jobs_dir, fsync=self.fsync) if self._index else 0

    @property
    def index(self) -> SpoolIndex | None:
        """The daemon's live bookkeeping (None before ``recover()``): counts for the gauges."""
        return self._index

    def usage(self) -> SpoolUsage:
        """Jobs and bytes held, free space, and job counts by (queue, state)."""
        if self._index is not None:  # the daemon's bookkeeping, no scan
            return SpoolUsage(jobs=len(self._index), bytes=self._index.bytes,
                              free_bytes=self.free_bytes(),
                              by_queue_state=dict(self._index.counts()))
        jobs = self.jobs()
        return SpoolUsage(jobs=len(jobs), bytes=sum(j.total_bytes + j.control_bytes for j in jobs),
                          free_bytes=self.free_bytes(),
                          by_queue_state=dict(Counter((j.queue, j.state) for j in jobs)))

    def statistics(self) -> SpoolStatistics:
        group = self._group.statistics()
        method = self._syncer.method if self._syncer is not None else "none"
        return SpoolStatistics(
            commits=self._stats["commits"], batches=group.batches,
            sync_calls=self._stats["sync_calls"], largest_batch=group.largest_batch,
            discarded=self._stats["discarded"], discarded_bytes=self._stats["discarded_bytes"],
            recovered=self._stats["recovered"], sync_method=method,
            free_space_reads=self._stats["free_space_reads"] + self._batch_reads)

    async def aclose(self) -> None:
        """Wait for a running flush, record the next id, release the lock; idempotent."""
        await self._group.wait_idle()
        if self._closed:
            return
        self._closed = True
        if left := self.save_unsaved():
            # Only delivery state: the jobs are on disk (docs/spool.md, "A full disk").
            log.event("warning", "spool_writes_unsaved", waiting=left)
        # A clean stop continues the id sequence exactly where it was; if that
        # write fails the reserved block still keeps ids unique.
        with contextlib.suppress(OSError):
            if self._next:
                write_atomic(os.path.join(self.directory, "next-id"), b"%d\n" % self._next,
                             fsync=self.fsync)
        if self._syncer is not None:
            self._syncer.close()
            self._syncer = None
        self._release_lock()


def _is_a_backend(spool: Spool) -> SpoolBackend[IncomingJob]:
    return spool  # checked by mypy: Spool implements relay.spoolbackend's interface
