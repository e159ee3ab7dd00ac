"""accept() on a trio listener without a scheduler round trip while clients wait.

trio's ``SocketType.accept`` tries the system call first but, when it
succeeds, still yields to the scheduler once (a cancel-shielded
checkpoint), builds the accepted socket through ``socket.socket.accept``
(which converts the family and type to enums on every call) and passes
through two context managers.  Every small job is one connection, so that
is one task switch and some forty Python calls a job in an intake process
(docs/architecture.md, "Where a small job's CPU goes").  ``Acceptor`` calls
``accept4`` directly and parks on ``wait_readable`` only when no client
waits; like ``relay.fastio`` it yields every ``YIELD_EVERY`` accepts so a
flood of connections cannot starve the connections already accepted, and
cancellation (stopping, a listener removed by reload) gets through at
every wait and every yield.
"""

from __future__ import annotations

import socket as pysocket

import trio

from relay.fastio import YIELD_EVERY  # the same fairness as the reads

__all__ = ["Acceptor"]


class Acceptor:
    """Accepts on one listening trio socket (``accept`` returns as trio's does)."""

    __slots__ = ("_family", "_raw", "_streak", "lsock")

    def __init__(self, lsock: trio.socket.SocketType) -> None:
        self.lsock = lsock
        # trio keeps the standard socket it wraps; without it (another trio)
        # this falls back to trio's own accept.
        raw = getattr(lsock, "_sock", None)
        self._raw = raw if isinstance(raw, pysocket.socket) else None
        self._family = int(lsock.family)
        self._streak = 0

    async def accept(self) -> tuple[trio.socket.SocketType, tuple[str, int]]:
        """The next client: (its trio socket, its address); OSError as ``accept``."""
        raw = self._raw
        if raw is None:
            sock, addr = await self.lsock.accept()
            return sock, addr
        if self._streak >= YIELD_EVERY:
            self._streak = 0
            await trio.lowlevel.checkpoint()
        else:   # no yield, but a cancelled accept loop stops here as with trio's
            await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                fd, addr = raw._accept()  # type: ignore[attr-defined]  # no enums per call
                break
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_readable(raw)
        self._streak += 1
        conn = pysocket.socket(self._family, pysocket.SOCK_STREAM, 0, fileno=fd)
        return trio.socket.from_stdlib_socket(conn), addr
