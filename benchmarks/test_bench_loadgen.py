"""The load generator's own CPU per job: the fast path against the trio path.

Both send the same 1 KiB jobs at concurrency 64 (and 1), one job a
connection, to a trivial acker in another process (``tests.lpdacker``: no
relay in the way) and to a real relay process (fsync "never", destination
down, so intake only); each reports its CPU per job (user + system, and
the system part: on loopback the kernel runs the peer's receive in the
sender's context too).  The fast path for ``lpd://`` is the compiled loop
(``relay._loadgen``).  The table row is the fast path's CPU per job
against the acker (target <= 0.15 ms), with the trio path as its
baseline, rounds alternating.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio

from benchmarks import sinkcheck, table
from benchmarks.report import print_lines
from benchmarks.test_bench_inbound import intake_config
from relay.loadgen import LoadResult, load, run_load
from relay.uri import parse_destination
from tests.daemon import RelayProcess
from tests.lpdacker import Acker

SCALE = float(os.environ.get("LPD_BENCH_SCALE", "1.0"))
ROUNDS = 3 if SCALE >= 1 else 1
JOBS = max(200, int(2000 * SCALE))
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Any:
    yield
    print_lines(request, lambda: ["", f"lpd-relay load generator CPU ({JOBS} x 1 KiB a run)",
                                  *(f"  {k}: {v:,.3f}" for k, v in RESULTS.items())]
                if RESULTS else [])


PAYLOAD = os.urandom(1024)


def _run(uri: str, fast: bool, concurrency: int, first: int = 0) -> LoadResult:
    if fast:
        result = load(uri, jobs=JOBS, concurrency=concurrency, size=1024, payload=PAYLOAD,
                      first=first)
    else:
        dest = parse_destination(uri)
        result = trio.run(lambda: run_load(dest, jobs=JOBS, concurrency=concurrency,
                                           size=1024, payload=PAYLOAD, first=first))
    assert result.ok == JOBS, result.failures
    return result


def _note(where: str, concurrency: int, fast: bool, result: LoadResult) -> float:
    path = "fast" if fast else "trio"
    RESULTS[f"{where} c={concurrency} {path}: ms CPU/job"] = result.cpu_ms_per_job
    RESULTS[f"{where} c={concurrency} {path}: of it system"] = result.cpu_system_ms_per_job
    RESULTS[f"{where} c={concurrency} {path}: jobs/s"] = result.jobs_per_second
    return result.cpu_ms_per_job


def _rows(**_: Any) -> table.RowSpecs:
    return [("loadgen CPU per 1 KiB job, c=64, into a trivial acker", {
        "unit": "ms", "baseline_name": "the trio path", "target": "<= 0.15 ms",
        "max_value": 0.15})]


@table.rows(_rows)
def test_loadgen_cpu_against_the_acker(benchmark: Any) -> None:
    (row,) = table.rows_for(_rows)
    with Acker() as acker:
        uri = f"lpd://127.0.0.1:{acker.port}/q"
        table.run(benchmark, row, ROUNDS,
                  lambda i: _note("acker", 64, True, _run(uri, True, 64)),
                  lambda i: _note("acker", 64, False, _run(uri, False, 64)))
        for fast in (True, False):
            _note("acker", 1, fast, _run(uri, fast, 1))


@pytest.mark.parametrize("concurrency", [64, 1])
def test_loadgen_cpu_against_the_relay(tmp_path: Any, benchmark: Any,
                                       concurrency: int) -> None:
    with RelayProcess(intake_config(tmp_path, "never")) as relay:
        uri = f"lpd://127.0.0.1:{relay.port}/q"

        def both() -> None:
            for first, fast in ((0, True), (JOBS, False)):
                _note("relay", concurrency, fast, _run(uri, fast, concurrency, first))
        benchmark.pedantic(both, rounds=1, iterations=1)
    # The relay's destination is down: both runs' jobs are in its spool, once, intact.
    sinkcheck.spool_jobs(tmp_path / "spool-never", 2 * JOBS, PAYLOAD)
