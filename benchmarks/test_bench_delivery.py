"""Delivery rows of the targets table: many jobs through the reserved ports, one large job.

* 10,000 x 1 KiB relay -> relay with A's default origin ports 721-731 (root):
  every job counted and checksummed at B's hot folder, jobs/s (absolute target);
* one 1 GiB job into the spool (``fsync = "always"``, until the final ack)
  against a raw TCP -> file + fsync receiver fed by the same sendfile sender;
* one 1 GiB job forwarded A -> lpd://B/q (until B committed it) against the
  same raw baseline: sendfile -> recv_into + write + fsync.

Both sides of a 1 GiB row write into memory made ready just before their
clock starts, and delete what they wrote after the round
(``benchmarks.pagecache`` says why: without it the side that kept its files
wrote into memory the VM had handed back to its host, 3x the CPU a GiB).

Each row runs ``ROUNDS`` rounds, alternating which side goes first, into
``benchmarks.table`` (printed at the session's end, docs/benchmarks.md).
The large job is 1 GiB x ``LPD_BENCH_SCALE`` (at least 8 MiB).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks import pagecache, table
from benchmarks.relaypair import (
    big_forwarded_mb_s,
    big_into_spool_mb_s,
    make_big_file,
    raw_receiver_mb_s,
    relay_to_relay,
)

SCALE = float(os.environ.get("LPD_BENCH_SCALE", "1.0"))
ROUNDS = 3 if SCALE >= 1 else 1
BIG = max(8 << 20, int((1 << 30) * SCALE))
MANY = max(100, int(10_000 * SCALE))
WARM = BIG + BIG // 8     # free memory made ready before a timed 1 GiB write (pagecache)
pytestmark = pytest.mark.timeout(1200)


def _relay_only(relay: Callable[[int], float], row: table.Row) -> None:
    """``ROUNDS`` rounds of a row with no baseline (its target is absolute)."""
    row.relay.extend(relay(i) for i in range(ROUNDS))


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_big_file(tmp_path_factory.mktemp("big") / "big.bin", BIG)


@pytest.mark.skipif(os.geteuid() != 0, reason="ports 721-731 need root")
def test_many_jobs_through_the_reserved_ports(tmp_path: Path, benchmark: Any) -> None:
    row = table.row(f"relay -> relay through ports 721-731, {MANY:,} x 1 KiB, 0 failed",
                    unit="jobs/s", baseline_name="", target=">= 500 jobs/s, 0 failed",
                    min_value=500.0)
    # relay_to_relay fails the round unless B has every job once, intact.
    benchmark.pedantic(_relay_only, args=(lambda i: _cleaned(
        lambda d: relay_to_relay(d, jobs=MANY).jobs_per_second, tmp_path / f"m{i}"), row),
        rounds=1, iterations=1)


def _cleaned(side: Callable[[Path], float], directory: Path) -> float:
    """One round of ``side`` in ``directory``, which is deleted afterwards (pagecache)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return side(directory)
    finally:
        pagecache.cleanup(directory)


def _against_raw(benchmark: Any, row: table.Row, relay: Callable[[Path], float],
                 big_file: Path, tmp: Path) -> None:
    """The relay's rounds against the raw sendfile -> file + fsync receiver, alternating.

    Each round of either side runs in a directory of its own, deleted after it.
    """
    table.run(benchmark, row, ROUNDS, lambda i: _cleaned(relay, tmp / f"relay{i}"),
              lambda i: _cleaned(lambda d: raw_receiver_mb_s(big_file, d / "raw.bin", warm=WARM),
                                 tmp / f"raw{i}"))


def test_large_job_into_the_spool(tmp_path: Path, benchmark: Any, big_file: Path) -> None:
    row = table.row(f"one {BIG >> 20:,} MiB job into the spool, fsync always",
                    unit="MB/s", baseline_name="raw TCP -> file + fsync",
                    target=">= 0.9x raw receiver", min_ratio=0.9)
    _against_raw(benchmark, row, lambda d: big_into_spool_mb_s(d, big_file, warm=WARM),
                 big_file, tmp_path)


def test_large_job_forwarded(tmp_path: Path, benchmark: Any, big_file: Path) -> None:
    row = table.row(f"one {BIG >> 20:,} MiB job forwarded relay -> relay",
                    unit="MB/s", baseline_name="sendfile -> file + fsync",
                    target=">= 0.7x raw sendfile baseline", min_ratio=0.7)
    _against_raw(benchmark, row, lambda d: big_forwarded_mb_s(d, big_file, warm=WARM),
                 big_file, tmp_path)
