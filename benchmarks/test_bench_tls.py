"""TLS against plain TCP into the same relay, side by side (SPEC §9 performance).

Each round starts a fresh relay process with both a plain and a TLS listener
(mutual TLS: the client shows a certificate the relay's ``client_ca`` signed
and ``[tls.peers]`` maps; ECDSA P-256 certificates made by trustme), with
``fsync = "always"``.  The rounds alternate which side goes first.

- one large job (1 GiB x LPD_BENCH_SCALE) sent by the relay's own client
  (``sendfile`` when plain, 256 KiB reads through TLS otherwise); the rate to
  the final acknowledgement.  The destination is down, so only intake counts.
- 1 KiB jobs at concurrency 64, one job a connection, a full handshake each
  (the load generator keeps no sessions, so nothing is resumed), into a
  ``dir://`` destination delivering as it goes: the relay's capacity is jobs
  per CPU-second of the relay's processes (all of them, from ``/proc``) from
  the first job in until the hot folder holds every job, each checked there.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from benchmarks import sinkcheck, table
from benchmarks.relaypair import _wait_delivered, send_big
from benchmarks.report import print_lines, tree_cpu
from relay.loadgen import load
from tests.daemon import RelayProcess, relay_config, write_config_file

SCALE = float(os.environ.get("LPD_BENCH_SCALE", "1.0"))
ROUNDS = 3 if SCALE >= 1 else 1
BIG = max(8 << 20, int((1 << 30) * SCALE))
SMALL = max(64, int(1000 * SCALE))
RESULTS: dict[str, float] = {}
pytestmark = pytest.mark.timeout(1200)
_TLS_PORT = re.compile(r"listening for LPD over TLS on \[?([0-9a-f.:]+)\]?:(\d+)")


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Any:
    yield
    print_lines(request, lambda: ["", "lpd-relay TLS vs plain benchmark",
                                  *(f"  {k}: {v:,.3f}" for k, v in RESULTS.items())]
                if RESULTS else [])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("trustme", reason="trustme makes the benchmark's certificates")
    from tests.tlspki import make_pki
    return make_pki(tmp_path_factory.mktemp("pki"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _relay(tmp: Path, pki: Any, destination: str) -> RelayProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    data = relay_config(
        tmp, server={"spool_dir": str(tmp / "spool"), "fsync": "always",
                     "max_connections": 2000, "max_connections_per_host": 2000,
                     "listen_tls": ["127.0.0.1:0"]},
        tls={"cert": pki.path("server.pem"), "key": pki.path("server.key"),
             "client_ca": pki.path("ca.pem"), "peers": {"branch-7.example.org": ["q"]}},
        metrics={"listen": ""}, log={"format": "json", "level": "warning"},
        retry={"initial": "1h", "max": "1h"},
        queues={"q": {"destinations": [destination], "concurrency": 4}})
    return RelayProcess(write_config_file(tmp / "relay.toml", data))


def _uri(relay: RelayProcess, pki: Any, tls: bool) -> str:
    """The relay's plain or TLS listener (the banner lists the TLS one after it)."""
    if not tls:
        return f"lpd://127.0.0.1:{relay.port}/q"
    ports = [int(m.group(2)) for line in relay.banner
             if (m := _TLS_PORT.search(line))]
    assert ports, relay.banner
    return (f"lpds://127.0.0.1:{ports[0]}/q?ca={pki.path('ca.pem')}"
            f"&cert={pki.path('branch-7.pem')}&key={pki.path('branch-7.key')}")


def _big_round(tmp: Path, pki: Any, path: Path, tls: bool) -> float:
    try:
        with _relay(tmp, pki, f"socket://127.0.0.1:{_closed_port()}") as relay:
            rate = send_big(_uri(relay, pki, tls), path)
        sinkcheck.spooled_big_job(tmp / "spool", path)
        return rate
    finally:
        shutil.rmtree(tmp, ignore_errors=True)     # a GiB a round


def _big_rows(**_: Any) -> table.RowSpecs:
    return [(f"one {BIG / (1 << 30):g} GiB job over TLS (mTLS, ECDSA P-256) into the spool",
             {"unit": "MB/s", "baseline_name": "plain TCP, same relay",
              "target": ">= 0.5x plain", "min_ratio": 0.5})]


@table.rows(_big_rows)
def test_large_job_tls_vs_plain(tmp_path: Path, benchmark: Any, pki: Any) -> None:
    (row,) = table.rows_for(_big_rows)
    path = tmp_path / "big.bin"
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(BIG >> 20):
            f.write(block)
    table.run(benchmark, row, ROUNDS,
              lambda i: _big_round(tmp_path / f"tls{i}", pki, path, True),
              lambda i: _big_round(tmp_path / f"plain{i}", pki, path, False))
    RESULTS["large MB/s TLS (median)"] = sorted(row.relay)[len(row.relay) // 2]
    RESULTS["large MB/s plain (median)"] = sorted(row.baseline)[len(row.baseline) // 2]


def _small_round(tmp: Path, pki: Any, tls: bool) -> float:
    """Jobs per CPU-second of the relay's processes, ``SMALL`` 1 KiB jobs at c=64."""
    out, payload = tmp / "out", os.urandom(1024)
    with _relay(tmp, pki, f"dir://{out}") as relay:
        assert relay.proc is not None
        cpu = tree_cpu(relay.proc.pid)
        result = load(_uri(relay, pki, tls), jobs=SMALL, concurrency=64, size=1024,
                      payload=payload)
        assert result.ok == SMALL, result.failures
        _wait_delivered(out / "q", SMALL, timeout=120 + SMALL / 20)
        used = tree_cpu(relay.proc.pid) - cpu
    sinkcheck.dir_sink(out / "q", SMALL, payload)
    side = "TLS" if tls else "plain"
    RESULTS[f"small {side} jobs/s (last round)"] = result.jobs_per_second
    RESULTS[f"small {side} relay CPU ms/job (last round)"] = used / SMALL * 1000
    RESULTS[f"small {side} loadgen CPU ms/job (last round)"] = result.cpu_ms_per_job
    return SMALL / used


def _small_rows(**_: Any) -> table.RowSpecs:
    return [(f"relay capacity, {SMALL:,} x 1 KiB at c=64 over TLS, full handshake each "
             "(mTLS, ECDSA P-256)",
             {"unit": "jobs/CPU-s", "baseline_name": "plain TCP, same relay",
              "target": ">= 0.5x plain", "min_ratio": 0.5})]


@table.rows(_small_rows)
def test_small_jobs_tls_capacity(tmp_path: Path, benchmark: Any, pki: Any) -> None:
    (row,) = table.rows_for(_small_rows)
    table.run(benchmark, row, ROUNDS, lambda i: _small_round(tmp_path / f"tls{i}", pki, True),
              lambda i: _small_round(tmp_path / f"plain{i}", pki, False))
