"""What an operator or a reload does to a running queue (``QueueRunner``'s mixin).

Kept apart from the delivery loop in ``relay.scheduler``: lpc's hold, topq,
redirect hand-over and stop (``relay.lpc``), and a reload's new settings or
retirement (``relay.dispatch``).  None of it touches a job being delivered.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

from relay.config import QueueConfig
from relay.sinks import Sink
from relay.spool import JobMeta

__all__ = ["RunnerControl"]


class RunnerControl:
    """Operator and reload operations; ``QueueRunner`` supplies the state and helpers."""

    queue: QueueConfig
    dests: list[Any]
    pending: deque[JobMeta]
    stopped: bool
    retired: str
    active: int
    failures: int
    retry_at: float
    retry_epoch: float
    failback_at: float
    _trial: bool

    def _hold(self, job: JobMeta, reason: str) -> None:
        raise NotImplementedError

    def _notify(self) -> None:
        raise NotImplementedError

    def _check_destinations(self) -> None:
        raise NotImplementedError

    def _start_workers(self) -> None:
        raise NotImplementedError

    def _dest(self, sink: Sink) -> object:
        raise NotImplementedError

    # -- lpc / ctl ------------------------------------------------------------

    def hold_jobs(self, job_ids: Sequence[str], reason: str) -> list[str]:
        """Hold the named waiting jobs (jobs being delivered are not touched)."""
        wanted = set(job_ids)
        chosen = [j for j in self.pending if j.id in wanted]
        self.pending = deque(j for j in self.pending if j.id not in wanted)
        for job in chosen:
            self._hold(job, reason)
        return [j.id for j in chosen]

    def to_front(self, job_ids: Sequence[str]) -> list[str]:
        """topq: the named waiting jobs go to the head of the queue, in their order."""
        wanted = set(job_ids)
        front = [j for j in self.pending if j.id in wanted]
        self.pending = deque([*front, *(j for j in self.pending if j.id not in wanted)])
        self._notify()
        return [j.id for j in front]

    def hand_over(self, queue: str) -> list[JobMeta]:
        """Take out the waiting jobs spooled for ``queue`` (a redirect moves them)."""
        mine = [j for j in self.pending if j.queue == queue]
        self.pending = deque(j for j in self.pending if j.queue != queue)
        return mine

    def set_stopped(self, stopped: bool) -> None:
        self.stopped = stopped
        self._notify()

    # -- reload -------------------------------------------------------------

    def reconfigure(self, queue: QueueConfig, sinks: Sequence[Sink] | None) -> None:
        """Take a reloaded queue's settings; ``sinks`` when its destinations changed.

        Jobs keep their place.  Attempts in flight finish on the sink they
        started with; new destinations start fresh (first one, no backoff).
        A changed ``concurrency`` starts or retires workers.
        """
        self.queue = queue
        if sinks is not None:
            self.dests = [self._dest(sink) for sink in sinks]
            self.active, self.failures, self._trial = 0, 0, False
            self.retry_at, self.retry_epoch, self.failback_at = -math.inf, 0.0, math.inf
            self._check_destinations()
        self._start_workers()
        self._notify()

    def retire(self, reason: str) -> None:
        """The queue left the configuration: hold its waiting jobs (never delete them)."""
        self.retired = reason
        self._hold_pending()
        self._notify()

    def _hold_pending(self) -> None:
        while self.pending:
            self._hold(self.pending.popleft(), self.retired)

