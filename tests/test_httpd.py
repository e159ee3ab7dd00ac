"""relay.httpd: /metrics and /healthz over a real loopback socket, and hostile clients."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from relay import httpd
from relay.httpd import serve_http
from relay.metrics import Metrics

Addr = tuple[str, int]
Health = Callable[[], tuple[bool, str]]


def healthy() -> tuple[bool, str]:
    return True, ""


def run_with_server(body: Callable[[Addr, Metrics], Awaitable[None]], *,
                    health: Health = healthy, host: str = "127.0.0.1",
                    connection_timeout: float = 5.0, header_timeout: float = 5.0,
                    seconds: float = 10) -> None:
    """Start serve_http on port 0, run ``body(addr, metrics)``, stop the server."""
    reg = CollectorRegistry()
    metrics = Metrics(reg, queues=["ward3"], destinations=["socket://10.1.2.3:9100"])

    async def main() -> None:
        with trio.fail_after(seconds):
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(partial(
                    serve_http, host, 0, registry=reg, health=health,
                    connection_timeout=connection_timeout, header_timeout=header_timeout))
                await body(addr, metrics)
                nursery.cancel_scope.cancel()

    trio.run(main)


async def exchange(addr: Addr, request: bytes) -> bytes:
    """Send ``request`` and read the answer until the server closes."""
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        await stream.send_all(request)
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
        return bytes(data)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    return int(status_line.split()[1]), headers, body


async def get(addr: Addr, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return parse(await exchange(addr, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))


def test_started_reports_the_bound_port() -> None:
    async def body(addr: Addr, m: Metrics) -> None:
        assert addr[0] == "127.0.0.1" and addr[1] > 0

    run_with_server(body)


def test_metrics_serves_the_registry() -> None:
    async def body(addr: Addr, m: Metrics) -> None:
        m.jobs_received_total.labels("ward3").inc(7)
        status, headers, text = await get(addr, "/metrics")
        assert status == 200
        assert headers["content-type"] == CONTENT_TYPE_LATEST
        assert headers["connection"] == "close"
        assert int(headers["content-length"]) == len(text)
        assert b'lpdrelay_jobs_received_total{queue="ward3"} 7.0\n' in text
        status, _, text = await get(addr, "/metrics?name[]=x")  # query ignored
        assert status == 200 and b"lpdrelay_spool_free_bytes" in text

    run_with_server(body)


def test_head_sends_headers_only() -> None:
    async def body(addr: Addr, m: Metrics) -> None:
        _, _, full = await get(addr, "/metrics")
        status, headers, text = await get(addr, "/metrics", "HEAD")
        assert status == 200 and text == b""
        assert int(headers["content-length"]) == len(full)

    run_with_server(body)


def test_healthz_ok_and_unhealthy_with_reason() -> None:
    state = {"ok": True}

    def health() -> tuple[bool, str]:
        return (True, "") if state["ok"] else (False, "spool: /var/spool/lpd-relay not writable")

    async def body(addr: Addr, m: Metrics) -> None:
        status, headers, text = await get(addr, "/healthz")
        assert (status, text) == (200, b"ok\n")
        assert headers["content-type"].startswith("text/plain")
        state["ok"] = False
        status, _, text = await get(addr, "/healthz")
        assert (status, text) == (503, b"spool: /var/spool/lpd-relay not writable\n")

    run_with_server(body, health=health)


def test_a_failing_health_check_is_a_503() -> None:
    def health() -> tuple[bool, str]:
        raise OSError("statvfs failed")

    async def body(addr: Addr, m: Metrics) -> None:
        status, _, text = await get(addr, "/healthz")
        assert status == 503 and b"statvfs failed" in text
        assert (await get(addr, "/metrics"))[0] == 200  # the server lives on

    run_with_server(body, health=health)


def test_unknown_path_is_404_and_other_methods_405() -> None:
    async def body(addr: Addr, m: Metrics) -> None:
        assert (await get(addr, "/"))[0] == 404
        assert (await get(addr, "/metrics/../etc/passwd"))[0] == 404
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            status, headers, _ = await get(addr, "/metrics", method)
            assert status == 405 and headers["allow"] == "GET, HEAD"

    run_with_server(body)


def test_malformed_request_line_is_400() -> None:
    async def body(addr: Addr, m: Metrics) -> None:
        for raw in (b"GET /metrics\r\n\r\n", b"\x02ward3\n\n", b"GET  /metrics HTTP/1.1\r\n\r\n",
                    b"GET /metrics SPDY/3\r\n\r\n"):
            assert parse(await exchange(addr, raw))[0] == 400, raw

    run_with_server(body)


def test_bare_lf_and_http_1_0_requests_work() -> None:
    async def body(addr: Addr, m: Metrics) -> None:
        status, _, text = parse(await exchange(addr, b"GET /healthz HTTP/1.0\n\n"))
        assert (status, text) == (200, b"ok\n")

    run_with_server(body)


def test_oversize_request_head_is_431() -> None:
    async def body(addr: Addr, m: Metrics) -> None:
        big = b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n"
        status, _, text = parse(await exchange(addr, big))
        assert status == 431 and b"8 KiB" in text
        # Headers that never end: the server answers once 8 KiB are in, not later.
        stream = await trio.open_tcp_stream(*addr)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 2000)
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 431 ")

    run_with_server(body)


def test_slow_client_is_dropped_after_the_connection_timeout() -> None:
    async def body(addr: Addr, m: Metrics) -> None:
        stream = await trio.open_tcp_stream(*addr)
        async with stream:
            await stream.send_all(b"GET /metr")
            start = trio.current_time()
            with trio.fail_after(3):
                assert await stream.receive_some(1024) == b""  # closed, no answer
            assert 0.2 <= trio.current_time() - start < 2.0
        assert (await get(addr, "/healthz"))[0] == 200

    run_with_server(body, connection_timeout=0.3)


def test_idle_connections_give_their_slot_to_a_fresh_scrape(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpd, "MAX_CONNECTIONS", 2)

    async def body(addr: Addr, m: Metrics) -> None:
        idle = [await trio.open_tcp_stream(*addr) for _ in range(2)]
        for s in idle:
            await s.send_all(b"GET /")  # an unfinished request holds its slot
        await trio.sleep(0.2)
        assert (await get(addr, "/healthz"))[0] == 200
        # The oldest waiting connection was closed to make room, unanswered.
        with trio.fail_after(2):
            assert await idle[0].receive_some(1024) == b""
        assert (await get(addr, "/metrics"))[0] == 200
        for s in idle:
            await s.aclose()

    run_with_server(body, connection_timeout=5.0)


def test_slots_evict_the_oldest_waiting_and_refuse_only_when_all_answer() -> None:
    async def main() -> None:
        slots = httpd._Slots(2)
        first, second = slots.admit(), slots.admit()
        assert first is not None and second is not None
        third = slots.admit()                      # both waiting: the oldest goes
        assert third is not None
        assert first.scope.cancel_called and not second.scope.cancel_called
        second.waiting = third.waiting = False     # both answering now
        assert slots.admit() is None
        slots.release(second)
        assert slots.admit() is not None

    trio.run(main)


def test_every_slot_answering_gives_an_immediate_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpd._Slots, "admit", lambda self: None)

    async def body(addr: Addr, m: Metrics) -> None:
        status, headers, text = parse(await exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n"))
        assert (status, text, headers["connection"]) == (503, b"too many connections\n",
                                                         "close")

    run_with_server(body)


def test_scrapes_succeed_while_150_slow_clients_hold_connections() -> None:
    async def slowloris(addr: Addr, opened: list[trio.SocketStream]) -> None:
        stream = await trio.open_tcp_stream(*addr)
        opened.append(stream)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(b"GET /metrics HTTP/1.1\r\n")
            for _ in range(20):                 # bounded: one header byte a second
                await trio.sleep(1)
                await stream.send_all(b"X")

    async def body(addr: Addr, m: Metrics) -> None:
        opened: list[trio.SocketStream] = []
        async with trio.open_nursery() as attackers:
            for _ in range(150):
                attackers.start_soon(slowloris, addr, opened)
            with trio.fail_after(5):
                while len(opened) < 150:
                    await trio.sleep(0.01)
            started = trio.current_time()
            statuses = [(await get(addr, "/metrics"))[0] for _ in range(7)]
            assert statuses == [200] * 7
            assert trio.current_time() - started < 3
            attackers.cancel_scope.cancel()
        for stream in opened:
            await stream.aclose()

    run_with_server(body, header_timeout=5.0, seconds=30)


def test_a_connection_without_a_request_head_is_closed_at_the_deadline() -> None:
    async def body(addr: Addr, m: Metrics) -> None:
        for head in (b"", b"GET /metrics HTTP/1.1\r\nHost: x\r\n"):
            stream = await trio.open_tcp_stream(*addr)
            async with stream:
                await stream.send_all(head)
                start = trio.current_time()
                with trio.fail_after(3):
                    assert await stream.receive_some(1024) == b""   # closed, no answer
                assert 0.4 <= trio.current_time() - start < 1.5
        assert (await get(addr, "/healthz"))[0] == 200

    run_with_server(body, header_timeout=0.5, connection_timeout=10.0)


def test_keep_alive_requests_get_one_answer_then_a_clean_close() -> None:
    async def body(addr: Addr, m: Metrics) -> None:
        one = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
        with trio.fail_after(3):
            raw = await exchange(addr, one + one)       # pipelined: the 2nd is not served
        status, headers, text = parse(raw)
        assert (status, headers["connection"], text) == (200, "close", b"ok\n")
        with trio.fail_after(3):
            status, headers, text = parse(await exchange(addr, one))
        assert (status, headers["connection"], text) == (200, "close", b"ok\n")

    run_with_server(body)


@pytest.mark.parametrize("raw", [
    b"GET /metrics HTTP/1.1\r\n\r\n",                          # HTTP/1.1 without Host
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    b"GET /m\x00etrics HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_malformed_headers_are_400(raw: bytes) -> None:
    async def body(addr: Addr, m: Metrics) -> None:
        status, _, text = parse(await exchange(addr, raw))
        assert status == 400 and text.startswith(b"malformed request")
        assert (await get(addr, "/healthz"))[0] == 200

    run_with_server(body)


def test_a_request_body_is_read_and_ignored() -> None:
    async def body(addr: Addr, m: Metrics) -> None:
        raw = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        assert parse(await exchange(addr, raw))[:3:2] == (200, b"ok\n")
        big = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n"
               + b"x" * 20000)
        assert parse(await exchange(addr, big))[0] == 413

    run_with_server(body)


def test_a_client_that_resets_does_not_stop_the_server() -> None:
    async def body(addr: Addr, m: Metrics) -> None:
        for _ in range(3):
            sock = trio.socket.socket()
            await sock.connect(addr)
            await sock.send(b"GET /metrics HTTP/1.1\r\n\r\n")
            # SO_LINGER 0: close sends RST while the server writes its answer.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        await trio.sleep(0.1)
        assert (await get(addr, "/metrics"))[0] == 200

    run_with_server(body)


def test_serves_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"::1 not usable: {e}")

    async def body(addr: Addr, m: Metrics) -> None:
        assert addr[0] == "::1"
        assert (await get(addr, "/healthz"))[0] == 200

    run_with_server(body, host="::1")
