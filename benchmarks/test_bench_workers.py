"""Intake with one process against intake in worker processes (``[server] workers``).

The same relay subprocess configuration (fsync "always", a ``dir://``
destination delivering as it goes) with ``workers = 1`` and the default
``workers = "auto"`` (one per core),
rounds alternating which runs first (a row of the targets table); the load is ``lpd-relay loadgen
--processes 2`` at concurrency 64, 2,000 1-KiB jobs (x LPD_BENCH_SCALE).  The
rate counts intake only (loadgen's jobs/s: every job acknowledged); each run
also checks every job arrived at the hot folder, once.  Printed at the end of
the module: the medians and the ratio workers=auto / workers=1.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import table
from benchmarks.report import print_lines
from tests.daemon import ROOT, RelayProcess, relay_config, write_config_file

SCALE = float(os.environ.get("LPD_BENCH_SCALE", "1.0"))
JOBS = max(100, int(2000 * SCALE))
ROUNDS = 3 if SCALE >= 0.5 else 1
AUTO = "auto"
RESULTS: dict[int | str, list[float]] = {1: [], AUTO: []}


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Any:
    yield
    print_lines(request, _lines)


def _lines() -> list[str]:
    if not RESULTS[1] or not RESULTS[AUTO]:
        return []
    one, auto = statistics.median(RESULTS[1]), statistics.median(RESULTS[AUTO])
    spread = {w: f"{min(r):,.0f}-{max(r):,.0f}" for w, r in RESULTS.items()}
    return ["", f"lpd-relay intake workers ({JOBS} 1-KiB jobs, c=64, loadgen --processes 2, "
                f"fsync always, dir://; median of {len(RESULTS[1])})",
            f"  workers=1: {one:,.0f} jobs/s ({spread[1]})",
            f"  workers=auto ({os.cpu_count()}): {auto:,.0f} jobs/s ({spread[AUTO]})",
            f"  ratio workers=auto / workers=1: {auto / one:.2f}x"]


def _run(tmp: Path, workers: int | str) -> float:
    out = tmp / "out"
    tmp.mkdir(parents=True, exist_ok=True)
    data = relay_config(tmp, server={"workers": workers, "fsync": "always",
                                     "max_connections_per_host": 2000},
                        metrics={"listen": ""}, log={"format": "json", "level": "warning"},
                        queues={"q": {"destinations": [f"dir://{out}"]}})
    with RelayProcess(write_config_file(tmp / "relay.toml", data)) as relay:
        load = subprocess.run(
            [sys.executable, "-m", "relay", "loadgen", f"lpd://127.0.0.1:{relay.port}/q",
             "--jobs", str(JOBS), "--concurrency", "64", "--processes", "2", "--json"],
            capture_output=True, text=True, timeout=600, cwd=ROOT, check=True)
        result = json.loads(load.stdout.strip().splitlines()[-1])
        assert result["ok"] == JOBS, result["failures"]
        deadline = time.monotonic() + 120
        while len(list((out / "q").glob("*.json"))) < JOBS and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(list((out / "q").glob("*.json"))) == JOBS, "every job delivered, once"
        assert relay.terminate() == 0
    return float(result["jobs_per_second"])


def _rows(**_: Any) -> table.RowSpecs:
    return [(f"intake, 1 KiB, c=64, workers = \"auto\" ({os.cpu_count()}) vs workers = 1 "
             f"({JOBS:,} jobs)",
             {"unit": "jobs/s", "baseline_name": "workers = 1",
              "target": "reported (SPEC: default one per core)"})]


@table.rows(_rows)
def test_intake_one_process_vs_workers_auto(tmp_path: Path, benchmark: Any) -> None:
    """A row of the targets table too, so ``make bench`` (``--benchmark-only``) runs it."""
    (row,) = table.rows_for(_rows)
    table.run(benchmark, row, ROUNDS,
              lambda i: _record(AUTO, _run(tmp_path / f"auto{i}", AUTO)),
              lambda i: _record(1, _run(tmp_path / f"one{i}", 1)))


def _record(workers: int | str, rate: float) -> float:
    RESULTS[workers].append(rate)
    return rate
