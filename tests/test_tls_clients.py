"""``probe``, ``send`` and ``queue`` towards an ``lpds://`` destination (SPEC §9).

A relay's TLS listener with mutual TLS and certificates made by the test
(``tests.tlspki``): probe shows the negotiated version and cipher, the
verified chain and the days until the server certificate expires, and
``lpd-relay send`` / ``queue`` reach the listener with a client certificate.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import trio

from relay.probe import ProbeReport, run_probe
from relay.uri import parse_destination
from tests.daemon import DaemonThread
from tests.test_server import delivered
from tests.test_tls import tls_port, tls_relay_config
from tests.tlspki import Pki, make_pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def lpds_uri(pki: Pki, port: int, queue: str = "ward3", *, who: str = "branch-7",
             servername: str = "localhost") -> str:
    return (f"lpds://127.0.0.1:{port}/{queue}?ca={pki.path('ca.pem')}"
            f"&cert={pki.path(who + '.pem')}&key={pki.path(who + '.key')}"
            f"&servername={servername}")


def probe(uri: str, *, send: bool = True) -> ProbeReport:
    async def main() -> ProbeReport:
        with trio.fail_after(30):
            return await run_probe(parse_destination(uri), send=send, step_timeout=5)
    return trio.run(main)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_probe_lpds_shows_version_chain_and_days_left(tmp_path: Path, pki: Pki) -> None:
    with DaemonThread(tls_relay_config(tmp_path, pki)) as relay:
        uri = lpds_uri(pki, tls_port(relay))
        report = probe(uri)
        (meta,) = delivered(tmp_path / "out", "ward3")
    assert report.ok, report
    assert [s.name for s in report.steps][:4] == ["resolve", "connect", "tls", "lpq"]
    assert report.tls is not None
    assert report.tls["version"] == "TLSv1.3" and report.tls["cipher"]
    assert len(report.tls["chain"]) == 2 and report.tls["chain"][0] == "localhost"
    days = int((pki.not_after.timestamp() - time.time()) // 86400)
    assert report.tls["days_left"] == days and days in (29, 30)
    detail = report.steps[2].detail
    assert detail.startswith("TLSv1.3 ") and f"(in {days} days)" in detail
    assert report.uri is not None and report.uri.startswith("lpds://127.0.0.1:")
    assert f"cert={pki.path('branch-7.pem')}" in report.uri and "servername=localhost" in report.uri
    assert meta["tls_peer"] == "branch-7.example.org"


@pytest.mark.parametrize(("servername", "who", "reason"), [
    ("wrong.example.org", "branch-7", "(bad_name)"),
    ("localhost", "rogue", ""),       # the server's verdict: seen on the first read
])
def test_probe_lpds_failure_names_the_tls_reason(tmp_path: Path, pki: Pki, servername: str,
                                                 who: str, reason: str) -> None:
    with DaemonThread(tls_relay_config(tmp_path, pki)) as relay:
        report = probe(lpds_uri(pki, tls_port(relay), who=who, servername=servername))
    assert not report.ok
    if reason:
        assert report.steps[-1].name == "tls" and not report.steps[-1].ok
        assert reason in report.verdict and "TLS handshake failed" in report.verdict
    else:   # TLS 1.3: the client's handshake ends first; the refusal comes after
        assert not all(s.ok for s in report.steps)
    assert not (tmp_path / "out").exists()


def test_probe_cli_takes_lpds_and_prints_the_tls_line(tmp_path: Path, pki: Pki) -> None:
    with DaemonThread(tls_relay_config(tmp_path, pki)) as relay:
        uri = lpds_uri(pki, tls_port(relay))
        text = cli("probe", uri, "--no-print")
        as_json = cli("probe", uri, "--no-print", "--json")
    assert text.returncode == 0, text.stderr
    assert "tls" in text.stdout and "chain localhost <- " in text.stdout
    assert orjson.loads(as_json.stdout)["tls"]["version"] == "TLSv1.3"


def test_send_and_queue_over_lpds_with_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    doc = tmp_path / "doc.txt"
    payload = bytes(range(256)) * 1024
    doc.write_bytes(payload)
    with DaemonThread(tls_relay_config(tmp_path, pki)) as relay:
        uri = lpds_uri(pki, tls_port(relay))
        sent = cli("send", uri, str(doc), "--user", "carol")
        (meta,) = delivered(tmp_path / "out", "ward3")
        queued = cli("queue", uri)
        refused = cli("queue", lpds_uri(pki, tls_port(relay), "lab"))
        no_cert = cli("queue", uri.split("&cert=")[0] + "&servername=localhost")
    assert sent.returncode == 0, sent.stderr
    assert meta["tls_peer"] == "branch-7.example.org" and meta["user"] == "carol"
    assert Path(meta["files"][0]["path"]).read_bytes() == payload
    assert queued.returncode == 0, queued.stderr
    assert queued.stdout.startswith("ward3 is ready")
    assert "may not use queue" in refused.stdout
    assert no_cert.returncode == 1 and "certificate required" in no_cert.stderr


def test_send_with_an_unreadable_ca_is_a_usage_error(tmp_path: Path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_bytes(b"x\n")
    result = cli("send", f"lpds://127.0.0.1:6515/q?ca={tmp_path / 'absent.pem'}", str(doc))
    assert result.returncode == 2 and "cannot load ca=" in result.stderr
