"""Socket reads and writes without a scheduler round trip when the kernel is ready.

trio's socket methods always yield to the scheduler, even when the kernel
could answer at once.  An LPD job is five request/acknowledge round trips of
a few bytes each, so that yield — not the bytes — dominated the cost of a
small job (measured: ~1.6 ms of relay CPU per 1-KiB job before, see
docs/server.md).  These helpers try the system call first and only park on
``wait_readable`` / ``wait_writable`` when it would block.

Fairness: a reader that keeps finding data yields every ``YIELD_EVERY``
reads, so one fast sender cannot starve the other connections, and
cancellation (idle timeouts, shutdown) still gets through.
"""

from __future__ import annotations

import os

import trio

YIELD_EVERY = 16


class FastSocket:
    """Non-blocking I/O on a connected trio socket's file descriptor."""

    __slots__ = ("_streak", "fd", "sock")

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self._streak = 0

    def recv_nowait(self, buf: bytearray) -> int | None:
        """What is there now, without yielding; otherwise the caller must ``recv_into``.

        -1: the read would block (``recv_into(blocked=True)`` waits first);
        None: this reader's turn to yield has come (``recv_into`` reads and
        checkpoints).  The caller arms its deadline only for a read that can
        wait (relay.connection).
        """
        if self._streak + 1 >= YIELD_EVERY:
            return None
        try:
            n = os.readv(self.fd, (buf,))
        except BlockingIOError:
            self._streak = 0
            return -1
        self._streak += 1
        return n

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the socket buffer takes now (0 when full); never yields."""
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0

    async def recv_into(self, buf: bytearray, *, blocked: bool = False) -> int:
        """Read what is there into ``buf``; 0 means the peer closed its side.

        ``blocked``: a ``recv_nowait`` just found nothing, so wait before reading.
        """
        if blocked:
            await trio.lowlevel.wait_readable(self.fd)
        while True:
            try:
                n = os.readv(self.fd, (buf,))
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_readable(self.fd)
                continue
            self._streak += 1
            if self._streak >= YIELD_EVERY:
                self._streak = 0
                await trio.lowlevel.checkpoint()
            return n

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``, parking only while the socket buffer is full."""
        sent = self.send_nowait(data)   # an acknowledgement: one write, no view, no loop
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            try:
                sent = os.write(self.fd, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.fd)
                continue
            view = view[sent:]
