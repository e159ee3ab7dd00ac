"""Idle connections: what each costs in RSS, and what they cost a new job's latency.

A real relay process (raised RLIMIT_NOFILE through prlimit), N idle connections
from this process (10,000 x LPD_BENCH_SCALE, at least 100), each having sent
``\\2q LF`` and got its 0x00 — the state a client waiting between files is in.
Reported: the relay's RSS (summed over all its processes, children included)
before, with N idle connections and after they closed; RSS per idle
connection; connections not accepted or not answered; new-job latency
p50/p99 unloaded and loaded and their ratio.  At full scale 3 rounds (1 at a
reduced scale) in one relay, alternating whether the unloaded or the loaded
probes go first; the three table rows (<= 16 KiB a connection, 0 accept
failures, p99 <= 2x unloaded) take every round.  Numbers, not assertions on
wall-clock time (docs/server.md "Measured" has the figures).  Every probe job
is counted and checksummed in the relay's hot folder at the end.
"""

from __future__ import annotations

import itertools
import os
import resource
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import sinkcheck, table
from benchmarks.relaypair import _wait_delivered
from benchmarks.report import print_lines, tree_rss_kib
from tests.daemon import RelayProcess, relay_config, write_config_file
from tests.lpdwire import Job, send_job

SCALE = float(os.environ.get("LPD_BENCH_SCALE", "1.0"))
IDLE = max(100, int(10_000 * SCALE))
PROBES = max(50, int(500 * SCALE))
ROUNDS = 3 if SCALE >= 1 else 1
RESULTS: dict[str, float] = {}


PAYLOAD = os.urandom(1024)
SENT = itertools.count()     # probe jobs are titled "load <n>", checked at the sink


def _latencies(port: int, n: int) -> list[float]:
    out = []
    for i in range(n):
        job = Job(number=f"{i % 1000:03d}", title=f"load {next(SENT)}", files=[PAYLOAD])
        start = time.perf_counter()
        assert all(r == 0 for r in send_job(port, job))
        out.append(time.perf_counter() - start)
    return out


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


def _open_idle(port: int, n: int) -> tuple[list[socket.socket], int]:
    """``n`` connections each past its ``\\2q`` and 0x00; (the sockets, how many failed)."""
    socks, failed = [], 0
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
        except OSError:
            failed += 1
            continue
        socks.append(s)
        s.sendall(b"\x02q\n")
    answered = []
    for s in socks:
        try:
            ok = s.recv(1) == b"\x00"
        except OSError:
            ok = False
        if ok:
            answered.append(s)
        else:
            failed += 1
            s.close()
    return answered, failed


def _settle(pid: int, seconds: float = 1.0) -> int:
    time.sleep(seconds)
    return tree_rss_kib(pid)


def _idle_rows(**_: Any) -> table.RowSpecs:
    return [
        (f"{IDLE:,} idle connections: RSS each, all the relay's processes",
         {"unit": "KiB", "baseline_name": "", "target": "<= 16 KiB", "max_value": 16.0}),
        (f"{IDLE:,} idle connections: accept failures",
         {"unit": "", "baseline_name": "", "target": "0", "max_value": 0.0}),
        (f"{IDLE:,} idle connections: new-job p99 loaded",
         {"unit": "ms", "baseline_name": "unloaded", "target": "<= 2x unloaded",
          "max_ratio": 2.0}),
    ]


def _round(port: int, pid: int, loaded_first: bool) -> dict[str, float]:
    """One round: RSS and p99 with and without ``IDLE`` idle connections."""
    got: dict[str, float] = {}

    def unloaded() -> None:
        got["base"] = _settle(pid)
        got["unloaded"] = _p(_latencies(port, PROBES), 99)

    if not loaded_first:
        unloaded()
    socks, got["failed"] = _open_idle(port, IDLE)
    try:
        got["rss"] = _settle(pid)
        got["loaded"] = _p(_latencies(port, PROBES), 99)
    finally:
        for s in socks:
            s.close()
    if loaded_first:
        time.sleep(2.0)            # the closed connections' memory returned
        unloaded()
    got["per_conn"] = (got["rss"] - got["base"]) / IDLE
    return got


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Any:
    yield
    print_lines(request, lambda: ["", f"lpd-relay idle connections benchmark ({IDLE} idle)",
                                  *(f"  {k}: {v:,.2f}" for k, v in RESULTS.items())]
                if RESULTS else [])


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
        except (ValueError, OSError):
            pytest.skip(f"needs {need} file descriptors, hard limit is {hard}")
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))


@table.rows(_idle_rows)
def test_idle_connections(tmp_path: Path, benchmark: Any) -> None:
    rss_row, fail_row, p99_row = table.rows_for(_idle_rows)
    need = IDLE + 1000
    _raise_nofile(need)
    data = relay_config(tmp_path, server={"max_connections": need,
                                          "max_connections_per_host": need,
                                          "fsync": "never", "idle_timeout": "10m"},
                        metrics={"listen": ""}, log={"format": "json", "level": "warning"})
    cfg = write_config_file(tmp_path / "relay.toml", data)
    with RelayProcess(cfg, wrapper=("prlimit", f"--nofile={need + 100}")) as relay:
        assert relay.proc is not None
        pid = relay.proc.pid
        _latencies(relay.port, 20)                  # warm up
        rounds = benchmark.pedantic(
            lambda: [_round(relay.port, pid, i % 2 == 1) for i in range(ROUNDS)],
            rounds=1, iterations=1)
        after = _settle(pid, 3.0)
        sent = next(SENT)
        _wait_delivered(tmp_path / "out" / "q", sent, timeout=60)
    sinkcheck.dir_sink(tmp_path / "out" / "q", sent, PAYLOAD)
    for got in rounds:
        rss_row.relay.append(got["per_conn"])
        fail_row.relay.append(got["failed"])
        p99_row.relay.append(got["loaded"])
        p99_row.baseline.append(got["unloaded"])
    last = rounds[-1]
    RESULTS.update({
        "RSS baseline KiB": last["base"], f"RSS with {IDLE} idle KiB": last["rss"],
        "RSS after they closed KiB": after,
        "RSS per idle connection KiB": statistics.median(r["per_conn"] for r in rounds),
        "accept failures": sum(r["failed"] for r in rounds),
        "new job p99 unloaded ms": statistics.median(r["unloaded"] for r in rounds),
        "new job p99 loaded ms": statistics.median(r["loaded"] for r in rounds),
    })
    RESULTS["ratio new job p99 loaded / unloaded"] = statistics.median(
        r["loaded"] / r["unloaded"] for r in rounds)
    benchmark.extra_info.update({k.replace(" ", "_"): v for k, v in RESULTS.items()})
