"""End to end into the spool: a real relay process, load from this process on loopback.

small jobs: 1-KiB jobs through the whole inbound path (TCP, the core, the
spool, the acknowledgement after the group commit), fsync "always" vs
"never", at concurrency 1 and 64; baseline: LPRng's lpd taking the same jobs
on the same machine (FIELD-NOTES measured ~250 jobs/s).

large job: one job of 1 GiB (x LPD_BENCH_SCALE) sent with sendfile; baselines
in the same run: ``cat file > /dev/null`` (page-cache read speed) and a plain
Python receiver doing recv_into + write into a file (raw TCP-to-disk).

The relay's destination is down (a closed port, retry in an hour), so only
intake is measured; afterwards the spool must hold every job once, intact
(``benchmarks.sinkcheck``), as must LPRng's queue and the raw receiver's
file.  Results: a table and ratios printed at the end of the module, and
``benchmark.extra_info``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from benchmarks import sinkcheck
from benchmarks.relaypair import raw_receiver_mb_s, send_big
from benchmarks.report import print_lines
from relay.loadgen import run_load
from relay.uri import parse_destination
from tests.daemon import RelayProcess, relay_config, write_config_file
from tests.peers import LprngServer

SCALE = float(os.environ.get("LPD_BENCH_SCALE", "1.0"))
SMALL_JOBS = max(64, int(1000 * SCALE))
LPRNG_JOBS = min(900, SMALL_JOBS)   # LPRng holds at most 1,000 jobs a queue (FIELD-NOTES)
BIG = max(8 << 20, int((1 << 30) * SCALE))
RESULTS: dict[str, float] = {}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def intake_config(tmp: Path, fsync: str) -> Path:
    data = relay_config(
        tmp, server={"spool_dir": str(tmp / f"spool-{fsync}"), "max_connections": 2000,
                     "max_connections_per_host": 2000, "fsync": fsync},
        metrics={"listen": ""}, log={"format": "json", "level": "warning"},
        retry={"initial": "1h", "max": "1h"},
        queues={"q": {"destinations": [f"socket://127.0.0.1:{_closed_port()}"]}})
    return write_config_file(tmp / f"relay-{fsync}.toml", data)


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Any:
    yield
    print_lines(request, _lines)


def _lines() -> list[str]:
    if not RESULTS:
        return []
    lines = ["", "lpd-relay inbound benchmark",
             *(f"  {key}: {value:,.1f}" for key, value in RESULTS.items())]
    pairs = [
        ("small c=1: fsync always / never", "jobs/s fsync=always c=1", "jobs/s fsync=never c=1"),
        ("small c=64: fsync always / never", "jobs/s fsync=always c=64",
         "jobs/s fsync=never c=64"),
        ("small c=64 fsync always: relay / LPRng lpd", "jobs/s fsync=always c=64",
         "jobs/s LPRng lpd c=16"),
        ("1 GiB fsync never: relay / raw TCP-to-file", "MB/s relay fsync=never",
         "MB/s raw TCP-to-file"),
        ("1 GiB fsync always: relay / raw TCP-to-file", "MB/s relay fsync=always",
         "MB/s raw TCP-to-file"),
        ("1 GiB fsync never: relay / cat file > /dev/null", "MB/s relay fsync=never",
         "MB/s cat file > /dev/null"),
    ]
    for label, num, den in pairs:
        if num in RESULTS and den in RESULTS and RESULTS[den]:
            lines.append(f"ratio {label}: {RESULTS[num] / RESULTS[den]:.2f}x")
    return lines


PAYLOAD = os.urandom(1024)


def _load(port: int, queue: str, jobs: int, concurrency: int) -> float:
    dest = parse_destination(f"lpd://127.0.0.1:{port}/{queue}")
    result = trio.run(lambda: run_load(dest, jobs=jobs, concurrency=concurrency, size=1024,
                                       payload=PAYLOAD))
    assert result.ok == jobs, result.failures
    return result.jobs_per_second


@pytest.mark.parametrize("concurrency", [1, 64])
@pytest.mark.parametrize("fsync", ["always", "never"])
def test_small_jobs(tmp_path: Path, benchmark: Any, fsync: str, concurrency: int) -> None:
    with RelayProcess(intake_config(tmp_path, fsync)) as relay:
        rate = benchmark.pedantic(_load, args=(relay.port, "q", SMALL_JOBS, concurrency),
                                  rounds=1, iterations=1)
    # The destination is down: every job must be in the spool, once, intact.
    sinkcheck.spool_jobs(tmp_path / f"spool-{fsync}", SMALL_JOBS, PAYLOAD)
    RESULTS[f"jobs/s fsync={fsync} c={concurrency}"] = rate
    benchmark.extra_info["jobs_per_second"] = rate


@pytest.mark.peers
def test_small_jobs_lprng_baseline(tmp_path: Path, benchmark: Any) -> None:
    with LprngServer(tmp_path / "lprng", queues=("q",)) as lprng:
        rate = benchmark.pedantic(_load, args=(lprng.port, "q", LPRNG_JOBS, 16),
                                  rounds=1, iterations=1)
        lprng.wait_jobs("q", LPRNG_JOBS, timeout=60)
        sinkcheck.lprng_queue(lprng, "q", LPRNG_JOBS, PAYLOAD)
    RESULTS["jobs/s LPRng lpd c=16"] = rate
    benchmark.extra_info["jobs_per_second"] = rate


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.bin"
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(BIG >> 20):
            f.write(block)
    return path


@pytest.mark.parametrize("fsync", ["always", "never"])
def test_large_job(tmp_path: Path, benchmark: Any, big_file: Path, fsync: str) -> None:
    with RelayProcess(intake_config(tmp_path, fsync)) as relay:
        uri = f"lpd://127.0.0.1:{relay.port}/q?reserve=none"
        rate = benchmark.pedantic(send_big, args=(uri, big_file), rounds=1, iterations=1)
    sinkcheck.spooled_big_job(tmp_path / f"spool-{fsync}", big_file)
    RESULTS[f"MB/s relay fsync={fsync}"] = rate
    benchmark.extra_info["mb_per_second"] = rate


def _raw_tcp_to_file(path: Path, out: Path) -> float:
    """Baseline: recv_into one buffer + os.write into a file (no fsync), sender uses sendfile."""
    return raw_receiver_mb_s(path, out, fsync=False)


def test_large_job_baselines(tmp_path: Path, benchmark: Any, big_file: Path) -> None:
    rate = benchmark.pedantic(_raw_tcp_to_file, args=(big_file, tmp_path / "copy.bin"),
                              rounds=1, iterations=1)
    RESULTS["MB/s raw TCP-to-file"] = rate
    start = time.perf_counter()
    subprocess.run(f"cat '{big_file}' > /dev/null", shell=True, check=True)
    RESULTS["MB/s cat file > /dev/null"] = big_file.stat().st_size / (
        time.perf_counter() - start) / 1e6
