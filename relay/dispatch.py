"""All queue runners as one ``Delivery`` for intake, and a reload's changes to them.

``Scheduler`` routes a spooled job to its queue's ``QueueRunner``
(``relay.scheduler``), or to the runner of the queue it is redirected to
(``relay.queuestate``); a job for a queue not configured is held, never
deleted.  ``reconfigure`` applies a reloaded configuration: runners of kept
queues take the new settings, new queues get a runner (and the spool's jobs
for that name), removed queues' runners retire and hold their jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence

import trio

from relay import log, status
from relay.config import QueueConfig, RetentionConfig
from relay.queuestate import QueueStates, State
from relay.reprint import Reprinter
from relay.retention import Retention
from relay.scheduler import QueueRunner
from relay.sinks import Sink
from relay.spool import JobMeta, Spool

__all__ = ["Scheduler", "removed_reason"]


class Scheduler:
    """All queue runners; the server's ``Delivery``.

    ``reconfigure`` applies a reloaded configuration: runners of kept queues
    take the new settings, new queues get a runner (with the spool's jobs
    for that name), removed queues' runners retire and hold their jobs.
    """

    def __init__(self, runners: Mapping[str, QueueRunner], spool: Spool | None = None,
                 states: QueueStates | None = None, retention: Retention | None = None) -> None:
        self.runners = dict(runners)
        self.spool = spool
        self.states = states
        self.retention = retention    # kept delivered jobs ([retention]); None: none kept
        self.default_retention = RetentionConfig()   # [retention]: for queues no longer here
        self.reprinter: Reprinter | None = None      # spool reprint (lpc), set by the daemon
        self._retired: list[QueueRunner] = []
        # Queues a reload removed (until one re-adds them), and queued jobs a re-added
        # queue took from the spool before intake handed them over (submitted once).
        self._removed: set[str] = set()
        self._adopted: set[str] = set()
        self._nursery: trio.Nursery | None = None
        for name, runner in self.runners.items():
            runner.stopped = self.state_of(name).stopped
            runner.keeper = retention
            self.publish(name)

    def publish(self, queue: str) -> None:
        """Set ``lpdrelay_queue_state`` for ``queue`` from its operator state."""
        runner = self.runners.get(queue)
        if runner is not None:
            for state, on in self.state_of(queue).flags().items():
                runner.metrics.queue_state.labels(queue, state).set(1 if on else 0)

    def retention_of(self, queue: str) -> RetentionConfig:
        """The retention of ``queue``'s delivered jobs (``Retention``'s policy)."""
        runner = self.runners.get(queue)
        return runner.queue.retention if runner is not None else self.default_retention

    def state_of(self, queue: str) -> State:
        return self.states.get(queue) if self.states is not None else State()

    def runner_for(self, queue: str) -> QueueRunner | None:
        """The runner that delivers ``queue``'s jobs: its own, or its redirect target's."""
        target = self.state_of(queue).redirect
        if target and target in self.runners:
            return self.runners[target]
        return self.runners.get(queue)

    def submit(self, job: JobMeta) -> None:
        if job.state == "delivered":      # kept after delivery: never delivered again
            if self.retention is not None:
                self.retention.adopt(job)
            return
        if job.id in self._adopted:       # a re-added queue has it already (_adopt)
            self._adopted.discard(job.id)
            return
        moved = self.states.moved.get(job.id, "") if self.states is not None else ""
        if moved in self.runners:
            runner: QueueRunner | None = self.runners[moved]
        elif job.state == "held":
            runner = self.runners.get(job.queue)
        else:
            runner = self.runner_for(job.queue)
        if runner is None:
            self._hold_orphan(job)
            return
        runner.submit(job)

    def _hold_orphan(self, job: JobMeta) -> None:
        """A job for a queue not (or no longer) configured: held, never deleted."""
        # Committed before a reload removed its queue, handed over after: held
        # like the retired runner's jobs, so re-adding the queue releases it.
        reason = (removed_reason(job.queue) if job.queue in self._removed
                  else f"queue {job.queue} is not configured")
        log.event("warning", "job_without_queue", job=job.id, queue=job.queue,
                  error=f"{reason}; job held in the spool")
        if job.state != "held" and self.spool is not None:
            with contextlib.suppress(KeyError):
                self.spool.update(dataclasses.replace(job, state="held", last_error=reason),
                                  durable=True)

    def reconfigure(self, queues: Mapping[str, QueueConfig],
                    sinks: Callable[[QueueConfig], list[Sink]],
                    runner: Callable[[QueueConfig, list[Sink]], QueueRunner]) -> None:
        """Apply a reloaded configuration's queues (see the class docstring)."""
        for name in [n for n in self.runners if n not in queues]:
            retired = self.runners.pop(name)
            retired.retire(removed_reason(name))
            self._retired.append(retired)
            self._removed.add(name)
            log.event("warning", "queue_removed", queue=name,
                      error=f"{len(retired.held)} job(s) held in the spool")
        self._retired = [r for r in self._retired if r.in_flight]
        for name, queue in queues.items():
            current = self.runners.get(name)
            if current is not None:
                same = current.queue.destinations == queue.destinations
                current.reconfigure(queue, None if same else sinks(queue))
                continue
            self.runners[name] = current = runner(queue, sinks(queue))
            self._removed.discard(name)
            current.stopped = self.state_of(name).stopped
            current.keeper = self.retention
            self.publish(name)
            self._adopt(current)
            if self._nursery is not None:
                self._nursery.start_soon(current.run)

    def _adopt(self, runner: QueueRunner) -> None:
        """A (re-)added queue takes its spooled jobs; those a reload held are released."""
        busy = {i for r in self._retired for i in r.in_flight}
        reason = removed_reason(runner.queue.name)
        for job in runner.spool.jobs(runner.queue.name):
            if job.id in busy or job.state == "delivered":   # kept jobs stay kept
                continue
            if job.state == "held" and job.last_error == reason:
                job = dataclasses.replace(job, state="queued", last_error="")
                runner.spool.update(job, durable=True)
            elif job.state != "held":     # committed, maybe not yet handed over by intake
                self._adopted.add(job.id)
            runner.submit(job)

    def wake(self, queue: str, job_ids: Sequence[str] = ()) -> None:
        if queue in self.runners:
            self.runners[queue].wake(job_ids)

    def queue_state(self, queue: str) -> status.QueueState:
        runner = self.runners.get(queue)
        if runner is None:     # asked on a connection older than a reload that removed it
            return status.QueueState(queue=queue, jobs=(), in_flight=frozenset(),
                                     destinations=())
        state = runner.state()
        target = self.runner_for(queue)
        if target is not None and target is not runner:   # redirected: its jobs wait there
            other = target.state()
            jobs = tuple(sorted((*state.jobs, *(j for j in other.jobs if j.queue == queue)),
                                key=lambda j: j.id))
            state = dataclasses.replace(state, jobs=jobs, in_flight=state.in_flight
                                        | other.in_flight)
        return dataclasses.replace(state, notice=self.state_of(queue).notice())

    def remove(self, queue: str, job_ids: Sequence[str]) -> list[str]:
        runner = self.runners.get(queue)
        return runner.remove(job_ids) if runner is not None else []

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(log.summary_loop)
            if self.retention is not None:
                nursery.start_soon(self.retention.run)
            if self.reprinter is not None:
                nursery.start_soon(self.reprinter.run)
            for runner in self.runners.values():
                nursery.start_soon(runner.run)


def removed_reason(queue: str) -> str:
    """The hold reason of a job whose queue a reload removed."""
    return f"queue {queue} removed by reload"
