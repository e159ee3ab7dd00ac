"""``socket://host[:port]`` — raw AppSocket/JetDirect printing (SPEC §3.3).

The protocol is no protocol: connect (port 9100 by default), send the job's
data files back to back, half-close, and wait for the printer to close.  The
wait matters: network print servers may drop the end of a job when the sender
closes abruptly (FIELD-NOTES "Half-close"), and the printer's close is the only
sign that it took everything.  Whatever the printer says meanwhile (PJL status,
PostScript messages) is read into one reused buffer and discarded.

Data moves with ``os.sendfile`` from the spool file into the non-blocking
socket (``relay.sinks.base.stream_file``); TCP_NODELAY keeps the tail of each
file from waiting for a delayed ACK.

Time bounds: resolving and connecting together take at most ``contimeout``
(CUPS' socket backend option; default the ``timeout``); each stall while
sending (no progress for ``timeout``, ``?timeout=30s`` or ``?timeout=30``:
printer offline, paper out); and waiting for the printer to close after the
half-close (``timeout`` too).  ``waiteof=false`` (CUPS' spelling) skips that
wait for printers that never close: the job counts as delivered once the
kernel took the last byte and the half-close.  A large job on a slow link
is therefore not cut off while it makes progress.  Every failure is
temporary (``SinkUnavailable``): the printer was unreachable, refused, reset
or silent, so the job is retried — which, if the
printer did print before going silent, prints it twice (at-least-once).
"""

from __future__ import annotations

import errno
import os
import socket as stdsocket

import trio

from relay.errors import SinkUnavailable, reason_for_errno
from relay.sinks.base import DeliveryJob, Sink, open_spool_file, register, stream_file
from relay.uri import format_hostport

__all__ = ["SocketSink"]

_DRAIN_BUFFER = 64 * 1024


class SocketSink(Sink):
    """Send each job's data files to a raw TCP printer port."""

    def describe(self) -> str:
        return f"raw socket (AppSocket/JetDirect) {self._where()}"

    def _where(self) -> str:
        return format_hostport(self.destination.host, self.destination.port)

    async def deliver(self, job: DeliveryJob) -> None:
        d = self.destination
        timeout = d.timeout
        phase = "connecting to"
        try:
            with trio.fail_after(d.connect_timeout):
                sock = await _connect(self.destination.host, self.destination.port)
            with sock:
                sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
                phase = "sending to"
                for spool_file in job.files:
                    await _send_file(sock, spool_file.path, idle_timeout=timeout)
                # Half-close: "that is all", while still hearing the printer.
                sock.shutdown(stdsocket.SHUT_WR)
                if not d.waiteof:
                    return
                phase = "waiting for the printer to close at"
                with trio.fail_after(timeout):
                    await _drain(sock)
        except trio.TooSlowError:
            took = d.connect_timeout if phase == "connecting to" else timeout
            raise SinkUnavailable(
                f"socket: timed out after {took:g}s {phase} {self._where()}",
                reason="timeout") from None
        except stdsocket.gaierror as exc:
            raise SinkUnavailable(
                f"socket: cannot resolve {self.destination.host!r}: {exc.strerror}") from exc
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, "?")
            raise SinkUnavailable(
                f"socket: {exc.strerror or exc} [{code}] {phase} {self._where()}",
                reason=reason_for_errno(exc.errno)) from exc


async def _connect(host: str, port: int) -> trio.socket.SocketType:
    """Resolve and connect, trying each address in turn (the caller bounds the time)."""
    infos = await trio.socket.getaddrinfo(host, port, type=stdsocket.SOCK_STREAM)
    last: OSError = OSError(errno.EHOSTUNREACH, f"no address for {host}")
    for family, type_, proto, _, address in infos:
        sock = trio.socket.socket(family, type_, proto)
        try:
            await sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    raise last


async def _send_file(sock: trio.socket.SocketType, path: str, *, idle_timeout: float) -> None:
    src = open_spool_file(path)
    try:
        await stream_file(sock.fileno(), src, idle_timeout=idle_timeout)
    finally:
        os.close(src)


async def _drain(sock: trio.socket.SocketType) -> None:
    """Read and discard until the printer closes (one reused buffer: memory stays flat)."""
    buf = bytearray(_DRAIN_BUFFER)
    while await sock.recv_into(buf):
        pass


register("socket", SocketSink)
