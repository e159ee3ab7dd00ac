"""TLS against the tool admins already use for it: stunnel at either end (SPEC §9).

LPRng's ``lpr`` cannot speak TLS, so an stunnel client with the branch's
certificate carries it to the relay's TLS listener; LPRng's ``lpd`` cannot
either, so an stunnel server (client certificate required) receives what an
``lpds://`` destination sends.  Certificates come from ``tests.tlspki``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon import DaemonThread, relay_config
from tests.peers import LprngServer, Stunnel, lpr
from tests.test_server import delivered, wait_for
from tests.test_tls import job_stream, plain_exchange, tls_port, tls_relay_config
from tests.tlspki import Pki, make_pki

pytestmark = pytest.mark.peers


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def branch_stunnel(tmp: Path, pki: Pki, port: int, who: str = "branch-7") -> Stunnel:
    return Stunnel.client_to(tmp / "stunnel", port, cert=pki.path(f"{who}.pem"),
                             key=pki.path(f"{who}.key"), ca=pki.path("ca.pem"))


def test_lprng_lpr_through_stunnel_reaches_the_tls_listener(tmp_path: Path, pki: Pki) -> None:
    payload = b"page one\fpage two\n" * 500
    with DaemonThread(tls_relay_config(tmp_path, pki)) as relay, \
            branch_stunnel(tmp_path, pki, tls_port(relay)) as tunnel:
        done = lpr(tunnel.port, "ward3", stdin=payload, user="nurse", reserved_port=False)
        assert done.returncode == 0, done.stderr
        (meta,) = delivered(tmp_path / "out", "ward3")
        assert meta["tls_peer"] == "branch-7.example.org" and meta["user"] == "nurse"
        assert Path(meta["files"][0]["path"]).read_bytes() == payload


def test_lprng_lpr_through_stunnel_to_an_unmapped_queue_is_refused(tmp_path: Path,
                                                                   pki: Pki) -> None:
    with DaemonThread(tls_relay_config(tmp_path, pki)) as relay, \
            branch_stunnel(tmp_path, pki, tls_port(relay)) as tunnel:
        done = lpr(tunnel.port, "lab", stdin=b"not for the lab\n", reserved_port=False)
        assert done.returncode != 0
        assert relay.metric("lpdrelay_jobs_rejected_total", reason="acl") >= 1
        assert relay.metric("lpdrelay_jobs_received_total", queue="lab") == 0


def test_stunnel_with_an_expired_certificate_is_refused(tmp_path: Path, pki: Pki) -> None:
    with DaemonThread(tls_relay_config(tmp_path, pki)) as relay, \
            branch_stunnel(tmp_path, pki, tls_port(relay), who="expired") as tunnel:
        done = lpr(tunnel.port, "ward3", stdin=b"expired\n", reserved_port=False)
        assert done.returncode != 0
        assert relay.metric("lpdrelay_tls_handshake_failures_total", reason="expired") >= 1
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["count", "stream"])
def test_lpds_destination_into_stunnel_in_front_of_lprng_lpd(tmp_path: Path, pki: Pki,
                                                              mode: str) -> None:
    payload = bytes(range(32, 127)) * 3000 + b"\n"
    with LprngServer(tmp_path / "lprng", ["q"]) as lpd, \
            Stunnel.server_for(tmp_path / "stunnel", lpd.port, cert=pki.path("server.pem"),
                               key=pki.path("server.key"), ca=pki.path("ca.pem")) as tunnel:
        uri = (f"lpds://127.0.0.1:{tunnel.port}/q?ca={pki.path('ca.pem')}"
               f"&cert={pki.path('branch-7.pem')}&key={pki.path('branch-7.key')}"
               f"&servername=localhost&mode={mode}&timeout=10s")
        config = relay_config(tmp_path, queues={"q": {"destinations": [uri]}})
        with DaemonThread(config) as relay:
            assert plain_exchange(relay.port, job_stream("q", payload)) == b"\0" * 5
            (job,) = lpd.wait_jobs("q", 1, timeout=20)
            assert job.files[0].data == payload
            wait_for(lambda: relay.metric("lpdrelay_jobs_delivered_total", queue="q",
                                          destination=uri) == 1)
