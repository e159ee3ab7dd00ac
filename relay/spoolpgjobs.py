"""The shared spool's jobs as this node sees them: what it knows, what the database owes.

``PgSpool`` keeps the jobs it accepted or delivers (``_known``), and, until
``sync`` writes them, the delivery-state changes (``_updates``) and removals
(``_removals``) its deliveries made: every read here (``get``, ``jobs``,
lpq's cluster view) lays those over what the database returns, so this
process reads its own changes before the database has them.  ``sync``
writes them after each delivery in one statement (``apply_writes``), a
delivery's removals alone on the event loop's own session
(``relay.spoolpgloop``); one that fails leaves them kept for the next.  A mixin, as ``Sessions`` is:
``PgSpool`` holds the state and is the one class built from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from relay import log
from relay.errors import SpoolError
from relay.spoolformat import STATES, JobMeta
from relay.spoolindex import SpoolIndex
from relay.spoolpgcache import BodyCache
from relay.spoolpgdb import apply_writes, delete_jobs, load_jobs, text_array
from relay.spoolpgloop import LoopSession
from relay.spoolpgsession import Sessions


class JobStates(Sessions):
    """Reading and changing the shared spool's jobs; ``relay.spoolpg.PgSpool`` is one."""

    jobs_dir: str                          # the body cache
    on_change: Callable[[], None]          # a job left (the feeder refills)
    _known: dict[str, JobMeta]             # jobs this node holds or accepted
    _updates: dict[str, JobMeta]           # delivery state the database still owes
    _removals: set[str]                    # removals the database still owes
    _index: SpoolIndex | None
    _cache: BodyCache
    _loop: LoopSession | None              # removals, from the event loop
    _writes_lock: trio.Lock

    def remember(self, meta: JobMeta) -> None:
        """Internal (the feeder): a job this node now delivers, as the database has it."""
        if meta.id not in self._updates and meta.id not in self._removals:
            self._known[meta.id] = meta

    def owes(self, job_id: str) -> bool:
        """Internal (the gauges): a change to this job the database has not taken yet."""
        return job_id in self._updates or job_id in self._removals

    def forget(self, job_id: str) -> None:
        """Internal (the feeder): a job another node delivers now; its cache goes."""
        meta = self._known.pop(job_id, None)
        if meta is not None:
            self._cache.drop(meta)

    def get(self, job_id: str) -> JobMeta:
        if job_id in self._removals:
            raise KeyError(job_id)
        meta = self._known.get(job_id)
        if meta is not None:
            return meta
        found = self.call(lambda conn: load_jobs(conn, self.jobs_dir, ids=[job_id]))
        if not found:
            raise KeyError(job_id)
        return found[0][0]

    def jobs(self, queue: str | None = None) -> list[JobMeta]:
        """The cluster's jobs (of ``queue``), id order: one query, blocking."""
        return [m for m, _ in self.jobs_with_node(queue)]

    def jobs_with_node(self, queue: str | None = None) -> list[tuple[JobMeta, str]]:
        """``jobs`` with the node that accepted each (``spool list``)."""
        found = self.call(lambda conn: load_jobs(
            conn, self.jobs_dir, queues=None if queue is None else [queue]))
        return [(self._updates.get(m.id, m), n) for m, n in found if m.id not in self._removals]

    def update(self, meta: JobMeta, *, durable: bool = False) -> None:
        """Keep the new delivery state; written by the next ``sync`` (or within a second)."""
        if meta.state not in STATES:
            raise ValueError(f"state must be one of {STATES}, not {meta.state!r}")
        if meta.id in self._removals:
            raise KeyError(meta.id)
        if self._pool is None:   # the CLI: write now
            self.call(lambda conn: apply_writes(conn, [meta], []))
            return
        self._known[meta.id] = meta
        self._updates[meta.id] = meta
        if self._index is not None and meta.id in self._index:
            self._index.track(meta)

    def remove(self, job_id: str) -> None:
        """Forget a job; the database row (and its chunks) go with the next ``sync``."""
        meta = self._known.pop(job_id, None)
        if meta is not None:
            self._cache.drop(meta)
        self._updates.pop(job_id, None)
        self._removals.add(job_id)
        if self._index is not None:
            self._index.untrack(job_id)
        self.on_change()

    def delete_now(self, job_ids: Sequence[str]) -> list[str]:
        """Remove jobs from the database at once (lprm from any node); the ids removed."""
        if not job_ids:
            return []
        removed = self.call(lambda conn: delete_jobs(conn, list(job_ids)))
        for job_id in removed:
            self.forget(job_id)
            if self._index is not None:
                self._index.untrack(job_id)
        return removed

    async def sync(self) -> None:
        """Write the kept state changes and removals (one transaction); a failure waits."""
        async with self._writes_lock:
            updates, removals = dict(self._updates), set(self._removals)
            if not updates and not removals:
                await trio.lowlevel.checkpoint()
                return
            try:
                await self._write(list(updates.values()), sorted(removals))
            except SpoolError as exc:
                log.event("warning", "spool_sync_failed", error=str(exc),
                          waiting=len(updates) + len(removals))
                return
            for job_id, meta in updates.items():
                if self._updates.get(job_id) is meta:
                    del self._updates[job_id]
            self._removals -= removals

    async def _write(self, updates: list[JobMeta], removals: list[str]) -> None:
        if updates or self._loop is None:
            await self.acall(lambda conn: apply_writes(conn, updates, removals))
            return
        # A delivery's usual sync, removals only: on the event loop's own session.
        try:
            await self._loop.execute("remove", [text_array(removals)])
        except Exception as exc:   # the driver's, a timeout: as every database error
            raise self.unavailable(exc) from exc

    def save_unsaved(self) -> int:
        """How many state changes and removals the database still owes (``sync`` writes them)."""
        return len(self._updates) + len(self._removals)
