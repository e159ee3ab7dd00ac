"""TLS listeners and lpds:// destinations (SPEC §9) with certificates made by the test.

A relay's TLS listener with mutual TLS and ``[tls.peers]``; Python's ssl
module as the client; a relay -> relay chain over lpds:// with client
certificates; refusals for a missing certificate, an unknown CA, an expired
certificate, an unmapped certificate and a queue outside a peer's list.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
from pathlib import Path
from typing import Any

import orjson
import pytest

from relay import tls
from relay.config import InvalidConfig, config_from_dict
from relay.errors import ConfigError
from tests.daemon import DaemonThread, relay_config
from tests.lpdwire import Job
from tests.test_server import delivered, wait_for
from tests.tlspki import Pki, make_pki, tls_exchange


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def tls_relay_config(tmp: Path, pki: Pki, *, peers: dict[str, list[str]] | None = None,
                     client_ca: bool = True) -> dict[str, Any]:
    out = f"dir://{tmp / 'out'}"
    return relay_config(
        tmp, server={"listen_tls": ["127.0.0.1:0"]},
        tls={"cert": pki.path("server.pem"), "key": pki.path("server.key"),
             **({"client_ca": pki.path("ca.pem")} if client_ca else {}),
             "peers": {"branch-7.example.org": ["ward3"]} if peers is None else peers},
        queues={"ward3": {"destinations": [out]}, "lab": {"destinations": [out]}})


def job_stream(queue: str, payload: bytes = b"over tls\n") -> bytes:
    job = Job(files=[payload])
    cf = job.control()
    (df,) = job.df_names()
    return (f"\x02{queue}\n".encode() + f"\x02{len(cf)} {job.cf_name}\n".encode() + cf + b"\0"
            + f"\x03{len(payload)} {df}\n".encode() + payload + b"\0")


def plain_exchange(port: int, data: bytes, replies: int = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        got = b""
        while len(got) < replies and (chunk := s.recv(16)):
            got += chunk
    return got


def tls_port(relay: DaemonThread) -> int:
    assert relay.bound is not None
    return relay.bound.lpd[-1][1]


def test_mapped_peer_sends_a_job_and_tls_peer_is_recorded(tmp_path: Path, pki: Pki) -> None:
    with DaemonThread(tls_relay_config(tmp_path, pki)) as relay:
        got = tls_exchange(tls_port(relay), pki.client_context(), job_stream("ward3"),
                           replies=5)
        assert got == b"\0" * 5
        (meta,) = delivered(tmp_path / "out", "ward3")
        assert meta["tls_peer"] == "branch-7.example.org"
        assert relay.metric("lpdrelay_tls_certificate_expiry_seconds", role="server") == (
            pki.not_after.timestamp())


def test_plain_listener_is_untouched_by_tls(tmp_path: Path, pki: Pki) -> None:
    with DaemonThread(tls_relay_config(tmp_path, pki)) as relay:
        assert plain_exchange(relay.port, job_stream("lab")) == b"\0" * 5
        (meta,) = delivered(tmp_path / "out", "lab")
        assert "tls_peer" not in meta


@pytest.mark.parametrize(("who", "ca", "reason"), [
    (None, "ca.pem", "no_certificate"),
    ("rogue", "ca.pem", "unknown_ca"),
    ("expired", "ca.pem", "expired"),
])
def test_refused_in_the_handshake(tmp_path: Path, pki: Pki, who: str | None, ca: str,
                                  reason: str) -> None:
    with DaemonThread(tls_relay_config(tmp_path, pki)) as relay:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            got = tls_exchange(tls_port(relay), pki.client_context(who, ca),
                               job_stream("ward3"), replies=5)
            # TLS 1.3: the client's handshake ends before the server's verdict,
            # which then arrives as an alert on the first read - or the close.
            if not got:
                raise ConnectionResetError("closed without a reply")
        name = "lpdrelay_tls_handshake_failures_total"
        wait_for(lambda: relay.metric(name, reason=reason) == 1)
        assert not (tmp_path / "out").exists()


def test_wrong_server_ca_is_refused_by_the_client(tmp_path: Path, pki: Pki) -> None:
    with DaemonThread(tls_relay_config(tmp_path, pki)) as relay, \
            pytest.raises(ssl.SSLCertVerificationError):
        tls_exchange(tls_port(relay), pki.client_context("branch-7", "rogue-ca.pem"),
                     job_stream("ward3"), replies=5)


@pytest.mark.parametrize(("who", "command", "expected"), [
    ("branch-7", b"\x02lab\n", b"\x01lpd-relay: TLS peer branch-7.example.org may not use"),
    ("branch-7", b"\x03lab\n", b"\x01lpd-relay: TLS peer branch-7.example.org may not use"),
    ("branch-7", b"\x05lab root\n", b"\x01lpd-relay: TLS peer branch-7.example.org may not"),
    ("branch-7", b"\x01lab\n", b"\x01lpd-relay: TLS peer branch-7.example.org may not use"),
    ("stranger", b"\x02ward3\n", b"\x01lpd-relay: TLS peer stranger.example.org is not map"),
])
def test_peer_outside_its_queues_gets_0x01_and_a_line(tmp_path: Path, pki: Pki, who: str,
                                                      command: bytes, expected: bytes) -> None:
    with DaemonThread(tls_relay_config(tmp_path, pki)) as relay:
        got = tls_exchange(tls_port(relay), pki.client_context(who), command, replies=200)
        assert got.startswith(expected), got
        assert relay.metric("lpdrelay_jobs_rejected_total", reason="acl") == 1


def test_per_host_limit_is_said_inside_tls(tmp_path: Path, pki: Pki) -> None:
    config = tls_relay_config(tmp_path, pki)
    config["server"]["max_connections_per_host"] = 1
    with DaemonThread(config) as relay, \
            socket.create_connection(("127.0.0.1", tls_port(relay)), timeout=10) as raw, \
            pki.client_context().wrap_socket(raw, server_hostname="localhost") as held:
        held.sendall(b"\x02ward3\n")
        assert held.recv(1) == b"\0"
        got = tls_exchange(tls_port(relay), pki.client_context(), b"\x02ward3\n", replies=100)
        assert got.startswith(b"\x02lpd-relay: too many connections"), got


def test_lpq_of_a_mapped_queue_answers(tmp_path: Path, pki: Pki) -> None:
    with DaemonThread(tls_relay_config(tmp_path, pki)) as relay:
        got = tls_exchange(tls_port(relay), pki.client_context(), b"\x03ward3\n", replies=1000)
        assert not got.startswith(b"\x01") and b"ward3" in got


def test_server_only_tls_takes_any_client(tmp_path: Path, pki: Pki) -> None:
    with DaemonThread(tls_relay_config(tmp_path, pki, peers={}, client_ca=False)) as relay:
        got = tls_exchange(tls_port(relay), pki.client_context(None), job_stream("lab"),
                           replies=5)
        assert got == b"\0" * 5
        (meta,) = delivered(tmp_path / "out", "lab")
        assert "tls_peer" not in meta


def chain_configs(tmp: Path, pki: Pki, query: str) -> tuple[dict[str, Any], Any]:
    central = tls_relay_config(tmp / "central", pki)

    def branch(port: int) -> dict[str, Any]:
        uri = f"lpds://127.0.0.1:{port}/ward3?{query}&timeout=5s"
        return relay_config(tmp / "branch", queues={"ward3": {"destinations": [uri]}},
                            retry={"initial": "100ms", "max": "200ms"})
    return central, branch


def test_relay_to_relay_over_lpds_with_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    query = (f"ca={pki.path('ca.pem')}&cert={pki.path('branch-7.pem')}"
             f"&key={pki.path('branch-7.key')}&servername=localhost")
    central_cfg, branch_cfg = chain_configs(tmp_path, pki, query)
    payload = bytes(range(256)) * 4096   # 1 MiB through the TLS layer
    with DaemonThread(central_cfg) as central, DaemonThread(branch_cfg(tls_port(central))) as b:
        assert plain_exchange(b.port, job_stream("ward3", payload)) == b"\0" * 5
        (meta,) = delivered(tmp_path / "central" / "out", "ward3", timeout=20)
        assert meta["tls_peer"] == "branch-7.example.org"
        assert Path(meta["files"][0]["path"]).read_bytes() == payload
        assert b.metric("lpdrelay_tls_certificate_expiry_seconds", role="client") > 0


@pytest.mark.parametrize(("query", "reason"), [
    ("servername=wrong.example.org", "bad_name"),
    ("servername=localhost&ca={rogue}", "unknown_ca"),
    ("servername=localhost", "no_certificate"),
])
def test_lpds_failures_are_retried_and_counted(tmp_path: Path, pki: Pki, query: str,
                                               reason: str) -> None:
    ca = "" if "ca=" in query else f"ca={pki.path('ca.pem')}&"
    query = ca + query.format(rogue=pki.path("rogue-ca.pem"))
    if reason != "no_certificate":
        query += f"&cert={pki.path('branch-7.pem')}&key={pki.path('branch-7.key')}"
    central_cfg, branch_cfg = chain_configs(tmp_path, pki, query)
    with DaemonThread(central_cfg) as central, DaemonThread(branch_cfg(tls_port(central))) as b:
        assert plain_exchange(b.port, job_stream("ward3")) == b"\0" * 5
        name = "lpdrelay_tls_handshake_failures_total"
        if reason == "no_certificate":   # the server's verdict; the client sees a reset
            wait_for(lambda: central.metric(name, reason=reason) >= 1)
        else:
            wait_for(lambda: b.metric(name, reason=reason) >= 2)   # retried
        wait_for(lambda: b.metric("lpdrelay_delivery_retries_total",
                                  destination=next(iter(b.config.queues["ward3"].destinations)).uri,
                                  reason="other") >= 1 or reason == "no_certificate")
        assert not (tmp_path / "central" / "out").exists()


def test_certificate_not_after_reads_the_pem(pki: Pki) -> None:
    assert tls.certificate_not_after(pki.path("server.pem")) == pki.not_after.timestamp()
    with pytest.raises(ValueError, match="no PEM certificate"):
        tls.certificate_not_after(pki.path("server.key"))


def test_identify_prefers_sans_then_the_cn() -> None:
    peers = {"branch-7.example.org": frozenset({"ward3"}), "urn:site:9": frozenset({"*"}),
             "legacy-cn": frozenset({"lab"})}
    sans = {"subjectAltName": (("DNS", "x.example.org"), ("URI", "urn:site:9")),
            "subject": ((("commonName", "legacy-cn"),),)}
    assert tls.identify(sans, peers).name == "urn:site:9"
    assert tls.identify(sans, peers).permits("anything", "anything")
    cn_only = {"subject": ((("commonName", "legacy-cn"),),)}
    assert tls.identify(cn_only, peers).permits("lab", "LAB")
    assert not tls.identify(cn_only, peers).permits("ward3", "ward3")
    stranger = tls.identify({"subjectAltName": (("DNS", "s.example.org"),)}, peers)
    assert not stranger.mapped and not stranger.permits("lab", "lab")


def test_config_needs_cert_and_key_and_peers_need_a_client_ca(tmp_path: Path) -> None:
    data = relay_config(tmp_path, server={"listen_tls": ["127.0.0.1:0"]},
                        tls={"peers": {"a.example.org": ["q"]}})
    with pytest.raises(InvalidConfig) as info:
        config_from_dict(data, "<test>")
    text = str(info.value)
    assert "tls.cert" in text and "tls.key" in text and "tls.client_ca" in text


def test_missing_certificate_files_stop_the_start_with_the_key(tmp_path: Path,
                                                               pki: Pki) -> None:
    config = tls_relay_config(tmp_path, pki)
    config["tls"]["cert"] = str(tmp_path / "absent.pem")
    with pytest.raises(RuntimeError, match=r"tls: cannot load"):
        DaemonThread(config).__enter__()
    branch = relay_config(tmp_path / "b", queues={"q": {"destinations": [
        f"lpds://127.0.0.1:1/q?ca={tmp_path / 'absent.pem'}"]}})
    with pytest.raises(RuntimeError, match=r"lpds://.*cannot load"):
        DaemonThread(branch).__enter__()


def test_reload_swaps_the_certificate_for_new_handshakes_only(tmp_path: Path,
                                                              pki: Pki) -> None:
    from prometheus_client import CollectorRegistry

    from relay.metrics import Metrics
    config = config_from_dict(tls_relay_config(tmp_path, pki), "<test>")
    assert config.server.tls is not None
    registry = CollectorRegistry()
    metrics = Metrics(registry, queues=["q"], destinations=[])
    inbound = tls.InboundTls(config.server, metrics)
    old = inbound.context
    name, role = "lpdrelay_tls_certificate_expiry_seconds", {"role": "server"}
    assert registry.get_sample_value(name, role) == pki.not_after.timestamp()
    later = make_pki(tmp_path / "later", days=90)   # another CA, a renewed certificate
    renewed = dataclasses.replace(config.server.tls, cert=Path(later.path("server.pem")),
                                  key=Path(later.path("server.key")), peers={})
    inbound.reload(renewed)
    assert inbound.context is not old and inbound.peers == {}
    assert registry.get_sample_value(name, role) == later.not_after.timestamp()
    broken = dataclasses.replace(renewed, cert=tmp_path / "absent.pem")
    with pytest.raises(ConfigError, match="tls: cannot load"):
        inbound.reload(broken)
    assert inbound.peers == {} and inbound.context is not old   # unchanged


def test_spool_record_without_tls_peer_still_decodes(tmp_path: Path) -> None:
    from relay.spoolformat import decode_job
    raw = orjson.dumps({"v": 1, "id": "000000000001", "queue": "q", "wire_queue": "q",
                        "peer": "127.0.0.1:721", "received": 1.0, "control_name": "cfA1h",
                        "control_bytes": 3, "number": "1", "user": "u", "host": "h",
                        "title": "", "job_name": "", "files": []})
    assert decode_job(raw, "000000000001", str(tmp_path)).tls_peer == ""
