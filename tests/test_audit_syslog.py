"""Audit records shipped to a real rsyslog over TCP and TLS, across an outage (SPEC §11).

The relay is a real process; rsyslogd runs with the test's own config
(tests/peers/rsyslog.py).  Every record of the audit file must arrive, in
seq order, and after the collector was stopped and started again nothing
may be missing: duplicates are allowed, recognisable by their seq.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

from relay.auditsyslog import frame
from tests.daemon import relay_config, write_config_file
from tests.lpdwire import Job, send_job
from tests.peers.process import require_binary
from tests.peers.rsyslog import Rsyslog, require_gtls
from tests.relayproc import LoggedRelay
from tests.test_audit_daemon import audit_records
from tests.tlspki import make_pki


def relay_for(tmp_path: Path, syslog: str, **tls: str) -> LoggedRelay:
    data = relay_config(tmp_path, audit={"syslog": syslog, **tls},
                        queues={"q": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    return LoggedRelay(write_config_file(tmp_path / "relay.toml", data))


def wait_all_shipped(tmp_path: Path, collector: Rsyslog, timeout: float = 30
                     ) -> list[dict[str, Any]]:
    """Wait until every record now in the audit file has reached the collector."""
    deadline = time.monotonic() + timeout
    while True:
        wanted = {r["seq"] for r in audit_records(tmp_path)}
        got = collector.records()
        if wanted and wanted <= {r["seq"] for r in got}:
            return got
        missing = sorted(wanted - {r["seq"] for r in got})
        assert time.monotonic() < deadline, f"missing seqs {missing}"
        time.sleep(0.1)


def check_order(got: list[dict[str, Any]], tmp_path: Path) -> None:
    """In seq order; a resent stretch only repeats records already sent, identical."""
    on_disk = {r["seq"]: r for r in audit_records(tmp_path)}
    highest = 0
    for rec in got:
        assert rec == on_disk[rec["seq"]]
        assert rec["seq"] <= highest + 1, f"seq {rec['seq']} after {highest}: one skipped"
        highest = max(highest, rec["seq"])


def send_jobs(port: int, first: int, n: int) -> None:
    for number in range(first, first + n):
        assert send_job(port, Job(number=str(number))) == [0] * 5


def metric(relay: LoggedRelay, name: str) -> float:
    with urllib.request.urlopen(relay.metrics_url(), timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_every_record_reaches_rsyslog_over_tcp_across_an_outage(tmp_path: Path) -> None:
    require_binary("rsyslogd")
    collector = Rsyslog(tmp_path / "rsyslog")
    with collector, relay_for(tmp_path, f"tcp://127.0.0.1:{collector.port}") as relay:
        send_jobs(relay.port, 100, 5)
        wait_all_shipped(tmp_path, collector)
        collector.stop()                          # the collector goes away for a while
        send_jobs(relay.port, 200, 5)
        deadline = time.monotonic() + 20
        while metric(relay, "lpdrelay_audit_syslog_failures_total") < 1:
            assert time.monotonic() < deadline, "the outage was not noticed"
            time.sleep(0.2)
        assert metric(relay, "lpdrelay_audit_syslog_backlog_records") > 0
        collector.start_again()
        send_jobs(relay.port, 300, 2)
        got = wait_all_shipped(tmp_path, collector, timeout=60)
        check_order(got, tmp_path)
        deadline = time.monotonic() + 10
        while metric(relay, "lpdrelay_audit_syslog_backlog_records") != 0:
            assert time.monotonic() < deadline, "backlog stays above 0"
            time.sleep(0.2)
        assert relay.terminate() == 0
    raw = (tmp_path / "rsyslog" / "raw").read_text().splitlines()
    assert raw and all("[lpdrelay@32473 " in line and ' seq="' in line for line in raw)


def test_records_reach_rsyslog_over_mutual_tls(tmp_path: Path) -> None:
    require_binary("rsyslogd")
    require_gtls()
    pki = make_pki(tmp_path / "pki")
    tls = {"ca": pki.path("ca.pem"), "cert": pki.path("server.pem"),
           "key": pki.path("server.key")}
    collector = Rsyslog(tmp_path / "rsyslog", tls=tls)
    with collector, relay_for(tmp_path, f"tls://127.0.0.1:{collector.port}",
                              syslog_ca=pki.path("ca.pem"), syslog_cert=pki.path("branch-7.pem"),
                              syslog_key=pki.path("branch-7.key")) as relay:
        send_jobs(relay.port, 100, 3)
        check_order(wait_all_shipped(tmp_path, collector), tmp_path)
        collector.stop()
        send_jobs(relay.port, 200, 3)
        time.sleep(1.5)
        collector.start_again()
        check_order(wait_all_shipped(tmp_path, collector, timeout=60), tmp_path)
        assert relay.terminate() == 0


def test_frame_is_octet_counted_rfc5424_with_escaped_structured_data() -> None:
    rec = {"ts": "2026-12-01T10:00:00.000Z", "event": "received", "seq": 7,
           "user": 'a"b]c\\d\n', "files": [{"name": "dfA1h"}]}
    data = frame(rec, b'{"json":1}\n', hostname="relay1", procid=42)
    length, _, message = data.partition(b" ")
    assert int(length) == len(message)
    assert message.startswith(b"<85>1 2026-12-01T10:00:00.000Z relay1 lpd-relay 42 received "
                              b"[lpdrelay@32473 ")
    assert b'user="a\\"b\\]c\\\\d?"' in message
    assert b'seq="7"' in message and message.endswith(b'] {"json":1}')
