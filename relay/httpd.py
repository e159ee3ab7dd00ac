"""The trio HTTP server for ``/metrics`` and ``/healthz`` (SPEC §7), parsing with h11.

Two read-only resources for a Prometheus scraper and a load balancer's health
probe do not earn a web framework; HTTP parsing does earn h11 (sans-I/O, the
model this project follows, from trio's ecosystem): request lines, header
syntax, ``Host``, bodies, HTTP/1.0 and connection reuse are its job, not ours.

Each connection carries one request and is closed after the answer
(``Connection: close``, also to a client asking for keep-alive): a scraper
comes back every 15 s or more, long after an idle connection would have been
dropped anyway, and an idle kept-alive connection would only hold a slot.

Slow clients cannot lock scrapers out:

* a request head (and any body) must arrive within ``header_timeout``
  (5 s) of the connection opening, else the connection is closed without an
  answer; a connection lives at most ``connection_timeout`` (10 s);
* at most ``MAX_CONNECTIONS`` (64) are served at once, and when all slots
  are taken a new connection takes the slot of the *oldest connection still
  waiting for its request* (closed at once): a fresh scrape always gets in,
  however many slowloris connections hold slots.  Only when every slot is
  busy answering does a new connection get an immediate 503.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import h11
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Request line plus headers; a scraper sends a few hundred bytes.
MAX_HEAD = 8 * 1024
MAX_CONNECTIONS = 64
HEADER_TIMEOUT = 5.0
# After the answer, unread request bytes are drained (bounded) before close, so
# the kernel does not reset the connection and destroy the answer in flight.
_DRAIN_BYTES = 64 * 1024
_DRAIN_SECONDS = 1.0

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Content Too Large", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}
_TEXT = "text/plain; charset=utf-8"

Health = Callable[[], tuple[bool, str]]
Headers = list[tuple[str, str]]


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Slot:
    """One served connection; ``waiting`` while no complete request is in."""

    __slots__ = ("scope", "waiting")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.waiting = True


class _Slots:
    """At most ``limit`` connections; a full house evicts its oldest waiting one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[_Slot, None] = {}    # insertion order = age

    def admit(self) -> _Slot | None:
        """A slot for a new connection, or None when every slot is busy answering."""
        if len(self._open) >= self.limit:
            victim = next((s for s in self._open if s.waiting), None)
            if victim is None:
                return None
            self.release(victim)
            victim.scope.cancel()
        slot = _Slot()
        self._open[slot] = None
        return slot

    def release(self, slot: _Slot) -> None:
        self._open.pop(slot, None)


async def serve_http(host: str, port: int, *, registry: CollectorRegistry, health: Health,
                     connection_timeout: float = 10.0, header_timeout: float = HEADER_TIMEOUT,
                     task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
                     ) -> None:
    """Serve GET/HEAD ``/metrics`` and ``/healthz`` on host:port until cancelled.

    ``health()`` returns (healthy, reason): 200 ``ok`` or 503 with the reason.
    ``header_timeout`` bounds the wait for each request, ``connection_timeout``
    a whole connection.  ``task_status.started`` receives the bound (host,
    port), so ``port=0`` works in tests.
    """
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    sockname = listeners[0].socket.getsockname()
    slots = _Slots(MAX_CONNECTIONS)
    app = _App(registry, health, header_timeout)

    async def handler(stream: trio.SocketStream) -> None:
        # A broken client (reset, half a request) must never stop the server:
        # serve_listeners would end the whole server on an escaping exception.
        try:
            with contextlib.suppress(Exception), trio.move_on_after(connection_timeout):
                slot = slots.admit()
                if slot is None:
                    await _refuse(stream)
                    return
                try:
                    with slot.scope:
                        await app.serve(stream, slot)
                finally:
                    slots.release(slot)
        finally:
            await trio.aclose_forcefully(stream)

    task_status.started((str(sockname[0]), int(sockname[1])))
    await trio.serve_listeners(handler, listeners)


class _App:
    """One request per connection: read it with h11 in time, answer, close."""

    def __init__(self, registry: CollectorRegistry, health: Health,
                 header_timeout: float) -> None:
        self.registry = registry
        self.health = health
        self.header_timeout = header_timeout

    async def serve(self, stream: trio.SocketStream, slot: _Slot) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            with trio.move_on_after(self.header_timeout) as waited:
                request = await _next_request(stream, conn)
        except _BadRequest as e:
            answer = _answer(conn, e.status, f"{e}\n".encode())
        else:
            if waited.cancelled_caught or request is None:
                return      # too slow, or closed before a request: no answer
            slot.waiting = False
            answer = self._route(conn, request)
        await stream.send_all(answer)
        await _close_gracefully(stream)

    def _route(self, conn: h11.Connection, request: h11.Request) -> bytes:
        method = request.method.decode("ascii", "replace")
        head = method == "HEAD"
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return _answer(conn, 405, b"method not allowed\n", extra=[("Allow", "GET, HEAD")])
        if path == "/metrics":
            return _answer(conn, 200, generate_latest(self.registry), CONTENT_TYPE_LATEST,
                           head=head)
        if path == "/healthz":
            ok, reason = _check(self.health)
            status, text = (200, "ok") if ok else (503, reason or "unhealthy")
            return _answer(conn, status, f"{text.rstrip()}\n".encode(errors="replace"),
                           head=head)
        return _answer(conn, 404, b"not found\n", head=head)


async def _next_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    """The whole request (its body read and dropped); None if the client closed first."""
    request: h11.Request | None = None
    head = body = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise _BadRequest(e.error_status_hint, _problem(e.error_status_hint, e)) from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(MAX_HEAD)
            if request is None and (head := head + len(data)) > MAX_HEAD:
                # h11 bounds only a head still incomplete; one that arrives
                # whole in a second read is refused here, the same way.
                raise _BadRequest(431, "request head over 8 KiB")
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > MAX_HEAD:
                raise _BadRequest(413, "request body over 8 KiB")
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None


def _problem(status: int, error: h11.RemoteProtocolError) -> str:
    if status == 431:
        return "request head over 8 KiB"
    return f"malformed request: {error}"


def _check(health: Health) -> tuple[bool, str]:
    try:
        ok, reason = health()
    except Exception as e:  # a failing check is an unhealthy answer
        return False, f"health check failed: {type(e).__name__}: {e}"
    return bool(ok), str(reason)


def _answer(conn: h11.Connection, status: int, body: bytes, ctype: str = _TEXT, *,
            head: bool = False, extra: Headers | None = None) -> bytes:
    """The bytes of one whole response, always ``Connection: close``."""
    headers: Headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
                        ("Cache-Control", "no-store"), ("Connection", "close"), *(extra or [])]
    reason = _REASONS.get(status, "Unknown").encode()
    out = conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
    if not head:
        out += conn.send(h11.Data(data=body)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


async def _refuse(stream: trio.SocketStream) -> None:
    """Every slot is answering a request: 503 at once, without reading anything."""
    conn = h11.Connection(h11.SERVER)
    await stream.send_all(_answer(conn, 503, b"too many connections\n"))
    await _close_gracefully(stream)


async def _close_gracefully(stream: trio.SocketStream) -> None:
    await stream.send_eof()
    with trio.move_on_after(_DRAIN_SECONDS):
        drained = 0
        while drained < _DRAIN_BYTES:
            chunk = await stream.receive_some(16384)
            if not chunk:
                return
            drained += len(chunk)
