"""The targets table: each row's relay and baseline measured side by side.

Every row runs ``ROUNDS`` rounds (3 at full scale, 1 at a reduced
``LPD_BENCH_SCALE``), alternating which side goes first; ``benchmarks.table``
keeps the rounds, and the session's end prints the table and writes it to
``benchmarks/results/``.  The relay runs as in the issue's targets:
``fsync = "always"`` and a ``dir://`` destination delivering as it goes;
LPRng as ``tests.peers`` configures it (never fsyncing).  Helpers come from
the other benchmark modules (their loads, configs and LPRng forwarding).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks import sinkcheck, table
from benchmarks.relaypair import (
    Attempts,
    _wait_delivered,
    drain_cpu,
    failed_attempts,
    metrics_url,
    relay_to_relay,
    wait_reserved_ports_bindable,
)
from benchmarks.report import tree_cpu
from benchmarks.test_bench_forward import JOBS
from relay.loadgen import load
from tests.daemon import RelayProcess, relay_config, write_config_file
from tests.peers import LprngServer, release_time_wait
from tests.peers.tcp import time_wait_pairs

SCALE = float(os.environ.get("LPD_BENCH_SCALE", "1.0"))
ROUNDS = 3 if SCALE >= 1 else 1
LPRNG_MAX = 900        # LPRng holds at most 1,000 jobs a queue (FIELD-NOTES)
# Sizes: each row's rate or CPU per job is steady after a few hundred jobs.
SENDER_JOBS = 500      # drained by A, each side of the sender CPU row
LL_JOBS = max(20, int(100 * SCALE))   # LPRng -> LPRng: ~15 jobs/s, one delayed ACK a job
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="ports 721-731 need root")
# A row is several relay and baseline runs: longer than a unit test's timeout.
pytestmark = pytest.mark.timeout(1200)


def _n(full: int, least: int = 20) -> int:
    return max(least, int(full * SCALE))


def _load(port: int, queue: str, jobs: int, concurrency: int, payload: bytes) -> float:
    """jobs/s of the load generator's fast path (about 0.1 ms of its CPU a job)."""
    result = load(f"lpd://127.0.0.1:{port}/{queue}", jobs=jobs, concurrency=concurrency,
                  size=len(payload), payload=payload)
    assert result.ok == jobs, result.failures
    return result.jobs_per_second


def _run(benchmark: Any, row: table.Row, relay: Callable[[int], float],
         baseline: Callable[[int], float]) -> None:
    table.run(benchmark, row, ROUNDS, relay, baseline)


def _intake_relay(tmp: Path, jobs: int, concurrency: int,
                  cpu_row: table.Row | None = None) -> float:
    out = tmp / "out"
    tmp.mkdir(parents=True, exist_ok=True)
    data = relay_config(
        tmp, server={"spool_dir": str(tmp / "spool"), "fsync": "always",
                     "max_connections": 2000, "max_connections_per_host": 2000},
        metrics={"listen": ""}, log={"format": "json", "level": "warning"},
        queues={"q": {"destinations": [f"dir://{out}"], "concurrency": 4}})
    payload = os.urandom(1024)
    with RelayProcess(write_config_file(tmp / "relay.toml", data)) as relay:
        assert relay.proc is not None
        cpu = tree_cpu(relay.proc.pid)
        rate = _load(relay.port, "q", jobs, concurrency, payload)
        # intake + delivery: the CPU until the hot folder has every job
        _wait_delivered(out / "q", jobs, timeout=120 + jobs / 20)
        if cpu_row is not None:
            cpu_row.relay.append((tree_cpu(relay.proc.pid) - cpu) / jobs * 1000)
    sinkcheck.dir_sink(out / "q", jobs, payload)
    return rate


def _intake_lprng(tmp: Path, jobs: int, concurrency: int) -> float:
    payload = os.urandom(1024)
    with LprngServer(tmp, queues=("q",)) as lprng:
        rate = _load(lprng.port, "q", jobs, concurrency, payload)
        lprng.wait_jobs("q", jobs, timeout=60)
        sinkcheck.lprng_queue(lprng, "q", jobs, payload)
    return rate


def _intake_rows(concurrency: int, jobs: int, target: float, **_: Any) -> table.RowSpecs:
    n = _n(jobs, least=64 if concurrency > 1 else 20)
    specs: table.RowSpecs = [(
        f"intake, 1 KiB, c={concurrency} ({n:,} jobs; LPRng {min(n, LPRNG_MAX)})",
        {"unit": "jobs/s", "baseline_name": "LPRng lpd", "target": f">= {target:g}x LPRng",
         "min_ratio": target})]
    if concurrency == 64:
        specs.append(("CPU per 1 KiB job, intake + dir:// delivery (c=64)",
                      {"unit": "ms", "baseline_name": "", "target": "<= 0.4 ms",
                       "max_value": 0.4}))
    return specs


@pytest.mark.peers
@pytest.mark.parametrize(("concurrency", "jobs", "target"),
                         [(64, 2000, 10.0), (1, 500, 1.5), (512, 2000, 10.0)])
@table.rows(_intake_rows)
def test_intake(tmp_path: Path, benchmark: Any, concurrency: int, jobs: int,
                target: float) -> None:
    n = _n(jobs, least=64 if concurrency > 1 else 20)
    row, *cpu = table.rows_for(_intake_rows, concurrency=concurrency, jobs=jobs, target=target)
    cpu_row = cpu[0] if cpu else None
    _run(benchmark, row,
         lambda i: _intake_relay(tmp_path / f"relay{i}", n, concurrency, cpu_row),
         lambda i: _intake_lprng(tmp_path / f"lprng{i}", min(n, LPRNG_MAX), concurrency))


def _feed_and_wait(port: int, queue: str, upstream: LprngServer, jobs: int = JOBS) -> float:
    """``jobs`` 1 KiB jobs at c=8 into a forwarder; jobs/s until all sit at ``upstream``.

    Then the upstream queue must hold exactly those jobs, each once and intact.
    """
    payload = os.urandom(1024)
    start = time.perf_counter()
    _load(port, queue, jobs, 8, payload)
    upstream.wait_jobs("q", jobs, timeout=120 + jobs / 5)
    rate = jobs / (time.perf_counter() - start)
    sinkcheck.lprng_queue(upstream, "q", jobs, payload)
    return rate


def _free_reserved_ports() -> None:
    """Move this host's TIME_WAITs on ports 721-731 off them (``release_time_wait``).

    LPRng binds its source ports without SO_REUSEADDR, so the TIME_WAITs a
    relay round just before left there would slow the LPRng baseline down.
    """
    for remote in sorted({r for p, r in time_wait_pairs() if 721 <= p <= 731}):
        with contextlib.suppress(OSError):    # a live listener there: not ours to touch
            release_time_wait(range(721, 732), remote)


def _lprng_to_lprng(tmp: Path, jobs: int) -> float:
    _free_reserved_ports()
    with LprngServer(tmp / "up", queues=("q",)) as up, LprngServer(
            tmp / "fw", queues={"fwd": f"lp=q@127.0.0.1%{up.port}:ah@"}) as fw:
        return _feed_and_wait(fw.port, "fwd", up, jobs)


def _relay_to_relay(tmp: Path, jobs: int, attempts: list[Attempts]) -> float:
    """relay_to_relay (it counts and checksums B's hot folder); then each job once, by title.

    A's failed delivery attempts of the round go into ``attempts``.  It starts once
    721-731 bind again: after the LPRng -> LPRng baseline that takes up to 60 s.
    """
    wait_reserved_ports_bindable()
    result = relay_to_relay(tmp, jobs=jobs)
    attempts.append(result.attempts)
    sinkcheck.dir_sink(tmp / "B" / "out" / "q", jobs, None)
    return result.jobs_per_second


def _note_attempts(row: table.Row, attempts: list[Attempts], benchmark: Any,
                   jobs: int) -> None:
    """The sender's failed attempts, round by round, beside the row's verdict,
    and its jobs per connection (median of the rounds).

    A failed attempt backs the queue off for up to a second (the harness's
    ``[retry]``), so it shows only as a slower round unless it is counted.
    """
    benchmark.extra_info["failed_attempts"] = [a.failed for a in attempts]
    benchmark.extra_info["connects"] = [a.connects for a in attempts]
    if any(a.failed or a.port_waits for a in attempts):
        text = "; ".join(f"round {i + 1}: {a.describe()}" for i, a in enumerate(attempts))
    else:
        text = f"0 failed attempts in {len(attempts)} round{'s' if len(attempts) != 1 else ''}"
    if connects := [a.connects for a in attempts if a.connects]:
        text += f", {jobs / statistics.median(connects):.1f} jobs a connection"
    if not row.note:
        row.note = f"sender: {text}"


def _rr_rows(**_: Any) -> table.RowSpecs:
    return [(f"forwarding relay -> relay, {_n(5000, least=50):,} x 1 KiB fed at c=16, lpd://B/q",
             {"unit": "jobs/s", "baseline_name": f"LPRng -> LPRng, {LL_JOBS} jobs",
              "target": ">= 1,000 jobs/s (>= 50x LPRng -> LPRng)", "min_ratio": 50.0,
              "min_value": 1000.0})]


@root_only
@pytest.mark.peers
@table.rows(_rr_rows)
def test_forward_relay_to_relay(tmp_path: Path, benchmark: Any) -> None:
    n = _n(5000, least=50)
    (row,) = table.rows_for(_rr_rows)
    attempts: list[Attempts] = []
    _run(benchmark, row,
         lambda i: _relay_to_relay(tmp_path / f"rr{i}", n, attempts),
         lambda i: _lprng_to_lprng(tmp_path / f"ll{i}", LL_JOBS))
    _note_attempts(row, attempts, benchmark, n)


def _sender_rows(**_: Any) -> table.RowSpecs:
    return [(f"sender CPU per job, draining {_n(SENDER_JOBS, least=50):,} spooled 1 KiB jobs "
             "to a relay",
             {"unit": "ms", "baseline_name": "one job a connection, ?batch=1",
              "target": "<= 0.5x one job a connection", "max_ratio": 0.5})]


@root_only
@table.rows(_sender_rows)
def test_forward_sender_cpu(tmp_path: Path, benchmark: Any) -> None:
    n = _n(SENDER_JOBS, least=50)
    (row,) = table.rows_for(_sender_rows)
    _run(benchmark, row,
         lambda i: _drain_cpu(tmp_path / f"auto{i}", n, ""),
         lambda i: _drain_cpu(tmp_path / f"one{i}", n, "?batch=1"))


def _drain_cpu(tmp: Path, jobs: int, query: str) -> float:
    """drain_cpu (count and checksum at B); then each job once, by title."""
    cpu = drain_cpu(tmp, jobs=jobs, query=query)[1]
    sinkcheck.dir_sink(tmp / "B" / "out" / "q", jobs, None)
    return cpu


def _relay_to_lprng(tmp: Path, attempts: list[Attempts], query: str = "") -> float:
    """A relay process (not a thread of this one: the load generator would share its
    interpreter lock) forwarding to LPRng's ``lpd://.../q`` + ``query``; its failed
    delivery attempts go into ``attempts``."""
    with LprngServer(tmp / "up", queues=("q",)) as up:
        dest = f"lpd://127.0.0.1:{up.port}/q{query}"
        cfg = relay_config(tmp, server={"fsync": "always", "spool_dir": str(tmp / "spool")},
                           queues={"q": {"destinations": [dest]}},
                           metrics={"listen": "127.0.0.1:0"},
                           log={"format": "json", "level": "warning"})
        with RelayProcess(write_config_file(tmp / "relay.toml", cfg)) as relay:
            url = metrics_url(relay)
            rate = _feed_and_wait(relay.port, "q", up)
            attempts.append(failed_attempts(url))
    release_time_wait(range(721, 732), up.port)
    return rate


def _rl_rows(query: str = "", **_: Any) -> table.RowSpecs:
    shown = f", lpd://.../q{query}" if query else ""
    return [(f"forwarding relay -> LPRng ({JOBS} jobs, c=8{shown})",
             {"unit": "jobs/s", "baseline_name": "LPRng's own intake, c=8",
              "target": ">= 0.9x LPRng's intake", "min_ratio": 0.9})]


@root_only
@pytest.mark.peers
@pytest.mark.parametrize("query", ["", "?batch=8"])
@table.rows(_rl_rows)
def test_forward_relay_to_lprng(tmp_path: Path, benchmark: Any, query: str) -> None:
    """The plain URI (one job a connection: LPRng is no lpd-relay), and ``batch=8``,
    the documented option for a receiver that takes several jobs a session."""
    (row,) = table.rows_for(_rl_rows, query=query)
    attempts: list[Attempts] = []
    _run(benchmark, row, lambda i: _relay_to_lprng(tmp_path / f"r{i}", attempts, query),
         lambda i: _intake_lprng(tmp_path / f"l{i}", JOBS, 8))
    _note_attempts(row, attempts, benchmark, JOBS)


def test_a_row_that_did_not_run_says_why() -> None:
    def make(**_: Any) -> table.RowSpecs:
        return [("a row without its peer", {"unit": "x", "baseline_name": "b",
                                             "target": ">= 1x", "min_ratio": 1.0})]
    try:
        table.mark_not_run(make, {}, "skipped: LPRng is not installed")
        line = next(x for x in table.render(1).splitlines() if "a row without" in x)
        assert "skipped: LPRng is not installed" in line and line.endswith("| - |")
    finally:
        table.ROWS.pop("a row without its peer", None)


def _hot_folder(folder: Path, titles: list[str], payload: bytes) -> None:
    folder.mkdir(parents=True)
    for i, title in enumerate(titles):
        data = folder / f"job{i}-1.prn"
        data.write_bytes(payload)
        (folder / f"job{i}.json").write_text(json.dumps(
            {"title": title, "files": [{"path": str(data), "bytes": len(payload)}]}))


@pytest.mark.parametrize(("titles", "corrupt", "problem"), [
    (["load 0", "load 1", "load 2"], False, None),
    (["load 0", "load 1", "load 1"], False, "duplicated 1"),
    (["load 0", "load 1"], False, "missing 1"),
    (["load 0", "load 1", "load 2"], True, "corrupt"),
])
def test_the_sink_check_finds_a_lost_duplicated_or_corrupt_job(
        tmp_path: Path, titles: list[str], corrupt: bool, problem: str | None) -> None:
    payload = os.urandom(1024)
    _hot_folder(tmp_path / "q", titles, payload)
    if corrupt:
        (tmp_path / "q" / "job1-1.prn").write_bytes(payload[:-1] + b"!")
    if problem is None:
        sinkcheck.dir_sink(tmp_path / "q", 3, payload)
    else:
        with pytest.raises(sinkcheck.SinkMismatch, match=problem):
            sinkcheck.dir_sink(tmp_path / "q", 3, payload)


def test_a_failed_round_fails_a_row_that_has_numbers() -> None:
    r = table.row("a row whose last round lost a job", unit="jobs/s", baseline_name="b",
                  target=">= 1x", min_ratio=1.0)
    try:
        r.relay += [5.0, 6.0]
        r.baseline += [1.0, 1.0]
        assert r.met() is True
        table.mark([r], "failed: 4999 of 5000 jobs reached the sink")
        assert r.met() is False
        line = next(x for x in table.render(3).splitlines() if "lost a job" in x)
        assert "| 2 |" in line and "no (failed: 4999 of 5000" in line
        assert "load average" in table.render(3)
    finally:
        table.ROWS.pop("a row whose last round lost a job", None)
