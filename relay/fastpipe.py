"""A loop connection's pipelined jobs: a session's later jobs commit while it reads on.

Another lpd-relay writes a run of jobs ahead in one 0x02 session
(``relay.sinks.lpd``).  ``relay._fastloop`` hands each complete job after
the session's first to Python (``Conn.jobs``) and reads on; here each one
is committed -- in an intake worker by ``SpoolProxy.commit_soon``, without a
task, else in a task by the connection's own ``_durable`` -- and
``_fastloop.FastLoop.release`` writes its final acknowledgement, and the
ones owed behind it, once it and every job before it are decided.  The
rules are ``relay.ackqueue``'s, kept exactly:

* replies leave in request order, a job's final ack only after its own
  durable commit (SPEC §4.4); jobs are handed to delivery in arrival order;
* several commits of one session are in flight, up to ``PIPELINE_DEPTH``;
  beyond, the connection is not read (back-pressure);
* once a commit fails, the jobs behind it are never acknowledged (any that
  did commit are removed again), reading stops, and the connection is
  refused by ``Connection`` once the jobs before are answered;
* acks to a peer that went are given up; its committed jobs stay.

A connection that leaves the loop (an event it does not take, a timeout, a
reset, EOF) while jobs are committing is handed over only once they are
decided, with the acks the loop could not write sent first, so
``Connection`` goes on with no commit of the loop's in flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, cast

from relay import _fastloop
from relay.ackqueue import PIPELINE_DEPTH
from relay.connection import Connection
from relay.intakechannel import Reply, raise_failure
from relay.jobassembly import JobAssembly
from relay.spool import JobMeta
from relay.spoolproxy import IncomingProxy, SpoolProxy

__all__ = ["Pipe", "PipedJob", "Pipeline"]


class PipedJob:
    """One pipelined job committing: its outcome once decided."""

    __slots__ = ("done", "error", "incoming", "meta", "rid")

    def __init__(self, job: JobAssembly) -> None:
        self.incoming = job.incoming
        self.rid = 0                       # a commit_soon's request id, while it waits
        self.done = False
        self.meta: JobMeta | None = None
        self.error: Exception | None = None


class Pipe:
    """One connection's pipelined jobs, in arrival order (module docstring)."""

    __slots__ = ("error", "items", "leaving", "paused", "unsent")

    def __init__(self) -> None:
        self.items: deque[PipedJob] = deque()
        self.error: Exception | None = None    # the first commit that failed, in order
        self.leaving: tuple[int, Any] | None = None   # a hand-over waiting for the items
        self.unsent = 0          # acks decided after the connection left the loop
        self.paused = False      # PIPELINE_DEPTH reached: not read

    def hand_over(self) -> tuple[int, Any]:
        """Every job decided: what ``Connection`` does first (``relay.fastsession``)."""
        assert self.leaving is not None and not self.items
        # Not kept here: an exception's traceback holds frames that hold the connection.
        (kind, payload), error, self.leaving, self.error = self.leaving, self.error, None, None
        if kind in (_fastloop.LOST, _fastloop.RAISE) or error is None:
            return kind, payload
        # As Connection's _serve_requests: a failed commit is refused before
        # whatever else ended the reading (an EOF, a timeout).
        return _fastloop.RAISE, error


class Pipeline:
    """The pipelined jobs of one loop's connections (``relay.fastsession`` owns it)."""

    def __init__(self, loop: _fastloop.FastLoop, now: Callable[[], float],
                 dispatch: Callable[[list[_fastloop.Conn]], None],
                 start: Callable[..., None], settled: Callable[[_fastloop.Conn], None],
                 close: Callable[[_fastloop.Conn], None]) -> None:
        self.loop, self._now, self._dispatch = loop, now, dispatch
        self._start = start        # nursery.start_soon: a commit in a task
        self._settled = settled    # a connection out of the loop with nothing committing
        self._close = close        # a cancelled commit: the connection ends
        self.draining: set[_fastloop.Conn] = set()   # left the loop, jobs committing

    def take(self, c: _fastloop.Conn) -> None:
        """Commit the complete jobs the loop handed over with ``c`` (decided by ``progress``)."""
        if c.pipe is None:
            c.pipe = Pipe()
        pipe: Pipe = c.pipe
        jobs, c.jobs = c.jobs, []
        for job in jobs:
            item = PipedJob(job)
            pipe.items.append(item)
            if pipe.error is not None:   # behind a failed one: never acknowledged
                c.conn._drop(item.incoming)
                item.done = True
            elif not self._commit_soon(c, item):
                self._start(self._commit, c, item)
        if len(pipe.items) >= PIPELINE_DEPTH and not pipe.paused and pipe.error is None:
            pipe.paused = True     # AckQueue.commit's back-pressure
            self.loop.pause(c)

    def leave(self, c: _fastloop.Conn) -> bool:
        """``c`` left the loop: True when its hand-over waits for its jobs."""
        pipe: Pipe | None = c.pipe
        if pipe is None or (not pipe.items and pipe.error is None):
            return False
        pipe.leaving = (c.kind, c.payload)
        c.payload = None
        if not pipe.items:   # all decided, one failed (an ack's write left): refused now
            self._settled(c)
            return True
        self.draining.add(c)
        self.progress(c)
        return True

    def forget(self, c: _fastloop.Conn) -> None:
        """``c`` ends with jobs still committing (a stop): nobody waits for them."""
        self.draining.discard(c)
        pipe: Pipe | None = c.pipe
        if pipe is None:
            return
        spool = c.conn.ctx.spool
        for item in pipe.items:
            if item.rid and not item.done:
                assert isinstance(spool, SpoolProxy)
                spool.forget(item.rid, cast(IncomingProxy, item.incoming))
            item.done = True
        pipe.items.clear()

    def _commit_soon(self, c: _fastloop.Conn, item: PipedJob) -> bool:
        conn: Connection = c.conn
        spool = conn.ctx.spool
        if not isinstance(spool, SpoolProxy):
            return False
        try:
            rid = spool.commit_soon(item.incoming,
                                    lambda reply: self._replied(c, item, reply))
        except Exception as exc:
            conn._drop(item.incoming)
            item.done, item.error = True, exc     # progress decides it, in order
            return True
        if not rid:
            return False     # the job before it has not sent its Commit: commit waits
        if spool.channel.pending:   # the socket took part of the frame: the rest, waiting
            self._start(spool.channel.flush_quietly)
        item.rid = rid
        return True

    def _replied(self, c: _fastloop.Conn, item: PipedJob, reply: Reply) -> None:
        """A ``commit_soon``'s reply (from the channel's reader: nothing may escape)."""
        if item.done:
            return
        item.rid = 0
        try:
            if reply.failure is not None:
                c.conn._drop(item.incoming)
                raise_failure(reply.failure)
            meta = reply.value
            assert isinstance(meta, JobMeta)
        except Exception as exc:
            self._decided(c, item, None, exc)
            return
        self._decided(c, item, meta, None)

    async def _commit(self, c: _fastloop.Conn, item: PipedJob) -> None:
        """A job committed in a task, as ``AckQueue`` commits it."""
        try:
            meta = await c.conn._durable(item.incoming)
        except Exception as exc:
            self._decided(c, item, None, exc)
            return
        except BaseException:
            self._close(c)     # cancelled with the server's connections
            raise
        self._decided(c, item, meta, None)

    def _decided(self, c: _fastloop.Conn, item: PipedJob, meta: JobMeta | None,
                 error: Exception | None) -> None:
        if item.done:
            return
        item.done, item.meta, item.error = True, meta, error
        self.progress(c)

    def progress(self, c: _fastloop.Conn) -> None:
        """Answer what is decided; a drained connection's hand-over; reading again."""
        pipe: Pipe | None = c.pipe
        if pipe is None or not pipe.items or not pipe.items[0].done:
            return
        for _ in range(len(pipe.items)):   # bounded: each pass answers one job at least
            try:
                self._answer(c, pipe)
                break
            except Exception as exc:   # e.g. a hand-off or a removal that raised
                if pipe.error is None:     # as a failed commit: the rest not acknowledged
                    pipe.error = exc
                    self.loop.pause(c)
        self._dispatch(self.loop.out())    # a write that failed or would block
        if not pipe.items:
            if pipe.leaving is None and pipe.error is not None:
                pipe.leaving = (_fastloop.RAISE, pipe.error)   # paused: refused now
                self.draining.add(c)
            if pipe.leaving is not None and c in self.draining:
                self.draining.discard(c)
                self._settled(c)
        if (pipe.paused and pipe.leaving is None and pipe.error is None
                and len(pipe.items) < PIPELINE_DEPTH):
            pipe.paused = False    # also when one pass took it from the depth to none
            self._dispatch(self.loop.unpause(c, self._now()))

    def _answer(self, c: _fastloop.Conn, pipe: Pipe) -> None:
        """The decided jobs at the head, in order: accepted and acknowledged, or not."""
        conn: Connection = c.conn
        while pipe.items and pipe.items[0].done:
            item = pipe.items.popleft()
            if item.error is not None:
                error, item.error = item.error, None
                if pipe.error is None:   # AckQueue: reading stops, the session is refused
                    pipe.error = error
                    self.loop.pause(c)
            if pipe.error is not None:
                if item.meta is not None:    # committed behind a failed one: it goes
                    conn.ctx.spool.remove(item.meta.id)
                self.loop.release(c, False)
                continue
            assert item.meta is not None
            conn._accepted(item.meta)
            pipe.unsent += self.loop.release(c, True)
