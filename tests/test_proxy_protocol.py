"""The PROXY protocol on the relay's listeners (SPEC §9): raw headers, then a real HAProxy.

The header's source is the client for ``allow``, limits and the job's
``peer``; a trusted balancer must send one, nobody else may; a v2 LOCAL
header is the balancer itself; on a TLS listener the header comes first.
Loopback has all of 127/8, so clients bind 127.0.0.2 or 127.0.0.3 to look
like different hosts behind the balancer at 127.0.0.1.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import DaemonThread, relay_config
from tests.peers import HAProxy
from tests.test_proxyproto import v2
from tests.test_server import delivered, wait_for
from tests.test_tls import job_stream, tls_port, tls_relay_config
from tests.tlspki import make_pki

V1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 515\r\n"


def proxy_config(tmp: Path, **server: Any) -> dict[str, Any]:
    return relay_config(tmp, server={"proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"],
                                     "allow": ["192.0.2.0/24", "127.0.0.2/32"], **server})


def exchange(port: int, data: bytes, *, source: str = "127.0.0.1", replies: int = 5) -> bytes:
    """Send ``data`` from ``source``; what came back before the relay closed (or 5 bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as s:
        s.sendall(data)
        got = b""
        try:
            while len(got) < replies and (chunk := s.recv(16)):
                got += chunk
        except ConnectionResetError:
            pass
        return got


def test_header_source_is_the_client(tmp_path: Path) -> None:
    with DaemonThread(proxy_config(tmp_path)) as relay:
        assert exchange(relay.port, V1 + job_stream("q")) == b"\0" * 5
        assert exchange(relay.port, v2() + job_stream("q")) == b"\0" * 5
        peers = sorted(m["peer"] for m in delivered(tmp_path / "out", "q", 2))
        assert peers == ["192.0.2.7:40001", "192.0.2.7:40001"]


@pytest.mark.parametrize(("data", "source", "reason"), [
    (job_stream("q"), "127.0.0.1", "malformed"),               # trusted, no header
    (V1 + job_stream("q"), "127.0.0.2", "acl"),                # header from elsewhere
    (b"PROXY TCP4 198.51.100.9 127.0.0.1 5 515\r\n" + job_stream("q"), "127.0.0.1", "acl"),
])
def test_refusals(tmp_path: Path, data: bytes, source: str, reason: str) -> None:
    with DaemonThread(proxy_config(tmp_path)) as relay:
        assert exchange(relay.port, data, source=source) == b""
        wait_for(lambda: relay.metric("lpdrelay_jobs_rejected_total", reason=reason) == 1)
        assert not (tmp_path / "out").exists()


def test_per_host_limit_counts_the_header_source(tmp_path: Path) -> None:
    with DaemonThread(proxy_config(tmp_path, max_connections_per_host=1)) as relay, \
            socket.create_connection(("127.0.0.1", relay.port), timeout=10) as held:
        held.sendall(V1 + b"\x02q\n")
        assert held.recv(1) == b"\0"          # 192.0.2.7's one connection, open
        other = b"PROXY TCP4 192.0.2.8 127.0.0.1 40001 515\r\n"
        assert exchange(relay.port, V1 + b"\x02q\n", replies=100).startswith(
            b"\x02lpd-relay: too many connections")
        assert exchange(relay.port, other + b"\x02q\n", replies=1) == b"\0"


def test_untrusted_address_without_a_header_is_served_directly(tmp_path: Path) -> None:
    with DaemonThread(proxy_config(tmp_path)) as relay:
        assert exchange(relay.port, job_stream("q"), source="127.0.0.2") == b"\0" * 5
        (meta,) = delivered(tmp_path / "out", "q")
        assert meta["peer"].startswith("127.0.0.2:")


def test_local_header_is_the_balancer_itself(tmp_path: Path) -> None:
    local = v2(command=0, family=0, addresses=b"")
    with DaemonThread(proxy_config(tmp_path)) as relay:   # 127.0.0.1 is not in allow
        assert exchange(relay.port, local + b"\x03q\n", replies=100) == b""
    with DaemonThread(proxy_config(tmp_path, allow=[])) as relay:
        assert b"q" in exchange(relay.port, local + b"\x03q\n", replies=100)


def test_a_health_check_connect_and_close_is_not_a_refusal(tmp_path: Path) -> None:
    with DaemonThread(proxy_config(tmp_path)) as relay:
        for data in (b"", b"PROXY"):       # a connect-and-close; then half a header
            with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                assert s.recv(16) == b""
        wait_for(lambda: relay.metric("lpdrelay_jobs_rejected_total", reason="malformed") == 1)
        assert relay.metric("lpdrelay_jobs_rejected_total", reason="timeout") == 0


def test_an_incomplete_header_is_dropped_after_five_seconds(tmp_path: Path) -> None:
    with DaemonThread(proxy_config(tmp_path)) as relay:
        started = time.monotonic()
        assert exchange(relay.port, b"PROXY TCP4 192.0.2.7 ") == b""
        assert 4.5 <= time.monotonic() - started < 9
        assert relay.metric("lpdrelay_jobs_rejected_total", reason="timeout") == 1


def test_header_first_then_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    config = tls_relay_config(tmp_path, pki)
    config["server"].update(proxy_protocol=True, proxy_trusted=["127.0.0.1/32"])
    with DaemonThread(config) as relay, \
            socket.create_connection(("127.0.0.1", tls_port(relay)), timeout=10) as raw:
        raw.sendall(v2())
        with pki.client_context().wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(job_stream("ward3"))
            got = b""
            while len(got) < 5 and (chunk := s.recv(16)):
                got += chunk
        assert got == b"\0" * 5
        (meta,) = delivered(tmp_path / "out", "ward3")
        assert meta["peer"] == "192.0.2.7:40001"
        assert meta["tls_peer"] == "branch-7.example.org"


@pytest.mark.peers
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_behind_a_real_haproxy(tmp_path: Path, version: str) -> None:
    config = proxy_config(tmp_path, allow=["127.0.0.2/32"])
    with DaemonThread(config) as relay, \
            HAProxy(tmp_path / "haproxy", [relay.port], send_proxy=version) as balancer:
        assert exchange(balancer.port, job_stream("q"), source="127.0.0.2") == b"\0" * 5
        (meta,) = delivered(tmp_path / "out", "q")
        assert meta["peer"].startswith("127.0.0.2:")
        assert exchange(balancer.port, job_stream("q"), source="127.0.0.3") == b""
        wait_for(lambda: relay.metric("lpdrelay_jobs_rejected_total", reason="acl") == 1)
        assert len(list((tmp_path / "out" / "q").glob("*.json"))) == 1
