"""What the audit log costs intake: 1-KiB jobs at c=64, audit on vs off, same run.

Two relay processes run side by side on the same machine, identical but for
``[audit]`` (fsync "always" for both: the audit's ``received`` record is
durable before each ack, one fdatasync per batch of jobs).  Load alternates
between them, ``ROUNDS`` rounds each, so drift of the machine (other load,
page cache, CPU frequency) hits both sides alike; the ratio of the median
rates is the result (target >= 0.9).  The destination is down, so only intake
is measured.  ``LPD_BENCH_SCALE`` scales the jobs per round.
"""

from __future__ import annotations

import os
import socket
import statistics
from pathlib import Path
from typing import Any

import pytest
import trio

from benchmarks import sinkcheck
from benchmarks.report import print_lines
from relay.loadgen import run_load
from relay.uri import parse_destination
from tests.daemon import RelayProcess, relay_config, write_config_file

SCALE = float(os.environ.get("LPD_BENCH_SCALE", "1.0"))
JOBS = max(64, int(1000 * SCALE))   # the rate is steady after a few hundred jobs
ROUNDS = 3 if SCALE >= 1 else 1
CONCURRENCY = 64
RESULTS: dict[str, float] = {}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp: Path, name: str, audit: bool) -> Path:
    extra: dict[str, Any] = {"audit": {"rotate_keep": 10}} if audit else {}
    data = relay_config(
        tmp, server={"spool_dir": str(tmp / f"spool-{name}"), "max_connections": 2000,
                     "max_connections_per_host": 2000, "fsync": "always"},
        metrics={"listen": ""}, log={"format": "json", "level": "warning"},
        retry={"initial": "1h", "max": "1h"},
        queues={"q": {"destinations": [f"socket://127.0.0.1:{_closed_port()}"]}}, **extra)
    return write_config_file(tmp / f"relay-{name}.toml", data)


PAYLOAD = os.urandom(1024)


def _load(port: int, first: int) -> float:
    """``JOBS`` jobs numbered from ``first`` (each relay's rounds number on)."""
    dest = parse_destination(f"lpd://127.0.0.1:{port}/q")
    result = trio.run(lambda: run_load(dest, jobs=JOBS, concurrency=CONCURRENCY, size=1024,
                                       payload=PAYLOAD, first=first))
    assert result.ok == JOBS, result.failures
    return result.jobs_per_second


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Any:
    yield
    print_lines(request, _lines)


def _lines() -> list[str]:
    if not RESULTS:
        return []
    lines = ["", "lpd-relay audit benchmark (1 KiB jobs, c=64, fsync always)",
             *(f"  {key}: {value:,.1f}" for key, value in RESULTS.items())]
    on, off = RESULTS.get("jobs/s audit on"), RESULTS.get("jobs/s audit off")
    if on and off:
        lines.append(f"ratio intake audit on / off: {on / off:.2f}x (target >= 0.9)")
    return lines


def _alternate(on: int, off: int) -> tuple[float, float]:
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(ROUNDS):
        rates["off"].append(_load(off, r * JOBS))
        rates["on"].append(_load(on, r * JOBS))
    return statistics.median(rates["on"]), statistics.median(rates["off"])


def test_intake_with_audit_on_vs_off(tmp_path: Path, benchmark: Any) -> None:
    with RelayProcess(_config(tmp_path, "on", True)) as on, \
            RelayProcess(_config(tmp_path, "off", False)) as off:
        rate_on, rate_off = benchmark.pedantic(_alternate, args=(on.port, off.port),
                                               rounds=1, iterations=1)
    RESULTS["jobs/s audit on"] = rate_on
    RESULTS["jobs/s audit off"] = rate_off
    benchmark.extra_info["ratio_audit_on_over_off"] = rate_on / rate_off
    audit_log = tmp_path / "spool-on" / "audit" / "audit.log"
    assert audit_log.exists()
    for name in ("on", "off"):      # the destination is down: every job in the spool
        sinkcheck.spool_jobs(tmp_path / f"spool-{name}", ROUNDS * JOBS, PAYLOAD)
