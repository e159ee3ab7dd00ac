"""A worker's jobs, the main process's half (docs/architecture.md, "Processes").

``WorkerJobs`` is what the main process keeps for one intake worker: the
jobs that stream into spool files it opened for them (``Open``), and the
jobs it committed that the worker's connections have not yet accepted or
withdrawn (``Settled``).  It turns a worker's ``Commit`` into a spool commit
and the job's audit records — durable before the reply, as
``relay.connection.Connection._durable`` does in one process — and hands a
job to delivery once its connection accepted it.
"""

from __future__ import annotations

import dataclasses

from relay import log
from relay.connection import log_received
from relay.context import Delivery
from relay.errors import LpdError, SpoolError
from relay.intakechannel import Commit, Failure, Open, Reply, Settled
from relay.metrics import Metrics
from relay.spool import DataWriter, IncomingJob, JobMeta, Spool

__all__ = ["Handover", "WorkerJobs"]


class Handover:
    """Committed jobs of every worker to delivery in id order, queue by queue.

    A job goes to the scheduler once its connection accepted it and no job of
    its queue with a smaller id still waits for its worker's word: a job
    acked on one worker before another was sent on a second worker is queued
    first, whichever ``Settled`` arrives first.
    """

    def __init__(self, spool: Spool, delivery: Delivery) -> None:
        self.spool, self.delivery = spool, delivery
        self._unsettled: dict[str, dict[str, JobMeta]] = {}   # queue -> id -> job
        self._ready: dict[str, dict[str, JobMeta]] = {}

    def committed(self, meta: JobMeta) -> None:
        self._unsettled.setdefault(meta.queue, {})[meta.id] = meta

    def accept(self, meta: JobMeta) -> None:
        self._unsettled[meta.queue].pop(meta.id, None)
        self._ready.setdefault(meta.queue, {})[meta.id] = meta
        self._release(meta.queue)

    def withdraw(self, meta: JobMeta) -> None:
        self._unsettled[meta.queue].pop(meta.id, None)
        self.spool.remove(meta.id)
        self._release(meta.queue)

    def _release(self, queue: str) -> None:
        waiting, ready = self._unsettled.get(queue, {}), self._ready.get(queue, {})
        first = min(waiting, default=None)
        for job_id in sorted(ready):
            if first is not None and job_id > first:
                break
            self.delivery.submit(ready.pop(job_id))
        if not waiting:
            self._unsettled.pop(queue, None)
        if not ready:
            self._ready.pop(queue, None)


@dataclasses.dataclass(slots=True)
class _Partial:
    """A job a worker streams into a spool file: its main-side half."""

    incoming: IncomingJob
    writer: DataWriter | None = None


class WorkerJobs:
    """One worker's jobs in the main process (module docstring)."""

    def __init__(self, spool: Spool, handover: Handover, metrics: Metrics) -> None:
        self.spool, self.handover, self.metrics = spool, handover, metrics
        self.partials: dict[str, _Partial] = {}    # token -> a job streaming into files
        self.unsettled: dict[str, JobMeta] = {}    # committed, not yet accepted/withdrawn

    def discard(self, token: str) -> None:
        if (part := self.partials.pop(token, None)) is not None:
            _discard(part)

    def forget(self) -> None:
        """The worker is gone: its partial jobs go; what it committed is delivered
        (its sender was maybe not told: at-least-once, SPEC §4.4)."""
        for part in self.partials.values():
            _discard(part)
        self.partials.clear()
        for meta in self.unsettled.values():
            self.handover.accept(meta)
        self.unsettled.clear()

    def open(self, message: Open) -> tuple[Reply, list[int]]:
        """A spool file for a worker's large data file: its descriptor goes back."""
        part = self.partials.get(message.token)
        try:
            if part is None:
                incoming = self._begin(message.queue, message.wire_queue, message.peer,
                                       message.tls_peer)
                part = self.partials[message.token] = _Partial(incoming)
            if part.writer is not None:   # the job's previous large file is complete
                self._close_writer(part)
            part.writer = part.incoming.open_data(message.name)
            if part.writer.fileno() < 0:    # held for a segment record: a large job has files
                part.incoming.spill()
            if part.writer.fileno() < 0:
                raise SpoolError("the spool gave no file to stream into")
        except (LpdError, OSError) as exc:
            if part is not None:
                self.partials.pop(message.token, None)
                _discard(part)
            return Reply(0, failure=Failure.of(_spool_error(exc))), []
        return Reply(0, value=part.incoming.id), [part.writer.fileno()]

    def _close_writer(self, part: _Partial) -> None:
        """A large file the worker wrote is complete: its bytes count in the spool's
        free-space estimate (they were written past the spool's own counters)."""
        assert part.writer is not None
        writer, part.writer = part.writer, None
        self.spool.written += writer.close()

    def _begin(self, queue: str, wire_queue: str, peer: str, tls_peer: str) -> IncomingJob:
        incoming = self.spool.begin(queue=queue, wire_queue=wire_queue, peer=peer)
        if tls_peer:
            incoming.set_tls_peer(tls_peer)
        return incoming

    async def commit(self, message: Commit, incoming: IncomingJob | Exception) -> Reply:
        """Store a worker's job and its audit records; reply once both are durable
        (the worker acks then, SPEC §4.4, §11).  Delivery gets the job once the
        worker says its connection accepted it (``Settled``), as ``relay.ackqueue``
        hands jobs over in one process."""
        try:
            if isinstance(incoming, Exception):
                raise incoming
            meta = await self._durable(incoming, message)
        except (LpdError, OSError) as exc:
            reply = Reply(message.rid, failure=Failure.of(_spool_error(exc)))
        else:
            self.unsettled[meta.id] = meta
            self.handover.committed(meta)
            self._received(meta, message.peer, bool(message.hold))
            reply = Reply(message.rid, value=meta)
        return reply

    async def _durable(self, incoming: IncomingJob, message: Commit) -> JobMeta:
        """Commit the job and its records, as relay.connection.Connection._durable does."""
        try:
            meta = await self.spool.commit(incoming, hold=message.hold)
        except (LpdError, OSError):
            _discard(_Partial(incoming))
            raise
        events = self.spool.events
        events.record("received", meta, digests=message.digests)
        if not message.hold:
            events.record("acknowledged", meta)
        await events.durable()
        if message.hold:
            events.record("held", meta, reason=message.hold)
        return meta

    def prepare(self, message: Commit) -> IncomingJob | Exception:
        """The job of ``message`` in the spool, not yet committed, its id taken in the
        order the worker's commits come (so as they were acked); or why not."""
        incoming: IncomingJob | None = None
        try:
            part = self.partials.pop(message.token, None) if message.promoted else None
            if message.promoted and part is None:
                raise SpoolError(f"job {message.token}: its spool file is gone")
            if part is not None:
                incoming = part.incoming
                if part.writer is not None:
                    self._close_writer(part)
            else:
                incoming = self._begin(message.queue, message.wire_queue, message.peer,
                                       message.tls_peer)
            for name, data in message.files:
                writer = incoming.open_data(name)
                writer.write(data)
                writer.close()
            if (c := message.control) is not None:
                incoming.set_control(c.name, c.raw, number=c.number, user=c.user,
                                     host=c.host, title=c.title, job_name=c.job_name,
                                     formats=c.formats)
            return incoming
        except (LpdError, OSError) as exc:
            if incoming is not None:
                _discard(_Partial(incoming))
            return exc

    def _received(self, meta: JobMeta, peer: str, held: bool) -> None:
        # Logged here, before the worker acks: as a one-process daemon does.
        if not held:
            log_received(meta, peer)
        self.metrics.count_received(meta.queue, meta.total_bytes)
        log.count("received")

    def settle(self, message: Settled) -> None:
        """Accepted jobs to delivery, in the order their connections acked them;
        withdrawn ones (a failed commit before them in the session) removed."""
        for job_id in message.accepted:
            if (meta := self.unsettled.pop(job_id, None)) is not None:
                self.handover.accept(meta)
        for job_id in message.withdrawn:
            if (meta := self.unsettled.pop(job_id, None)) is not None:
                self.handover.withdraw(meta)


def _spool_error(exc: Exception) -> Exception:
    return exc if isinstance(exc, LpdError) else SpoolError(str(exc))


def _discard(part: _Partial) -> None:
    try:
        part.incoming.discard()
    except OSError as exc:   # a spool gone read-only: the next start sweeps it
        log.event("error", "discard_failed", job=part.incoming.id, error=str(exc))

