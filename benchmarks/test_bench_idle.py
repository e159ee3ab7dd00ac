"""Idle connections: what each costs in RSS, and what they cost a new job's latency.

A real relay process (raised RLIMIT_NOFILE through prlimit), N idle connections
from this process (10,000 x LPD_BENCH_SCALE, at least 100), each having sent
``\\2q LF`` and got its 0x00 — the state a client waiting between files is in.
Reported: the relay's RSS before, with N idle connections and after they closed;
RSS per idle connection; new-job latency p50/p99 unloaded and loaded and their
ratio.  Numbers, not assertions on wall-clock time (the target is <= 16 KiB per
idle connection; docs/server.md "Measured" has the figures).
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.report import print_lines
from tests.daemon import RelayProcess, relay_config, write_config_file
from tests.lpdwire import Job, send_job

SCALE = float(os.environ.get("LPD_BENCH_SCALE", "1.0"))
IDLE = max(100, int(10_000 * SCALE))
PROBES = max(50, int(500 * SCALE))
RESULTS: dict[str, float] = {}


def _rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and every process below it (intake workers hold the connections)."""
    return sum(_own_rss_kib(p) for p in [pid, *_descendants(pid)])


def _own_rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:   # ended meanwhile
        return 0
    raise AssertionError("no VmRSS")


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _latencies(port: int, n: int) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        assert all(r == 0 for r in send_job(port, Job(number=f"{i % 1000:03d}")))
        out.append(time.perf_counter() - start)
    return out


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


def _open_idle(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        socks.append(s)
        s.sendall(b"\x02q\n")
    for s in socks:
        assert s.recv(1) == b"\x00"
    return socks


def _settle(pid: int, seconds: float = 1.0) -> int:
    time.sleep(seconds)
    return _rss_kib(pid)


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Any:
    yield
    print_lines(request, lambda: ["", f"lpd-relay idle connections benchmark ({IDLE} idle)",
                                  *(f"  {k}: {v:,.2f}" for k, v in RESULTS.items())]
                if RESULTS else [])


def test_idle_connections(tmp_path: Path, benchmark: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE + 1000
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
        except (ValueError, OSError):
            pytest.skip(f"needs {need} file descriptors, hard limit is {hard}")
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    data = relay_config(tmp_path, server={"max_connections": need,
                                          "max_connections_per_host": need,
                                          "fsync": "never", "idle_timeout": "10m"},
                        metrics={"listen": ""}, log={"format": "json", "level": "warning"})
    cfg = write_config_file(tmp_path / "relay.toml", data)
    with RelayProcess(cfg, wrapper=("prlimit", f"--nofile={need + 100}")) as relay:
        assert relay.proc is not None
        pid = relay.proc.pid
        _latencies(relay.port, 20)                  # warm up
        base = _settle(pid)
        unloaded = _latencies(relay.port, PROBES)
        socks = benchmark.pedantic(_open_idle, args=(relay.port, IDLE), rounds=1, iterations=1)
        try:
            loaded_rss = _settle(pid)
            loaded = _latencies(relay.port, PROBES)
        finally:
            for s in socks:
                s.close()
        after = _settle(pid, 3.0)
    RESULTS.update({
        "RSS baseline KiB": base, f"RSS with {IDLE} idle KiB": loaded_rss,
        "RSS after they closed KiB": after,
        "RSS per idle connection KiB": (loaded_rss - base) / IDLE,
        "new job p50 unloaded ms": _p(unloaded, 50), "new job p99 unloaded ms": _p(unloaded, 99),
        "new job p50 loaded ms": _p(loaded, 50), "new job p99 loaded ms": _p(loaded, 99),
    })
    RESULTS["ratio new job p99 loaded / unloaded"] = (
        RESULTS["new job p99 loaded ms"] / RESULTS["new job p99 unloaded ms"])
    benchmark.extra_info.update({k.replace(" ", "_"): v for k, v in RESULTS.items()})
