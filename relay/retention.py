"""Retention: delivered jobs kept in the spool for reprint, and their expiry (SPEC §11).

With ``[retention]`` (or ``[queues.NAME.retention]``) a delivered job is not
removed: the scheduler hands it to ``Retention.keep``, which records it in the
spool as state ``delivered`` (with ``delivered_at``) and keeps it, files and
all, until its queue's ``keep`` age or ``keep_jobs`` count passes.  Kept jobs
are never delivered again and are no queue's work: lpq, lpc and the queued/held
gauges do not see them; ``spool list --delivered`` does, and ``spool reprint``
(``relay.reprint``) turns one into a new job.

Expiry has its own task (``run``): it sleeps until the next kept job is due
(at most ``MAX_EXPIRY_WAIT``, so a reload's shorter ``keep`` is applied within
a minute), removes what is due and reports each removal as ``expired``
(``relay.jobevents``).  The count limit is applied at once, when a delivery
pushes a queue past ``keep_jobs``.  Space: when a new job would be refused for
free space, ``make_room`` expires the oldest kept jobs (any queue, oldest
delivery first) until the job fits, and only then is 0x02 sent
(docs/spool.md, "Retention").

A queue without retention costs one attribute test per delivery here, and the
expiry task waits on an event that never fires.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable

import trio

from relay import log
from relay.config import RetentionConfig
from relay.errors import DiskFull
from relay.spool import JobMeta, Spool

__all__ = ["MAX_EXPIRY_WAIT", "Retention"]

# The longest the expiry task sleeps: a kept job is removed at most this long
# after it is due, even when a reload shortened its queue's ``keep``.
MAX_EXPIRY_WAIT = 60.0

Policy = Callable[[str], RetentionConfig]


class Retention:
    """The daemon's kept delivered jobs: keep, expire by age and count, make room."""

    def __init__(self, spool: Spool, policy: Policy) -> None:
        self.spool = spool
        self.policy = policy          # queue name -> its retention (reload: the new one)
        self._kept: dict[str, JobMeta] = {}   # id -> job, in the order they were kept
        self._changed = trio.Event()
        self._wake_at = -math.inf     # epoch the expiry task wakes at anyway

    def __len__(self) -> int:
        return len(self._kept)

    def jobs(self, queue: str | None = None) -> list[JobMeta]:
        """The kept jobs (of ``queue``), oldest delivery first."""
        return [j for j in self._kept.values() if queue is None or j.queue == queue]

    def keep(self, job: JobMeta) -> bool:
        """A delivered ``job``: keep it if its queue retains jobs; False = remove it now."""
        if not self.policy(job.queue).enabled:
            return False
        kept = dataclasses.replace(job, state="delivered", delivered_at=time.time(),
                                   last_error="", next_attempt=0.0)
        try:
            self.spool.update(kept)   # made durable by the delivery's Spool.sync()
        except KeyError:              # purged while being delivered: nothing to keep
            return True
        self.adopt(kept)
        self._trim(job.queue)
        return True

    def adopt(self, job: JobMeta) -> None:
        """A job already ``delivered`` in the spool (found at start) is kept from now on."""
        self._kept.pop(job.id, None)
        self._kept[job.id] = job
        # Woken only when this job is due before the task wakes anyway: a
        # busy queue's deliveries do not each cost a pass over the kept jobs.
        if self.due_at(job) < self._wake_at:
            self._changed.set()
            self._changed = trio.Event()

    def forget(self, job_id: str) -> JobMeta | None:
        """Stop keeping a job (reprinted elsewhere, purged by the CLI); the job or None."""
        return self._kept.pop(job_id, None)

    def _trim(self, queue: str) -> None:
        limit = self.policy(queue).keep_jobs
        if limit is None:
            return
        mine = self.jobs(queue)
        for job in mine[:max(0, len(mine) - limit)]:
            self.expire(job, f"more than keep_jobs = {limit} delivered jobs kept")

    def expire(self, job: JobMeta, reason: str) -> None:
        """Remove a kept job from the spool; evented ``expired``."""
        self._kept.pop(job.id, None)
        try:
            self.spool.get(job.id)
        except KeyError:    # purged by the CLI meanwhile: not an expiry
            return
        self.spool.remove(job.id)
        self.spool.events.record("expired", job, reason=reason)
        log.event("info", "job_expired", job=job.id, queue=job.queue, reason=reason)

    def due_at(self, job: JobMeta) -> float:
        """When ``job`` passes its queue's age limit (epoch; inf: no age limit).

        A queue that no longer retains jobs (a reload, a restart with the
        section removed) lets its kept jobs go at once.
        """
        policy = self.policy(job.queue)
        if not policy.enabled:
            return -math.inf
        return job.delivered_at + policy.keep if policy.keep is not None else math.inf

    def expire_due(self, now: float | None = None) -> int:
        """Remove every kept job past its age limit (or its queue's count); how many."""
        now = time.time() if now is None else now
        gone = 0
        for job in list(self._kept.values()):
            if self.due_at(job) <= now:
                policy = self.policy(job.queue)
                self.expire(job, f"kept longer than keep = {policy.keep:g}s" if policy.enabled
                            else "its queue keeps no delivered jobs now")
                gone += 1
        for queue in {j.queue for j in self._kept.values()}:
            self._trim(queue)
        return gone

    def next_due(self) -> float:
        return min((self.due_at(j) for j in self._kept.values()), default=math.inf)

    async def run(self) -> None:
        """The expiry schedule: sleep until the next job is due (at most a minute)."""
        while True:
            if self.expire_due():
                await self.spool.sync()
            changed = self._changed
            now = time.time()
            if not self._kept:      # nothing kept: wait for the first one, for free
                self._wake_at = math.inf
                await changed.wait()
                continue
            wait = max(0.0, min(MAX_EXPIRY_WAIT, self.next_due() - now))
            self._wake_at = now + wait
            with trio.move_on_after(wait):
                await changed.wait()

    def make_room(self, need: int = 0) -> bool:
        """Expire the oldest kept jobs until ``need`` bytes fit; False when none is left."""
        while True:
            try:
                self.spool.check_space(need)
                return True
            except DiskFull:
                oldest = _oldest(self._kept.values())
                if oldest is None:
                    return False
                self.expire(oldest, "spool free space below min_free_disk")


def _oldest(jobs: Iterable[JobMeta]) -> JobMeta | None:
    return min(jobs, key=lambda j: (j.delivered_at, j.id), default=None)
