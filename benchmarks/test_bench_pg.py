"""The PostgreSQL spool against the local one, as ratios measured in the same run.

Three cases (SPEC §10, docs/spool.md "PostgreSQL"), on a private cluster
(``tests.peers.postgres``) with PostgreSQL's own durability (fsync on,
``synchronous_commit = on`` in the relay's sessions):

- intake of 1-KiB jobs at concurrency 64, ``PgSpool`` vs the local spool with
  ``fsync = "always"`` (2,000 x ``LPD_BENCH_SCALE`` jobs; target >= 0.5);
- one large job's intake in MB/s (1 GiB x ``LPD_BENCH_SCALE``), both spools;
- delivery by two relay processes vs one from a database pre-filled with jobs
  of four queues (``concurrency = 4`` each), to a destination that only reads and discards
  (``socket://``), timed from the relays' start until the spool is empty
  (target >= 1.5x).

Quick smoke run:  LPD_BENCH_SCALE=0.01 pytest benchmarks/test_bench_pg.py --benchmark-disable
"""

from __future__ import annotations

import hashlib
import os
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio

from benchmarks.report import print_lines
from relay.spool import Spool
from relay.spoolpg import PgSpool
from relay.spoolpgconfig import SpoolConfig
from relay.spoolpgschema import init_db
from tests.daemon import relay_config, write_config_file
from tests.peers.postgres import PostgresCluster, require_postgres
from tests.relayproc import LoggedRelay, wait_until

SCALE = float(os.environ.get("LPD_BENCH_SCALE", "1.0"))
JOBS = max(64, int(2000 * SCALE))
BIG = max(4 << 20, int((1 << 30) * SCALE))
DELIVER = max(40, int(2000 * SCALE))
QUEUES = ("q0", "q1", "q2", "q3")
# Deliveries a queue may have in flight in the whole cluster.  At 1, the four
# queues allow four deliveries in flight whatever the number of nodes, so a
# second node could only add CPU: the row would measure per-queue order, not
# what a node adds.  At 4 (16 in flight), one node is limited by its own
# database round trips and a second node brings its own (docs/scaling.md).
CONCURRENCY = 4
PAYLOAD = os.urandom(1024)
CF = b"Hbench\nPbench\nldfA001bench\nNbench\n"
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[PostgresCluster]:
    require_postgres()
    with PostgresCluster() as pg:
        yield pg
    print_lines(request, _lines)


def _lines() -> list[str]:
    if not RESULTS:
        return []
    lines = [f"postgresql spool (LPD_BENCH_SCALE={SCALE}):"]
    lines += [f"  {name:44s} {value:10.1f}" for name, value in RESULTS.items()]
    pairs = [("intake 1KiB c64 pg jobs/s", "intake 1KiB c64 local jobs/s", ">= 0.5"),
             ("large job pg MB/s", "large job local MB/s", ""),
             ("delivery 2 nodes jobs/s", "delivery 1 node jobs/s", ">= 1.5")]
    for a, b, target in pairs:
        if a in RESULTS and b in RESULTS:
            lines.append(f"ratio {a} / {b}: {RESULTS[a] / RESULTS[b]:.2f}x"
                         + (f" (target {target})" if target else ""))
    return lines


def _db(pg: PostgresCluster, name: str) -> str:
    dsn = pg.create_db(f"{name}_{time.monotonic_ns()}")
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        init_db(conn)
    return dsn


def _pg_spool(directory: Path, dsn: str) -> PgSpool:
    spool = PgSpool(directory, SpoolConfig(backend="postgresql", dsn=dsn, pool_size=8))
    spool.recover()
    return spool


async def _commit(spool: Any, count: int, concurrency: int, queues: tuple[str, ...] = ("q",),
                  size: int = 0) -> None:
    async def worker(first: int, n: int) -> None:
        for i in range(first, first + n):
            queue = queues[i % len(queues)]
            job = spool.begin(queue=queue, wire_queue=queue, peer="127.0.0.1:721")
            writer = job.open_data("dfA001bench")
            left = size or len(PAYLOAD)
            chunk = PAYLOAD * 1024 if size else PAYLOAD
            while left > 0:
                writer.write(memoryview(chunk)[:left])
                left -= len(chunk)
            writer.close()
            job.set_control("cfA001bench", CF, number="001", user="bench", host="bench",
                            title=f"job{i}", job_name="", formats={"dfA001bench": "l"})
            await spool.commit(job)

    with trio.fail_after(900):
        async with trio.open_nursery() as nursery:
            per = count // concurrency
            for c in range(concurrency):
                n = per + (c < count % concurrency)
                nursery.start_soon(worker, c * per + min(c, count % concurrency), n)


def _timed(spool: Any, count: int, concurrency: int, size: int = 0) -> float:
    start = time.perf_counter()
    trio.run(_commit, spool, count, concurrency, ("q",), size)
    elapsed = time.perf_counter() - start
    trio.run(spool.aclose)
    return elapsed


pytestmark = pytest.mark.timeout(1800)   # full size on a busy machine: minutes


def test_intake_small_jobs_c64(benchmark: Any, cluster: PostgresCluster,
                               tmp_path: Path) -> None:
    def measure() -> None:
        local = Spool(tmp_path / "local", fsync=True)
        local.recover()
        RESULTS["intake 1KiB c64 local jobs/s"] = JOBS / _timed(local, JOBS, 64)
        pg = _pg_spool(tmp_path / "pg", _db(cluster, "intake"))
        RESULTS["intake 1KiB c64 pg jobs/s"] = JOBS / _timed(pg, JOBS, 64)
        stats = pg.statistics()
        RESULTS["intake pg jobs per transaction"] = stats.commits / max(1, stats.sync_calls)
    benchmark.pedantic(measure, rounds=1, iterations=1)
    assert RESULTS["intake 1KiB c64 pg jobs/s"] > 0


def test_intake_large_job(benchmark: Any, cluster: PostgresCluster, tmp_path: Path) -> None:
    def measure() -> None:
        local = Spool(tmp_path / "local", fsync=True)
        local.recover()
        RESULTS["large job local MB/s"] = BIG / 1e6 / _timed(local, 1, 1, BIG)
        pg = _pg_spool(tmp_path / "pg", _db(cluster, "large"))
        RESULTS["large job pg MB/s"] = BIG / 1e6 / _timed(pg, 1, 1, BIG)
    benchmark.pedantic(measure, rounds=1, iterations=1)
    assert RESULTS["large job pg MB/s"] > 0


class CountingSink:
    """A ``socket://`` destination that is never the bottleneck: each connection is one
    job; its bytes are hashed and the digest kept.

    One thread serves every connection through ``selectors`` (epoll): a thread
    per connection cost the benchmark's process about 520 us of CPU per job,
    a fifth of what the whole delivery cost the machine, taken from the relays
    it measures.
    """

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.digests: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, None)
        sel.register(self._stop[0], selectors.EVENT_READ, None)
        while True:
            for key, _ in sel.select():
                if key.fileobj is self._stop[0]:
                    for k in list(sel.get_map().values()):
                        if k.data is not None:
                            k.data[0].close()
                    sel.close()
                    return
                if key.fileobj is self.sock:
                    self._accept(sel)
                else:
                    self._read(sel, *key.data)

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(64):   # bounded: the rest at the next wakeup
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ, (conn, hashlib.sha256()))

    def _read(self, sel: selectors.BaseSelector, conn: socket.socket, digest: Any) -> None:
        try:
            data = conn.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            digest.update(data)
            return
        sel.unregister(conn)
        conn.close()
        with self._lock:
            self.digests.append(digest.digest())

    def take(self) -> list[bytes]:
        """The digests so far, forgotten here (the next round starts from none)."""
        with self._lock:
            got, self.digests = self.digests, []
        return got

    def close(self) -> None:
        self._stop[1].send(b"x")
        self._thread.join(timeout=10)
        self.sock.close()
        for s in self._stop:
            s.close()


def _deliver(cluster: PostgresCluster, tmp: Path, nodes: int, sink: CountingSink) -> float:
    dsn = _db(cluster, f"deliver{nodes}")
    fill = _pg_spool(tmp / "fill", dsn)
    trio.run(_commit, fill, DELIVER, 16, QUEUES)
    trio.run(fill.aclose)
    dest = [f"socket://127.0.0.1:{sink.port}"]
    relays = []
    for n in range(nodes):
        queues = {q: {"destinations": dest, "concurrency": CONCURRENCY} for q in QUEUES}
        data = relay_config(tmp / f"n{n}", queues=queues,
                            spool={"backend": "postgresql", "dsn": dsn, "lease_time": "2s",
                                   "node": f"n{n}"})
        relays.append(LoggedRelay(write_config_file(tmp / f"n{n}.toml", data)))
    try:
        with ThreadPoolExecutor(nodes) as pool:   # together: the clock runs once all are up
            list(pool.map(lambda r: r.start(), relays))
        start = time.perf_counter()
        # One connection polled every 50 ms: a psql process per poll would compete
        # with the relays for the CPUs it measures.
        import psycopg
        with psycopg.connect(dsn, autocommit=True) as conn:
            wait_until(lambda: conn.execute("SELECT NOT EXISTS (SELECT FROM lpd_jobs)"
                                            ).fetchone()[0], timeout=900, step=0.05)
        return DELIVER / (time.perf_counter() - start)
    finally:
        for relay in relays:
            relay.terminate()


def test_delivery_two_nodes_vs_one(benchmark: Any, cluster: PostgresCluster,
                                   tmp_path: Path) -> None:
    sink = CountingSink()

    def measure() -> None:
        RESULTS["delivery 1 node jobs/s"] = _deliver(cluster, tmp_path / "one", 1, sink)
        RESULTS["delivery 2 nodes jobs/s"] = _deliver(cluster, tmp_path / "two", 2, sink)
    try:
        benchmark.pedantic(measure, rounds=1, iterations=1)
    finally:
        sink.close()
    assert RESULTS["delivery 2 nodes jobs/s"] > 0
