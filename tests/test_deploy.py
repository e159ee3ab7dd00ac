"""deploy/: the Grafana dashboard and Prometheus rules, checked with the real tools.

Structure checks run everywhere.  The tool checks run promtool and a real
Prometheus server on loopback (Debian package ``prometheus``, installed by
scripts/install-peers.sh) and skip with the reason when the binaries are absent:
- ``promtool check rules`` / ``check config`` on the shipped files;
- every dashboard expression as a recording rule through ``promtool check rules``;
- ``promtool test rules``: each alert fires on a series that should fire it
  and stays quiet on one that should not;
- ``promtool check metrics`` on a live scrape of ``serve_http``;
- a Prometheus server scraping a live ``serve_http``: the counter moves, every
  dashboard query returns series, every alert rule loads and evaluates.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import orjson
import pytest
import trio
from prometheus_client import CollectorRegistry

from relay.httpd import serve_http
from relay.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "lpd-relay.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DOCS = ROOT / "docs" / "observability.md"
ALERT_NAMES = {"LpdRelayDown", "LpdRelayDestinationDown", "LpdRelayJobsHeld",
               "LpdRelayOriginPortExhaustion", "LpdRelaySpoolDiskLow",
               "LpdRelayDeliveryLatencyHigh", "LpdRelayTlsCertificateExpiring"}
QUEUES = ["ward3", "lab", "*"]
DESTS = ["lpd://laptop-ward3.vpn/Ward3?mode=count", "socket://10.1.2.3:9100"]

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
requires_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus, "
    "installed by scripts/install-peers.sh)")
requires_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian package prometheus, "
    "installed by scripts/install-peers.sh)")


def dashboard() -> Any:
    return json.loads(DASHBOARD.read_text())


def panels() -> Iterator[Any]:
    """Every panel, including those nested in collapsed rows."""
    for p in dashboard()["panels"]:
        yield p
        yield from p.get("panels", [])


def variables() -> dict[str, Any]:
    return {v["name"]: v for v in dashboard()["templating"]["list"]}


def panel_exprs() -> list[tuple[str, str]]:
    """(panel title/refId, PromQL) of every target, template variables unresolved."""
    return [(f"{p['title']}/{t['refId']}", t["expr"])
            for p in panels() for t in p.get("targets", [])]


def variable_selectors() -> list[tuple[str, str, str]]:
    """(variable, selector, label) of each ``label_values(selector, label)`` query."""
    out = []
    for name, v in variables().items():
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", str(v["definition"]))
            assert m, f"variable {name}: not a label_values() query"
            out.append((name, m.group(1), m.group(2)))
    return out


def substitute(expr: str, choice: str) -> str:
    """Replace Grafana's variables the way Grafana does; ``choice`` for the multi-values."""
    values = {"__rate_interval": "1m", "__interval": "30s", "__range": "1h",
              "instance": choice, "queue": choice, "destination": choice}
    out = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)
    assert "$" not in out, out
    return out


def exported_names() -> set[str]:
    reg = CollectorRegistry()
    Metrics(reg, queues=QUEUES, destinations=DESTS)
    return {s.name for fam in reg.collect() for s in fam.samples}


def referenced_names(text: str) -> set[str]:
    return set(re.findall(r"\blpdrelay_[a-z0-9_]+\b", text))


def families(names: set[str]) -> set[str]:
    """Histogram sample names back to the family: ``x_bucket`` -> ``x``."""
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def run_tool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin.decode() if stdin else None, capture_output=True,
                          text=True, timeout=60, check=False)


# --- structure: no tools needed -------------------------------------------------------


def test_dashboard_has_schema_and_template_variables() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 36
    vs = variables()
    assert vs["datasource"]["type"] == "datasource" and vs["datasource"]["query"] == "prometheus"
    for name in ("instance", "queue", "destination"):
        assert vs[name]["type"] == "query" and vs[name]["multi"] and vs[name]["includeAll"]
        assert vs[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_panels_are_well_formed() -> None:
    ps = list(panels())
    ids = [p["id"] for p in ps]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in ps:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(g["x"] + i, g["y"] + j)
                for i in range(g["w"]) for j in range(g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"] and p.get("description"), p["title"]


def test_dashboard_shows_every_metric() -> None:
    shown = families(referenced_names(" ".join(e for _, e in panel_exprs())))
    every = families(exported_names())
    assert every <= shown, f"metrics without a panel: {every - shown}"


def test_every_referenced_metric_is_exported() -> None:
    samples = exported_names()  # with _total, _bucket, _sum, _count as in PromQL
    texts = {"dashboard": (DASHBOARD.read_text(), samples),
             "alerts": (ALERTS.read_text(), samples),
             "docs": (DOCS.read_text(), samples | families(samples))}
    for where, (text, exported) in texts.items():
        assert referenced_names(text), where
        unknown = referenced_names(text) - exported
        assert not unknown, f"{where} names metrics that Metrics does not export: {unknown}"


def test_docs_cover_every_metric_and_alert() -> None:
    text = DOCS.read_text()
    for name in families(exported_names()):
        assert f"`{name}`" in text, name
    for alert in ALERT_NAMES:
        assert f"### {alert}" in text, alert
        assert alert in ALERTS.read_text()


# --- promtool -------------------------------------------------------------------------


@pytest.mark.peers
@requires_promtool
def test_alert_rules_pass_promtool() -> None:
    r = run_tool(str(PROMTOOL), "check", "rules", str(ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in r.stdout


@pytest.mark.peers
@requires_promtool
def test_example_prometheus_config_passes_promtool() -> None:
    r = run_tool(str(PROMTOOL), "check", "config", str(PROM_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "alerts.yml" in r.stdout  # the example loads the shipped rules


@pytest.mark.peers
@requires_promtool
def test_every_dashboard_query_passes_promtool(tmp_path: Path) -> None:
    # Multi-value variables become a regex alternation, escaped by Grafana.
    choice = "(ward3|\\\\*)"
    exprs = [(f"{name}_{i}", substitute(e, choice)) for i, (name, e) in enumerate(panel_exprs())]
    exprs += [(f"var_{v}", substitute(sel, choice)) for v, sel, _ in variable_selectors()]
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, (_, e) in enumerate(exprs)]
    path = tmp_path / "dashboard-rules.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = run_tool(str(PROMTOOL), "check", "rules", str(path))
    assert r.returncode == 0, f"{r.stdout}{r.stderr}\n" + "\n".join(map(str, exprs))
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout


def alerts_without_annotations() -> str:
    """alerts.yml minus its annotations, which promtool would compare word for word.

    What the annotations say is checked by the live Prometheus test instead.
    """
    out, skip_deeper_than = [], None
    for line in ALERTS.read_text().splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None and (indent > skip_deeper_than or not line.strip()):
            continue
        skip_deeper_than = indent if line.strip().startswith("annotations:") else None
        if skip_deeper_than is None:
            out.append(line)
    return "\n".join(out) + "\n"


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    base = {"job": "lpd-relay", "instance": "relay1:9515"} | labels
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(base.items()))
    return {"series": f"{name}{{{inner}}}", "values": values}


def fires(alert: str, at: str, *label_sets: dict[str, str]) -> dict[str, object]:
    severity = "critical" if alert in ("LpdRelayDown", "LpdRelaySpoolDiskLow") else "warning"
    return {"eval_time": at, "alertname": alert, "exp_alerts": [
        {"exp_labels": {"job": "lpd-relay", "instance": "relay1:9515", "severity": severity}
         | ls} for ls in label_sets]}


ALERT_CASES = [
    # (input series, [alert expectations]); 1 sample a minute.
    ([series("up", "1 1 0x10"), series("up", "0x10", job="node")],
     [fires("LpdRelayDown", "4m"), fires("LpdRelayDown", "8m", {})]),
    ([series("lpdrelay_destination_up", "1 1 0x20", destination=DESTS[0]),
      series("lpdrelay_destination_up", "1x20", destination=DESTS[1])],
     [fires("LpdRelayDestinationDown", "6m"),
      fires("LpdRelayDestinationDown", "13m", {"destination": DESTS[0]})]),
    ([series("lpdrelay_spool_jobs", "0 0 0 2x10", queue="ward3", state="held"),
      series("lpdrelay_spool_jobs", "50x40", queue="ward3", state="queued"),
      series("lpdrelay_jobs_held_total", "0 0 1x40", queue="lab"),
      series("lpdrelay_spool_jobs", "0x40", queue="lab", state="held")],
     [fires("LpdRelayJobsHeld", "1m"),
      fires("LpdRelayJobsHeld", "5m", {"queue": "ward3"}, {"queue": "lab"}),
      fires("LpdRelayJobsHeld", "30m")]),  # lab's job was released, ward3's series ended
    ([series("lpdrelay_origin_port_exhausted_total", "0+10x30"),
      series("lpdrelay_origin_port_exhausted_total", "0+1x30", instance="relay2:9515")],
     [fires("LpdRelayOriginPortExhaustion", "5m"),
      fires("LpdRelayOriginPortExhaustion", "20m", {})]),
    ([series("lpdrelay_spool_free_bytes", "10e9x10"),
      series("lpdrelay_spool_free_bytes", "10e9 1e9x10", instance="relay2:9515")],
     [fires("LpdRelaySpoolDiskLow", "3m"),
      fires("LpdRelaySpoolDiskLow", "8m", {"instance": "relay2:9515"})]),
    ([series("lpdrelay_job_delivery_seconds_bucket", "0+1x40", queue="ward3", le="300"),
      series("lpdrelay_job_delivery_seconds_bucket", "0+10x40", queue="ward3", le="3600"),
      series("lpdrelay_job_delivery_seconds_bucket", "0+10x40", queue="ward3", le="+Inf"),
      series("lpdrelay_job_delivery_seconds_bucket", "0+10x40", queue="lab", le="1"),
      series("lpdrelay_job_delivery_seconds_bucket", "0+10x40", queue="lab", le="+Inf")],
     [fires("LpdRelayDeliveryLatencyHigh", "10m"),
      fires("LpdRelayDeliveryLatencyHigh", "30m", {"queue": "ward3"})]),
    # promtool's clock starts at 0: 1e6 s is 11.6 days ahead, 1e8 s three years
    ([series("lpdrelay_tls_certificate_expiry_seconds", "1e6x30", role="server"),
      series("lpdrelay_tls_certificate_expiry_seconds", "1e8x30", role="client")],
     [fires("LpdRelayTlsCertificateExpiring", "5m"),
      fires("LpdRelayTlsCertificateExpiring", "15m", {"role": "server"})]),
]


@pytest.mark.peers
@requires_promtool
def test_each_alert_fires_when_it_should_and_only_then(tmp_path: Path) -> None:
    rules = tmp_path / "alerts.yml"
    rules.write_text(alerts_without_annotations())
    tests = [{"interval": "1m", "input_series": s, "alert_rule_test": a} for s, a in ALERT_CASES]
    assert {a["alertname"] for _, cases in ALERT_CASES for a in cases} == ALERT_NAMES
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(json.dumps({"rule_files": [str(rules)], "evaluation_interval": "1m",
                                "tests": tests}))
    r = run_tool(str(PROMTOOL), "test", "rules", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def exercise(m: Metrics, queue: str = "ward3", destination: str = DESTS[0]) -> None:
    """Move every metric, so a scrape shows each kind of sample with a value."""
    q, d = m.queue_label(queue), m.destination_label(destination)
    m.jobs_received_total.labels(q).inc()
    m.bytes_received_total.labels(q).inc(2048)
    m.jobs_rejected_total.labels("unknown_queue").inc()
    m.jobs_delivered_total.labels(q, d).inc()
    m.bytes_delivered_total.labels(q, d).inc(2000)
    m.delivery_attempts_total.labels(d, "ok").inc()
    m.delivery_retries_total.labels(d, "timeout").inc()
    m.jobs_held_total.labels(q).inc()
    m.set_spool({(q, "queued"): 3, (q, "held"): 1}, 8192, 50 * 2**30)
    m.job_delivery_seconds.labels(q).observe(0.7)
    m.inbound_connections.set(4)
    m.destination_up.labels(d).set(0)
    m.origin_ports_in_use.set(2)
    m.origin_port_exhausted_total.inc()
    m.origin_port_wait_seconds.observe(0.02)


async def http_get(addr: tuple[str, int], path: str) -> tuple[int, bytes]:
    """One HTTP/1.0 GET (so the answer is never chunked), body read to EOF."""
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: {addr[0]}\r\n\r\n".encode())
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.peers
@requires_promtool
def test_live_scrape_passes_promtool_check_metrics() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg, queues=QUEUES, destinations=DESTS)

    async def main() -> bytes:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(partial(serve_http, "127.0.0.1", 0, registry=reg,
                                                   health=lambda: (True, "")))
                exercise(m)
                status, text = await http_get(addr, "/metrics")
                assert status == 200
                nursery.cancel_scope.cancel()
        return text

    text = trio.run(main)
    assert b'lpdrelay_destination_up{destination="%s"} 0.0' % DESTS[0].encode() in text
    r = run_tool(str(PROMTOOL), "check", "metrics", stdin=text)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def prom_api(port: int, path: str) -> Any:
    status, body = await http_get(("127.0.0.1", port), path)
    doc = orjson.loads(body)
    assert status == 200 and doc["status"] == "success", doc
    return doc["data"]


async def query(port: int, expr: str) -> list[Any]:
    data = await prom_api(port, "/api/v1/query?query=" + quote(expr, safe=""))
    return list(data["result"])


async def wait_until(what: str, seconds: float, check: Callable[[], Awaitable[Any]]) -> Any:
    """Poll the coroutine function ``check`` until it returns a truthy value."""
    with trio.move_on_after(seconds):
        while True:
            try:
                found = await check()
            except (OSError, trio.BrokenResourceError, ValueError, IndexError):
                found = None  # not up yet, or an empty answer while starting
            if found:
                return found
            await trio.sleep(0.25)
    pytest.fail(f"Prometheus: no {what} within {seconds} s")


def prometheus_config(tmp_path: Path, target: tuple[str, int]) -> Path:
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(ALERTS)],
              "scrape_configs": [{"job_name": "lpd-relay", "scrape_timeout": "1s",
                                  "static_configs": [{"targets": [f"{target[0]}:{target[1]}"]}]}]}
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(config))
    return path


async def check_live_prometheus(port: int, m: Metrics) -> None:
    sel = 'lpdrelay_jobs_received_total{job="lpd-relay",queue="ward3"}'

    async def ready() -> bool:
        return (await http_get(("127.0.0.1", port), "/-/ready"))[0] == 200

    async def value() -> str | None:
        result = await query(port, sel)
        return str(result[0]["value"][1]) if result else None

    await wait_until("readiness", 20, ready)
    assert await wait_until("first scrape", 10, value) == "0"
    m.jobs_received_total.labels("ward3").inc(5)
    m.destination_up.labels(DESTS[0]).set(0)
    await wait_until("counter at 5", 10, lambda: _equals(value, "5"))
    # Every dashboard query finds series, so its label names fit the metrics:
    # ".+" (unlike Grafana's All, ".*") does not match a label the series lacks.
    await trio.sleep(2)  # a few more scrapes for rate() windows
    for name, expr in panel_exprs():
        real = substitute(expr, ".+").replace("[1m]", "[15s]")
        assert await query(port, real), f"dashboard panel {name}: no series for {real}"
    for var, selector, label in variable_selectors():
        rows = await query(port, substitute(selector, ".+"))
        assert rows and all(label in r["metric"] for r in rows), var
    await wait_until("alert rules evaluated", 10, partial(_rules_ok, port))

    async def pending() -> bool:
        alerts = (await prom_api(port, "/api/v1/alerts"))["alerts"]
        return any(a["labels"]["alertname"] == "LpdRelayDestinationDown"
                   and a["labels"]["destination"] == DESTS[0] for a in alerts)

    await wait_until("LpdRelayDestinationDown pending", 10, pending)


async def _equals(get: Callable[[], Awaitable[str | None]], want: str) -> bool:
    return await get() == want


async def _rules_ok(port: int) -> bool:
    groups = (await prom_api(port, "/api/v1/rules"))["groups"]
    rules = [r for g in groups for r in g["rules"]]
    if not rules:
        return False  # not loaded yet
    assert {r["name"] for r in rules} == ALERT_NAMES
    for r in rules:
        assert r["type"] == "alerting"
        assert {"summary", "description", "runbook"} <= set(r["annotations"]), r["name"]
        assert r["labels"]["severity"] in ("warning", "critical"), r["name"]
    return all(r["health"] == "ok" for r in rules)


async def run_live(tmp_path: Path, log: BinaryIO) -> None:
    reg = CollectorRegistry()
    m = Metrics(reg, queues=QUEUES, destinations=DESTS)
    exercise(m, "lab", DESTS[1])  # ward3 and DESTS[0] move once Prometheus watches
    port = free_port()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            target = await nursery.start(partial(serve_http, "127.0.0.1", 0, registry=reg,
                                                 health=lambda: (True, "")))
            proc = await trio.lowlevel.open_process(
                [str(PROMETHEUS), f"--config.file={prometheus_config(tmp_path, target)}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            try:
                await check_live_prometheus(port, m)
            finally:
                proc.terminate()  # by PID: the one process this test started
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            nursery.cancel_scope.cancel()


@pytest.mark.peers
@requires_prometheus
def test_real_prometheus_scrapes_the_relay(tmp_path: Path) -> None:
    path = tmp_path / "prometheus.log"
    with path.open("wb") as log:
        try:
            trio.run(run_live, tmp_path, log)
        except BaseException:
            print("prometheus log:", path.read_text()[-4000:])  # shown by pytest on failure
            raise
