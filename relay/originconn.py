"""One outbound connection from an origin port, and the socket calls behind it.

The pool in ``relay.originports`` decides *which* source port a connection
gets; this module does what happens on the socket: resolve, bind (with the
SO_REUSEADDR / IPV6_V6ONLY details), connect within a deadline, and at close
read the kernel's TCP state to learn which side is left in TIME_WAIT, lingering
for the peer's FIN without blocking the event loop.  ``OriginConnection`` hands
its port back through a ``release`` callback, so nothing here imports the pool.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from typing import Any, Final

import trio

from relay.errors import OriginPortUnavailable, SinkUnavailable, reason_for_errno
from relay.uri import format_hostport

__all__ = [
    "AddressBusy", "Dest", "OriginConnection", "bind_probe", "open_socket", "resolve", "show_dest",
]

_ADDRESS_ERRNOS: Final = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})
# Linux tcp_states.h: the states in which the peer's FIN came before ours.
_TCP_CLOSE_WAIT: Final = 8
_TCP_LAST_ACK: Final = 9
_TCP_CLOSE: Final = 7
_DRAIN_BYTES: Final = 4096
_DRAIN_READS: Final = 256   # what a peer may still send while we linger (1 MiB)

Dest = tuple[str, int]          # resolved peer address and port


class AddressBusy(Exception):
    """EADDRINUSE/EADDRNOTAVAIL; ``at_connect`` tells a 4-tuple collision from a bind."""

    def __init__(self, at_connect: bool) -> None:
        super().__init__("address in use")
        self.at_connect = at_connect


class OriginConnection:
    """A connected outbound socket holding one origin port until :meth:`aclose`.

    ``socket`` is the trio socket (its ``fileno()`` is what ``os.sendfile``
    wants); TCP_NODELAY is on.  Use ``async with`` or call ``aclose`` exactly
    once: the port goes back to the pool only then.
    """

    def __init__(self, sock: trio.socket.SocketType, *, remote: Dest, linger: float,
                 release: Callable[[bool], None]) -> None:
        self.socket = sock
        self.remote = remote
        self.local_port: int = sock.getsockname()[1]
        self._linger = linger
        self._release: Callable[[bool], None] | None = release

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send every byte; a reset or broken pipe becomes ``SinkUnavailable``."""
        with memoryview(data) as view, view.cast("B") as raw:
            sent = 0
            while sent < len(raw):   # each round sends at least one byte
                try:
                    sent += await self.socket.send(raw[sent:])
                except OSError as exc:
                    raise SinkUnavailable(f"sending to {show_dest(self.remote)}: {exc}",
                                          reason=reason_for_errno(exc.errno)) from exc

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes``; ``b""`` when the peer has closed its side."""
        try:
            return await self.socket.recv(max_bytes)
        except OSError as exc:
            raise SinkUnavailable(f"receiving from {show_dest(self.remote)}: {exc}",
                                  reason=reason_for_errno(exc.errno)) from exc

    def send_eof(self) -> None:
        """Half-close (our FIN after the data): some receivers need it (FIELD-NOTES)."""
        self.socket.shutdown(socket.SHUT_WR)

    async def aclose(self, *, peer_closed: bool = False) -> None:
        """Close and give the port back.

        ``peer_closed=True`` says the peer's FIN came before ours: the TIME_WAIT
        is then on the peer and the port needs no cooling.  On Linux the socket's
        TCP state is read first and wins over the hint when it is conclusive.
        With ``linger`` > 0 and our FIN first, waits up to ``linger`` seconds for
        the peer's FIN, then resets the connection (docs/origin-ports.md).
        """
        release, self._release = self._release, None
        if release is None:
            return
        ours = _time_wait_is_ours(self.socket, peer_closed)
        lingered = False
        try:
            if ours and self._linger > 0:
                lingered = True
                ours = not await _linger_close(self.socket, self._linger)
        finally:
            self.socket.close()
            release(ours)
        if not lingered:
            await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> OriginConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()



async def resolve(host: str, port: int,
                  deadline: float) -> list[tuple[socket.AddressFamily, Any]]:
    """Every answer for ``host``, in getaddrinfo's preference order (RFC 6724)."""
    with trio.move_on_at(deadline):
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:   # socket.gaierror included
            raise SinkUnavailable(f"cannot resolve {host!r}: {exc}") from exc
        return [(family, sockaddr) for family, _kind, _proto, _name, sockaddr in infos]
    raise SinkUnavailable(f"resolving {host!r} timed out", reason="timeout")


async def open_socket(family: socket.AddressFamily, sockaddr: Any, local: int | None,
                      reuse_addr: bool, deadline: float, dest: Dest) -> trio.socket.SocketType:
    """A connected socket from ``local`` (None: the kernel's ephemeral choice)."""
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    ok = False
    try:
        # Nagle + delayed ACK stalls every small LPD write by ~40 ms (FIELD-NOTES).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if local is not None:
            await _bind(sock, family, local, reuse_addr)
        with trio.move_on_at(deadline):
            try:
                await sock.connect(sockaddr)
            except OSError as exc:
                raise _connect_error(exc, dest) from exc
            ok = True
            return sock
        raise SinkUnavailable(f"connecting to {show_dest(dest)} timed out", reason="timeout")
    finally:
        if not ok:
            sock.close()


async def _bind(sock: trio.socket.SocketType, family: socket.AddressFamily, local: int,
                reuse_addr: bool) -> None:
    if reuse_addr:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # Keep v6 binds from also claiming the IPv4 port.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        await sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", local))
    except OSError as exc:
        if exc.errno in _ADDRESS_ERRNOS:
            raise AddressBusy(at_connect=False) from exc
        raise OriginPortUnavailable(f"cannot bind origin port {local}: {exc.strerror} "
                                    "(ports < 1024 need root or CAP_NET_BIND_SERVICE)") from exc


def _connect_error(exc: OSError, dest: Dest) -> Exception:
    if exc.errno in _ADDRESS_ERRNOS:
        return AddressBusy(at_connect=True)
    if exc.errno == errno.ECONNREFUSED:
        return SinkUnavailable(f"{show_dest(dest)} refused the connection", reason="refused")
    return SinkUnavailable(f"connecting to {show_dest(dest)}: {exc.strerror or exc}",
                           reason=reason_for_errno(exc.errno))


def _time_wait_is_ours(sock: trio.socket.SocketType, peer_closed: bool) -> bool:
    """Whether closing now leaves TIME_WAIT on our side (so the port must cool)."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except (OSError, AttributeError):   # not Linux: trust the caller
        return not peer_closed
    if state in (_TCP_CLOSE_WAIT, _TCP_LAST_ACK):
        return False            # the peer's FIN came first
    if state == _TCP_CLOSE:     # reset, or finished either way: only the caller knows
        return not peer_closed
    return True                 # established or our FIN already sent


async def _linger_close(sock: trio.socket.SocketType, linger: float) -> bool:
    """Our FIN, then up to ``linger`` s for the peer's; else reset.  True if reset.

    Kernel SO_LINGER > 0 would make close() block the whole event loop (Linux
    ignores O_NONBLOCK there), so the wait is done here, asynchronously.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        with trio.move_on_after(linger):
            for _read in range(_DRAIN_READS):
                if not await sock.recv(_DRAIN_BYTES):
                    return False            # orderly close: the peer has everything
    except OSError:
        return False                        # already reset or closed: nothing to wait for
    # Too slow or too talkative: SO_LINGER 0 turns close() into a RST, which
    # frees the port now instead of leaving it in FIN_WAIT for minutes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return True


def bind_probe(port: int) -> OSError | None:
    """Bind IPv4 ``port`` and close (nothing is sent); the ``OSError``, or None if allowed.

    EADDRINUSE counts as allowed: Linux checks the privilege before the port's use.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as exc:
            return None if exc.errno == errno.EADDRINUSE else exc
    return None


def show_dest(dest: Dest) -> str:
    return format_hostport(*dest)
