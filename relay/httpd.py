"""A minimal trio HTTP server for ``/metrics`` and ``/healthz`` (SPEC §7).

Two read-only resources for a Prometheus scraper and a load balancer's health
probe do not earn a web framework as a dependency.  The server reads one
request head (at most ``MAX_HEAD`` bytes, within ``timeout`` seconds), answers
it, and closes the connection (``Connection: close``), so there is no
keep-alive, chunking or request-body state to get wrong.  Connections beyond
``MAX_CONNECTIONS`` get a 503 at once instead of a task that waits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Request line plus headers; a scraper sends a few hundred bytes.
MAX_HEAD = 8 * 1024
MAX_CONNECTIONS = 64
# After the answer, unread request bytes are drained (bounded) before close, so
# the kernel does not reset the connection and destroy the answer in flight.
_DRAIN_BYTES = 64 * 1024
_DRAIN_SECONDS = 1.0

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}
_TEXT = "text/plain; charset=utf-8"

Health = Callable[[], tuple[bool, str]]


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def serve_http(host: str, port: int, *, registry: CollectorRegistry, health: Health,
                     connection_timeout: float = 10.0,
                     task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
                     ) -> None:
    """Serve GET/HEAD ``/metrics`` and ``/healthz`` on host:port until cancelled.

    ``health()`` returns (healthy, reason): 200 ``ok`` or 503 with the reason.
    ``connection_timeout`` bounds each connection (reading the request and writing the
    answer).  ``task_status.started`` receives the bound (host, port), so
    ``port=0`` works in tests.
    """
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    sockname = listeners[0].socket.getsockname()
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(connection_timeout):
                await _handle(stream, registry, health, limiter)
        finally:
            await trio.aclose_forcefully(stream)

    task_status.started((str(sockname[0]), int(sockname[1])))
    await trio.serve_listeners(handler, listeners)


async def _handle(stream: trio.SocketStream, registry: CollectorRegistry, health: Health,
                  limiter: trio.CapacityLimiter) -> None:
    # A broken client (reset, half a request) must never stop the server:
    # serve_listeners would end the whole server on an escaping exception.
    with contextlib.suppress(Exception):
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await stream.send_all(_response(503, b"too many connections\n"))
            await _close_gracefully(stream)
            return
        try:
            await _exchange(stream, registry, health)
        finally:
            limiter.release()


async def _exchange(stream: trio.SocketStream, registry: CollectorRegistry,
                    health: Health) -> None:
    try:
        method, path = _parse_head(await _read_head(stream))
        answer = _route(method, path, registry, health)
    except _BadRequest as e:
        answer = _response(e.status, f"{e}\n".encode())
    await stream.send_all(answer)
    await _close_gracefully(stream)


async def _read_head(stream: trio.SocketStream) -> bytes:
    buf = bytearray()
    while True:
        # Search only the new bytes (plus 3 of the old) for the blank line.
        start = max(0, len(buf) - 3)
        chunk = await stream.receive_some(MAX_HEAD + 1 - len(buf))
        if not chunk:
            raise _BadRequest(400, "incomplete request")
        buf += chunk
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            end = buf.find(b"\n\n", start)  # bare-LF clients (printf | nc)
        if end >= 0:
            return bytes(buf[:end])
        if len(buf) > MAX_HEAD:
            raise _BadRequest(431, "request head over 8 KiB")


def _parse_head(head: bytes) -> tuple[str, str]:
    parts = head.split(b"\n", 1)[0].rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _BadRequest(400, "malformed request line")
    method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1")
    return method, target.split("?", 1)[0]


def _route(method: str, path: str, registry: CollectorRegistry, health: Health) -> bytes:
    head_only = method == "HEAD"
    if method not in ("GET", "HEAD"):
        return _response(405, b"method not allowed\n", extra=[("Allow", "GET, HEAD")])
    if path == "/metrics":
        return _response(200, generate_latest(registry), CONTENT_TYPE_LATEST, head=head_only)
    if path == "/healthz":
        ok, reason = _check(health)
        status, text = (200, "ok") if ok else (503, reason or "unhealthy")
        return _response(status, f"{text.rstrip()}\n".encode(errors="replace"),
                         head=head_only)
    return _response(404, b"not found\n", head=head_only)


def _check(health: Health) -> tuple[bool, str]:
    try:
        ok, reason = health()
    except Exception as e:  # a failing check is an unhealthy answer
        return False, f"health check failed: {type(e).__name__}: {e}"
    return bool(ok), str(reason)


def _response(status: int, body: bytes, ctype: str = _TEXT, *, head: bool = False,
              extra: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
             f"Content-Type: {ctype}", f"Content-Length: {len(body)}",
             "Cache-Control: no-store", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in extra or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


async def _close_gracefully(stream: trio.SocketStream) -> None:
    await stream.send_eof()
    with trio.move_on_after(_DRAIN_SECONDS):
        drained = 0
        while drained < _DRAIN_BYTES:
            chunk = await stream.receive_some(16384)
            if not chunk:
                return
            drained += len(chunk)
