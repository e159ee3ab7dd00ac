"""One inbound LPD connection: core events -> spool, replies back (SPEC §4).

``Connection`` drives the sans-I/O core and assembles jobs: a job is complete
when its control file and every data file that control file names have
arrived (control-first or data-first), and only then is it committed and the
last file acknowledged (SPEC §4.4).  A job is never dropped silently once its
every step was acknowledged (SPEC §4.2, docs/protocol.md "Job assembly"):
a file the control file does not name, or a control file arriving last that
names a file not sent, is refused while a reply is still due; a connection
that ends at a file boundary with such a job keeps it *held* with the reason.
Whatever else a connection started and did not commit is discarded.

``run`` is the connection boundary: no exception but cancellation leaves it
(trio's ``serve_listeners`` rule), so one client, a full file-descriptor
table or a failing disk ends that connection only, with a refusal where a
reply is due, one log line and a count.  The collaborators arrive as one
frozen ``ConnectionContext`` (``relay.context``) built by the server.
Receive buffers: ``relay.buffers``; which files make a job:
``relay.jobassembly``; each receive-job step's decision, made without
waiting: ``relay.jobsteps``; the one-shot commands: ``relay.commands``;
deadlines that trickling clients cannot dodge: ``relay.readdeadline``.  A
plain connection starts in ``relay.fastsession``'s epoll loop, which makes
the same steps on this object and hands it over (``handover``) at anything
else.
"""

from __future__ import annotations

import socket as pysocket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from relay import _core, commands, log
from relay.ackqueue import AckQueue
from relay.buffers import SMALL
from relay.committed import accepted, record_committed
from relay.context import ConnectionContext, Delivery
from relay.errors import REPLY_RETRY_LATER, DiskFull, ProtocolError, SpoolError
from relay.fastio import FastSocket
from relay.jobassembly import JobAssembly
from relay.jobsteps import JobSteps
from relay.readdeadline import ReadDeadline
from relay.spool import DataWriter, IncomingJob, JobMeta
from relay.spoolbackend import Session
from relay.tls import TlsPeer, TlsStream

__all__ = ["HANDLERS", "Connection", "ConnectionContext", "Delivery", "PeerGone"]

# After a refusal: how long and how much of a still-sending client to drain.
REFUSAL_DRAIN_SECONDS = 2.0
REFUSAL_DRAIN_BYTES = 64 * 1024 * 1024


class PeerGone(Exception):
    """The socket failed (reset, broken pipe): nothing more can be said to the peer."""


class Connection(JobSteps):
    """One inbound connection: event dispatch and job assembly."""

    def __init__(self, ctx: ConnectionContext, sock: trio.socket.SocketType,
                 host: str, port: int, *, io: FastSocket | TlsStream | None = None,
                 tls_peer: TlsPeer | None = None) -> None:
        cfg = ctx.config
        self.ctx = ctx
        self.sock = sock
        self.io = io or FastSocket(sock)    # a TLS listener's connection: TlsStream
        self._fast = self.io if isinstance(self.io, FastSocket) else None
        self.tls_peer = tls_peer            # who the client certificate says (SPEC §9)
        self.host, self.port, self.peer = host, port, f"{host}:{port}"
        self.session = Session()              # this connection, as the spool sees it
        self.parser = _core.ServerParser(max_line=1024, max_control=cfg.max_control_size,
                                         max_job=cfg.max_job_size)
        self.queue: str | None = None        # configured queue name of this 0x02 session
        self.wire_queue = ""
        self.job: JobAssembly | None = None
        self.writer: DataWriter | None = None
        self.closing = False
        self.deadline = ReadDeadline(cfg)     # the read timeouts (relay.readdeadline)
        self.acks: AckQueue | None = None     # jobs committing while the next is read
        self.completed = 0                    # jobs complete on this connection
        self._reading: trio.CancelScope | None = None
        self._upgrade: IncomingJob | None = None   # a job for _serve_pipelined to commit
        self._buf: Any = None                     # the receive buffer in use (small or pooled)
        # Set by relay.fastsession's loop when it hands the connection over: when
        # it read its last byte, and what to do first (the step it did not take).
        self.handover: tuple[float, Callable[[], Awaitable[None]]] | None = None

    async def run(self) -> None:
        """Serve the connection; the boundary no exception but cancellation crosses."""
        try:
            await self._serve()
        except Exception as exc:
            # Resources (EMFILE/ENFILE), the spool (EACCES, EIO, EROFS) or a bug:
            # this connection ends, the daemon does not.  Logged without traceback.
            spool = isinstance(exc, SpoolError | OSError)
            message = str(exc) if spool else f"{type(exc).__name__}: {exc}"
            self._reject("spool_error", message, partial=self.job is not None,
                         level="warning" if spool else "error")
            await self._send_refusal(REPLY_RETRY_LATER, "cannot store the job now, retry later")
        finally:
            self._discard()

    async def _serve(self) -> None:
        small = bytearray(SMALL)
        self._buf = small
        try:
            if await self._serve_requests(small):
                await self._serve_pipelined(small)
        finally:
            if self._buf is not small:    # a pooled buffer for a large body
                self.ctx.buffers.give(self._buf)
            self._buf = small
            self.parser.release()     # no export of our buffers outlives the connection
            # The queue holds bound methods of this connection: dropped here, or
            # the cycle would keep the parser's buffer exports for the GC (_HANDLERS).
            self.acks = self._reading = None

    async def _serve_pipelined(self, small: bytearray) -> None:
        """The rest of a connection whose sender sends several jobs (relay.ackqueue).

        Its nursery holds the jobs' commits; it is opened only here, so idle
        and one-job connections do not carry one.  An error of ours leaves it
        as itself, not as an exception group.
        """
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            self.acks = AckQueue(nursery, self.ctx.spool, self._durable, send=self._send_now,
                                 accepted=self._accepted, failed=self._commit_failed)
            try:
                first, self._upgrade = self._upgrade, None
                assert first is not None
                await self.acks.commit(first)
                await self._serve_requests(small)
            except Exception as exc:
                error = exc
            finally:
                await self.acks.wait_idle()
        if error is not None:
            raise error

    def _commit_failed(self, exc: Exception) -> None:
        # A pipelined commit failed: stop reading; _serve_requests refuses.
        if self._reading is not None:
            self._reading.cancel()

    async def _serve_requests(self, small: bytearray) -> bool:
        """Read and answer requests; True when a session turned out to pipeline."""
        acks = self.acks
        try:
            with trio.CancelScope() as scope:
                self._reading = scope
                if await self._loop(scope, small):
                    return True
            if acks is not None:
                await acks.wait_idle()
                if acks.error is not None:
                    raise acks.error
            if scope.cancelled_caught:
                await self._ended("timeout", self.deadline.message())
        except PeerGone as exc:
            await self._ended("lost", str(exc))
        except ProtocolError as exc:
            self._reject(exc.reason, str(exc), partial=True)
            if exc.reply is not None:
                await self._send_refusal(exc.reply, str(exc))
        except DiskFull as exc:
            self._reject("disk_full", str(exc), partial=True)
            await self._send_refusal(REPLY_RETRY_LATER, "spool disk full, retry later")
        return False

    async def _loop(self, scope: trio.CancelScope, small: bytearray) -> bool:
        """Events to handlers until the connection closes (False) or a job waits
        for ``_serve_pipelined`` (True); the receive buffer lives in ``self._buf``."""
        buf: Any = self._buf
        view = memoryview(buf)
        pool = self.ctx.buffers
        parser, handlers, io = self.parser, _HANDLERS, self.io
        fast = self._fast
        deadline = self.deadline
        now = trio.lowlevel.current_clock().current_time   # trio.current_time, 2 calls less
        deadline.begin()
        if (handover := self.handover) is not None:
            self.handover = None
            deadline.read(handover[0])   # as if this loop had read those bytes
            await handover[1]()
            if self._upgrade is not None:
                return True
        while not self.closing:
            ev = parser.next_event()
            if ev is _core.NEED_DATA:
                # Here the parser holds no export of ``buf``: the one
                # moment a buffer may be swapped (docs/protocol.md).
                remaining = parser.body_remaining
                if remaining and buf is small and not 0 < remaining <= SMALL:
                    if (large := pool.take()) is not None:
                        buf, view = large, memoryview(large)
                        self._buf = large
                elif not remaining and buf is not small:
                    pool.give(buf)
                    buf, view = small, memoryview(small)
                    self._buf = small
                try:
                    n = fast.recv_nowait(buf) if fast is not None else None
                    if n is None or n < 0:
                        # A read that may wait: only it needs the deadline armed.
                        deadline.arm(scope, parser, now())
                        n = await (io.recv_into(buf) if fast is None
                                   else fast.recv_into(buf, blocked=n is not None))
                except OSError as exc:
                    raise PeerGone(str(exc)) from None
                deadline.read(now())   # armed for handlers only if they wait
                parser.receive_data(view[:n])
                continue
            result = handlers[type(ev)](self, ev)
            if result is not None:
                await result  # type: ignore[misc]
            if self._upgrade is not None:
                return True
        return False

    async def _send(self, data: bytes) -> None:
        # Behind a job still committing, a reply waits for that job's ack.
        if self.acks is not None and self.acks.owe(data):
            return
        if (fast := self._fast) is not None:   # an ack: written without waiting, mostly
            try:
                sent = fast.send_nowait(data)
            except OSError as exc:
                raise PeerGone(str(exc)) from None
            if sent == len(data):
                return
            data = data[sent:]
        await self._send_now(data)

    async def _send_now(self, data: bytes | bytearray) -> None:
        io = self.io
        try:
            rest: bytes | bytearray | memoryview = data
            if isinstance(io, FastSocket):
                sent = io.send_nowait(data)
                if sent == len(data):   # an ack: written without waiting
                    return
                rest = memoryview(data)[sent:]
            self.deadline.refresh(self._reading)
            await io.send_all(rest)
        except OSError as exc:
            raise PeerGone(str(exc)) from None

    async def _send_refusal(self, code: int, message: str) -> None:
        """LPRng style: the reply byte and one human-readable line, then close.

        A sender refused mid-file is still writing; closing on its unread
        bytes would send a reset that can overtake our answer.  So half-close
        and drain what it sends for a bounded while (REFUSAL_DRAIN_*), giving
        it the chance to read why.  The partial job is discarded first: its
        space is free before the drain, not after.
        """
        self._discard()
        if self.acks is not None:     # the jobs before this one are answered first
            await self.acks.wait_idle()
        line = message.replace("\n", " ")[:200].encode("ascii", "replace")
        buf = bytearray(SMALL)
        try:
            with trio.move_on_after(REFUSAL_DRAIN_SECONDS):
                await self.io.send_all(bytes([code]) + b"lpd-relay: " + line + b"\n")
                self.sock.shutdown(pysocket.SHUT_WR)  # over TLS too: a FIN ends the data
                drained = 0
                while drained < REFUSAL_DRAIN_BYTES and (n := await self.io.recv_into(buf)):
                    drained += n
        except OSError:
            pass

    def _reject(self, reason: str, message: str, *, partial: bool,
                level: str = "warning") -> None:
        self.ctx.metrics.jobs_rejected_total.labels(reason=reason).inc()
        log.event(level, "job_refused", peer=self.peer, queue=self.wire_queue,
                  reason=reason, error=message, partial=partial)

    def _discard(self) -> None:
        # The job's open data file, if any, is the job's: discard closes it.
        job, self.job, self.writer = self.job, None, None
        if job is not None:
            self._drop(job.incoming)
        if self._upgrade is not None:
            upgrade, self._upgrade = self._upgrade, None
            self._drop(upgrade)

    async def _pipeline_failed(self) -> bool:
        """Wait for the jobs still committing; True when one failed (the session is refused)."""
        if self.acks is None:
            return False
        await self.acks.wait_idle()
        return self.acks.error is not None

    async def _ended(self, how: str, message: str) -> None:
        """The peer went (timeout, reset): hold an acknowledged job, discard the rest."""
        if await self._pipeline_failed():   # refused instead (_serve_requests)
            return
        if self._holdable():
            await self._hold()
        elif how == "timeout":
            self._reject("timeout", message, partial=self.job is not None)
        else:  # reset by peer and friends: the job is simply not complete
            log.event("info", "connection_lost", peer=self.peer, error=message)

    def _holdable(self) -> bool:
        # Every step so far was acknowledged and the stream stopped between
        # files: the sender may believe the job complete.
        job = self.job
        return (job is not None and job.control is not None and self.writer is None
                and not self.parser.buffered and not self.parser.body_remaining)

    async def _hold(self) -> None:
        job = self.job
        assert job is not None
        self.job = None
        reason = job.hold_reason()
        meta = await self._commit(job, hold=reason)
        self.ctx.spool.events.record("held", meta, reason=reason)
        self.ctx.metrics.jobs_held_total.labels(
            queue=self.ctx.metrics.queue_label(meta.queue)).inc()
        log.event("error", "job_held", job=meta.id, queue=meta.queue, peer=self.peer,
                  error=reason)

    # -- 0x02 receive job --------------------------------------------------

    async def on_receive_job(self, ev: _core.ReceiveJob) -> None:
        self.take_receive_job(ev)
        await self._send(b"\x00")

    async def on_control_start(self, ev: _core.ControlFileStart) -> None:
        self.take_control_start(ev)
        await self._send(b"\x00")

    async def on_control_end(self, ev: _core.ControlFileEnd) -> None:
        self.take_control_end(ev)
        await self._finish_file()

    async def on_data_start(self, ev: _core.DataFileStart) -> None:
        self.take_data_start(ev)
        await self._send(b"\x00")

    async def on_data_end(self, ev: _core.DataFileEnd) -> None:
        self.take_data_end(ev)
        await self._finish_file()

    async def _finish_file(self) -> None:
        job = self.job
        assert job is not None
        if job.complete():
            self.job = None
            acks = self.acks
            self.completed += 1
            if acks is not None or self.completed > 1:
                # A session of several jobs (another lpd-relay writes them
                # ahead): read the next job while this one commits; its ack
                # follows its commit.  A one-job connection commits inline.
                if acks is None:
                    self._upgrade = job.incoming    # committed by _serve_pipelined
                else:
                    self.deadline.refresh(self._reading)
                    await acks.commit(job.incoming)
                return
            self.deadline.refresh(self._reading)
            await self._commit(job)
        await self._send(b"\x00")

    async def _durable(self, incoming: IncomingJob, hold: str = "") -> JobMeta:
        """Commit a job and its audit records; both durable on return (SPEC §4.4, §11)."""
        meta = await self.ctx.spool.commit(incoming, hold=hold)
        await record_committed(self.ctx.spool.events, meta, incoming.digests, hold)
        return meta

    async def _commit(self, job: JobAssembly, *, hold: str = "") -> JobMeta:
        try:
            meta = await self._durable(job.incoming, hold)
        except BaseException:
            self._drop(job.incoming)
            raise
        self._accepted(meta, held=bool(hold))
        return meta

    def _accepted(self, meta: JobMeta, *, held: bool = False) -> None:
        """A job committed (in arrival order): counted, logged, handed to delivery."""
        accepted(self.ctx.metrics, self.ctx.delivery, meta, self.peer, held=held)

    async def on_abort(self, ev: _core.AbortJob) -> None:
        self._discard()
        await self._send(b"\x00")

    async def on_end(self, ev: _core.EndOfStream) -> None:
        self.closing = True
        if self.acks is not None:   # the deadline moves only before a wait (readdeadline)
            self.deadline.refresh(self._reading)
            if await self._pipeline_failed():   # refused instead (_serve_requests)
                return
        if self._holdable():
            self.deadline.refresh(self._reading)
            await self._hold()
        elif self.job is not None:
            # The sender closed before the job was complete: never deliver half
            # a job (SPEC §4.2); discarded by run()'s finally.
            self._reject("malformed", "connection closed before the job was complete",
                         partial=True)

    # -- one-shot commands: 0x01, 0x03, 0x04, 0x05, 0x06 (lpc) ----------------

    async def on_command(self, ev: _core.Command) -> None:
        self.closing = True
        self.wire_queue = ev.queue
        if self.tls_peer is not None:
            try:
                self._check_tls_peer(self.ctx.router.route(ev.queue).name, ev.queue)
            except ProtocolError as exc:
                if exc.reason == "acl":
                    self._reject("acl", str(exc), partial=False)
                    await self._send(b"\x01lpd-relay: " + str(exc).encode("ascii", "replace")
                                     + b"\n")
                    return
        self.deadline.refresh(self._reading)
        if self.ctx.answer is not None:   # an intake worker: the main process answers
            await self._send(await self.ctx.answer(self.ctx, ev, self.host, self.port))
            return
        await self._send(commands.answer(self.ctx, ev, self.host, self.port))

# Event type -> handler, kept on the class rather than as bound methods on
# each connection: bound methods would make every connection a reference cycle,
# freed only by the cyclic GC, and each holds its receive buffers (and the
# parser's export of them) until then.
_HANDLERS: dict[type, Callable[[Connection, Any], object]] = {
    _core.ReceiveJob: Connection.on_receive_job,
    _core.ControlFileStart: Connection.on_control_start,
    _core.ControlFileEnd: Connection.on_control_end,
    _core.DataFileStart: Connection.on_data_start,
    _core.DataChunk: Connection.on_data_chunk,
    _core.DataFileEnd: Connection.on_data_end,
    _core.AbortJob: Connection.on_abort,
    _core.EndOfStream: Connection.on_end,
    _core.Command: Connection.on_command,
}
HANDLERS = _HANDLERS   # a handed-over event is dispatched with them (relay.fastsession)
