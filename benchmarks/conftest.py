"""Benchmark plumbing: the size scale, and ratios printed at the end of the run.

Benchmarks come in pairs (the compiled core and a baseline); each pair's
ratio goes into ``benchmark.extra_info`` and onto the terminal summary, so
``pytest benchmarks --benchmark-only`` ends with lines such as
``ratio small-jobs c/py speedup: 23.4x``.  ``LPD_BENCH_SCALE`` (default 1.0)
scales every size, e.g. ``LPD_BENCH_SCALE=0.01 pytest benchmarks
--benchmark-disable`` as a quick smoke run.  The targets table
(``test_bench_table.py``, ``benchmarks.table``) is printed last and written to
``benchmarks/results/``; a table row whose benchmark was skipped or failed
says so there (``skipped: reason``) instead of stopping the table.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

# pair -> (numerator side, denominator side, label): ratio = time(num) / time(den).
PAIRS = {
    "small-jobs": ("py", "c", "ratio small-jobs c/py speedup (target >= 10x)"),
    "body-stream": ("parser", "slicing",
                    "ratio body-stream parser/slicing time (target <= 2x)"),
}
RATIOS: dict[str, float] = {}
_TIMES: dict[tuple[str, str], float] = {}


def scale() -> float:
    """The LPD_BENCH_SCALE multiplier for benchmark sizes."""
    return float(os.environ.get("LPD_BENCH_SCALE", "1.0"))


def record(benchmark: Any, pair: str, side: str, work: float, unit: str) -> None:
    """Note one side's best time; once both sides of ``pair`` ran, store the ratio.

    ``work`` (jobs, bytes, ...) over the best time gives a rate in extra_info.
    """
    stats = getattr(benchmark, "stats", None)
    if not stats:  # --benchmark-disable: the function ran once, untimed
        return
    best = stats.stats.min
    benchmark.extra_info[f"{unit}_per_second"] = work / best
    _TIMES[pair, side] = best
    num, den, _ = PAIRS[pair]
    if (pair, num) in _TIMES and (pair, den) in _TIMES:
        RATIOS[pair] = _TIMES[pair, num] / _TIMES[pair, den]
        benchmark.extra_info[f"ratio_{num}_over_{den}"] = RATIOS[pair]


def pytest_sessionstart(session: Any) -> None:
    from benchmarks import table
    table.session_started()


def pytest_runtest_setup(item: Any) -> None:
    from benchmarks import table
    table.TOUCHED.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    """A skipped or failed table benchmark: its rows say why.

    The rows are those it names with ``@table.rows`` and those it asked
    ``table.row`` for before it failed; a failure fails a row that already
    has numbers from earlier rounds too.
    """
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped or report.failed):
        return
    from benchmarks import table
    make = getattr(getattr(item, "function", None), "table_rows", None)
    params = dict(getattr(getattr(item, "callspec", None), "params", {}))
    rows = [*table.TOUCHED, *(table.rows_for(make, **params) if make is not None else [])]
    if report.skipped and isinstance(report.longrepr, tuple):
        note = f"skipped: {report.longrepr[2].removeprefix('Skipped: ')}"
    else:
        text = str(call.excinfo.value) if call.excinfo is not None else report.outcome
        note = f"failed: {text.splitlines()[0] if text else report.when}"
    table.mark(rows, note)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from benchmarks import table
    if table.ROWS:
        terminalreporter.section("lpd-relay benchmark table")
        rounds = 3 if scale() >= 1 else 1
        for line in table.render(rounds).splitlines():
            terminalreporter.write_line(line)
        path = table.write(scale(), rounds)
        terminalreporter.write_line(f"written to {path} (and .json)")
    if not RATIOS:
        return
    terminalreporter.section("lpd-relay benchmark ratios")
    for pair, ratio in RATIOS.items():
        terminalreporter.write_line(f"{PAIRS[pair][2]}: {ratio:.2f}x")


@pytest.fixture(scope="session")
def bench_scale() -> float:
    """LPD_BENCH_SCALE (float, default 1.0)."""
    return scale()


@pytest.fixture(scope="session")
def record_ratio() -> Any:
    """``record`` from the conftest instance pytest loaded (it owns RATIOS)."""
    return record
