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

A small job (up to ``segment_threshold`` bytes) has no files at all: it is one
record in a segment file (``relay.spoolsegjobs``), appended by the flush
thread and made durable by one ``fdatasync`` of the segment per batch; its
state changes and its removal are records too.  ``jobs()`` and ``get()``
merge both kinds in id (arrival) order.

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
import functools
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import trio

from relay import log
from relay.durablefiles import create, disk_error, make_dir, read_file, unlink_quiet, write_atomic
from relay.errors import DiskFull, SpoolError
from relay.groupcommit import GroupCommit, Syncer
from relay.jobevents import NO_EVENTS, JobEvents
from relay.spoolbackend import Body, Session, SpoolBackend, open_file_body
from relay.spoolbatch import CommitEntry, commit_many
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
    in_folder,
    state_of,
    with_state,
)
from relay.spoolindex import SpoolIndex, unlink_job, usage_of, write_state
from relay.spooljob import MAX_FILES_PER_JOB, WRITEBACK_CHUNK, DataWriter, IncomingJob
from relay.spoolpublish import Publish, Staged, make_item, publish
from relay.spoolrecovery import sweep
from relay.spoolsegjobs import SEGMENT_THRESHOLD, SegmentJobs
from relay.spoolspace import FreeSpace

# The public names of relay.spooljob and relay.spoolformat are this module's too.
__all__ = ["ID_BLOCK", "ID_WIDTH", "MAX_FILES_PER_JOB", "SEGMENT_THRESHOLD", "STATES",
           "WRITEBACK_CHUNK",
           "DataWriter", "FileMeta", "IncomingJob", "JobMeta", "Recovery", "Spool",
           "SpoolBusy", "SpoolStatistics", "SpoolUsage"]

ID_BLOCK = 1000              # ids reserved per durable write of the ``next-id`` file


class SpoolBusy(SpoolError):
    """Another process holds the spool lock: a daemon is running on it."""


def take_lock(directory: str) -> int:
    """The spool's ``lock`` file, locked for this process (one daemon or CLI writer a spool)."""
    fd = create(os.path.join(directory, "lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolBusy(f"spool {directory} is in use by another process") from None
    return fd


def release_lock(fd: int) -> int:
    """Give up the lock taken by ``take_lock`` (``fd`` -1: none held); returns -1."""
    if fd >= 0:
        os.close(fd)
    return -1


class Spool(FreeSpace):
    """The spool directory: receive (``begin``/``commit``), read, update, remove jobs.

    ``recover()`` must run first in the daemon (it takes the spool lock and
    sweeps debris).  Readers such as the CLI may use ``jobs``/``get``/
    ``update``/``remove`` without it, also while the daemon runs.  ``commit``
    needs no background task: concurrent callers share flushes by themselves.
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True,
                 min_free_disk: int = 0, sync_method: str = "auto",
                 segment_threshold: int = SEGMENT_THRESHOLD) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.jobs_dir = os.path.join(self.directory, "jobs")
        self.fsync = fsync
        self.segment_threshold = segment_threshold  # 0: every job gets files
        self._seg = SegmentJobs(self.directory, fsync=fsync)
        self._files_dirty = False  # a .state/.json changed since the last flush
        self._synced = False       # the last flush's sync succeeded (its upkeep may run)
        self.min_free_disk = min_free_disk
        self._sync_method = sync_method
        self._syncer: Syncer | None = None
        self._group: GroupCommit[Publish] = GroupCommit(self._flush, after=self._after_flush)
        self._lock_fd = -1
        self._reserving = threading.Lock()
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
            small, seg_highest = self._seg.recover(self.count_discard)
            jobs = sorted([*jobs, *small], key=lambda m: int(m.id))
            stored = read_file(os.path.join(self.directory, "next-id")) or b"0"
            self._next = max(highest + 1, seg_highest + 1,
                             int(stored) if stored.strip().isdigit() else 0, 1)
        except OSError as exc:
            self._release_lock()  # a later attempt must not find its own lock taken
            raise disk_error(exc, f"spool {self.directory}") from exc
        self._index = SpoolIndex()
        self._index.on_full = self.saw_full
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
        self._lock_fd = take_lock(self.directory)

    def _release_lock(self) -> None:
        self._lock_fd = release_lock(self._lock_fd)

    def _reserve(self) -> None:
        # Ids stay unique across restarts even after every job was removed: the
        # next-id file is moved ahead in blocks, durably, before ids are used.
        # The flush thread reserves the next block ahead of need (off the event
        # loop); begin() only when that did not happen in time.  One at a time.
        with self._reserving:
            limit = max(self._limit, self._next + ID_BLOCK)
            write_atomic(os.path.join(self.directory, "next-id"), b"%d\n" % limit,
                         fsync=self.fsync)
            self._limit = limit  # only once durable: a failed write reserves nothing

    # -- receiving -----------------------------------------------------------------------

    def begin(self, *, queue: str, wire_queue: str, peer: str,
              session: Session | None = None) -> IncomingJob:
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

    async def commit(self, job: IncomingJob, *, hold: str = "",
                     on_durable: Callable[[JobMeta], Callable[[], None] | None] | None = None
                     ) -> JobMeta:
        """Publish the job; return once it is durable (shared flush under fsync).

        Raises SpoolError (DiskFull on ENOSPC); a commit that raises — cancelled
        included — leaves no job behind, so the caller must not acknowledge.
        ``hold``: publish it held with that reason; its ``.state`` is written
        before its ``.json``, so no crash can leave it queued.  ``on_durable``:
        called with the job's final metadata in the flush thread, right after
        the batch's sync made it durable and before this returns (under
        ``fsync``; else not at all); what it returns is called once the batch's
        every ``on_durable`` ran (one write for a batch's replies to a worker).
        """
        job._check_open()  # a second commit must not discard the first one's job
        staged = Staged()
        try:
            item = self.stage(staged, job, hold, on_durable)
            if self.fsync:
                await self._group.submit(item)
            else:
                await trio.lowlevel.checkpoint()
                publish(self.jobs_dir, self._seg, item)
        except BaseException as exc:
            self.unstage(staged, job, exc)
            raise
        return self.finish(staged, job)

    def stage(self, staged: Staged, job: IncomingJob, hold: str,
              on_durable: Callable[[JobMeta], Callable[[], None] | None] | None) -> Publish:
        """``commit``'s first half: seal the job, the item its flush publishes."""
        # A job held in memory is sealed with its body names in the segment
        # folder at once (no copy of the metadata per job afterwards).
        meta = job.seal(self._seg.folder if job.in_memory else None)
        if job.in_memory and not self._seg.fits(meta):
            job.spill()  # a record this large would not fit in a segment
            meta = job.seal()
        staged.small = small = job.in_memory
        if hold:
            meta = replace(meta, state="held", last_error=hold[:500])
        job.mark("committing")
        notify = (None if on_durable is None or not self.fsync
                  else functools.partial(_final_meta, on_durable, meta, self.jobs_dir))
        staged.meta = meta
        staged.item = make_item(self.jobs_dir, job, meta, hold=bool(hold), small=small,
                                notify=notify)
        return staged.item

    def unstage(self, staged: Staged, job: IncomingJob, exc: BaseException) -> None:
        """A commit that failed (or was cancelled) before its job was durable: it goes."""
        if isinstance(exc, DiskFull):
            self.saw_full()
        if staged.small:
            self._seg.forget(job.id)  # its record, if appended, is no job
        job.mark("open")
        job.discard()  # nothing the sender was not told about may stay

    def finish(self, staged: Staged, job: IncomingJob) -> JobMeta:
        """``commit``'s second half, the job durable: the spool's view of it."""
        meta, item, small = staged.meta, staged.item, staged.small
        assert meta is not None and item is not None
        job.mark("committed")
        self.written += len(job.control_raw) + len(item.record or b"")
        if small and not item.filed:
            self._seg.committed(meta)
        else:
            if small:  # written as files after all (relay.spoolpublish)
                meta = in_folder(meta, self.jobs_dir)
            self._cache[meta.id] = meta
        if self._index is not None:
            self._index.track(meta)
        self._stats["commits"] += 1
        return meta

    async def commit_many(self, entries: list[CommitEntry]) -> list[JobMeta | Exception]:
        """Several jobs (job, hold, on_durable), each as ``commit`` would, made durable by
        one hand-off to the group commit (``relay.spoolbatch``): one result each."""
        return await commit_many(self, entries)

    async def sync(self) -> None:
        """Make earlier ``update``/``remove`` calls durable (joins the next group commit).

        Writes a full disk refused are tried first (a delivery may have just
        freed space).  A failed flush is logged, not raised: no caller could act.
        """
        self.save_unsaved()
        if self.fsync and self._syncer is not None:
            try:
                await self._group.submit(Publish("", None, b"", ()))
            except SpoolError as exc:
                log.event("error", "spool_sync_failed", error=str(exc))
        else:
            await trio.lowlevel.checkpoint()
            if self._seg.log is not None:  # nothing to make durable: collect at once
                self._seg.log.collect()
                self._seg.upkeep()

    def _owes_sync(self) -> bool:
        log = self._seg.log
        return self.fsync and self._syncer is not None and (
            self._files_dirty or (log is not None and log.dirty))

    def _flush(self, items: list[Publish]) -> list[Exception | None]:
        # Runs in a worker thread, one at a time: publish every record, then one
        # sync makes the whole batch (and all earlier writes) durable.
        self._synced = False   # set again only once this flush's sync succeeded
        errors: list[Exception | None] = []
        paths: list[str] = []
        for item in items:
            try:
                paths += publish(self.jobs_dir, self._seg, item)
                errors.append(None)
            except SpoolError as exc:
                errors.append(exc)
        assert self._syncer is not None
        try:
            if paths or self._files_dirty or self._seg.log is None:
                self._files_dirty = False
                self._stats["sync_calls"] += self._syncer.sync(paths)
            if self._seg.log is not None:  # one fdatasync of the segment for the batch
                self._stats["sync_calls"] += self._seg.log.sync(collect=True)
        except OSError as exc:
            errors = [e or disk_error(exc, "spool sync") for e in errors]
            self._heed(errors)
            return errors
        self._heed(errors)
        self._synced = True
        with contextlib.suppress(OSError):  # one reading per batch, off the event loop
            self._read_free(time.monotonic())
            self._batch_reads += 1
        # Last: nothing after a reply may fail the batch (its jobs would be discarded).
        _notify(items, errors)
        return errors

    def _after_flush(self) -> None:
        # In the flush thread, after the batch's commits were woken (they need
        # neither), before the next batch: segment upkeep and the next id block.
        if not self._synced:   # the flush's sync failed: nothing is moved after it
            return
        self._synced = False
        with contextlib.suppress(OSError):  # a record copied forward waits for the next sync
            self._seg.upkeep()
        if self._limit and self._limit - self._next < ID_BLOCK // 2:
            with contextlib.suppress(OSError):  # begin() tries again when it runs out
                self._reserve()

    def _heed(self, errors: list[Exception | None]) -> None:
        if any(isinstance(e, DiskFull) for e in errors):
            self.saw_full()   # intake refuses on a fresh reading from now

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
        if (small := self._small(job_id)) is not None:
            return small
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

    def _small(self, job_id: str) -> JobMeta | None:
        # The daemon serves its segment jobs from memory; a reader reads the segments.
        if self._index is not None:
            return self._seg.jobs.get(job_id)
        return self._seg.view().get(job_id) if os.path.isdir(self._seg.folder) else None

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
        small = self._seg.jobs if self._index is not None else self._seg.view()
        if self._index is not None:
            for gone in self._index.ids() - set(ids) - small.keys():  # removed by another process
                self._index.untrack(gone)
                self._index.unsaved.pop(gone, None)
        found = [self._load(i, f"{i}.state" in names, listed=True) for i in ids]
        found += [self._load(i) if self._index is not None else m for i, m in small.items()]
        return sorted((m for m in found if m is not None and (queue is None or m.queue == queue)),
                      key=lambda m: int(m.id))

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
        if ID_RE.fullmatch(meta.id) and (small := self._small(meta.id)) is not None:
            self._update_small(state_of(small, meta), durable=durable)
            return
        if not (ID_RE.fullmatch(meta.id) and (index is None or meta.id not in index.unremoved)
                and os.path.exists(os.path.join(self.jobs_dir, f"{meta.id}.json"))):
            raise KeyError(meta.id)
        self._files_dirty = True
        if index is not None:
            index.set_state(meta, functools.partial(
                write_state, self.jobs_dir, meta, fsync=durable and self.fsync,
                only_if_there=True))
            return
        try:
            write_state(self.jobs_dir, meta, fsync=durable and self.fsync)
        except OSError as exc:
            raise disk_error(exc, f"job {meta.id} state") from exc

    def _update_small(self, meta: JobMeta, *, durable: bool) -> None:
        # A STATE record: appended by the daemon, or by a reader holding the lock.
        if self._index is not None:
            if meta.id in self._index.unremoved:
                raise KeyError(meta.id)
            self._seg.jobs[meta.id] = meta  # served as written, even if the disk refuses
            self._index.set_state(meta, functools.partial(
                self._seg.write_state, meta, durable=durable))
        else:
            self._offline(meta.id, meta)

    def _offline(self, job_id: str, state: JobMeta | None) -> None:
        # Only the lock holder appends to segments: a running daemon's readers
        # ask it instead (SpoolBusy is the SpoolError ``lpd-relay spool`` expects).
        self._take_lock()
        try:
            self._seg.change_offline(job_id, state)
        except OSError as exc:
            raise disk_error(exc, f"job {job_id} segment record") from exc
        finally:
            self._release_lock()

    def remove(self, job_id: str) -> None:
        """Remove a job (after delivery, or purge); idempotent.  See also ``sync()``.

        In the daemon a refused unlink (EROFS, EIO) is retried later, like a
        refused ``update``; the job is gone for this process at once.
        """
        if not ID_RE.fullmatch(job_id):
            return
        if self._index is not None and job_id in self._seg.jobs:
            self._index.remove(job_id, self._seg.remove(job_id))
            return
        if self._index is None and self._small(job_id) is not None:
            self._offline(job_id, None)
            return
        base = self._base(job_id)
        paths = tuple(f.path for f in base.files) if base is not None else ()
        self._files_dirty = True
        if self._index is not None:
            self._index.remove(job_id, functools.partial(unlink_job, self.jobs_dir, job_id,
                                                         paths))
        else:
            unlink_job(self.jobs_dir, job_id, paths)
        self._cache.pop(job_id, None)  # _load() asks the index first

    def remove_many(self, job_ids: list[str]) -> None:
        """``remove`` of each of ``job_ids`` (a delivered batch): in the daemon the
        segment jobs' DONE records go in one write instead of one each."""
        index = self._index
        small = [j for j in job_ids if j in self._seg.jobs] if index is not None else []
        if index is not None and small:
            index.remove_many(small, self._seg.remove_many(small), self._seg.remove)
        others = set(small)
        for job_id in job_ids:
            if job_id not in others:
                self.remove(job_id)

    def open_body(self, file: FileMeta) -> Body:
        """A data file to deliver: its own spool file, from offset 0."""
        return open_file_body(file.path, 0, file.bytes)

    def open_control(self, job: JobMeta) -> Body:
        """The raw control file to deliver."""
        return open_file_body(job.control_path, 0, job.control_bytes)

    def save_unsaved(self) -> int:
        """Write what the disk refused before; returns how many changes still wait."""
        return self._index.save() if self._index else 0

    @property
    def index(self) -> SpoolIndex | None:
        """The daemon's live bookkeeping (None before ``recover()``): counts for the gauges."""
        return self._index

    def usage(self) -> SpoolUsage:
        """Jobs and bytes held, free space, and job counts by (queue, state)."""
        return usage_of(self._index, self.jobs, self.free_bytes())

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
        """Sync what is owed, record the next id, release the lock; idempotent.

        A graceful stop can cancel a delivery's ``sync()`` before its flush
        began, leaving that delivery's DONE records owed: they are made
        durable here.
        """
        if not self._closed and self._owes_sync():
            await self.sync()
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
        self._seg.close()
        self._release_lock()


def _final_meta(on_durable: Callable[[JobMeta], Callable[[], None] | None], meta: JobMeta,
                jobs_dir: str, item: Publish) -> Callable[[], None] | None:
    # The metadata ``commit`` returns: a segment job the flush wrote as files names them.
    return on_durable(in_folder(meta, jobs_dir) if item.meta is not None and item.filed
                      else meta)


def _notify(items: list[Publish], errors: list[Exception | None]) -> None:
    # In the flush thread, the batch durable: each durable item's hook, then each
    # distinct function they returned once (bound methods of one object are equal).
    after: dict[Callable[[], None], None] = {}
    for item, error in zip(items, errors, strict=True):
        if error is None and item.notify is not None:
            try:
                if (then := item.notify(item)) is not None:
                    after[then] = None
            except Exception as exc:   # a hook's failure must not fail the batch
                log.event("error", "durable_hook_failed", job=item.job_id, error=repr(exc))
    for then in after:
        try:
            then()
        except Exception as exc:
            log.event("error", "durable_hook_failed", error=repr(exc))


def _is_a_backend(spool: Spool) -> SpoolBackend[IncomingJob]:
    return spool  # checked by mypy: Spool implements relay.spoolbackend's interface
