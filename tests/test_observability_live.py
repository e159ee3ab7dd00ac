"""The running relay observed with the real tools: its own /metrics after traffic
through promtool, a real Prometheus scraping it, /healthz, and label cardinality
under hostile queue names (SPEC §7)."""

from __future__ import annotations

import json
import random
import string
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.daemon import DaemonThread, relay_config
from tests.lpdwire import Job, Wire, send_job
from tests.test_deploy import PROMETHEUS, PROMTOOL, free_port
from tests.test_server import wait_for


def scrape(relay: DaemonThread, path: str = "/metrics") -> tuple[int, str]:
    assert relay.bound is not None and relay.bound.metrics is not None
    host, port = relay.bound.metrics
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def series(text: str) -> set[str]:
    return {line.split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}


def traffic(relay: DaemonThread, jobs: int = 5) -> None:
    for n in range(jobs):
        assert all(r == 0 for r in send_job(relay.port, Job(queue="ward3", number=f"{n:03d}")))
    with Wire(relay.port) as w:          # one refusal, so the rejection counter moves
        w.send(b"\x02nosuchqueue\n")
        w.read_all()


def exact_config(tmp_path: Path) -> dict[str, Any]:
    return relay_config(tmp_path, server={"queue_names": "exact"},
                        queues={"ward3": {"destinations": [f"dir://{tmp_path / 'out'}"]}})


@pytest.mark.peers
@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_live_relay_scrape_passes_promtool_check_metrics(tmp_path: Path) -> None:
    with DaemonThread(exact_config(tmp_path)) as relay:
        traffic(relay)
        wait_for(lambda: relay.metric("lpdrelay_jobs_delivered_total", queue="ward3",
                                      destination=f"dir://{tmp_path / 'out'}") == 5)
        status, text = scrape(relay)
    assert status == 200
    assert 'lpdrelay_jobs_received_total{queue="ward3"} 5.0' in text
    assert 'lpdrelay_jobs_rejected_total{reason="unknown_queue"} 1.0' in text
    assert "lpdrelay_job_delivery_seconds_count" in text
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_healthz_reports_spool_below_min_free_disk(tmp_path: Path) -> None:
    with DaemonThread(relay_config(tmp_path)) as relay:
        assert scrape(relay, "/healthz") == (200, "ok\n")
    with DaemonThread(relay_config(tmp_path, server={"min_free_disk": "1000TiB"})) as relay:
        status, text = scrape(relay, "/healthz")
        assert status == 503 and "min_free_disk" in text


def test_hostile_queue_names_leave_the_label_set_unchanged(tmp_path: Path) -> None:
    rng = random.Random(5)
    with DaemonThread(exact_config(tmp_path)) as relay:
        traffic(relay, jobs=1)
        before = series(scrape(relay)[1])
        for _ in range(2000):
            name = "".join(rng.choices(string.ascii_letters + string.digits, k=12))
            with Wire(relay.port) as w:
                w.send(b"\x02" + name.encode() + b"\n")
                assert w.reply() == 0x01
        after = series(scrape(relay)[1])
        assert relay.metric("lpdrelay_jobs_rejected_total", reason="unknown_queue") == 2001
    assert after == before


def prometheus_query(port: int, expr: str) -> list[Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={quote(expr, safe='')}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return list(json.loads(resp.read())["data"]["result"])


@pytest.mark.peers
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package)")
def test_real_prometheus_sees_the_relay_counters_move(tmp_path: Path) -> None:
    with DaemonThread(exact_config(tmp_path)) as relay:
        assert relay.bound is not None and relay.bound.metrics is not None
        host, mport = relay.bound.metrics
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [{"job_name": "lpd-relay", "scrape_timeout": "1s",
                                "static_configs": [{"targets": [f"{host}:{mport}"]}]}]}))
        port = free_port()
        assert PROMETHEUS is not None
        with open(tmp_path / "prometheus.log", "wb") as log:
            proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'db'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=log, stderr=log)
        try:
            expr = 'lpdrelay_jobs_received_total{queue="ward3"}'

            def value() -> str | None:
                try:
                    rows = prometheus_query(port, expr)
                except OSError:
                    return None
                return rows[0]["value"][1] if rows else None
            wait_for(lambda: value() == "0", timeout=30, interval=0.25)
            traffic(relay, jobs=3)
            wait_for(lambda: value() == "3", timeout=15, interval=0.25)
            delivered = 'lpdrelay_jobs_delivered_total{queue="ward3"}'
            wait_for(lambda: prometheus_query(port, delivered)
                     and prometheus_query(port, delivered)[0]["value"][1] == "3",
                     timeout=15, interval=0.25)
        finally:
            proc.terminate()   # by PID: the one process this test started
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
