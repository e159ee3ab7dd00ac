"""The targets table's PostgreSQL rows (issue 12), measured like every other row.

Three rows, each ``ROUNDS`` rounds (3 at full scale) alternating which side
goes first, on a private cluster (``tests.peers.postgres``; skipped with a
reason without PostgreSQL), with the load and delivery of
``benchmarks/test_bench_pg.py``:

- intake of 1-KiB jobs at concurrency 64 into ``PgSpool`` against the local
  spool with ``fsync = "always"`` (target >= 0.5x);
- one large job's intake (1 GiB x ``LPD_BENCH_SCALE``), PostgreSQL against
  local (no target: reported);
- delivery by two relay processes against one from a database pre-filled
  with four queues' jobs (concurrency 4 each) to a ``socket://`` destination that only reads,
  hashes and counts (target >= 1.5x).

Every job is counted and checksummed where it ended up: the database's rows
and chunks (by SQL), the local spool (reopened), and the counting
destination (one connection a job, each job's bytes once).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from benchmarks import sinkcheck, table
from benchmarks.test_bench_pg import PAYLOAD, CountingSink, _commit, _db, _deliver, _pg_spool
from relay.spool import Spool
from tests.peers.postgres import PostgresCluster, require_postgres

SCALE = float(os.environ.get("LPD_BENCH_SCALE", "1.0"))
ROUNDS = 3 if SCALE >= 1 else 1
JOBS = max(64, int(2000 * SCALE))
BIG = max(4 << 20, int((1 << 30) * SCALE))
DELIVER = max(40, int(2000 * SCALE))   # as test_bench_pg: the start-up share stays small
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    require_postgres()
    with PostgresCluster() as pg:
        yield pg


def _written(size: int) -> Iterator[memoryview]:
    """The bytes ``test_bench_pg._commit`` writes for one job of ``size`` bytes (0: 1 KiB)."""
    chunk = PAYLOAD * 1024 if size else PAYLOAD
    left = size or len(PAYLOAD)
    while left > 0:
        yield memoryview(chunk)[:left]
        left -= len(chunk)


def _expected(size: int) -> bytes:
    digest = hashlib.sha256()
    for piece in _written(size):
        digest.update(piece)
    return digest.digest()


def _chunk_digests(size: int, chunk_size: int) -> list[bytes]:
    """SHA-256 of each ``chunk_size`` piece of those bytes, as the spool stores them."""
    data = bytearray()
    out = []
    for piece in _written(size):
        data += piece
        while len(data) >= chunk_size:
            out.append(hashlib.sha256(data[:chunk_size]).digest())
            del data[:chunk_size]
    if data:
        out.append(hashlib.sha256(data).digest())
    return out


def _check_pg(dsn: str, jobs: int, size: int, chunk_size: int) -> None:
    """The database holds ``jobs`` jobs titled job0.., each body the bytes written.

    PostgreSQL hashes each stored chunk (``sha256(data)``), so a GiB is
    checked without moving it out of the database.
    """
    import psycopg
    want, seen = _chunk_digests(size, chunk_size), []
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT j.title, array_agg(sha256(c.data) ORDER BY c.file, c.seq)"
            " FROM lpd_jobs j JOIN lpd_chunks c ON c.job_id = j.id GROUP BY j.id, j.title"
        ).fetchall()
    for title, digests in rows:
        if [bytes(d) for d in digests] != want:
            raise sinkcheck.SinkMismatch(f"PostgreSQL: job {title!r} is not the bytes sent")
        seen.append(title)
    sinkcheck.check_titles("PostgreSQL spool", seen, jobs, prefix="job")


def _check_local(directory: Path, jobs: int, size: int) -> None:
    want, seen = _expected(size), []
    spool = Spool(directory, fsync=False)
    spool.recover()
    try:
        for meta in spool.jobs():
            with spool.open_body(meta.files[0]) as body:
                digest = hashlib.sha256()
                at = 0
                while at < body.length:
                    block = os.pread(body.fd, min(1 << 20, body.length - at), body.offset + at)
                    digest.update(block)
                    at += len(block)
            if digest.digest() != want:
                raise sinkcheck.SinkMismatch(f"local spool: job {meta.title!r} is corrupt")
            seen.append(meta.title)
    finally:
        trio.run(spool.aclose)
    sinkcheck.check_titles("local spool", seen, jobs, prefix="job")


def _intake(spool: Any, jobs: int, size: int) -> float:
    """Commit ``jobs`` jobs (c=64, or one of ``size`` bytes); the rate (jobs/s or MB/s)."""
    start = time.perf_counter()
    trio.run(_commit, spool, jobs, 64 if jobs > 1 else 1, ("q",), size)
    seconds = time.perf_counter() - start
    trio.run(spool.aclose)
    return size / 1e6 / seconds if size else jobs / seconds


def _pg_round(cluster: PostgresCluster, tmp: Path, jobs: int, size: int) -> float:
    dsn = _db(cluster, "table")
    spool = _pg_spool(tmp, dsn)
    rate = _intake(spool, jobs, size)
    _check_pg(dsn, jobs, size, spool.config.chunk_size)
    return rate


def _local_round(tmp: Path, jobs: int, size: int) -> float:
    spool = Spool(tmp, fsync=True)
    spool.recover()
    rate = _intake(spool, jobs, size)
    _check_local(tmp, jobs, size)
    return rate


def _intake_rows(**_: Any) -> table.RowSpecs:
    return [(f"PostgreSQL spool: intake, 1 KiB, c=64 ({JOBS:,} jobs)",
             {"unit": "jobs/s", "baseline_name": "local spool, fsync always",
              "target": ">= 0.5x local", "min_ratio": 0.5})]


def _large_rows(**_: Any) -> table.RowSpecs:
    return [(f"PostgreSQL spool: one {BIG >> 20:,} MiB job's intake",
             {"unit": "MB/s", "baseline_name": "local spool, fsync always",
              "target": "(reported)"})]


def _delivery_rows(**_: Any) -> table.RowSpecs:
    return [(f"PostgreSQL spool: delivery, 2 nodes vs 1 ({DELIVER:,} jobs, "
             "4 queues of concurrency 4)",
             {"unit": "jobs/s", "baseline_name": "1 node", "target": ">= 1.5x one node",
              "min_ratio": 1.5})]


@pytest.mark.peers
@table.rows(_intake_rows)
def test_pg_intake(cluster: PostgresCluster, tmp_path: Path, benchmark: Any) -> None:
    (row,) = table.rows_for(_intake_rows)
    table.run(benchmark, row, ROUNDS,
              lambda i: _pg_round(cluster, tmp_path / f"pg{i}", JOBS, 0),
              lambda i: _local_round(tmp_path / f"local{i}", JOBS, 0))


@pytest.mark.peers
@table.rows(_large_rows)
def test_pg_large_job(cluster: PostgresCluster, tmp_path: Path, benchmark: Any) -> None:
    (row,) = table.rows_for(_large_rows)
    table.run(benchmark, row, ROUNDS,
              lambda i: _pg_round(cluster, tmp_path / f"pg{i}", 1, BIG),
              lambda i: _local_round(tmp_path / f"local{i}", 1, BIG))


def _deliver_round(cluster: PostgresCluster, tmp: Path, nodes: int,
                   sink: CountingSink) -> float:
    sink.take()
    rate = float(_deliver(cluster, tmp, nodes, sink))   # until the database has no job
    got, want = sink.take(), hashlib.sha256(PAYLOAD).digest()
    if len(got) != DELIVER or any(d != want for d in got):
        raise sinkcheck.SinkMismatch(
            f"{nodes} node(s): {len(got)} deliveries for {DELIVER} jobs, "
            f"{sum(d != want for d in got)} corrupt")
    return rate


@pytest.mark.peers
@table.rows(_delivery_rows)
def test_pg_delivery_two_nodes_vs_one(cluster: PostgresCluster, tmp_path: Path,
                                      benchmark: Any) -> None:
    (row,) = table.rows_for(_delivery_rows)
    sink = CountingSink()
    try:
        table.run(benchmark, row, ROUNDS,
                  lambda i: _deliver_round(cluster, tmp_path / f"two{i}", 2, sink),
                  lambda i: _deliver_round(cluster, tmp_path / f"one{i}", 1, sink))
    finally:
        sink.close()
