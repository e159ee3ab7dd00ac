"""Delivery scheduler: per-queue FIFO, retries with backoff, failover, hold (SPEC §5).

Each queue has one ``QueueRunner`` with ``concurrency`` workers taking jobs in
arrival order.  A failed job goes back to the *front* of its queue — order is
kept — and the whole queue backs off (exponential, with jitter), because a
destination that refused one job will usually refuse the next.  After
``failover_after`` consecutive failures the runner moves to the next
destination; a job failing for longer than ``give_up_after`` is held: it stays
in the spool, visible in lpq and ``spool list``, until 0x01 or ``spool retry``
releases it.  It is never deleted.

Failback: while a queue is on another destination than its first, every
``failback_after`` its next job is tried on the first one (a trial); if that
delivers, the queue is back on it, otherwise the job goes straight on to the
destination the queue was on, with no backoff.  Only a delivery proves a
destination recovered, and a trial costs one attempt per interval.

Errors are typed (``relay.errors``): the retry reason is the ``reason`` a sink
raised, never words of its message; an exception that is no ``SinkError`` is a
sink bug, retried as ``other`` and logged with its type.  A job whose spool
file vanished (``SpoolFileMissing``) is forgotten when the spool no longer has
it (purged while in flight) and held otherwise; the destination is not blamed.

A job leaves the spool only after its sink returned, i.e. after the
destination confirmed it.  The duplicate window: a crash between that
confirmation and the spool removal (one unlink) prints the job again after
restart; see docs/delivery.md.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from relay import log, status
from relay.config import QueueConfig
from relay.errors import SinkError, SinkRejected, SpoolFileMissing
from relay.metrics import Metrics
from relay.runnerctl import RunnerControl
from relay.sinks import Sink, destination_key, destination_problem
from relay.spool import JobMeta, Spool

if TYPE_CHECKING:
    from relay.retention import Retention


def backoff_delay(failures: int, *, initial: float, maximum: float,
                  rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random."""
    if failures <= 0:
        return 0.0
    base = min(maximum, initial * 2.0 ** min(failures - 1, 60))
    return base / 2 + rng.uniform(0, base / 2)


@dataclass(slots=True)
class _Dest:
    """One destination of a queue and what its last attempt said."""

    sink: Sink
    up: bool | None = None    # None: not tried yet; True only after a delivery
    error: str = ""


class QueueRunner(RunnerControl):
    """Delivers one queue's jobs to its destinations."""

    def __init__(self, queue: QueueConfig, sinks: Sequence[Sink], spool: Spool,
                 metrics: Metrics, *, rng: random.Random | None = None) -> None:
        self.queue = queue
        self.dests = [_Dest(sink) for sink in sinks]
        self.spool = spool
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.pending: deque[JobMeta] = deque()
        self.in_flight: dict[str, JobMeta] = {}
        self.held: dict[str, JobMeta] = {}
        self.failures = 0                 # consecutive failures, whole queue
        self.active = 0                   # index of the destination in use
        self.retry_at = -math.inf         # trio clock; no attempt before this
        self.retry_epoch = 0.0            # the same moment in wall-clock time, for lpq
        self.failback_at = math.inf       # trio clock; next trial of the first destination
        self._trial = False               # a trial is in flight
        self._first_failure: dict[str, float] = {}   # job id -> trio clock
        self._changed = trio.Event()
        self.retired = ""                 # why the queue left the configuration (reload)
        self.stopped = False              # lpc stop: jobs wait, none is delivered
        self._nursery: trio.Nursery | None = None
        self._workers = 0                 # worker tasks started
        self.keeper: Retention | None = None   # [retention]: keeps delivered jobs (dispatch)
        self._check_destinations()

    def _dest(self, sink: Sink) -> _Dest:
        return _Dest(sink)

    @property
    def sinks(self) -> tuple[Sink, ...]:
        """The destinations' sinks, in failover order."""
        return tuple(d.sink for d in self.dests)

    def _check_destinations(self) -> None:
        # A destination known unusable before any attempt (a cmd: program
        # not installed) starts DOWN with the reason, and says so in the log.
        for index, sink in enumerate(self.sinks):
            problem = destination_problem(sink.destination)
            if problem is not None:
                self._mark(index, False, problem)
                log.event("warning", "destination_unusable", queue=self.queue.name,
                          destination=sink.destination.uri,
                          error=f"{destination_key(self.queue.name, index)}: {problem}")

    # -- feeding ------------------------------------------------------------

    def submit(self, job: JobMeta) -> None:
        if job.state == "held":
            self.held[job.id] = job
        else:
            self.pending.append(job)
            self._notify()

    def wake(self, job_ids: Sequence[str] = ()) -> None:
        """0x01 / ``spool retry``: release held jobs, reset the backoff, try now.

        With ``job_ids`` only those held jobs are released (``spool retry JOB``
        names one); without, every held job of the queue (an operator's
        "print waiting jobs").  Only the held jobs are re-read from the spool,
        never the whole spool, so this stays cheap on a deep queue.  A queue
        on a backup destination tries its first one with the next job.
        """
        chosen = [i for i in job_ids if i in self.held] if job_ids else list(self.held)
        released = []
        for job_id in chosen:
            del self.held[job_id]
            try:
                job = self.spool.get(job_id)
            except KeyError:    # purged meanwhile
                continue
            if job.state == "held":
                job = dataclasses.replace(job, state="queued", failures=0)
                self.spool.update(job, durable=True)
                self.spool.events.record("released", job)
            self._first_failure.pop(job.id, None)
            released.append(job)
        # Released jobs keep arrival order among themselves and go behind the
        # queue they were held out of.
        self.pending.extend(sorted(released, key=lambda j: j.id))
        self.failures = 0
        self.retry_at = -math.inf
        self.retry_epoch = 0.0
        if self.active != 0:
            self.failback_at = -math.inf
        self._notify()

    def remove(self, job_ids: Sequence[str]) -> list[str]:
        """lprm: drop queued or held jobs; jobs being delivered are not touched."""
        wanted = set(job_ids) - set(self.in_flight)
        gone = {j.id: j for j in self.pending if j.id in wanted}
        self.pending = deque(j for j in self.pending if j.id not in wanted)
        for job_id in wanted:
            meta = self.held.pop(job_id, None) or gone.get(job_id)
            self.spool.remove(job_id)
            self.spool.events.record("removed", meta, job=job_id, queue=self.queue.name)
            log.event("info", "job_removed", job=job_id, queue=self.queue.name)
        return sorted(wanted)

    def state(self) -> status.QueueState:
        jobs = sorted([*self.in_flight.values(), *self.pending, *self.held.values()],
                      key=lambda j: j.id)
        next_retry = self.retry_epoch if self.retry_epoch > time.time() else None
        return status.QueueState(
            queue=self.queue.name, jobs=tuple(jobs), in_flight=frozenset(self.in_flight),
            destinations=tuple(
                status.DestinationState(name=d.sink.destination.uri, up=d.up,
                                        active=i == self.active, last_error=d.error)
                for i, d in enumerate(self.dests)),
            next_retry=next_retry, server=status.SERVER_LINE)

    def _notify(self) -> None:
        # Set, not replaced here (an Event a submitted job): a worker about to wait
        # replaces a set one first (_take), with no checkpoint in between.
        self._changed.set()

    # -- delivering ---------------------------------------------------------

    def _start_workers(self) -> None:
        while self._nursery is not None and self._workers < self.queue.concurrency:
            self._nursery.start_soon(self._worker, self._workers)
            self._workers += 1

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._start_workers()

    async def _worker(self, slot: int) -> None:
        while True:
            taken = await self._take(slot)
            if taken is None:
                self._workers -= 1
                return
            jobs, index, trial = taken
            try:
                await self._attempt(jobs, index, trial)
            finally:
                for job in jobs:
                    self.in_flight.pop(job.id, None)
                if trial:
                    self._trial = False
                if self.retired:
                    self._hold_pending()

    async def _take(self, slot: int) -> tuple[list[JobMeta], int, bool] | None:
        """The next jobs (up to the sink's ``per_attempt``) once the queue is not backing off.

        None: this worker is no longer wanted (queue removed, concurrency lowered).
        """
        while True:
            if self.retired or slot >= self.queue.concurrency:
                return None
            if self.pending and not self.stopped and trio.current_time() >= self.retry_at:
                index, trial = self._route()
                limit = self.dests[index].sink.per_attempt
                jobs = [self.pending.popleft() for _ in range(min(limit, len(self.pending)))]
                for job in jobs:
                    self.in_flight[job.id] = job
                return jobs, index, trial
            if self._changed.is_set():   # what it said was just looked at above
                self._changed = trio.Event()
            changed = self._changed
            deadline = self.retry_at if self.pending else math.inf
            with trio.move_on_at(deadline):
                await changed.wait()

    def _route(self) -> tuple[int, bool]:
        """(destination index, whether this attempt is a failback trial)."""
        if self.active != 0 and not self._trial and trio.current_time() >= self.failback_at:
            self._trial = True
            return 0, True
        return self.active, False

    async def _attempt(self, jobs: list[JobMeta], index: int, trial: bool) -> None:
        dests = self.dests
        sink = dests[index].sink
        dest = self.metrics.destination_label(sink.destination.uri)
        try:
            done, error = await sink.deliver_many(jobs)
        except Exception as exc:    # a sink bug: retried as "other"; none counts as sent
            done, error = 0, exc
        if self.dests is not dests:     # a reload changed the destinations meanwhile
            await self._stale_result(jobs, done, error, dest)
            return
        if done:
            self._delivered(jobs[:done], index, dest)
            # Make the removals durable too (shared with other commits), so
            # even a power loss right after cannot print a job a second time.
            await self.spool.sync()
            if trial:
                self._fail_back()
        if error is None:
            return
        failed, untried = jobs[done], jobs[done + 1:]
        self.pending.extendleft(reversed(untried))   # back to the front, in order
        if isinstance(error, SpoolFileMissing):
            self._spool_file_missing(failed, error)
        elif trial and not done:
            self._trial_failed(failed, index, dest, error)
        elif isinstance(error, SinkRejected):
            self._count_attempt(dest, "rejected")
            self.spool.events.record("attempt", failed, destination=sink.destination.uri,
                                     result="rejected", reason=str(error))
            self._mark(index, False, f"refused job {failed.id}: {error}")
            self._hold(dataclasses.replace(failed, attempts=failed.attempts + 1),
                       f"rejected by {sink.destination.uri}: {error}")
        else:
            self._count_retry(dest, sink, failed, error)
            self._failed(failed, index, _describe(error))

    async def _stale_result(self, jobs: list[JobMeta], done: int, error: Exception | None,
                            dest: str) -> None:
        """An attempt on a destination a reload replaced: delivered jobs leave the
        spool; the rest go back to the front, for the new destinations, no backoff."""
        if done:
            self._count_attempt(dest, "ok", done)
            self._gone(jobs[:done], dest, dest)
            await self.spool.sync()
        if error is not None:
            self.pending.extendleft(reversed(jobs[done:]))
            self._notify()

    def _count_attempt(self, dest: str, result: str, n: int = 1) -> None:
        self.metrics.child(self.metrics.delivery_attempts_total, dest, result).inc(n)

    def _count_retry(self, dest: str, sink: Sink, job: JobMeta, error: Exception) -> None:
        self._count_attempt(dest, "retry")
        if isinstance(error, SinkError):
            reason = error.reason
        else:
            reason = "other"
            log.event("error", "sink_bug", job=job.id, queue=job.queue,
                      destination=sink.destination.uri, exception=type(error).__name__,
                      error=str(error))
        self.metrics.delivery_retries_total.labels(destination=dest, reason=reason).inc()

    def _mark(self, index: int, up: bool, error: str) -> None:
        d = self.dests[index]
        d.up = up
        d.error = error
        m = self.metrics
        m.child(m.destination_up, m.destination_label(d.sink.destination.uri)).set(
            1 if up else 0)

    def _delivered(self, jobs: list[JobMeta], index: int, dest: str) -> None:
        """``jobs`` (one attempt's, in order) reached destination ``index``."""
        if index == self.active:
            self.failures = 0
        self._mark(index, True, "")   # once an attempt: the same state for each of its jobs
        self._count_attempt(dest, "ok", len(jobs))
        self._gone(jobs, dest, self.dests[index].sink.destination.uri)

    def _gone(self, jobs: list[JobMeta], dest: str, uri: str) -> None:
        """Confirmed jobs leave the spool (or are kept, ``[retention]``); counted, audited.

        Their removals are one call (``Spool.remove_many``: one DONE write for
        the batch's segment jobs), their counters one ``inc`` per batch.
        """
        keeper = self.keeper
        gone: list[str] = []
        events, now = self.spool.events, time.time()
        debug = log.enabled("debug")   # off in production: no fields built a job
        by_queue: dict[str, list[JobMeta]] = {}   # one queue, but for redirected jobs
        for job in jobs:
            # Kept or not before its events, job by job: a later job's keep may
            # expire this one, and the audit log has "delivered" before "expired".
            if keeper is None or not keeper.keep(job):
                gone.append(job.id)
            events.record("attempt", job, destination=uri, result="ok")
            events.record("delivered", job, destination=uri)
            self._first_failure.pop(job.id, None)
            by_queue.setdefault(job.queue, []).append(job)
            if debug:
                log.event("debug", "job_delivered", job=job.id, queue=job.queue,
                          destination=uri, seconds=round(max(0.0, now - job.received), 3))
        if isinstance(self.spool, Spool):
            self.spool.remove_many(gone)
        else:
            for job_id in gone:
                self.spool.remove(job_id)
        for queue, group in by_queue.items():
            self._count_gone(group, self._children(queue, dest), now)

    @staticmethod
    def _count_gone(jobs: list[JobMeta], children: tuple[Any, Any, Any], now: float) -> None:
        count, size, seconds = children
        count.inc(len(jobs))
        size.inc(sum(job.total_bytes for job in jobs))
        for job in jobs:
            seconds.observe(max(0.0, now - job.received))
        log.count("delivered", len(jobs))

    def _children(self, queue: str, dest: str) -> tuple[Any, Any, Any]:
        """The labelled metric children for (queue label, destination), looked up once."""
        m = self.metrics
        q = m.queue_label(queue)
        return (m.child(m.jobs_delivered_total, q, dest),
                m.child(m.bytes_delivered_total, q, dest), m.child(m.job_delivery_seconds, q))

    def _switch(self, index: int, direction: str) -> None:
        """Make ``index`` the destination in use; count and log the move."""
        before = self.dests[self.active].sink.destination.uri
        self.active = index
        after = self.queue.failback_after
        self.failback_at = trio.current_time() + after if index != 0 and after > 0 else math.inf
        self.metrics.destination_failovers_total.labels(
            queue=self.metrics.queue_label(self.queue.name), direction=direction).inc()
        log.event("warning" if direction == "failover" else "info", f"destination_{direction}",
                  queue=self.queue.name, destination=before,
                  to=self.dests[index].sink.destination.uri)

    def _fail_back(self) -> None:
        if self.active != 0:
            self.failures = 0
            self._switch(0, "failback")

    def _trial_failed(self, job: JobMeta, index: int, dest: str, error: Exception) -> None:
        # The first destination is still bad: this job goes straight on to the
        # destination in use; no backoff, no failure counted against the queue.
        self._count_retry(dest, self.dests[index].sink, job, error)
        self.spool.events.record("attempt", job, result="retry", reason=_describe(error),
                                 destination=self.dests[index].sink.destination.uri)
        self._mark(index, False, _describe(error))
        self.failback_at = trio.current_time() + self.queue.failback_after
        self.pending.appendleft(job)
        log.event("info", "failback_failed", job=job.id, queue=job.queue,
                  destination=self.dests[index].sink.destination.uri, error=_describe(error),
                  retry_in=self.queue.failback_after)

    def _spool_file_missing(self, job: JobMeta, error: SpoolFileMissing) -> None:
        # Not the destination's fault: its state and the backoff stay as they are.
        self._first_failure.pop(job.id, None)
        try:
            self.spool.get(job.id)
        except KeyError:
            log.event("info", "job_gone", job=job.id, queue=job.queue,
                      error=f"removed from the spool while being delivered ({error})")
            return
        self._hold(job, f"{error}; restore the file and `spool retry`, or purge the job")

    def _failed(self, job: JobMeta, index: int, error: str) -> None:
        uri = self.dests[index].sink.destination.uri
        self._mark(index, False, error)
        now = trio.current_time()
        first = self._first_failure.setdefault(job.id, now)
        delay = 0.0
        # A late failure from a destination the queue has already left (the
        # attempt began before a failback) neither backs off nor fails over.
        if index == self.active:
            self.failures += 1
            delay = backoff_delay(self.failures, initial=self.queue.retry.initial,
                                  maximum=self.queue.retry.max, rng=self.rng)
            self.retry_at = now + delay
            self.retry_epoch = time.time() + delay
            if self.failures % self.queue.failover_after == 0 and len(self.dests) > 1:
                self._switch((index + 1) % len(self.dests), "failover")
        log.event("warning", "delivery_failed", job=job.id, queue=job.queue, destination=uri,
                  error=error, retry_in=round(delay, 3))
        self.spool.events.record("attempt", job, destination=uri, result="retry", reason=error)
        job = dataclasses.replace(job, attempts=job.attempts + 1, failures=self.failures,
                                  destination=self.active, last_error=error,
                                  next_attempt=time.time() + delay)
        if now - first >= self.queue.retry.give_up_after:
            self._hold(job, f"gave up after {self.queue.retry.give_up_after:g}s: {error}")
            return
        if self._persist(job):
            self.pending.appendleft(job)

    def _persist(self, job: JobMeta, *, durable: bool = False) -> bool:
        """Record ``job``'s delivery state; False when the spool no longer has it (purged)."""
        try:
            self.spool.update(job, durable=durable)
        except KeyError:
            self._first_failure.pop(job.id, None)
            log.event("info", "job_gone", job=job.id, queue=job.queue,
                      error="removed from the spool while being delivered")
            return False
        return True

    def _hold(self, job: JobMeta, reason: str) -> None:
        job = dataclasses.replace(job, state="held", last_error=reason[:500])
        self._first_failure.pop(job.id, None)
        if not self._persist(job, durable=True):
            return
        self.held[job.id] = job
        self.spool.events.record("held", job, reason=reason)
        self.metrics.jobs_held_total.labels(queue=self.metrics.queue_label(job.queue)).inc()
        log.event("error", "job_held", job=job.id, queue=job.queue, error=reason)


def _describe(error: Exception) -> str:
    """The text lpq and the log show: a sink's own message, a bug's with its type."""
    return str(error) if isinstance(error, SinkError) else f"{type(error).__name__}: {error}"
