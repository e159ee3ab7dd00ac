"""The inbound LPD server: trio sockets driving the sans-I/O core into the spool.

Listening sockets on every configured address, an accept loop bounded by
``max_connections``, the source checks made before a byte is read (``allow``,
reserved ports, per-host limit), and one task per admitted connection under a
nursery (``relay.connection.Connection``: receive buffers feeding the core,
memoryview slices of them written straight to the spool, the last
acknowledgement only after the group commit).  A connection beyond
``max_connections`` is answered at once (0x02 and a line) by one of a few
refusal slots instead of waiting in the kernel backlog.  The connection gets
its collaborators as one ``ConnectionContext``; it never sees the server.
Graceful shutdown: stop accepting, give connections ``graceful_timeout``,
cancel the rest.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import socket as pysocket
from collections import Counter
from collections.abc import Callable, Container

import trio

from relay import log
from relay.buffers import BufferPool, HeapTrimmer
from relay.commands import source_allowed
from relay.config import CATCH_ALL, Listen, ServerConfig
from relay.connection import Connection
from relay.connectioncounts import NO_OTHERS, NoOthers
from relay.context import ConnectionContext, Delivery
from relay.errors import REPLY_RETRY_LATER, BindError
from relay.fastaccept import Acceptor
from relay.fastsession import FastSessions
from relay.metrics import Metrics
from relay.privacy import KEEP, Redactor
from relay.proxysource import ProxySource
from relay.queues import QueueRouter, hot_folder_names
from relay.spool import Spool
from relay.tls import InboundTls, TlsStream

__all__ = ["Delivery", "LpdServer", "open_listener"]

# accept() errors that mean "out of resources for now": wait and try again
# instead of dying (the same list trio.serve_listeners uses).
ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# Connections beyond max_connections being told so at once; beyond these the
# kernel backlog holds the rest (each refusal holds a descriptor for <= 1 s).
REFUSAL_SLOTS = 64
REFUSAL_SECONDS = 1.0
BUSY = bytes([REPLY_RETRY_LATER]) + b"lpd-relay: server busy (max_connections), retry later\n"
NOFILE = bytes([REPLY_RETRY_LATER]) + b"lpd-relay: out of file descriptors, retry later\n"
# Plain connections start in the epoll loop (relay.fastsession); False only in the
# tests that compare its results with Connection's own, session by session.
FAST_LOOP = True
# Out of descriptors this long without a successful accept: the waiting client is
# accepted with the spare descriptor and refused (a brief shortage just waits).
NOFILE_GRACE = 0.5


def open_new_listeners(listen: tuple[Listen, ...], held: Container[Listen], *,
                       reuse_port: bool, accept: bool = True
                       ) -> dict[Listen, trio.socket.SocketType]:
    """Bind the addresses of ``listen`` not in ``held`` (all or none: BindError)."""
    opened: dict[Listen, trio.socket.SocketType] = {}
    try:
        for i, address in enumerate(listen):
            if address not in held and address not in opened:
                opened[address] = open_listener(address, key=f"server.listen[{i}]",
                                                reuse_port=reuse_port, accept=accept)
    except BaseException:
        for sock in opened.values():
            sock.close()
        raise
    return opened


def open_listener(listen: Listen, backlog: int = 1024, *, key: str = "server.listen",
                  reuse_port: bool = False, accept: bool = True) -> trio.socket.SocketType:
    """Bind one listening socket; IPv6 sockets are v6-only so [::] and 0.0.0.0 coexist.

    A failure is a ``BindError`` naming ``key``, the config key of ``listen``.
    ``reuse_port``: SO_REUSEPORT, so the intake workers share the port
    (docs/architecture.md, "Processes"); ``accept`` False binds without
    listening: the main process holds the port and the kernel hands it no
    connection.
    """
    family = pysocket.AF_INET6 if ":" in listen.host else pysocket.AF_INET
    sock = pysocket.socket(family, pysocket.SOCK_STREAM)
    try:
        sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEPORT, 1)
        if family == pysocket.AF_INET6:
            sock.setsockopt(pysocket.IPPROTO_IPV6, pysocket.IPV6_V6ONLY, 1)
        sock.bind((listen.host, listen.port))   # numeric host: no lookup, no await
        if accept:
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
                 delivery: Delivery, metrics: Metrics,
                 make_room: Callable[[int], bool] | None = None,
                 privacy: Redactor = KEEP) -> None:
        self.config = config
        self.spool = spool
        self.router = router
        self.metrics = metrics
        self.context = ConnectionContext(config=config, spool=spool, router=router,
                                         delivery=delivery, metrics=metrics,
                                         buffers=BufferPool(), make_room=make_room,
                                         privacy=privacy)
        self._slots = trio.Semaphore(config.max_connections)
        self._refusals = trio.Semaphore(REFUSAL_SLOTS)
        self._active = 0
        self._busy_count, self._busy_logged = 0, -math.inf
        self._trimmer = HeapTrimmer()
        self._per_host: Counter[str] = Counter()
        self._accepting: trio.CancelScope | None = None
        self.listeners: list[trio.socket.SocketType] = []
        self.tls = InboundTls(config, metrics) if config.listen_tls else None
        self.proxy = ProxySource(config, metrics) if config.proxy_protocol else None
        self._by_listen: dict[Listen, tuple[trio.socket.SocketType, trio.CancelScope]] = {}
        self._accepts: trio.Nursery | None = None
        self._connections: trio.Nursery | None = None
        self.closed = trio.Event()
        self.reuse_port = False    # an intake worker: SO_REUSEPORT beside its siblings
        self.others: NoOthers = NO_OTHERS  # connections the sibling workers hold
        self._reserve = -1   # a spare descriptor: out of them, it accepts a client to refuse
        self._nofile_since = math.inf   # since when accept() has found no descriptor
        self.fast: FastSessions | None = None   # the plain connections' epoll loop

    async def serve(self, *, task_status: trio.TaskStatus[list[tuple[str, int]]]
                    = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop_accepting(); then let connections finish for graceful_timeout."""
        self._seed_catch_all()
        opened = self.open_listeners(self.config.listen)
        self._reserve = _spare_descriptor()
        try:   # TLS listeners stay as started: listen_tls changes need a restart
            tls_listeners = [open_listener(listen, key=f"server.listen_tls[{i}]",
                                           reuse_port=self.reuse_port)
                             for i, listen in enumerate(self.config.listen_tls)]
        except BaseException:
            for sock in opened.values():
                sock.close()
            raise
        try:
            async with trio.open_nursery() as connections:
                self._connections = connections
                if FAST_LOOP and self.proxy is None:   # PROXY headers are read in trio
                    self.fast = FastSessions(self, connections)
                    connections.start_soon(self.fast.run)
                with trio.CancelScope() as self._accepting:
                    async with trio.open_nursery() as accepts:
                        self._accepts = accepts
                        self._start_listeners(opened)
                        for lsock in tls_listeners:
                            self.listeners.append(lsock)
                            accepts.start_soon(self._accept_loop, lsock, connections, True)
                        task_status.started(self.bound())
                self._close_listeners()
                if self.fast is not None:
                    self.fast.stop()
                connections.cancel_scope.deadline = (
                    trio.current_time() + self.config.graceful_timeout)
        finally:
            self._close_listeners()
            if self._reserve >= 0:
                os.close(self._reserve)
                self._reserve = -1
            self.closed.set()

    # -- reload: listeners opened and closed, new connections get a new context --

    def open_listeners(self, listen: tuple[Listen, ...]) -> dict[Listen, trio.socket.SocketType]:
        """Bind the addresses of ``listen`` not listened on yet (all or none: BindError)."""
        return open_new_listeners(listen, self._by_listen, reuse_port=self.reuse_port)

    def reload_tls(self, config: ServerConfig) -> None:
        """Re-read the TLS listeners' certificate, key, CA and peers (ConfigError: unchanged)."""
        if self.tls is not None and config.tls is not None:
            self.tls.reload(config.tls)

    def reconfigure(self, config: ServerConfig, router: QueueRouter,
                    opened: dict[Listen, trio.socket.SocketType]) -> None:
        """Serve new connections with ``config``/``router``; connections in flight keep theirs.

        ``opened`` (from ``open_listeners``) start accepting; addresses no
        longer in ``config.listen`` stop accepting and close.
        """
        self.config, self.router = config, router
        self.context = dataclasses.replace(self.context, config=config, router=router)
        self._seed_catch_all()
        for address in [a for a in self._by_listen if a not in config.listen]:
            sock, scope = self._by_listen.pop(address)
            scope.cancel()
            self.listeners.remove(sock)
            sock.close()
            log.event("info", "listener_closed", listen=str(address))
        self._start_listeners(opened)

    def bound(self) -> list[tuple[str, int]]:
        """The addresses accepting now."""
        return [lsock.getsockname()[:2] for lsock in self.listeners]

    def _start_listeners(self, opened: dict[Listen, trio.socket.SocketType]) -> None:
        assert self._accepts is not None and self._connections is not None
        for address, lsock in opened.items():
            scope = trio.CancelScope()
            self._by_listen[address] = (lsock, scope)
            self.listeners.append(lsock)
            self._accepts.start_soon(self._listen_until_removed, lsock, scope, self._connections)

    async def _listen_until_removed(self, lsock: trio.socket.SocketType, scope: trio.CancelScope,
                                    nursery: trio.Nursery) -> None:
        with scope:
            await self._accept_loop(lsock, nursery)

    def _seed_catch_all(self) -> None:
        # max_catch_all_queues counts the names the catch-all already has:
        # those of its spooled jobs and the subfolders of its hot folders.
        queue = self.router.catch_all
        if queue is not None:
            self.router.seed_catch_all(j.wire_queue for j in self.spool.jobs(CATCH_ALL))
            self.router.seed_catch_all(hot_folder_names(queue))

    def stop_accepting(self) -> None:
        """Stop taking new connections; connections in flight get graceful_timeout."""
        if self._accepting is not None:
            self._accepting.cancel()

    def _close_listeners(self) -> None:
        for lsock in self.listeners:
            lsock.close()

    async def _accept_loop(self, lsock: trio.socket.SocketType,
                           nursery: trio.Nursery, tls: bool = False) -> None:
        acceptor = Acceptor(lsock)
        while True:
            try:
                sock, addr = await acceptor.accept()
                self._nofile_since = math.inf
            except OSError as exc:
                if exc.errno in ACCEPT_RETRY_ERRNOS:   # out of descriptors: never an exit
                    if not await self._refuse_unaccepted(lsock, nursery, exc):
                        log.event("error", "accept_failed", error=str(exc))
                        await trio.sleep(0.1)
                    continue
                if exc.errno == errno.EBADF:  # listener closed by shutdown
                    return
                raise
            try:
                self._slots.acquire_nowait()
                if self._over_total():
                    self._slots.release()
                    raise trio.WouldBlock
            except trio.WouldBlock:
                # Beyond max_connections a client is told to retry later at
                # once; only while every refusal slot is busy too does
                # accepting wait (the kernel backlog holds the rest).
                try:
                    await self._refusals.acquire()
                except BaseException:
                    sock.close()
                    raise
                nursery.start_soon(self._busy, sock, addr)
                continue
            if not tls and self.fast is not None and self._fast_accept(sock, addr):
                continue
            nursery.start_soon(self._connection, sock, addr, tls)

    def _fast_accept(self, sock: trio.socket.SocketType, addr: tuple[str, int]) -> bool:
        """A plain connection the source checks pass at once: into the epoll loop
        (relay.fastsession), counted as ``_connection`` counts; False: ``_connection``."""
        host, port = addr[0], addr[1]
        cfg = self.config
        if (cfg.allow or cfg.require_reserved_port
                or self._per_host[host] + self.others.others(host)
                >= cfg.max_connections_per_host):
            return False   # _admit's checks, its log lines and refusals
        assert self.fast is not None
        self.metrics.inbound_connections.inc()
        self._active += 1
        self._trimmer.opened(self._active)
        self._per_host[host] += 1
        self.others.add(host, 1)
        self.fast.add(Connection(self.context, sock, host, port), sock, host)
        return True

    def fast_closed(self, host: str) -> None:
        """A connection of the loop is gone: as ``_connection``'s ends."""
        self.others.add(host, -1)
        self._per_host[host] -= 1
        if not self._per_host[host]:
            del self._per_host[host]
        self.metrics.inbound_connections.dec()
        self._slots.release()
        self._active -= 1
        self._trimmer.closed(self._active)

    async def _refuse_unaccepted(self, lsock: trio.socket.SocketType, nursery: trio.Nursery,
                                 exc: OSError) -> bool:
        """Out of descriptors: the spare one takes the waiting client, told 0x02 and why
        (as a connection whose spool file cannot be opened); False: none spare now."""
        now = trio.current_time()
        self._nofile_since = min(self._nofile_since, now)
        if self._reserve < 0:   # not re-taken last time: every descriptor was in use
            self._reserve = _spare_descriptor()
        if (self._reserve < 0 or exc.errno not in (errno.EMFILE, errno.ENFILE)
                or now - self._nofile_since < NOFILE_GRACE):
            return False
        os.close(self._reserve)
        self._reserve = -1
        with trio.move_on_after(0.1):   # it is waiting: accept() returns at once
            sock, addr = await lsock.accept()
            nursery.start_soon(self._out_of_descriptors, sock, addr, str(exc))
            return True
        self._reserve = _spare_descriptor()
        return False

    async def _out_of_descriptors(self, sock: trio.socket.SocketType, addr: tuple[str, int],
                                  error: str) -> None:
        try:
            with sock:
                self.metrics.jobs_rejected_total.labels(reason="spool_error").inc()
                log.event("warning", "job_refused", peer=f"{addr[0]}:{addr[1]}", queue="",
                          reason="spool_error", error=error, partial=False)
                await _refuse(sock, NOFILE, seconds=REFUSAL_SECONDS)
        finally:
            self._reserve = _spare_descriptor()

    def _over_total(self) -> bool:
        """Beyond max_connections counting the sibling workers' (always False alone)."""
        others = self.others.others_total()
        return bool(others) and (others + self.config.max_connections - self._slots.value
                                 > self.config.max_connections)

    async def _busy(self, sock: trio.socket.SocketType, addr: tuple[str, int]) -> None:
        try:
            with sock:
                self._busy_count += 1
                now = trio.current_time()
                if now >= self._busy_logged + 1.0:   # a flood logs a line a second, not each
                    log.event("warning", "connection_refused", peer=f"{addr[0]}:{addr[1]}",
                              error="max_connections reached", refused=self._busy_count)
                    self._busy_logged, self._busy_count = now, 0
                await _refuse(sock, BUSY, seconds=REFUSAL_SECONDS)
        finally:
            self._refusals.release()

    async def _connection(self, sock: trio.socket.SocketType, addr: tuple[str, int],
                          tls: bool = False) -> None:
        host, port = addr[0], addr[1]
        self.metrics.inbound_connections.inc()
        self._active += 1
        self._trimmer.opened(self._active)
        try:
            with sock:
                if self.proxy is not None:   # the client behind a balancer (SPEC §9)
                    if (source := await self.proxy.resolve(sock, host, port)) is None:
                        return
                    host, port = source
                self._per_host[host] += 1
                self.others.add(host, 1)
                try:
                    await self._serve(sock, host, port, tls)
                finally:
                    self.others.add(host, -1)
                    self._per_host[host] -= 1
                    if not self._per_host[host]:
                        del self._per_host[host]
        finally:
            self.metrics.inbound_connections.dec()
            self._slots.release()
            self._active -= 1
            self._trimmer.closed(self._active)

    async def _serve(self, sock: trio.socket.SocketType, host: str, port: int,
                     tls: bool) -> None:
        admitted, refusal = self._admit(host, port)
        if tls and (admitted or refusal):
            # A refusal with words (reserved port, per-host limit) is said
            # inside TLS: a TLS client could not read it in the clear.
            assert self.tls is not None
            if (accepted := await self.tls.accept(sock, f"{host}:{port}")) is None:
                return
            stream, peer = accepted
            if admitted:
                await Connection(self.context, sock, host, port, io=stream,
                                 tls_peer=peer).run()
            else:
                await _refuse(sock, refusal, io=stream)
        elif admitted and not tls:
            await Connection(self.context, sock, host, port).run()
        elif refusal and not tls:
            await _refuse(sock, refusal)

    def _admit(self, host: str, port: int) -> tuple[bool, bytes]:
        """Source checks made before a single byte of the job is read (SPEC §4.3).

        Returns (admitted, what to say before closing when not).
        """
        if self.config.allow and not source_allowed(host, self.config.allow):
            self.metrics.jobs_rejected_total.labels(reason="acl").inc()
            log.event("warning", "connection_refused", peer=f"{host}:{port}",
                      error="source not in allow")
            return False, b""
        if self.config.require_reserved_port and port >= 1024:
            self.metrics.jobs_rejected_total.labels(reason="acl").inc()
            log.event("warning", "connection_refused", peer=f"{host}:{port}",
                      error=f"source port {port} is not reserved")
            return False, b"\x01lpd-relay: source port must be below 1024\n"
        if self._per_host[host] + self.others.others(host) > self.config.max_connections_per_host:
            log.event("warning", "connection_refused", peer=f"{host}:{port}",
                      error="too many connections from this host")
            return False, bytes([REPLY_RETRY_LATER]) + b"lpd-relay: too many connections\n"
        return True, b""


def _spare_descriptor() -> int:
    """A descriptor held in reserve (-1 when even that one is not to be had)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


async def _refuse(sock: trio.socket.SocketType, message: bytes, seconds: float = 1.0,
                  *, io: TlsStream | None = None) -> None:
    """Say why, then close without reading the job (``io``: inside TLS).

    Half-close and drain briefly first: closing a socket with unread input
    sends a reset, and the reset can overtake the message we just wrote.
    """
    with trio.move_on_after(seconds):
        try:
            if io is not None:
                await io.send_all(message)
            else:
                await sock.send(message)
            sock.shutdown(pysocket.SHUT_WR)
            buf = bytearray(4096)
            while await (io.recv_into(buf) if io is not None else sock.recv_into(buf)):
                pass
        except OSError:
            pass

