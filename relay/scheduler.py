"""Delivery scheduler: per-queue FIFO, retries with backoff, failover, hold (SPEC §5).

Each queue has one ``QueueRunner`` with ``concurrency`` workers taking jobs in
arrival order.  A failed job goes back to the *front* of its queue — order is
kept — and the whole queue backs off (exponential, with jitter), because a
destination that refused one job will usually refuse the next.  After
``failover_after`` consecutive failures the runner moves to the next
destination; a job failing for longer than ``give_up_after`` is held: it stays
in the spool, visible in lpq and ``spool list``, until 0x01 or ``spool retry``
releases it.  It is never deleted.

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
from collections.abc import Mapping, Sequence

import trio

from relay import log, status
from relay.config import QueueConfig
from relay.errors import SinkRejected, SinkUnavailable
from relay.metrics import Metrics
from relay.sinks import Sink
from relay.spool import JobMeta, Spool


def backoff_delay(failures: int, *, initial: float, maximum: float,
                  rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random."""
    if failures <= 0:
        return 0.0
    base = min(maximum, initial * 2.0 ** min(failures - 1, 60))
    return base / 2 + rng.uniform(0, base / 2)


def retry_reason(exc: BaseException) -> str:
    """Bounded label for lpdrelay_delivery_retries_total."""
    text = str(exc).lower()
    for reason, words in (("refused", ("refused",)), ("timeout", ("timed out", "timeout")),
                          ("reset", ("reset", "broken pipe", "closed")),
                          ("reply", ("reply", "answered"))):
        if any(w in text for w in words):
            return reason
    return "unavailable" if isinstance(exc, SinkUnavailable) else "other"


class QueueRunner:
    """Delivers one queue's jobs to its destinations."""

    def __init__(self, queue: QueueConfig, sinks: Sequence[Sink], spool: Spool,
                 metrics: Metrics, *, rng: random.Random | None = None) -> None:
        self.queue = queue
        self.sinks = list(sinks)
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
        self.dest_up: list[bool | None] = [None] * len(self.sinks)
        self.dest_error: list[str] = [""] * len(self.sinks)
        self._first_failure: dict[str, float] = {}   # job id -> trio clock
        self._changed = trio.Event()

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
        never the whole spool, so this stays cheap on a deep queue.
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
            self._first_failure.pop(job.id, None)
            released.append(job)
        # Released jobs keep arrival order among themselves and go behind the
        # queue they were held out of.
        self.pending.extend(sorted(released, key=lambda j: j.id))
        self.failures = 0
        self.retry_at = -math.inf
        self.retry_epoch = 0.0
        self._notify()

    def remove(self, job_ids: Sequence[str]) -> list[str]:
        """lprm: drop queued or held jobs; jobs being delivered are not touched."""
        wanted = set(job_ids) - set(self.in_flight)
        self.pending = deque(j for j in self.pending if j.id not in wanted)
        for job_id in wanted:
            self.held.pop(job_id, None)
            self.spool.remove(job_id)
            log.event("info", "job_removed", job=job_id, queue=self.queue.name)
        return sorted(wanted)

    def state(self) -> status.QueueState:
        jobs = sorted([*self.in_flight.values(), *self.pending, *self.held.values()],
                      key=lambda j: j.id)
        next_retry = self.retry_epoch if self.retry_epoch > time.time() else None
        return status.QueueState(
            queue=self.queue.name, jobs=tuple(jobs), in_flight=frozenset(self.in_flight),
            destinations=tuple(
                status.DestinationState(name=s.destination.uri, up=self.dest_up[i],
                                        active=i == self.active, last_error=self.dest_error[i])
                for i, s in enumerate(self.sinks)),
            next_retry=next_retry)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- delivering ---------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self.queue.concurrency):
                nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        while True:
            jobs = await self._take(self.sinks[self.active].batch)
            try:
                await self._attempt(jobs)
            finally:
                for job in jobs:
                    self.in_flight.pop(job.id, None)

    async def _take(self, limit: int) -> list[JobMeta]:
        """The next ``limit`` jobs at most, once the queue is not backing off."""
        while True:
            if self.pending and trio.current_time() >= self.retry_at:
                jobs = [self.pending.popleft() for _ in range(min(limit, len(self.pending)))]
                for job in jobs:
                    self.in_flight[job.id] = job
                return jobs
            changed = self._changed
            deadline = self.retry_at if self.pending else math.inf
            with trio.move_on_at(deadline):
                await changed.wait()

    async def _attempt(self, jobs: list[JobMeta]) -> None:
        index = self.active
        sink = self.sinks[index]
        dest = self.metrics.destination_label(sink.destination.uri)
        done, error = await sink.deliver_many(jobs)
        for job in jobs[:done]:
            self._count_attempt(dest, "ok")
            self._delivered(job, index, dest)
        if done:
            # Make the removals durable too (shared with other commits), so
            # even a power loss right after cannot print a job a second time.
            await self.spool.sync()
        if error is None:
            return
        failed, untried = jobs[done], jobs[done + 1:]
        self.pending.extendleft(reversed(untried))   # back to the front, in order
        if isinstance(error, SinkRejected):
            self._count_attempt(dest, "rejected")
            self._mark(index, True, "")
            self._hold(dataclasses.replace(failed, attempts=failed.attempts + 1),
                       f"rejected by {sink.destination.uri}: {error}")
            return
        # SinkUnavailable, or a sink bug: both are retried.
        self._count_attempt(dest, "retry")
        self.metrics.delivery_retries_total.labels(
            destination=dest, reason=retry_reason(error)).inc()
        self._failed(failed, index, error)

    def _count_attempt(self, dest: str, result: str) -> None:
        self.metrics.delivery_attempts_total.labels(destination=dest, result=result).inc()

    def _mark(self, index: int, up: bool, error: str) -> None:
        self.dest_up[index] = up
        self.dest_error[index] = error
        self.metrics.destination_up.labels(
            destination=self.metrics.destination_label(self.sinks[index].destination.uri),
        ).set(1 if up else 0)

    def _delivered(self, job: JobMeta, index: int, dest: str) -> None:
        self.spool.remove(job.id)
        self._first_failure.pop(job.id, None)
        self.failures = 0
        self._mark(index, True, "")
        q = self.metrics.queue_label(job.queue)
        self.metrics.jobs_delivered_total.labels(queue=q, destination=dest).inc()
        self.metrics.bytes_delivered_total.labels(queue=q, destination=dest).inc(job.total_bytes)
        latency = max(0.0, time.time() - job.received)
        self.metrics.job_delivery_seconds.labels(queue=q).observe(latency)
        log.event("info", "job_delivered", job=job.id, queue=job.queue,
                  destination=self.sinks[index].destination.uri, seconds=round(latency, 3))

    def _failed(self, job: JobMeta, index: int, exc: Exception) -> None:
        uri = self.sinks[index].destination.uri
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, SinkUnavailable) \
            else str(exc)
        self._mark(index, False, error)
        self.failures += 1
        now = trio.current_time()
        first = self._first_failure.setdefault(job.id, now)
        delay = backoff_delay(self.failures, initial=self.queue.retry.initial,
                              maximum=self.queue.retry.max, rng=self.rng)
        self.retry_at = now + delay
        self.retry_epoch = time.time() + delay
        if self.failures % self.queue.failover_after == 0 and len(self.sinks) > 1:
            self.active = (index + 1) % len(self.sinks)
            log.event("warning", "destination_failover", queue=job.queue, destination=uri,
                      to=self.sinks[self.active].destination.uri)
        log.event("warning", "delivery_failed", job=job.id, queue=job.queue, destination=uri,
                  error=error, retry_in=round(delay, 3))
        job = dataclasses.replace(job, attempts=job.attempts + 1, failures=self.failures,
                                  destination=self.active, last_error=error,
                                  next_attempt=time.time() + delay)
        if now - first >= self.queue.retry.give_up_after:
            self._hold(job, f"gave up after {self.queue.retry.give_up_after:g}s: {error}")
            return
        self.spool.update(job)
        self.pending.appendleft(job)

    def _hold(self, job: JobMeta, reason: str) -> None:
        job = dataclasses.replace(job, state="held", last_error=reason[:500])
        self.spool.update(job, durable=True)
        self._first_failure.pop(job.id, None)
        self.held[job.id] = job
        self.metrics.jobs_held_total.labels(queue=self.metrics.queue_label(job.queue)).inc()
        log.event("error", "job_held", job=job.id, queue=job.queue, error=reason)


class Scheduler:
    """All queue runners; the server's ``Delivery``."""

    def __init__(self, runners: Mapping[str, QueueRunner]) -> None:
        self.runners = dict(runners)

    def submit(self, job: JobMeta) -> None:
        runner = self.runners.get(job.queue)
        if runner is None:
            log.event("warning", "job_without_queue", job=job.id, queue=job.queue,
                      error="queue no longer configured; job kept in the spool")
            return
        runner.submit(job)

    def wake(self, queue: str, job_ids: Sequence[str] = ()) -> None:
        self.runners[queue].wake(job_ids)

    def queue_state(self, queue: str) -> status.QueueState:
        return self.runners[queue].state()

    def remove(self, queue: str, job_ids: Sequence[str]) -> list[str]:
        return self.runners[queue].remove(job_ids)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for runner in self.runners.values():
                nursery.start_soon(runner.run)
