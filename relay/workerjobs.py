"""A worker's jobs, the main process's half (docs/architecture.md, "Processes").

``WorkerJobs`` is what the main process keeps for one intake worker: the
jobs that stream into spool files it opened for them (``Open``), and the
jobs whose ``Commit`` it is working on.  It turns a worker's ``Commit`` into
a spool commit and the job's audit records — durable before the reply, as
``relay.connection.Connection._durable`` does in one process — and hands the
job to delivery before it replies, so the worker's final ack follows the job's
entry in the scheduler (an lpq through any worker after the ack lists it).
Under ``fsync`` a job that waits for nothing but its sync is answered by the
spool's flush thread right after the batch's ``fdatasync`` (``_ReplyFromFlush``)
and handed to delivery by trio just after; ``in_hop`` holds those in between,
and the pool's commands wait for the ones there when they came (``WorkerPool._settle``).
The commits one read of the channel brought that wait for nothing but their
sync are committed together (``commit_many``: one task, one hand-off to the
group commit for all of them, each job its own outcome).

A connection that sends jobs ahead (``relay.ackqueue``) has several commits in
flight; in one process a job behind a failed commit is never acknowledged and
is removed again.  Here the same rule: a ``Commit`` naming the job before it
(``previous``, not yet answered when the worker sent it) waits for that job's
outcome, and is removed and refused when that one failed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import cast

import trio

from relay import log
from relay.committed import accepted, record_committed
from relay.context import Delivery
from relay.errors import LpdError, SpoolError
from relay.intakechannel import Channel, Commit, Failure, Open, Reply, Withdrawn
from relay.jobevents import NO_EVENTS
from relay.metrics import Metrics
from relay.spool import DataWriter, IncomingJob, JobMeta, Spool

__all__ = ["Prepared", "WorkerJobs"]

# A failed commit is remembered this long for a later Commit that names it.
FAILED_MEMORY = 60.0


@dataclasses.dataclass(slots=True)
class _Outcome:
    """Whether a job's commit succeeded, once decided (``decide``)."""

    ok: bool = False
    decided: bool = False
    # Made only when a job behind it waits (a pipelining session): most commits
    # are decided with nobody waiting, and an Event a job is work on the event loop.
    _event: trio.Event | None = None

    def decide(self) -> None:
        self.decided = True
        if self._event is not None:
            self._event.set()

    async def wait_decided(self) -> None:
        if self.decided:
            await trio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()


@dataclasses.dataclass(slots=True)
class Prepared:
    """A worker's ``Commit`` as prepared in stream order: its spool job (or why not),
    its outcome for the jobs behind it, and the outcome of the job before it."""

    incoming: IncomingJob | Exception
    outcome: _Outcome
    before: _Outcome | None


@dataclasses.dataclass(slots=True)
class _Partial:
    """A job a worker streams into a spool file: its main-side half."""

    incoming: IncomingJob
    writer: DataWriter | None = None


class _ReplyFromFlush:
    """A commit's reply, written by the spool's flush thread as soon as the job is
    durable (``Spool.commit``'s ``on_durable``) instead of after the hop back to
    trio.  ``sent``: posted to the channel (written by the flush thread, or its rest by
    trio; dropped if the worker is gone -- at-least-once, SPEC §4.4).

    The job's intake counters are bumped here, before the reply is posted: a
    client that has its ack and then scrapes ``/metrics`` sees its job counted,
    as on the one-process path (prometheus_client's counters take a lock)."""

    __slots__ = ("channel", "jobs", "rid", "sent")

    def __init__(self, jobs: WorkerJobs, channel: Channel, rid: int) -> None:
        self.jobs, self.channel, self.rid, self.sent = jobs, channel, rid, False

    def __call__(self, meta: JobMeta) -> Callable[[], None]:
        # In the hop before it is written: a command that follows the worker's ack
        # waits until trio has handed the job to delivery (``WorkerJobs.in_hop``).
        self.jobs.metrics.count_received(meta.queue, meta.total_bytes)
        write = self.channel.post(Reply(self.rid, value=meta))
        self.jobs.in_hop.add(self)   # a set's add and discard are atomic under the GIL
        self.sent = True
        return write


def _answered(early: _ReplyFromFlush | None) -> bool:
    """Whether the flush thread posted the job's reply (and counted it)."""
    return early is not None and early.sent


class WorkerJobs:
    """One worker's jobs in the main process (module docstring)."""

    def __init__(self, spool: Spool, delivery: Delivery, metrics: Metrics) -> None:
        self.spool, self.delivery, self.metrics = spool, delivery, metrics
        # Jobs the flush thread answered that trio has not handed to delivery yet;
        # the event is set (and replaced) whenever trio hands one over.
        self.in_hop: set[_ReplyFromFlush] = set()
        self.handed = trio.Event()
        self.partials: dict[str, _Partial] = {}    # token -> a job streaming into files
        self._deciding: dict[str, _Outcome] = {}   # token -> a commit not decided yet
        self._failed: dict[str, float] = {}        # token -> when its commit failed

    def discard(self, token: str) -> None:
        if (part := self.partials.pop(token, None)) is not None:
            _discard(part.incoming)

    def forget(self) -> None:
        """The worker is gone: its partial jobs go.  What it committed is with delivery
        already (its sender was maybe not told: at-least-once, SPEC §4.4)."""
        for part in self.partials.values():
            _discard(part.incoming)
        self.partials.clear()

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
                _discard(part.incoming)
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

    def hand_over(self, job: object) -> None:
        """In trio: ``job`` (answered by the flush thread) is with delivery now."""
        self.in_hop.discard(job)
        self.handed.set()
        self.handed = trio.Event()

    async def commit(self, message: Commit, prepared: Prepared,
                     channel: Channel | None = None) -> Reply | None:
        """Store a worker's job and its audit records, hand it to delivery, then reply
        (the worker acks then, SPEC §4.4, §11) — unless a job before it on its
        connection failed: then it is removed and refused, never acknowledged.

        With ``channel``, a job that waits for nothing but its sync (no job
        before it, no audit records, not held) is answered by the flush thread
        on ``channel`` right after the sync (None returned: nothing to send)."""
        outcome = prepared.outcome
        early = (_ReplyFromFlush(self, channel, message.rid)
                 if channel is not None and prepared.before is None and not message.hold
                 and self.spool.events is NO_EVENTS else None)
        try:
            if isinstance(prepared.incoming, Exception):
                raise prepared.incoming
            meta = await self._durable(prepared.incoming, message, early)
            if prepared.before is not None:
                with trio.CancelScope(shield=True):   # committed: decided even if cancelled
                    await self._after(prepared.before, meta)
            # No checkpoint since the commit (none without a job before it to wait
            # for): a cancellation cannot come between it and the hand-over.
            answered = _answered(early)
            self._accepted(meta, message.peer, bool(message.hold), counted=answered)
            outcome.ok = True
            return None if answered else Reply(message.rid, value=meta)
        except (LpdError, OSError) as exc:
            return Reply(message.rid, failure=Failure.of(_spool_error(exc)))
        finally:
            if _answered(early):
                self.hand_over(early)
            self._decided(message.token, outcome)

    def batchable(self, message: Commit, prepared: Prepared) -> bool:
        """Whether ``commit_many`` may take it: no job before it to wait for, no records."""
        return prepared.before is None and self.spool.events is NO_EVENTS

    async def commit_many(self, batch: list[tuple[Commit, Prepared]],
                          channel: Channel) -> list[Reply]:
        """Several ``batchable`` commits read together, each as ``commit`` would do it,
        in one task and one hand-off to the group commit (``Spool.commit_many``);
        returns the replies left for trio to send (the flush thread wrote the rest)."""
        replies: list[Reply] = []
        staged: list[tuple[Commit, Prepared, _ReplyFromFlush | None]] = []
        for message, prepared in batch:
            if isinstance(prepared.incoming, Exception):
                replies.append(Reply(message.rid, failure=Failure.of(
                    _spool_error(prepared.incoming))))
                self._decided(message.token, prepared.outcome)
            else:
                early = None if message.hold else _ReplyFromFlush(self, channel, message.rid)
                staged.append((message, prepared, early))
        try:
            results = await self.spool.commit_many(
                [(cast(IncomingJob, p.incoming), m.hold, e) for m, p, e in staged])
            # No checkpoint since the commit: no cancellation before the hand-over.
            for (message, prepared, early), result in zip(staged, results, strict=True):
                if isinstance(result, Exception):
                    replies.append(Reply(message.rid, failure=Failure.of(_spool_error(result))))
                    continue
                answered = _answered(early)
                self._accepted(result, message.peer, bool(message.hold), counted=answered)
                prepared.outcome.ok = True
                if not answered:
                    replies.append(Reply(message.rid, value=result))
        finally:
            for message, prepared, early in staged:
                if _answered(early):
                    self.hand_over(early)
                self._decided(message.token, prepared.outcome)
        return replies

    async def _after(self, before: _Outcome, meta: JobMeta) -> None:
        """Wait for the job before it on its connection; removed and refused if that failed."""
        await before.wait_decided()
        if not before.ok:
            self.spool.remove(meta.id)
            raise SpoolError("a job before it on this connection was not committed")

    def _decided(self, token: str, outcome: _Outcome) -> None:
        outcome.decide()
        self._deciding.pop(token, None)
        if not outcome.ok:
            now = trio.current_time()
            if len(self._failed) > 1000:
                self._failed = {t: w for t, w in self._failed.items()
                                if now - w < FAILED_MEMORY}
            self._failed[token] = now

    async def _durable(self, incoming: IncomingJob, message: Commit,
                       early: _ReplyFromFlush | None = None) -> JobMeta:
        """Commit the job and its records, as relay.connection.Connection._durable does."""
        try:
            meta = await self.spool.commit(incoming, hold=message.hold, on_durable=early)
        except (LpdError, OSError):
            _discard(incoming)
            raise
        events = self.spool.events
        if events is NO_EVENTS:   # nothing to record, no checkpoint: no shield (10 µs) needed
            return meta
        with trio.CancelScope(shield=True):   # committed: its records follow
            await record_committed(events, meta, message.digests, message.hold)
            if message.hold:
                events.record("held", meta, reason=message.hold)
        return meta

    def prepare(self, message: Commit) -> Prepared:
        """``message``'s job, called in the order the worker's commits come: its id is
        taken in that order (so as they were acked), and the job before it on its
        connection, if that was not answered, is found while still known."""
        before = self._deciding.get(message.previous) if message.previous else None
        if before is None and message.previous in self._failed:
            before = _Outcome(ok=False)
            before.decide()
        outcome = self._deciding[message.token] = _Outcome()
        return Prepared(self._prepare(message), outcome, before)

    def _prepare(self, message: Commit) -> IncomingJob | Exception:
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
                _discard(incoming)
            return exc

    def _accepted(self, meta: JobMeta, peer: str, held: bool, *, counted: bool) -> None:
        """Committed and acknowledged next: counted, logged and handed to delivery (as
        relay.connection.Connection._accepted; a job removed again is not counted)."""
        accepted(self.metrics, self.delivery, meta, peer, held=held, counted=counted)

    def withdraw(self, message: Withdrawn) -> None:
        """Jobs a worker's connection did not acknowledge after all: they go."""
        for job_id in message.job_ids:
            try:
                meta = self.spool.get(job_id)
            except KeyError:
                continue
            log.event("warning", "job_withdrawn", job=job_id, queue=meta.queue,
                      error="committed, then not acknowledged: removed unless in delivery")
            self.delivery.remove(meta.queue, [job_id])


def _spool_error(exc: Exception) -> Exception:
    return exc if isinstance(exc, LpdError) else SpoolError(str(exc))


def _discard(incoming: IncomingJob) -> None:
    try:
        incoming.discard()
    except OSError as exc:   # a spool gone read-only: the next start sweeps it
        log.event("error", "discard_failed", job=incoming.id, error=str(exc))

