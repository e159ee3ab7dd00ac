"""The shared spool on PostgreSQL: ``SpoolBackend`` for any number of relays (SPEC §10).

Intake receives a job exactly as the local spool does (``relay.spooljob``):
a small one (up to the local spool's segment threshold) in memory, a larger
one into this node's body cache (``<spool_dir>/pg-cache``), so the server can
still splice straight from the socket to a file.  ``commit`` then stores the
job in the database — its row, the raw control file and the data files in
``chunk_size`` rows — and returns only after that transaction committed with
``synchronous_commit = on``: the ack follows the commit (SPEC §10, §4.4).
Concurrent jobs share one transaction and one commit (``relay.groupcommit``),
as the local spool's jobs share one flush: one statement for the group's rows
and in-memory chunks, a binary ``COPY`` for cached files; a large job gets a
transaction of its own so small ones never wait behind it.

psycopg's synchronous API runs in worker threads over a bounded pool of
sessions (``pool_size``, ``relay.spoolpgsession``): trio has no PostgreSQL
driver, and a thread per call is what the local spool does for its flushes
(docs/spool.md says why and what was measured).  Nothing blocking runs on the event loop except the
few reads the synchronous interface asks for and the daemon calls rarely
(``jobs``, a ``get`` of a job this node never saw, lpq's cluster view).

Delivery-state changes and removals are kept in memory and written by
``sync`` (after each delivery: removals alone on the event loop's own
session, ``relay.spoolpgloop``) or the service loop: reading and changing
jobs is ``relay.spoolpgjobs``, which ``PgSpool`` builds on; delivery across nodes —
queue leases, LISTEN/NOTIFY, feeding the runners — is ``relay.spoolpgfeed``.
A database that cannot take a job (down, read-only, a hot standby) makes
``check_space``/``begin``/``commit`` raise ``DatabaseUnavailable``: 0x02.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import trio

from relay import log
from relay.durablefiles import make_dir, write_file
from relay.errors import DiskFull, SpoolError
from relay.groupcommit import GroupCommit
from relay.jobevents import NO_EVENTS, JobEvents
from relay.spool import release_lock, take_lock
from relay.spoolbackend import Body, Session, SpoolBackend, open_file_body, register_locator
from relay.spoolformat import FileMeta, JobMeta, Recovery, SpoolStatistics, SpoolUsage
from relay.spoolindex import SpoolIndex, usage_of
from relay.spooljob import IncomingJob
from relay.spoolpgcache import BodyCache
from relay.spoolpgconfig import SpoolConfig, redact_dsn
from relay.spoolpgdb import (
    REMOVE_SQL,
    NewJob,
    fetch_bodies,
    fetch_small_bodies,
    heartbeat,
    insert_jobs,
)
from relay.spoolpgjobs import JobStates
from relay.spoolpgloop import LoopSession
from relay.spoolpgschema import check_schema
from relay.spoolpgsession import DatabaseUnavailable, close_pool
from relay.spoolsegjobs import SEGMENT_THRESHOLD

CACHE_DIR = "pg-cache"
ID_DIGITS = 19            # 16 digits of microseconds, 3 of the node's slot
BIG_JOB_CHUNKS = 4        # a job of more chunks than this is big (PgSpool.big_job)


class PgSpool(JobStates):
    """The PostgreSQL backend; ``recover()`` first, then ``relay.spoolpgfeed`` runs it."""

    fsync = False   # for IncomingJob: durability is the database's commit, not ours

    def __init__(self, directory: str | os.PathLike[str], config: SpoolConfig, *,
                 min_free_disk: int = 0) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.jobs_dir = os.path.join(self.directory, CACHE_DIR)
        self.config = config
        self.node = config.node_name()
        self.where = redact_dsn(config.dsn)
        self.min_free_disk = min_free_disk
        self.written = 0
        # Jobs up to this size stay in memory from intake to the database (no
        # cache file is created or unlinked for them); larger ones spill to
        # the body cache and are streamed from there by COPY.
        self.segment_threshold = min(SEGMENT_THRESHOLD, config.chunk_size)
        # Jobs above this commit in a transaction of their own, so small ones never
        # wait behind them, and are fetched back one by one, not in a batch file.
        self.big_job = BIG_JOB_CHUNKS * config.chunk_size
        self.events: JobEvents = NO_EVENTS   # the audit log's subscriber, when configured
        self.problem = ""                    # why the database cannot take jobs ("" = it can)
        self.leased: set[str] = set()        # queues this node delivers (relay.spoolpgfeed)
        self.on_commit: Callable[[JobMeta], None] = lambda meta: None
        self.on_change: Callable[[], None] = lambda: None   # a job left (the feeder refills)
        self._pool: Any = None
        self._loop: LoopSession | None = None    # removals, from the event loop
        self._group: GroupCommit[NewJob] = GroupCommit(self._flush)
        self._limiter = trio.CapacityLimiter(max(1, config.pool_size - 1))
        self._writes_lock = trio.Lock()
        self._known: dict[str, JobMeta] = {}     # jobs this node holds or accepted
        self._updates: dict[str, JobMeta] = {}   # delivery state the database still owes
        self._removals: set[str] = set()
        self._index: SpoolIndex | None = None
        self._lock_fd = -1
        self._slot = 0
        self._last_us = 0
        self._stats = Counter[str]()
        self._cache = BodyCache(self.jobs_dir)

    # -- start-up ----------------------------------------------------------------------

    def recover(self) -> Recovery:
        """Lock the local directory, empty the body cache, open the pool, check the schema.

        The jobs are the cluster's, fed to the runners by ``relay.spoolpgfeed``
        once this node holds their queue's lease, so none are returned here.
        """
        if self._pool is not None:
            raise SpoolError("recover() runs once, at start")
        try:
            make_dir(self.directory)
            self._take_lock()
            shutil.rmtree(self.jobs_dir, ignore_errors=True)   # the database has every body
            make_dir(self.jobs_dir)
            register_locator(self.jobs_dir, self._cache.locate)
        except OSError as exc:
            self._release_lock()
            raise SpoolError(f"spool {self.directory}: {exc.strerror or exc}") from exc
        try:
            with self.connect(plain=True) as conn:
                check_schema(conn)
                default = conn.execute("SHOW synchronous_commit").fetchone()[0]
                self._slot = int(conn.execute("SELECT nextval('lpd_node_slot')").fetchone()[0])
                version = conn.execute("SHOW server_version").fetchone()[0]
                heartbeat(conn, self.node)   # nodes starting together share at once
        except SpoolError:
            self._release_lock()
            raise
        except Exception as exc:
            self._release_lock()
            raise self.unavailable(exc) from exc
        log.event("info", "spool_database", database=self.where, node=self.node,
                  server_version=version, synchronous_commit_default=default,
                  synchronous_commit="on")
        self._open_pool()
        self._loop = LoopSession(self.connect, {"remove": REMOVE_SQL}, self.config.db_timeout)
        self._index = SpoolIndex()
        return Recovery(jobs=[], discarded=0, discarded_bytes=0)

    def _take_lock(self) -> None:
        self._lock_fd = take_lock(self.directory)   # the local spool's lock, same file

    def _release_lock(self) -> None:
        self._lock_fd = release_lock(self._lock_fd)

    # -- intake ------------------------------------------------------------------------

    def check_space(self, need: int = 0) -> None:
        """0x02 while the database cannot take jobs, or the body cache's disk is full."""
        if self.problem:
            raise DatabaseUnavailable(f"database {self.where} {self.problem}")
        st = os.statvfs(self.jobs_dir)
        free = st.f_bavail * st.f_frsize
        if free <= 0 or free - need < self.min_free_disk:
            raise DiskFull(f"spool {self.directory}: free space below min_free_disk")

    def begin(self, *, queue: str, wire_queue: str, peer: str,
              session: Session | None = None) -> IncomingJob:
        """Start a job with a cluster-unique id: microseconds, then this node's slot."""
        if self._pool is None:
            raise SpoolError("recover() first")
        self.check_space()
        now = max(time.time_ns() // 1000, self._last_us + 1)
        self._last_us = now
        job_id = f"{now:0{ID_DIGITS - 3}d}{self._slot:03d}"
        return IncomingJob(self, job_id, queue=queue, wire_queue=wire_queue, peer=peer)

    def count_discard(self, nbytes: int) -> None:
        self._stats["discarded"] += 1
        self._stats["discarded_bytes"] += nbytes

    async def commit(self, job: IncomingJob, *, hold: str = "") -> JobMeta:
        """Store the job; return once its transaction committed (a raise leaves no job)."""
        job._check_open()
        try:
            meta = job.seal()
            if hold:
                meta = replace(meta, state="held", last_error=hold[:500])
            job.mark("committing")
            data = tuple(job.data_parts(meta.files)) if job.in_memory else None
            item = NewJob(meta, job.control_raw, self.node, data)
            if job.bytes > self.big_job:
                errors = await trio.to_thread.run_sync(self._flush, [item],
                                                       limiter=self._limiter)
                if errors[0] is not None:
                    raise errors[0]
            else:
                await self._group.submit(item)
        except BaseException:
            job.mark("open")
            job.discard()
            raise
        job.mark("committed")
        self._stats["commits"] += 1
        self.written += job.bytes
        if meta.queue in self.leased:
            self._known[meta.id] = meta      # its bodies are here: delivered from the cache
        if self._index is not None:
            self._index.track(meta)
        self.on_commit(meta)
        return meta

    def _flush(self, items: list[NewJob]) -> list[Exception | None]:
        # A worker thread: one transaction for the batch.  Then the cache: a
        # job this node delivers keeps its bodies there (delivery reads them
        # from the cache): an in-memory job's in one batch file for the whole
        # group, a spilled job's control file beside its data files.  Another
        # node's job leaves it — here, since an unlink of a just-written file
        # can take a millisecond.
        try:
            self.call(lambda conn: insert_jobs(conn, items, self.config.chunk_size))
        except SpoolError as exc:
            return [exc for _ in items]
        self._stats["transactions"] += 1
        leased = self.leased
        kept: list[tuple[str, bytes]] = []
        for item in items:
            if item.meta.queue not in leased:
                if item.data is None:
                    self._cache.drop(item.meta)
            elif item.data is not None:
                kept.append((item.meta.control_path, item.control))
                kept += zip((f.path for f in item.meta.files), item.data, strict=True)
            else:
                with contextlib.suppress(OSError):
                    write_file(item.meta.control_path, item.control)
        if kept:
            with contextlib.suppress(OSError):   # then a delivery fetches them back
                self._cache.keep(kept)
        return [None for _ in items]

    # -- bodies ------------------------------------------------------------------------

    async def prefetch(self, meta: JobMeta) -> None:
        """Bring ``meta``'s bodies into the cache (a worker thread); ``KeyError`` if gone."""
        if self._cache.cached(meta):
            await trio.lowlevel.checkpoint()
            return
        await self.acall(lambda conn: fetch_bodies(conn, meta))

    async def prefetch_many(self, metas: Sequence[JobMeta]) -> list[JobMeta]:
        """``prefetch`` for several jobs: the small ones in one call (two queries, one
        batch file), not a thread, a few round trips and two files each; the jobs
        still in the database, in order."""
        todo = [m for m in metas if not self._cache.cached(m)]
        small = [m for m in todo if m.total_bytes <= self.big_job]
        gone: set[str] = set()
        if small:
            batch = self._cache.new_batch()
            where = await self.acall(lambda conn: fetch_small_bodies(conn, small, batch))
            self._cache.add(batch, where)
            gone.update(m.id for m in small if m.control_path not in where)
        for meta in todo:
            if meta.total_bytes > self.big_job:
                try:
                    await self.prefetch(meta)
                except KeyError:
                    gone.add(meta.id)
        await trio.lowlevel.checkpoint()
        return [m for m in metas if m.id not in gone]

    def _ensure(self, job_id: str, path: str) -> None:
        if self._cache.has(path):
            return
        with contextlib.suppress(KeyError, SpoolError):   # then open_file_body says "missing"
            meta = self.get(job_id)
            self.call(lambda conn: fetch_bodies(conn, meta))

    def open_body(self, file: FileMeta) -> Body:
        self._ensure(os.path.basename(file.path).split(".", 1)[0], file.path)
        return open_file_body(file.path, 0, file.bytes)

    def open_control(self, job: JobMeta) -> Body:
        self._ensure(job.id, job.control_path)
        return open_file_body(job.control_path, 0, job.control_bytes)

    # -- bookkeeping -------------------------------------------------------------------

    @property
    def index(self) -> SpoolIndex | None:
        return self._index

    def free_bytes(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def usage(self) -> SpoolUsage:
        return usage_of(self._index, self.jobs, self.free_bytes())

    def statistics(self) -> SpoolStatistics:
        group = self._group.statistics()
        return SpoolStatistics(
            commits=self._stats["commits"], batches=group.batches,
            sync_calls=self._stats["transactions"], largest_batch=group.largest_batch,
            discarded=self._stats["discarded"], discarded_bytes=self._stats["discarded_bytes"],
            recovered=0, sync_method="postgresql")

    async def aclose(self) -> None:
        """Wait for a running commit, write what is owed (bounded), close the pool."""
        await self._group.wait_idle()
        if self._pool is not None:
            with trio.move_on_after(self.config.db_timeout):
                await self.sync()
            pool, self._pool = self._pool, None
            loop, self._loop = self._loop, None
            if loop is not None:
                loop.close()
            await trio.to_thread.run_sync(close_pool, pool)
            register_locator(self.jobs_dir, None)
        self._release_lock()


def _is_a_backend(spool: PgSpool) -> SpoolBackend[IncomingJob]:
    return spool  # checked by mypy: PgSpool implements relay.spoolbackend's interface
