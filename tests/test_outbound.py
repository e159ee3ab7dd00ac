"""The one outbound connect (``relay.client.connect``) and what it loads.

Address policy: every address a name resolves to is tried in order, from an
ephemeral port and from an origin-port pool alike, so a name whose first
address refuses still reaches the one that listens.  Imports: the CLI's
send/queue/remove and probe modules load no sink (the bytes-out helpers
live in ``relay.streams``, below the sinks).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from relay import client
from relay.errors import SinkUnavailable
from relay.originports import OriginPortPool
from relay.uri import parse_destination


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP listener on 127.0.0.1 only; nothing accepts (the backlog completes connects)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s


def two_addresses(port: int) -> list[Any]:
    """getaddrinfo's answer for a name on ::1 first (nothing listens), then 127.0.0.1."""
    return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]


def connect_via(name: str, port: int, pool: OriginPortPool | None) -> tuple[str, int]:
    async def main() -> tuple[str, int]:
        with trio.fail_after(10):
            ch = await client.connect(parse_destination(f"lpd://{name}:{port}/q"), pool,
                                      io_timeout=5)
            try:
                peer = ch.sock.getpeername()
            finally:
                await ch.aclose()
            return str(peer[0]), int(peer[1])
    return trio.run(main)


def pools() -> list[Any]:
    root = os.geteuid() == 0
    return [None, pytest.param("privileged", marks=pytest.mark.skipif(
        not root, reason="reserved origin ports need root"))]


@pytest.mark.parametrize("reserve", pools())
def test_first_address_refusing_falls_through_to_the_next(
        listener: socket.socket, monkeypatch: pytest.MonkeyPatch, reserve: str | None) -> None:
    port = listener.getsockname()[1]
    seen: list[str] = []

    async def fake_getaddrinfo(host: str, *args: Any, **kw: Any) -> list[Any]:
        seen.append(host)
        return two_addresses(port)
    monkeypatch.setattr(trio.socket, "getaddrinfo", fake_getaddrinfo)
    pool = None if reserve is None else OriginPortPool.for_reserve(reserve, linger=0.1)
    assert connect_via("printers.example.org", port, pool) == ("127.0.0.1", port)
    assert seen == ["printers.example.org"]


@pytest.mark.parametrize("reserve", pools())
def test_every_address_refusing_is_unavailable(monkeypatch: pytest.MonkeyPatch,
                                               reserve: str | None) -> None:
    with socket.socket() as s:    # a port nothing listens on, on either address
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def fake_getaddrinfo(host: str, *args: Any, **kw: Any) -> list[Any]:
        return two_addresses(port)
    monkeypatch.setattr(trio.socket, "getaddrinfo", fake_getaddrinfo)
    pool = None if reserve is None else OriginPortPool.for_reserve(reserve, linger=0.1)
    with pytest.raises(SinkUnavailable, match="refused"):
        connect_via("printers.example.org", port, pool)


def test_localhost_with_two_addresses_reaches_the_listening_one(
        listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    infos = socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)
    if [i[4][0] for i in infos][:1] != ["::1"] or len(infos) < 2:
        pytest.skip("this host's 'localhost' does not resolve to ::1 before 127.0.0.1")
    assert connect_via("localhost", port, None) == ("127.0.0.1", port)


def test_cli_client_modules_load_no_sink() -> None:
    code = ("import sys, relay.cli, relay.clientcli, relay.probe\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('relay.sinks'))\n"
            "print(','.join(loaded))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == ""
    # relay.sinks.base still offers the helpers to the sinks, from relay.streams.
    from relay import streams
    from relay.sinks import base
    assert base.stream_file is streams.stream_file
    assert base.open_spool_file is streams.open_spool_file
