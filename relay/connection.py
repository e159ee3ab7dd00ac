"""One inbound LPD connection: core events -> spool, replies back (SPEC §4).

``Connection`` drives the sans-I/O core from one reused receive buffer and
assembles jobs: a job is complete when its control file and every data file
that control file names have arrived (control-first or data-first), and only
then is it committed and the last file acknowledged (SPEC §4.4).  Whatever a
connection started and did not commit is discarded when it ends.  The
listening, accepting and admission checks are ``relay.server``'s.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket as pysocket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from relay import _core, controlfile, log, status
from relay.config import CATCH_ALL
from relay.errors import (
    REPLY_BAD_JOB,
    REPLY_RETRY_LATER,
    DiskFull,
    ProtocolError,
    SpoolError,
)
from relay.fastio import FastSocket
from relay.spool import DataWriter, IncomingJob

if TYPE_CHECKING:
    from relay.server import LpdServer

RECV_BUFFER = 256 * 1024
# After a refusal: how long and how much of a still-sending client to drain.
REFUSAL_DRAIN_SECONDS = 2.0
REFUSAL_DRAIN_BYTES = 64 * 1024 * 1024
# While a data file of unknown length streams in, look at free space this often.
SPACE_CHECK_EVERY = 64 * 1024 * 1024


class Connection:
    """One inbound connection: event dispatch and job assembly."""

    def __init__(self, server: LpdServer, sock: trio.socket.SocketType, peer: str) -> None:
        cfg = server.config
        self.server = server
        self.sock = sock
        self.io = FastSocket(sock)
        self.peer = peer
        self.parser = _core.ServerParser(max_line=1024, max_control=cfg.max_control_size,
                                         max_job=cfg.max_job_size)
        self.queue: str | None = None        # configured queue name of this 0x02 session
        self.wire_queue = ""
        self.job: JobAssembly | None = None
        self.writer: DataWriter | None = None
        self.closing = False

    async def run(self) -> None:
        idle = self.server.config.idle_timeout
        try:
            with trio.CancelScope(deadline=trio.current_time() + idle) as scope:
                await self._loop(scope, idle)
            if scope.cancelled_caught:
                self._reject("timeout", f"no data for {idle:g}s", partial=self.job is not None)
        except ProtocolError as exc:
            self._reject(exc.reason, str(exc), partial=True)
            if exc.reply is not None:
                await self._send_refusal(exc.reply, str(exc))
        except DiskFull as exc:
            self._reject("disk_full", str(exc), partial=True)
            await self._send_refusal(REPLY_RETRY_LATER, "spool disk full, retry later")
        except OSError as exc:  # reset by peer and friends: the job is simply not complete
            log.event("info", "connection_lost", peer=self.peer, error=str(exc))
        finally:
            self._discard()

    async def _loop(self, scope: trio.CancelScope, idle: float) -> None:
        buf = bytearray(RECV_BUFFER)
        view = memoryview(buf)
        parser, handlers, io = self.parser, _HANDLERS, self.io
        while not self.closing:
            ev = parser.next_event()
            if ev is _core.NEED_DATA:
                n = await io.recv_into(buf)
                scope.deadline = trio.current_time() + idle
                parser.receive_data(view[:n])
                continue
            result = handlers[type(ev)](self, ev)
            if result is not None:
                await result  # type: ignore[misc]

    async def _send(self, data: bytes) -> None:
        await self.io.send_all(data)

    async def _send_refusal(self, code: int, message: str) -> None:
        """LPRng style: the reply byte and one human-readable line, then close.

        A sender refused mid-file is still writing; closing on its unread
        bytes would send a reset that can overtake our answer.  So half-close
        and drain what it sends for a bounded while (REFUSAL_DRAIN_*), giving
        it the chance to read why.
        """
        line = message.replace("\n", " ")[:200].encode("ascii", "replace")
        buf = bytearray(65536)
        try:
            with trio.move_on_after(REFUSAL_DRAIN_SECONDS):
                await self.io.send_all(bytes([code]) + b"lpd-relay: " + line + b"\n")
                self.sock.shutdown(pysocket.SHUT_WR)
                drained = 0
                while drained < REFUSAL_DRAIN_BYTES and (n := await self.io.recv_into(buf)):
                    drained += n
        except OSError:
            pass

    def _reject(self, reason: str, message: str, *, partial: bool) -> None:
        self.server.metrics.jobs_rejected_total.labels(reason=reason).inc()
        log.event("warning", "job_refused", peer=self.peer, queue=self.wire_queue,
                  reason=reason, error=message, partial=partial)

    def _discard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.job is not None:
            self.job.incoming.discard()
            self.job = None

    # -- 0x02 receive job --------------------------------------------------

    async def on_receive_job(self, ev: _core.ReceiveJob) -> None:
        if self.queue is None:
            queue = self.server.router.route(ev.queue)
            self.server.spool.check_space()
            self.queue, self.wire_queue = queue.name, ev.queue
        await self._send(b"\x00")

    def _job(self) -> JobAssembly:
        if self.job is None:
            assert self.queue is not None, "parser emits files only inside 0x02"
            incoming = self.server.spool.begin(queue=self.queue, wire_queue=self.wire_queue,
                                               peer=self.peer)
            self.job = JobAssembly(incoming)
        return self.job

    async def on_control_start(self, ev: _core.ControlFileStart) -> None:
        job = self._job()
        self._check_size(job.incoming.bytes + ev.length)
        await self._send(b"\x00")

    async def on_control_end(self, ev: _core.ControlFileEnd) -> None:
        job = self._job()
        if job.control is not None:
            raise ProtocolError("second control file before the data files of the first",
                                reply=REPLY_BAD_JOB, reason="malformed")
        cf = controlfile.parse_control_file(ev.data)
        name = controlfile.split_job_name(ev.name)
        job.incoming.set_control(
            ev.name, ev.data, number=name.number, user=cf.user or "", host=cf.host or "",
            title=cf.title or cf.job_name or "", job_name=cf.job_name or "",
            formats={f.name: f.format for f in cf.print_files})
        job.control = cf
        await self._finish_file()

    async def on_data_start(self, ev: _core.DataFileStart) -> None:
        job = self._job()
        if ev.length is not None:
            self._check_size(job.incoming.bytes + ev.length)
        if ev.length:
            # A declared size must fit above min_free_disk before a byte is
            # written; the job itself passed the plain check at 0x02, and a
            # streamed file is checked as it grows (on_data_chunk).
            self.server.spool.check_space(ev.length)
        self.writer = job.incoming.open_data(ev.name)
        job.streamed = 0
        await self._send(b"\x00")

    def on_data_chunk(self, ev: _core.DataChunk) -> None:
        assert self.writer is not None and self.job is not None
        data = ev.data
        self.writer.write(data)
        job = self.job
        job.streamed += len(data)
        if job.streamed >= SPACE_CHECK_EVERY:
            job.streamed = 0
            self._check_size(job.incoming.bytes)
            self.server.spool.check_space()

    async def on_data_end(self, ev: _core.DataFileEnd) -> None:
        assert self.writer is not None and self.job is not None
        self.writer.close()
        self.writer = None
        self._check_size(self.job.incoming.bytes)
        self.job.received.add(ev.name)
        await self._finish_file()

    async def _finish_file(self) -> None:
        job = self.job
        assert job is not None
        if job.complete():
            self.job = None
            await self._commit(job)
        await self._send(b"\x00")

    async def _commit(self, job: JobAssembly) -> None:
        try:
            meta = await self.server.spool.commit(job.incoming)
        except (SpoolError, OSError):
            job.incoming.discard()
            raise
        m = self.server.metrics
        label = m.queue_label(meta.queue)
        m.jobs_received_total.labels(queue=label).inc()
        m.bytes_received_total.labels(queue=label).inc(meta.total_bytes)
        log.count("received")
        log.event("debug", "job_received", job=meta.id, queue=meta.queue, peer=self.peer,
                  user=meta.user, bytes=meta.total_bytes, files=len(meta.files))
        self.server.delivery.submit(meta)

    def _check_size(self, total: int) -> None:
        limit = self.server.config.max_job_size
        if total > limit:
            raise ProtocolError(f"job larger than max_job_size ({limit} bytes)",
                                reply=REPLY_BAD_JOB, reason="too_large")

    async def on_abort(self, ev: _core.AbortJob) -> None:
        self._discard()
        await self._send(b"\x00")

    def on_end(self, ev: _core.EndOfStream) -> None:
        self.closing = True
        if self.job is not None:
            # The sender closed before the job was complete: never deliver half
            # a job (SPEC §4.2); discarded by run()'s finally.
            self._reject("malformed", "connection closed before the job was complete",
                         partial=True)

    # -- one-shot commands: 0x01, 0x03, 0x04, 0x05 ---------------------------

    async def on_command(self, ev: _core.Command) -> None:
        self.closing = True
        self.wire_queue = ev.queue
        if ev.code == 0x01:
            queue = self.server.router.route(ev.queue)
            # Operands are an lpd-relay extension: spool ids to release (from
            # `lpd-relay spool retry`); plain 0x01 releases every held job.
            self.server.delivery.wake(queue.name, ev.operands)
            await self._send(b"\x00")
            return
        try:
            queue = self.server.router.route(ev.queue)
        except ProtocolError as exc:
            await self._send(f"{exc}\n".encode("ascii", "replace"))
            return
        if ev.code in (0x03, 0x04):
            text = status.render(self._queue_state(queue.name, ev.queue),
                                 long=ev.code == 0x04, items=ev.operands)
        else:
            text = self._remove(queue.name, ev.operands)
        await self._send(text.encode("utf-8", "replace"))

    def _queue_state(self, queue: str, wire_queue: str) -> status.QueueState:
        """The queue as the asker named it: for the catch-all, only that name's jobs."""
        state = self.server.delivery.queue_state(queue)
        if queue != CATCH_ALL:
            return state
        wanted = wire_queue.casefold()
        return dataclasses.replace(state, queue=wire_queue, jobs=tuple(
            j for j in state.jobs if j.wire_queue.casefold() == wanted))

    def _remove(self, queue: str, operands: Sequence[str]) -> str:
        if not operands:
            return "lpd-relay: lprm needs the requesting user\n"
        state = self._queue_state(queue, self.wire_queue)
        host = self.peer.rsplit(":", 1)[0]
        local = ipaddress.ip_address(host).is_loopback
        chosen = status.select_for_removal(state.jobs, agent=operands[0], items=operands[1:],
                                           local=local)
        removed = set(self.server.delivery.remove(queue, [j.id for j in chosen]))
        return status.render_removal(chosen, removed)


# Event type -> handler, kept on the class rather than as bound methods on
# each connection: bound methods would make every connection a reference cycle,
# freed only by the cyclic GC, and each holds its 256 KiB receive buffer (and
# the parser's export of it) until then.
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


class JobAssembly:
    """The job being received: complete once its control file and every data file
    that control file names have arrived (control-first or data-first)."""

    __slots__ = ("control", "incoming", "received", "streamed")

    def __init__(self, incoming: IncomingJob) -> None:
        self.incoming = incoming
        self.control: controlfile.ControlFile | None = None
        self.received: set[str] = set()
        self.streamed = 0

    def complete(self) -> bool:
        cf = self.control
        return cf is not None and all(name in self.received for name in cf.data_files)
