"""Who a connection is from when it comes through a balancer: the PROXY header (SPEC §9).

With ``[server] proxy_protocol = true``, a connection from a
``proxy_trusted`` address must open with a PROXY v1 or v2 header within
``HEADER_SECONDS``; the header's source address and port are then the
client for everything after — ``allow``, per-host limits,
``require_reserved_port``, lprm ownership, logs, metrics and the job's
``peer``.  A LOCAL (v2) or UNKNOWN (v1) header leaves the balancer as the
client (health checks).  A trusted address without a header, and a header
from anywhere else, are refused: closed without a word, logged and counted
(``lpdrelay_jobs_rejected_total``, ``malformed`` / ``timeout`` / ``acl``).
The header is read exactly (``relay.proxyproto.HeaderReader.wanted``), so
the first LPD or TLS byte is still in the socket for what follows.
"""

from __future__ import annotations

import contextlib
import socket as pysocket

import trio

from relay import log
from relay.commands import source_allowed
from relay.config import ServerConfig
from relay.metrics import Metrics
from relay.proxyproto import HeaderReader, ProxyProtocolError, looks_like_header

__all__ = ["HEADER_SECONDS", "ProxySource"]

HEADER_SECONDS = 5.0


class ProxySource:
    """Resolves each accepted connection's real client."""

    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.trusted = config.proxy_trusted
        self.idle_timeout = config.idle_timeout
        self.metrics = metrics

    async def resolve(self, sock: trio.socket.SocketType, host: str, port: int,
                      ) -> tuple[str, int] | None:
        """The client's (address, port); None when the connection is refused."""
        peer = f"{host}:{port}"
        if not source_allowed(host, self.trusted):
            return await self._untrusted(sock, peer, host, port)
        reader = HeaderReader()
        try:
            with trio.fail_after(HEADER_SECONDS):
                while (want := reader.wanted()) > 0:
                    data = await sock.recv(want)
                    if not data and reader.empty:
                        # A balancer's plain TCP health check: connect, close.
                        log.event("debug", "connection_closed", peer=peer)
                        return None
                    if not data:
                        raise ProxyProtocolError("closed before a complete PROXY header")
                    reader.feed(data)
        except trio.TooSlowError:
            self._refused(peer, "timeout", f"no complete PROXY header within {HEADER_SECONDS:g}s")
            return None
        except ProxyProtocolError as exc:
            self._refused(peer, "malformed", str(exc))
            return None
        except OSError as exc:
            log.event("info", "connection_lost", peer=peer, error=str(exc))
            return None
        header = reader.header
        assert header is not None
        return header.source or (host, port)

    async def _untrusted(self, sock: trio.socket.SocketType, peer: str, host: str,
                         port: int) -> tuple[str, int] | None:
        # LPD and TLS clients speak first and never begin with "P" or "\r", so a
        # peek at the first bytes tells a header without taking a byte away.
        first = b""
        with trio.move_on_after(self.idle_timeout), contextlib.suppress(OSError):
            first = await sock.recv(12, pysocket.MSG_PEEK)
        if looks_like_header(first):
            self._refused(peer, "acl", "PROXY header from an address not in proxy_trusted")
            return None
        return host, port

    def _refused(self, peer: str, reason: str, message: str) -> None:
        self.metrics.jobs_rejected_total.labels(reason=reason).inc()
        log.event("warning", "connection_refused", peer=peer, reason=reason, error=message)
