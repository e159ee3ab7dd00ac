"""Acknowledgements in wire order while later jobs are read: pipelined receive (SPEC §4.4).

A sender that writes ahead (another lpd-relay sends up to 64 jobs in one
write) would otherwise wait one group commit per job: the connection read a
job, waited for its commit, acknowledged it, and only then read the next.
Here the connection hands a complete job to ``AckQueue.commit`` and goes on
reading; the commit runs in a task of the connection's nursery, so the jobs
of one session share group commits.  Two rules hold whatever the timing:

* replies leave in the order the requests came: every reply the connection
  owes after a job still committing (the next job's header acks) waits behind
  that job's final ack, which goes out only after its own durable commit;
* a job is handed to delivery only in that same order, after every job
  before it in the session was committed; once one commit fails, the jobs
  behind it are never acknowledged, so any that did commit are removed again
  (the sender will send them once more) and the connection is told to refuse.

Only a connection with bytes already waiting behind a complete job (or
commits still in flight) takes this path; a sender that waits for each ack
gets the plain commit-then-ack sequence, with no task.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import trio

from relay.spool import IncomingJob, JobMeta, Spool

__all__ = ["PIPELINE_DEPTH", "AckQueue"]

# Jobs of one connection committing at once; beyond, reading waits (back-pressure).
PIPELINE_DEPTH = 128


class _Pending:
    """One job committing, and the replies owed after its final ack."""

    __slots__ = ("after", "incoming", "meta", "sent")

    def __init__(self, incoming: IncomingJob) -> None:
        self.incoming = incoming
        self.after = bytearray()         # replies queued behind this job's ack
        self.meta: JobMeta | None = None
        self.sent = trio.Event()         # its ack (and ``after``) written, or given up


class AckQueue:
    """One connection's committing jobs and the replies behind them, in order."""

    def __init__(self, nursery: trio.Nursery, spool: Spool,
                 durable: Callable[[IncomingJob], Awaitable[JobMeta]], *,
                 send: Callable[[bytes | bytearray], Awaitable[None]],
                 accepted: Callable[[JobMeta], None],
                 failed: Callable[[Exception], None]) -> None:
        self._nursery = nursery
        self._spool = spool
        self._durable = durable      # the spool's commit and the job's audit records
        self._send = send            # raises on a lost peer
        self._accepted = accepted    # a job committed in order: count it, deliver it
        self._failed = failed        # the first failed commit: the connection refuses
        self._pending: deque[_Pending] = deque()
        self.error: Exception | None = None    # the first commit that failed
        self.peer_lost = False

    @property
    def busy(self) -> bool:
        """Commits (or their replies) still outstanding."""
        return bool(self._pending)

    def owe(self, data: bytes) -> bool:
        """Queue ``data`` behind the last committing job; False when nothing is pending
        (the caller sends it itself)."""
        if not self._pending:
            return False
        self._pending[-1].after += data
        return True

    async def commit(self, incoming: IncomingJob) -> None:
        """Commit ``incoming`` in the background; its final ack follows its commit."""
        while len(self._pending) >= PIPELINE_DEPTH:
            await self._pending[0].sent.wait()
        previous = self._pending[-1].sent if self._pending else None
        item = _Pending(incoming)
        self._pending.append(item)
        self._nursery.start_soon(self._run, item, previous)

    async def wait_idle(self) -> None:
        """Until every queued job was committed and its replies written (or given up)."""
        while self._pending:
            await self._pending[-1].sent.wait()

    async def _run(self, item: _Pending, previous: trio.Event | None) -> None:
        try:
            try:
                item.meta = await self._durable(item.incoming)
            except Exception as exc:   # the connection refuses; no exception leaves a task
                await self._after(previous)
                if self.error is None:
                    self.error = exc
                    self._failed(exc)
                return
            await self._after(previous)
            await self._answer(item)
        finally:
            item.sent.set()
            self._pending.remove(item)

    @staticmethod
    async def _after(previous: trio.Event | None) -> None:
        if previous is not None:
            await previous.wait()

    async def _answer(self, item: _Pending) -> None:
        assert item.meta is not None
        if self.error is not None:
            # An earlier job of the session failed: this one was never
            # acknowledged and will be sent again, so it must not stay.
            self._spool.remove(item.meta.id)
            return
        self._accepted(item.meta)
        if self.peer_lost:
            return
        try:
            await self._send(b"\x00" + item.after)
        except Exception:   # the peer went; committed jobs stay (as without pipelining)
            self.peer_lost = True
