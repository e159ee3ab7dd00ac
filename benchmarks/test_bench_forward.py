"""Forwarding 1-KiB jobs to a real LPRng lpd, against LPRng forwarding the same jobs.

Each case sends N jobs into a forwarder on loopback and times until all N
sit in the upstream LPRng queue.  Baseline in the same run: a second LPRng
lpd forwarding to the upstream (FIELD-NOTES measured ~18 jobs/s: its sender
stalls on delayed ACKs).  The relay forwards through the reserved ports
721-731 (its default) with queue concurrency 1, 4, and 4 with batch=10.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.relaypair import (
    _config,
    failed_attempts,
    metrics_url,
    wait_reserved_ports_bindable,
)
from benchmarks.report import print_lines
from relay.loadgen import load
from tests.daemon import DaemonThread, RelayProcess, relay_config
from tests.peers import LprngServer, free_port, release_time_wait

pytestmark = [pytest.mark.peers, pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="ports 721-731 need root")]

SCALE = float(os.environ.get("LPD_BENCH_SCALE", "1.0"))
JOBS = max(20, min(900, int(300 * SCALE)))
RESULTS: dict[str, float] = {}


def _feed_and_wait(port: int, queue: str, upstream: LprngServer) -> float:
    """jobs/s from the first job sent until the upstream LPRng holds all ``JOBS``.

    The feed is the load generator's fast path, and the wait counts LPRng's
    tickets until there are enough before reading every job once: reading
    them all every 20 ms took most of a core, and a relay in this process
    (``DaemonThread``) shares its interpreter.
    """
    start = time.perf_counter()
    sent = load(f"lpd://127.0.0.1:{port}/{queue}", jobs=JOBS, concurrency=8, size=1024)
    assert sent.ok == JOBS, sent.failures
    folder, deadline = upstream.spool_dir("q"), time.monotonic() + 600
    while sum(1 for n in os.listdir(folder) if n.startswith("hfA")) < JOBS:
        if time.monotonic() > deadline:
            break       # wait_jobs says how many arrived
        time.sleep(0.02)
    upstream.wait_jobs("q", JOBS, timeout=600)
    return JOBS / (time.perf_counter() - start)


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Any:
    yield
    print_lines(request, _lines)


def _lines() -> list[str]:
    if "LPRng -> LPRng" not in RESULTS:
        return []
    base = RESULTS["LPRng -> LPRng"]
    return ["", f"lpd-relay forwarding benchmark ({JOBS} 1-KiB jobs to LPRng lpd)",
            *(f"  {key}: {value:,.1f} jobs/s  (ratio {value / base:.2f}x)"
              for key, value in RESULTS.items())]


def test_lprng_forwarding_baseline(tmp_path: Path, benchmark: Any) -> None:
    with LprngServer(tmp_path / "up", queues=("q",)) as up, LprngServer(
            tmp_path / "fw", queues={"fwd": f"lp=q@127.0.0.1%{up.port}:ah@"}) as fw:
        rate = benchmark.pedantic(_feed_and_wait, args=(fw.port, "fwd", up), rounds=1,
                                  iterations=1)
    RESULTS["LPRng -> LPRng"] = rate


@pytest.mark.parametrize(("concurrency", "batch"), [(1, 1), (4, 1), (4, 10)])
def test_relay_forwarding(tmp_path: Path, benchmark: Any, concurrency: int, batch: int) -> None:
    wait_reserved_ports_bindable()     # the LPRng baseline's TIME_WAITs on 721-731
    with LprngServer(tmp_path / "up", queues=("q",)) as up:
        dest = f"lpd://127.0.0.1:{up.port}/q?batch={batch}"
        cfg = relay_config(tmp_path, queues={"q": {"destinations": [dest],
                                                   "concurrency": concurrency}},
                           log={"format": "json", "level": "warning"})
        with DaemonThread(cfg) as relay:
            rate = benchmark.pedantic(_feed_and_wait, args=(relay.port, "q", up), rounds=1,
                                      iterations=1)
    release_time_wait(range(721, 732), up.port)   # after LPRng let go of its port
    RESULTS[f"relay -> LPRng, concurrency {concurrency}, batch {batch}"] = rate


def test_a_senders_failed_attempts_are_counted(tmp_path: Path) -> None:
    """The harness's count (``failed_attempts``) sees every attempt that did not deliver."""
    port = free_port()      # nothing listens there: every connect is refused
    cfg = _config(tmp_path, "A", f"lpd://127.0.0.1:{port}/q?reserve=none", retry="50ms",
                  metrics=True)
    with RelayProcess(cfg) as a:
        url = metrics_url(a)
        assert failed_attempts(url).failed == 0
        assert load(f"lpd://127.0.0.1:{a.port}/q", jobs=1, concurrency=1, size=100).ok == 1
        deadline = time.monotonic() + 20
        while (attempts := failed_attempts(url)).failed < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert attempts.failed >= 3
    assert attempts.reasons == {"refused": attempts.failed}
    assert attempts.describe() == f"{attempts.failed} failed attempts (refused {attempts.failed})"
