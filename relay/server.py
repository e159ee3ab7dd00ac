"""The inbound LPD server: trio sockets driving the sans-I/O core into the spool.

Listening sockets on every configured address, an accept loop bounded by
``max_connections``, the source checks made before a byte is read (``allow``,
reserved ports, per-host limit), and one task per admitted connection under a
nursery (``relay.connection.Connection``: one reused receive buffer feeding
the core, memoryview slices of it written straight to the spool, the last
acknowledgement only after the group commit).  Graceful shutdown: stop
accepting, give connections ``graceful_timeout``, cancel the rest.
"""

from __future__ import annotations

import errno
import ipaddress
import socket as pysocket
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import trio

from relay import log, status
from relay.config import Listen, ServerConfig
from relay.connection import Connection
from relay.errors import (
    REPLY_RETRY_LATER,
    BindError,
)
from relay.metrics import Metrics
from relay.queues import QueueRouter
from relay.spool import JobMeta, Spool

# accept() errors that mean "out of resources for now": wait and try again
# instead of dying (the same list trio.serve_listeners uses).
ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class Delivery(Protocol):
    """What the server needs from the delivery side (the scheduler)."""

    def submit(self, job: JobMeta) -> None: ...
    def wake(self, queue: str, job_ids: Sequence[str] = ()) -> None: ...
    def queue_state(self, queue: str) -> status.QueueState: ...
    def remove(self, queue: str, job_ids: Sequence[str]) -> list[str]: ...


def open_listener(listen: Listen, backlog: int = 1024, *, key: str = "server.listen",
                  ) -> trio.socket.SocketType:
    """Bind one listening socket; IPv6 sockets are v6-only so [::] and 0.0.0.0 coexist.

    A failure is a ``BindError`` naming ``key``, the config key of ``listen``.
    """
    family = pysocket.AF_INET6 if ":" in listen.host else pysocket.AF_INET
    sock = pysocket.socket(family, pysocket.SOCK_STREAM)
    try:
        sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
        if family == pysocket.AF_INET6:
            sock.setsockopt(pysocket.IPPROTO_IPV6, pysocket.IPV6_V6ONLY, 1)
        sock.bind((listen.host, listen.port))   # numeric host: no lookup, no await
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindError(key, str(listen), exc) from exc
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


class LpdServer:
    """Accepts LPD connections on every configured address (SPEC §4)."""

    def __init__(self, config: ServerConfig, *, spool: Spool, router: QueueRouter,
                 delivery: Delivery, metrics: Metrics) -> None:
        self.config = config
        self.spool = spool
        self.router = router
        self.delivery = delivery
        self.metrics = metrics
        self._slots = trio.Semaphore(config.max_connections)
        self._per_host: Counter[str] = Counter()
        self._accepting: trio.CancelScope | None = None
        self.listeners: list[trio.socket.SocketType] = []
        self.closed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[list[tuple[str, int]]]
                    = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop_accepting(); then let connections finish for graceful_timeout."""
        self.listeners = [open_listener(listen, key=f"server.listen[{i}]")
                          for i, listen in enumerate(self.config.listen)]
        try:
            async with trio.open_nursery() as connections:
                with trio.CancelScope() as self._accepting:
                    async with trio.open_nursery() as accepts:
                        for lsock in self.listeners:
                            accepts.start_soon(self._accept_loop, lsock, connections)
                        task_status.started([lsock.getsockname()[:2] for lsock in self.listeners])
                self._close_listeners()
                connections.cancel_scope.deadline = (
                    trio.current_time() + self.config.graceful_timeout)
        finally:
            self._close_listeners()
            self.closed.set()

    def stop_accepting(self) -> None:
        """Stop taking new connections; connections in flight get graceful_timeout."""
        if self._accepting is not None:
            self._accepting.cancel()

    def _close_listeners(self) -> None:
        for lsock in self.listeners:
            lsock.close()

    async def _accept_loop(self, lsock: trio.socket.SocketType,
                           nursery: trio.Nursery) -> None:
        while True:
            # Beyond max_connections accepting waits (the kernel backlog holds
            # the rest); nothing is refused or crashes (SPEC §3.2).
            await self._slots.acquire()
            try:
                sock, addr = await lsock.accept()
            except OSError as exc:
                self._slots.release()
                if exc.errno in ACCEPT_RETRY_ERRNOS:
                    log.event("error", "accept_failed", error=str(exc))
                    await trio.sleep(0.1)
                    continue
                if exc.errno == errno.EBADF:  # listener closed by shutdown
                    return
                raise
            nursery.start_soon(self._connection, sock, addr)

    async def _connection(self, sock: trio.socket.SocketType, addr: tuple[str, int]) -> None:
        host, port = addr[0], addr[1]
        self.metrics.inbound_connections.inc()
        self._per_host[host] += 1
        try:
            with sock:
                admitted, refusal = self._admit(host, port)
                if admitted:
                    await Connection(self, sock, f"{host}:{port}").run()
                elif refusal:
                    await _refuse(sock, refusal)
        finally:
            self._per_host[host] -= 1
            if not self._per_host[host]:
                del self._per_host[host]
            self.metrics.inbound_connections.dec()
            self._slots.release()

    def _admit(self, host: str, port: int) -> tuple[bool, bytes]:
        """Source checks made before a single byte of the job is read (SPEC §4.3).

        Returns (admitted, what to say before closing when not).
        """
        peer = f"{host}:{port}"
        if self.config.allow and not _allowed(host, self.config.allow):
            self.metrics.jobs_rejected_total.labels(reason="acl").inc()
            log.event("warning", "connection_refused", peer=peer, error="source not in allow")
            return False, b""
        if self.config.require_reserved_port and port >= 1024:
            self.metrics.jobs_rejected_total.labels(reason="acl").inc()
            log.event("warning", "connection_refused", peer=peer,
                      error=f"source port {port} is not reserved")
            return False, b"\x01lpd-relay: source port must be below 1024\n"
        if self._per_host[host] > self.config.max_connections_per_host:
            log.event("warning", "connection_refused", peer=peer,
                      error="too many connections from this host")
            return False, bytes([REPLY_RETRY_LATER]) + b"lpd-relay: too many connections\n"
        return True, b""


async def _refuse(sock: trio.socket.SocketType, message: bytes) -> None:
    """Say why, then close without reading the job.

    Half-close and drain briefly first: closing a socket with unread input
    sends a reset, and the reset can overtake the message we just wrote.
    """
    with trio.move_on_after(1):
        try:
            await sock.send(message)
            sock.shutdown(pysocket.SHUT_WR)
            while await sock.recv(4096):
                pass
        except OSError:
            pass


def _allowed(host: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
             ) -> bool:
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)
