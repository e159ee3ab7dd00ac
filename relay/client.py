"""Outbound LPD client: send a job, ask for queue state, remove jobs (RFC 1179 §5).

Used by the ``lpd://`` and ``lpds://`` sinks, by ``probe`` and by ``lpd-relay
send|queue|remove``, all through ``connect``: one way out, from an ephemeral
port or an origin-port pool, every resolved address tried in order, with the
TLS handshake for ``lpds://``.  The bytes
on the wire come from ``relay._core`` (headers are written whole, in one send
each — FIELD-NOTES pain point 11); replies are read with its ``ReplyParser``,
which tolerates a stray LF after the reply byte and LPRng's error lines.

Data files go out with ``os.sendfile`` straight from the spool file (SPEC §5:
zero-copy, never loaded whole into memory).  Every read and write has its own
deadline (``timeout``), and a stalled peer can never block a queue for longer
than that — FIELD-NOTES pain point 5.

Reply handling: 0x00 ok; 0x01/0x02 and a closed connection -> ``SinkUnavailable``
(retry later); 0x03 -> ``SinkRejected`` (hold, with the peer's message).  A
refusal carries the reply byte and the step it answered (``SinkError.reply``,
``.step``; steps are the ``*_STEP`` names below), so callers such as probe
never read the message to learn what was refused.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket as pysocket
import ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from relay import _core, tls
from relay.errors import (
    REPLY_BAD_JOB,
    REPLY_OK,
    SinkRejected,
    SinkUnavailable,
    reason_for_errno,
)
from relay.fastio import FastSocket
from relay.spoolbackend import Body, open_file_body
from relay.streams import stream_body
from relay.tls import TlsStream
from relay.uri import Destination, format_hostport

if TYPE_CHECKING:
    from relay.originports import OriginPortPool

# The steps a reply answers (``SinkError.step``): the 0x02 command itself,
# then each file's header and its end.  Probe tells a refused 0x02 from a
# refused file by this attribute.
RECEIVE_JOB_STEP = "receive job"
CONTROL_HEADER_STEP = "control file header"
CONTROL_FILE_STEP = "control file"
DATA_HEADER_STEP = "data file header"
DATA_FILE_STEP = "data file"
# Seconds a one-job session waits, after its final ack and our FIN, for the
# receiver's close (``Channel.close_after_peer``): as the origin-port linger.
PEER_CLOSE_WAIT = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class OutFile:
    """A data file to send: from a file on disk (``path``) or from memory (``data``)."""

    name: str
    size: int
    path: str | None = None
    data: bytes | None = None


def short_hostname() -> str:
    """This host's name as an H line and job names carry it: short, letters, digits, '-'."""
    name = pysocket.gethostname().split(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9-]", "", name)[:32] or "lpdrelay"


# dfA..dfZ, dfa..dfz: RFC 1179 names at most 52 data files per job.
DATA_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def build_job(documents: Sequence[OutFile], *, user: str, title: str, host: str,
              number: int, digits: int = 3, fmt: str = "l",
              ) -> tuple[str, bytes, list[OutFile]]:
    """A new job as LPRng's lpr writes it: (control-file name, control file, data files).

    Each document's ``name`` is what the user knows it by (the ``N`` line); the
    data files come back renamed ``dfA<number><host>``, ``dfB...``.
    """
    if not 0 < len(documents) <= len(DATA_LETTERS):
        raise ValueError(f"a job has 1 to {len(DATA_LETTERS)} files")
    job = f"{number % 10 ** digits:0{digits}d}{host}"
    lines = [f"H{host}", f"P{user}", f"J{title}", f"L{user}"]
    files = []
    for letter, doc in zip(DATA_LETTERS, documents, strict=False):
        name = f"df{letter}{job}"
        lines += [f"{fmt}{name}", f"N{doc.name}", f"U{name}"]
        files.append(OutFile(name=name, size=doc.size, path=doc.path, data=doc.data))
    return f"cfA{job}", ("\n".join(lines) + "\n").encode("utf-8"), files


class Channel:
    """One connected LPD socket with per-operation deadlines."""

    def __init__(self, sock: trio.socket.SocketType, *, timeout: float, peer: str,
                 closer: Callable[[bool], Awaitable[None]] | None = None) -> None:
        self.sock = sock
        self.io: FastSocket | TlsStream = FastSocket(sock)   # lpds://: a TlsStream
        self.timeout = timeout
        self.peer = peer
        self._closer = closer
        self._replies = _core.ReplyParser()
        self._buf = bytearray(4096)
        self._scope: trio.CancelScope | None = None

    @contextlib.contextmanager
    def stall_guard(self) -> Iterator[None]:
        """One deadline for a whole exchange, pushed back at every step.

        A peer that makes no progress for ``timeout`` fails the exchange with
        ``trio.TooSlowError``; one cancel scope per exchange instead of one
        per step keeps a small job cheap.
        """
        with trio.CancelScope(deadline=trio.current_time() + self.timeout) as scope:
            self._scope = scope
            try:
                yield
            finally:
                self._scope = None
        if scope.cancelled_caught:
            raise trio.TooSlowError

    def _step(self) -> contextlib.AbstractContextManager[object]:
        if self._scope is not None:
            self._scope.deadline = trio.current_time() + self.timeout
            return contextlib.nullcontext()
        return trio.fail_after(self.timeout)

    async def send_all(self, data: bytes) -> None:
        with self._step():
            await self.io.send_all(data)

    async def send_file(self, path: str, size: int) -> None:
        """Zero-copy ``sendfile`` of a spool file; the deadline restarts on progress.

        A small job's body inside a segment file goes out as its range of
        that file (``open_file_body``), with no copy into a file of its own.
        """
        with open_file_body(path) as body:
            if isinstance(self.io, FastSocket):
                sent = await stream_body(self.sock.fileno(), body, idle_timeout=self.timeout)
            else:
                sent = await self._send_through(body)
        if sent != size:
            raise SinkRejected(f"spool file {path} has {sent} bytes, expected {size}")

    async def _send_through(self, body: Body) -> int:
        # Over TLS the bytes must pass through the TLS layer: no sendfile; one
        # reused buffer, the deadline pushed back at every chunk.
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        sent = 0
        while sent < body.length and (
                n := os.preadv(body.fd, [view[:min(len(buf), body.length - sent)]],
                               body.offset + sent)):
            with self._step():
                await self.io.send_all(view[:n])
            sent += n
        return sent

    async def reply(self, step: str) -> _core.Reply:
        """The next reply: a buffered one at once, else read (the deadline pushed back)."""
        parser = self._replies
        reply = parser.next_reply()
        if reply is not _core.NEED_DATA:
            return reply
        with self._step():
            while reply is _core.NEED_DATA:
                n = await self.io.recv_into(self._buf)
                parser.feed(self._buf[:n])
                reply = parser.next_reply()
        return reply

    def take_ok(self, most: int) -> int:
        """Up to ``most`` ok replies already received, consumed; how many (no I/O)."""
        return self._replies.take_ok(most)

    async def expect_ok(self, step: str, what: str = "") -> None:
        """Wait for the reply to ``step`` (one of the ``*_STEP`` names) about ``what``."""
        reply = await self.reply(step)
        if reply.code == REPLY_OK:
            return
        shown = f"{step} {what}" if what else step
        if reply.code == -1:
            raise SinkUnavailable(f"{self.peer} closed the connection after {shown}",
                                  reason="reset", step=step)
        message = f"{self.peer} answered 0x{reply.code:02x} to {shown}"
        if reply.message:
            message += f": {reply.message.strip()}"
        kind = SinkRejected if reply.code == REPLY_BAD_JOB else SinkUnavailable
        raise kind(message, reply=reply.code, step=step)

    async def read_text(self, limit: int = 1 << 20) -> str:
        text = bytearray()
        buf = bytearray(65536)
        with self._step():
            while len(text) < limit:
                n = await self.io.recv_into(buf)
                if not n:
                    break
                text += buf[:n]
        return text.decode("utf-8", "replace")

    def half_close(self) -> None:
        self.sock.shutdown(pysocket.SHUT_WR)

    async def close_after_peer(self) -> None:
        """Our FIN, then up to ``PEER_CLOSE_WAIT`` s for the receiver's close, then close.

        cups-lpd takes a job at the sender's close, in a process per
        connection: once its close came, the job is taken, and a next job of
        the queue cannot overtake it (whether or not the close would linger).
        """
        with contextlib.suppress(OSError), trio.move_on_after(PEER_CLOSE_WAIT):
            self.half_close()
            while await self.sock.recv(65536):
                pass
        await self.aclose()

    async def aclose(self, *, peer_closed: bool = False) -> None:
        if self._closer is not None:
            await self._closer(peer_closed)
        else:
            self.sock.close()


async def open_channel(host: str, port: int, *, io_timeout: float) -> Channel:
    """A plain connection from an ephemeral port (no origin-port pool).

    Every address the name resolves to is tried in getaddrinfo's order (RFC
    6724) until one answers, all within ``io_timeout``: a name with an IPv6
    and an IPv4 address reaches the one that listens.
    """
    try:
        with trio.fail_after(io_timeout):
            infos = await trio.socket.getaddrinfo(host, port, type=pysocket.SOCK_STREAM)
            sock = await _connect_first(infos)
    except OSError as exc:
        raise SinkUnavailable(f"cannot connect to {format_hostport(host, port)}: {exc}",
                              reason=reason_for_errno(exc.errno)) from exc
    except trio.TooSlowError as exc:
        raise SinkUnavailable(f"cannot connect to {format_hostport(host, port)}: timed out",
                              reason="timeout") from exc
    return Channel(sock, timeout=io_timeout, peer=format_hostport(host, port))


async def _connect_first(infos: Sequence[Any]) -> trio.socket.SocketType:
    """The first of ``infos`` (getaddrinfo answers) that accepts a connection."""
    error: OSError = OSError("no address")
    for family, type_, proto, _, addr in infos:
        sock = trio.socket.socket(family, type_, proto)
        try:
            sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
            await sock.connect(addr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error


async def connect(dest: Destination, pool: OriginPortPool | None = None, *,
                  io_timeout: float, connect_timeout: float | None = None,
                  ctx: ssl.SSLContext | None = None) -> Channel:
    """The one outbound connect: a channel to an ``lpd://`` or ``lpds://`` destination.

    From an ephemeral port, or from ``pool`` (reserved origin ports); every
    resolved address tried in order; for ``lpds://`` the TLS handshake
    (``ctx`` from ``tls_context``, made here when not given), so the caller
    gets one channel type whichever it is.  ``SinkUnavailable`` (a
    ``TlsHandshakeFailed`` for the handshake) when it cannot be had.
    """
    contimeout = io_timeout if connect_timeout is None else connect_timeout
    if pool is None:
        ch = await open_channel(dest.host, dest.port, io_timeout=contimeout)
        ch.timeout = io_timeout
    else:
        conn = await pool.connect(dest.host, dest.port, timeout=contimeout)

        async def release(peer_closed: bool) -> None:
            await conn.aclose(peer_closed=peer_closed)
        ch = Channel(conn.socket, timeout=io_timeout,
                     peer=format_hostport(dest.host, dest.port), closer=release)
    if dest.scheme == "lpds":
        await start_tls(ch, dest, ctx or tls_context(dest), io_timeout)
    return ch


class TlsHandshakeFailed(SinkUnavailable):
    """The TLS handshake of an ``lpds://`` connection failed; ``tls_reason`` is the
    ``lpdrelay_tls_handshake_failures_total`` label (expired, unknown_ca, ...)."""

    def __init__(self, message: str, *, reason: str, tls_reason: str) -> None:
        super().__init__(message, reason=reason)
        self.tls_reason = tls_reason


def tls_context(dest: Destination) -> ssl.SSLContext:
    """The client context of an ``lpds://`` destination; ValueError when a file is unreadable."""
    try:
        return tls.client_context(dest.tls_ca, dest.tls_cert, dest.tls_key)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{dest.uri}: cannot load ca=, cert= or key=: {exc}") from exc


async def start_tls(ch: Channel, dest: Destination, ctx: ssl.SSLContext,
                    handshake_timeout: float) -> None:
    """Handshake on ``ch`` (verified as ``servername`` or the host); its I/O then goes
    through TLS.  ``TlsHandshakeFailed`` (``ch`` closed) when the handshake fails."""
    stream = TlsStream.wrap(ch.sock, ctx, server_hostname=dest.servername or dest.host)
    try:
        with trio.fail_after(handshake_timeout):
            await stream.handshake()
    except (OSError, trio.TooSlowError) as exc:
        await ch.aclose()
        if isinstance(exc, trio.TooSlowError):
            reason, why = "other", f"timed out after {handshake_timeout:g}s"
        else:
            reason, why = tls.failure_reason(exc), tls.describe_failure(exc)
        retry = "timeout" if isinstance(exc, trio.TooSlowError) else (
            "other" if isinstance(exc, ssl.SSLError) else "reset")
        raise TlsHandshakeFailed(f"{dest.host}:{dest.port}: TLS handshake failed ({reason}): "
                                 f"{why}", reason=retry, tls_reason=reason) from None
    except BaseException:
        await ch.aclose()
        raise
    ch.io = stream


async def send_job(ch: Channel, *, queue: str, cf_name: str, control: bytes,
                   files: Sequence[OutFile], mode: str = "count",
                   order: str = "control-first") -> None:
    """Send one job in one 0x02 session and wait for every acknowledgement.

    In ``stream``/``windows`` mode the last data file carries the fake length,
    runs to our half-close and has no trailing NUL; the control file then has
    to go first whatever ``order`` says.
    """
    with ch.stall_guard():
        await open_session(ch, queue)
        await send_job_files(ch, cf_name=cf_name, control=control, files=files, mode=mode,
                             order=order)


async def open_session(ch: Channel, queue: str) -> None:
    """0x02 "receive job": after it, one or more jobs' files may follow."""
    await ch.send_all(_core.receive_job(queue))
    await ch.expect_ok(RECEIVE_JOB_STEP, f"for queue {queue!r}")


async def send_job_files(ch: Channel, *, cf_name: str, control: bytes,
                         files: Sequence[OutFile], mode: str, order: str) -> None:
    """The subcommands of one job inside an open 0x02 session."""
    streamed = mode != "count" and bool(files)
    control_first = order == "control-first" or streamed
    if control_first:
        await _send_control(ch, cf_name, control)
    for i, f in enumerate(files):
        last_streamed = streamed and i == len(files) - 1
        await ch.send_all(_core.data_header(f.name, f.size, mode if last_streamed else "count"))
        await ch.expect_ok(DATA_HEADER_STEP, f.name)
        if f.path is not None:
            await ch.send_file(f.path, f.size)
        else:
            await ch.send_all(f.data or b"")
        if last_streamed:
            ch.half_close()
            await _final_after_eof(ch, f.name)
            return
        await ch.send_all(b"\x00")
        await ch.expect_ok(DATA_FILE_STEP, f.name)
    if not control_first:
        await _send_control(ch, cf_name, control)


async def _send_control(ch: Channel, cf_name: str, control: bytes) -> None:
    await ch.send_all(_core.control_header(cf_name, len(control)))
    await ch.expect_ok(CONTROL_HEADER_STEP, cf_name)
    await ch.send_all(control + b"\x00")
    await ch.expect_ok(CONTROL_FILE_STEP, cf_name)


async def _final_after_eof(ch: Channel, name: str) -> None:
    # After the half-close a receiver either acknowledges (LPRng) or just
    # closes (CUPS' stream peers read no status): a clean close is success, a
    # non-zero byte is the refusal it would be anywhere else.
    reply = await ch.reply(f"{DATA_FILE_STEP} {name}")
    if reply.code in (REPLY_OK, -1):
        return
    raise (SinkRejected if reply.code == REPLY_BAD_JOB else SinkUnavailable)(
        f"{ch.peer} answered 0x{reply.code:02x} to data file {name}: {reply.message.strip()}",
        reply=reply.code, step=DATA_FILE_STEP)


@dataclass(slots=True)
class Pipelined:
    """Jobs for ``send_pipelined``: (control-file name, subcommands, file count) each.

    The subcommands are one string, control file first (``relay.sinks.lpdprepare.inline``).
    """

    jobs: list[tuple[str, bytes, int]]
    done: int = 0          # jobs whose own last reply was 0x00


async def send_pipelined(ch: Channel, batch: Pipelined) -> None:
    """Write every job of ``batch`` in one send, then read their replies in order.

    For a receiver that reads ahead (another lpd-relay): no round trip per
    step.  The replies are small (two per file), so they never fill our
    receive buffer while we write.  A job counts (``batch.done``) only at its
    own last 0x00; the first refusal raises with the jobs before it counted.
    """
    await ch.send_all(b"".join(blob for _, blob, _ in batch.jobs))
    for cf_name, _, nfiles in batch.jobs:
        want = 2 + 2 * nfiles           # a header and an end per file
        got = ch.take_ok(want)
        while got < want:   # not received yet, or not ok: wait for it, step named
            await ch.expect_ok(_PIPELINED_STEPS[min(got, 2 + (got & 1))], cf_name)
            got += 1 + ch.take_ok(want - got - 1)
        batch.done += 1


# The step each reply of a pipelined job answers, by its index: the control
# file's header and end, then a header and an end per data file.
_PIPELINED_STEPS = (CONTROL_HEADER_STEP, CONTROL_FILE_STEP, DATA_HEADER_STEP, DATA_FILE_STEP)


async def query(ch: Channel, queue: str, *, long: bool, items: Sequence[str] = ()) -> str:
    """lpq: send 0x03/0x04 and return the text the server writes before closing."""
    with ch.stall_guard():
        await ch.send_all(_core.queue_state(queue, long=long, items=list(items)))
        return await ch.read_text()


async def remove(ch: Channel, queue: str, agent: str, items: Sequence[str]) -> str:
    """lprm: send 0x05; BSD answers with text lines, cups-lpd with one status byte."""
    with ch.stall_guard():
        await ch.send_all(_core.remove_jobs(queue, agent, list(items)))
        text = await ch.read_text()
    if text == "\x00":
        return "ok\n"
    return text
