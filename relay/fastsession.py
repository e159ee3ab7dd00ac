"""Plain connections served by one epoll loop until they need trio (docs/architecture.md).

A plain listener's connection (no TLS, no PROXY header) starts as a
``relay.connection.Connection`` that ``relay._fastloop`` drives: the loop
reads, frames and acknowledges, and decides each step by the connection's
own ``relay.jobsteps`` calls, so one trio wake-up on the loop's epoll
descriptor serves every ready connection instead of a task's round trip
per acknowledgement.  Python does here what the loop hands back:

* the session's first complete job is committed: in an intake worker
  without a task (``SpoolProxy.commit_soon``, its reply to ``_replied``),
  in a single process in a task (the connection's ``_commit``); either is
  bounded by ``idle_timeout`` from the last byte as ``relay.readdeadline``
  bounds it, and the final acknowledgement is written
  only after the commit returned (SPEC §4.4), then the loop reads on;
* the session's later jobs are pipelined while the loop reads on
  (``relay.fastpipe``, with ``relay.ackqueue``'s rules); a connection that
  leaves the loop with jobs committing is handed over once they are decided;
* anything else -- a command (lpq), an abort, an until-close or large data
  file, a refusal or error a step raised, a lost peer, a full socket buffer,
  a failed pipelined commit, a deadline that passed, an epoll set that
  would not take it -- continues in the
  connection's own ``run``, which first does what the loop did not
  (``Connection.handover``), so it goes on exactly as if it had read those
  bytes itself;
* a peer that closes between jobs is closed here, as ``Connection`` would.

Read deadlines: the loop asks the connection's ``ReadDeadline.due`` before
every read that waits, and when it turns to other connections after a few
reads (the last may have emptied the socket); a sweep hands over the
connections past theirs (``SWEEP_SECONDS`` late at most).  Graceful stop: ``stop`` lets the loop run
until its last connection is gone; the server's ``graceful_timeout`` cancels
it, and a cancelled loop discards what its connections had not committed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from relay import _fastloop
from relay.connection import HANDLERS, Connection, PeerGone
from relay.fastpipe import Pipeline
from relay.intakechannel import Reply, raise_failure
from relay.jobassembly import JobAssembly
from relay.memoryfile import IN_MEMORY_MAX
from relay.spoolproxy import SpoolProxy

__all__ = ["SWEEP_SECONDS", "FastSessions"]

# The most a deadline is overrun in the loop (a fraction of the bounds, if smaller).
SWEEP_SECONDS = 0.05


class _Server(Protocol):
    """What the loop's owner keeps: the connection counts (``relay.server``)."""

    config: Any

    def fast_closed(self, host: str) -> None: ...


class FastSessions:
    """One loop's connections and the tasks that serve what it hands back."""

    def __init__(self, server: _Server, nursery: trio.Nursery) -> None:
        self.server = server
        self.loop = _fastloop.FastLoop(IN_MEMORY_MAX)
        self.nursery = nursery      # the server's connections: commits, handed-over ones
        self.stopping = False
        self._scope: trio.CancelScope | None = None
        self._added: trio.Event | None = None
        # Committing without a task: the request id and the job.
        self._soon: dict[_fastloop.Conn, tuple[int, JobAssembly]] = {}
        self._clock = trio.lowlevel.current_clock()
        self.pipeline = Pipeline(self.loop, self._now, self._dispatch, nursery.start_soon,
                                 self._settled, self._close)

    def _now(self) -> float:
        return self._clock.current_time()

    def add(self, conn: Connection, sock: trio.socket.SocketType, host: str) -> None:
        """Serve ``conn`` (counted by the server; ``server.fast_closed`` when it is gone)."""
        self._dispatch(self.loop.add(conn, sock, host, self._now()))
        if self._added is not None:
            self._added.set()

    def stop(self) -> None:
        """No more connections come: end once the loop's are gone."""
        self.stopping = True
        self._maybe_done()

    async def run(self) -> None:
        fd = self.loop.fd
        try:
            with trio.CancelScope() as self._scope:
                self._maybe_done()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._sweep)
                    while True:
                        await trio.lowlevel.wait_readable(fd)
                        self._dispatch(self.loop.poll(self._now()))
        finally:
            # Cancelled: what was not committed goes.
            for c in self.loop.take_all() + list(self.pipeline.draining):
                self._close(c)
            trio.lowlevel.notify_closing(fd)
            self.loop.close()

    async def _sweep(self) -> None:
        while True:
            if not self.loop.count:
                self._added = trio.Event()
                await self._added.wait()
                self._added = None
            out, nearest = self.loop.expired(self._now())
            self._dispatch(out)
            cfg = self.server.config
            step = min(SWEEP_SECONDS, cfg.idle_timeout / 8, cfg.command_timeout / 8)
            await trio.sleep_until(min(nearest, self._now() + step))

    def _maybe_done(self) -> None:
        if (self.stopping and not self.loop.count and not self.pipeline.draining
                and self._scope is not None):
            self._scope.cancel()

    def _dispatch(self, out: list[_fastloop.Conn]) -> None:
        pipeline = self.pipeline
        for c in out:
            kind = c.kind
            if c.jobs:
                pipeline.take(c)
            if kind == _fastloop.IN_LOOP:
                pipeline.progress(c)
            elif kind == _fastloop.COMMIT:
                job, c.payload = c.payload, None
                if not self._commit_soon(c, job):
                    self.nursery.start_soon(self._commit, c, job)
            elif pipeline.leave(c):
                pass      # handed over once its pipelined jobs are decided (_settled)
            elif kind == _fastloop.CLOSED:   # read in the loop: no ack left unsent
                self._close(c)
            else:
                self._hand_over(c)
        if out:
            self._maybe_done()

    async def _commit(self, c: _fastloop.Conn, job: JobAssembly) -> None:
        """The session's first job, as ``Connection._finish_file`` commits it."""
        conn: Connection = c.conn
        try:
            with trio.CancelScope(deadline=c.last + conn.ctx.config.idle_timeout) as scope:
                await conn._commit(job)
        except Exception as exc:
            c.kind, c.payload = _fastloop.RAISE, exc
            self._hand_over(c)
            return
        except BaseException:
            self._close(c)     # cancelled with the server's connections
            raise
        if scope.cancelled_caught:
            c.kind = _fastloop.TIMEOUT
            self._hand_over(c)
            return
        self._dispatch(self.loop.resume(c, self._now()))

    def _commit_soon(self, c: _fastloop.Conn, job: JobAssembly) -> bool:
        """An intake worker's commit without a task (``SpoolProxy.commit_soon``): the
        reply comes to ``_replied``; bounded as ``_commit`` is, by the sweep.  False:
        ``_commit`` it."""
        conn: Connection = c.conn
        spool = conn.ctx.spool
        # A worker's job events are recorded by the main process with its commit, so
        # record_committed has nothing to wait for: spool.commit is all of _durable.
        if not isinstance(spool, SpoolProxy):
            return False
        try:
            rid = spool.commit_soon(job.incoming,
                                    lambda reply: self._replied(c, job, reply))
        except Exception as exc:
            conn._drop(job.incoming)
            c.kind, c.payload = _fastloop.RAISE, exc
            self._hand_over(c)
            return True
        if not rid:
            return False
        if spool.channel.pending:   # the socket took part of the frame: the rest, waiting
            self.nursery.start_soon(spool.channel.flush_quietly)
        self._soon[c] = (rid, job)
        c.due = c.last + conn.ctx.config.idle_timeout   # ReadDeadline.refresh's bound
        return True

    def _replied(self, c: _fastloop.Conn, job: JobAssembly, reply: Reply) -> None:
        """A ``commit_soon``'s reply (from the channel's reader: nothing may escape)."""
        if self._soon.pop(c, None) is None:
            return     # given up meanwhile (a timeout, a stop)
        conn: Connection = c.conn
        try:
            if reply.failure is not None:
                conn._drop(job.incoming)
                raise_failure(reply.failure)
            conn._accepted(reply.value)
            self._dispatch(self.loop.resume(c, self._now()))
        except Exception as exc:
            c.kind, c.payload = _fastloop.RAISE, exc
            self._hand_over(c)

    def _give_up(self, c: _fastloop.Conn) -> None:
        """A commit without a task its connection no longer waits for (a timeout, a
        stop): as a cancelled ``_commit`` ends; the main process still decides the job."""
        if (soon := self._soon.pop(c, None)) is not None:
            rid, job = soon
            conn: Connection = c.conn
            spool = conn.ctx.spool
            assert isinstance(spool, SpoolProxy)
            spool.forget(rid, job.incoming)
            conn._drop(job.incoming)

    def _settled(self, c: _fastloop.Conn) -> None:
        """Its pipelined jobs decided: the hand-over that waited for them."""
        c.kind, c.payload = c.pipe.hand_over()
        if c.kind == _fastloop.CLOSED and not c.pipe.unsent:
            self._close(c)
        else:
            self._hand_over(c)

    def _hand_over(self, c: _fastloop.Conn) -> None:
        if c.sock is None:     # closed meanwhile (a stop's take_all): nothing to serve
            return
        self.loop.drop(c)      # a failed commit: still in the loop's table
        self._give_up(c)       # a commit past its deadline: nobody waits for it now
        conn: Connection = c.conn
        owed = c.pipe.unsent if c.pipe is not None else 0   # acks the loop could not write
        conn.handover = (c.last, _resume(conn, c.kind, c.payload, owed))
        c.payload = None
        self.nursery.start_soon(self._continue, c)
        self._maybe_done()

    async def _continue(self, c: _fastloop.Conn) -> None:
        sock, c.sock = c.sock, None
        try:
            with sock:
                await c.conn.run()
        finally:
            self.server.fast_closed(c.host)

    def _close(self, c: _fastloop.Conn) -> None:
        """As ``Connection.run`` ends: the partial job discarded, the parser released."""
        sock, c.sock = c.sock, None
        if sock is None:
            return
        self.loop.drop(c)
        self._give_up(c)
        self.pipeline.forget(c)
        conn: Connection = c.conn
        try:
            conn._discard()
            conn.parser.release()
        finally:
            sock.close()
            self.server.fast_closed(c.host)
            self._maybe_done()


def _resume(conn: Connection, kind: int, payload: Any,
            owed: int) -> Callable[[], Awaitable[None]]:
    """What ``conn`` does first, where the loop stopped (``Connection.handover``):
    the ``owed`` acks of its pipelined jobs, then the step the loop did not take."""
    step = _step(conn, kind, payload)
    if not owed or kind == _fastloop.LOST:   # a lost peer's acks are given up (AckQueue)
        return step

    async def acks_first() -> None:
        await conn._send_now(bytes(owed))
        await step()

    return acks_first


def _step(conn: Connection, kind: int, payload: Any) -> Callable[[], Awaitable[None]]:

    async def event() -> None:
        if (result := HANDLERS[type(payload)](conn, payload)) is not None:
            await result  # type: ignore[misc]

    async def fail() -> None:
        # Not kept here: the traceback holds the frame that holds this closure.
        nonlocal payload
        exc, payload = payload, None
        raise exc

    async def lost() -> None:
        raise PeerGone(str(payload))

    async def send() -> None:   # the loop's ack (None), or the rest of ``owed`` (b"")
        if (data := b"\x00" if payload is None else payload):
            await conn._send_now(data)

    async def closed() -> None:   # a clean EOF between jobs, once the acks are sent
        conn.closing = True
        await trio.lowlevel.checkpoint()

    async def away() -> None:
        await trio.lowlevel.checkpoint()

    async def timeout() -> None:
        assert conn._reading is not None
        conn._reading.cancel()
        await trio.lowlevel.checkpoint()

    return {_fastloop.EVENT: event, _fastloop.RAISE: fail, _fastloop.LOST: lost,
            _fastloop.SEND: send,
            _fastloop.TIMEOUT: timeout, _fastloop.CLOSED: closed,
            _fastloop.AWAY: away}[kind]
