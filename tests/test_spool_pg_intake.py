"""The PostgreSQL spool's intake in one process: what each kind of job becomes in the database.

``PgSpool`` against a private cluster (``tests.peers.postgres``; skipped with
the reason without PostgreSQL), committing concurrently so jobs share
transactions: small jobs that intake kept in memory, jobs that spilled to
the body cache, a job large enough for a transaction of its own, several
data files and an empty one.  The rows and chunks are read back by SQL and
compared with the bytes sent; the body cache is checked for what it keeps;
the removals' own session (``relay.spoolpgloop``) is lost and reopened; and
the feeder's recount reads back only the jobs changed on another node.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio

from relay.dispatch import Scheduler
from relay.spoolformat import JobMeta
from relay.spoolpg import PgSpool
from relay.spoolpgconfig import SpoolConfig
from relay.spoolpgschema import init_db
from tests.peers.postgres import PostgresCluster

CHUNK = 64 << 10
# (data files' sizes) per job: in memory (<= 64 KiB in all), spilled to the
# cache (grouped with the others), over 4 chunks (its own transaction), none.
SHAPES = [(1024,), (10, 20, 0), (CHUNK - 200,), (100 << 10,), (CHUNK, 1), (300 << 10,), (0,)]


def _spool(cluster: PostgresCluster, tmp: Path) -> tuple[PgSpool, str]:
    import psycopg
    dsn = cluster.create_db(f"intake_{time.monotonic_ns()}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        init_db(conn)
    spool = PgSpool(tmp, SpoolConfig(backend="postgresql", dsn=dsn, pool_size=4,
                                     chunk_size=CHUNK))
    spool.recover()
    return spool, dsn


def _data(i: int, n: int, size: int) -> bytes:
    seed = hashlib.sha256(f"{i}.{n}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


async def _send(spool: PgSpool, copies: int) -> dict[str, list[bytes]]:
    """Every shape ``copies`` times, all at once; title -> the data files sent."""
    sent: dict[str, list[bytes]] = {}

    async def one(i: int, sizes: tuple[int, ...]) -> None:
        title = f"job{i:03d}"
        job = spool.begin(queue="q", wire_queue="q", peer="127.0.0.1:721")
        names = {}
        sent[title] = []
        for n, size in enumerate(sizes):
            data = _data(i, n, size)
            writer = job.open_data(f"df{chr(65 + n)}001h")
            for at in range(0, len(data), 7000):   # several writes, as from a socket
                writer.write(data[at:at + 7000])
            writer.close()
            names[f"df{chr(65 + n)}001h"] = "l"
            sent[title].append(data)
        job.set_control("cfA001h", f"Hh\nPu\nJ{title}\n".encode(), number="001", user="u",
                        host="h", title=title, job_name=title, formats=names)
        await spool.commit(job)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for c in range(copies):
                for s, sizes in enumerate(SHAPES):
                    nursery.start_soon(one, c * len(SHAPES) + s, sizes)
    return sent


def _stored(dsn: str) -> dict[str, list[bytes]]:
    """title -> each data file as the database holds it (its chunks in order)."""
    import psycopg
    with psycopg.connect(dsn) as conn:
        jobs = conn.execute("SELECT id, title, files, control FROM lpd_jobs").fetchall()
        chunks: dict[tuple[str, int], bytes] = {}
        for job_id, number, data in conn.execute(
                "SELECT job_id, file, data FROM lpd_chunks ORDER BY job_id, file, seq"):
            chunks[(job_id, number)] = chunks.get((job_id, number), b"") + bytes(data)
    out = {}
    for job_id, title, files, control in jobs:
        assert bytes(control) == f"Hh\nPu\nJ{title}\n".encode()
        out[title] = [chunks.get((job_id, f["n"]), b"") for f in files]
        assert [f["bytes"] for f in files] == [len(d) for d in out[title]]
    return out


def test_every_kind_of_job_is_stored_whole_in_shared_transactions(
        cluster: PostgresCluster, tmp_path: Path) -> None:
    spool, dsn = _spool(cluster, tmp_path)
    try:
        sent = trio.run(_send, spool, 6)
        stats = spool.statistics()
        # Another node delivers "q": nothing of its jobs stays in this node's cache.
        assert os.listdir(spool.jobs_dir) == []
    finally:
        trio.run(spool.aclose)
    assert _stored(dsn) == sent
    assert stats.commits == len(sent)
    assert stats.sync_calls < stats.commits / 2   # concurrent jobs shared their commits


def test_a_delivering_node_keeps_the_bodies_in_batch_files(cluster: PostgresCluster,
                                                           tmp_path: Path) -> None:
    spool, dsn = _spool(cluster, tmp_path)
    spool.leased = {"q"}   # as the feeder sets it once this node holds the queue
    try:
        sent = trio.run(_send, spool, 3)
        cached = os.listdir(spool.jobs_dir)
        jobs = {m.title: m for m in spool.jobs()}
        for title, files in sent.items():
            got = []
            for f in jobs[title].files:
                body = spool.open_body(f)
                try:
                    got.append(body.read())
                finally:
                    body.close()
            assert got == files
            control = spool.open_control(jobs[title])
            try:
                assert control.read() == f"Hh\nPu\nJ{title}\n".encode()
            finally:
                control.close()
    finally:
        trio.run(spool.aclose)
    # The in-memory jobs of a group share one file; spilled jobs have their own.
    batches = [n for n in cached if n.startswith("batch-")]
    small = sum(sum(sizes) <= CHUNK for sizes in SHAPES) * 3
    spilled = sum(len(sizes) + 1 for sizes in SHAPES if sum(sizes) > CHUNK) * 3
    assert 0 < len(batches) < small
    assert len(cached) - len(batches) == spilled   # their data files and control files
    assert _stored(dsn) == sent


def test_removals_reopen_their_session_after_losing_it(cluster: PostgresCluster,
                                                       tmp_path: Path) -> None:
    """A delivery's removals go over the event loop's own session; a session the
    server dropped fails one sync (the removals wait), and the next opens a new one."""
    import psycopg
    spool, dsn = _spool(cluster, tmp_path)

    def count() -> int:
        with psycopg.connect(dsn) as conn:
            return int(conn.execute("SELECT count(*) FROM lpd_jobs").fetchone()[0])

    async def main() -> list[int]:
        with trio.fail_after(30):
            return await steps()

    async def steps() -> list[int]:
        ids = [m.id for m in spool.jobs()]
        seen = []
        spool.remove(ids[0])
        await spool.sync()
        seen.append(count())
        assert spool._loop is not None and spool._loop._conn is not None
        pid = spool._loop._conn.pgconn.backend_pid
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        spool.remove(ids[1])
        await spool.sync()                 # the lost session: fails, the removal waits
        seen.append(spool.save_unsaved())
        await spool.sync()                 # a new session
        seen += [spool.save_unsaved(), count()]
        return seen

    try:
        trio.run(_send, spool, 1)
        total = count()
        seen = trio.run(main)
    finally:
        trio.run(spool.aclose)
    assert seen == [total - 1, 1, 0, total - 2]


def test_a_full_round_reads_back_only_the_jobs_changed_elsewhere(
        cluster: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gauges' recount compares the database with the spool's index: the jobs
    this node committed are there already; one held by another node is read again."""
    import psycopg

    from relay import spoolpgfeed
    spool, dsn = _spool(cluster, tmp_path)
    read: list[list[str]] = []
    real = spoolpgfeed.load_changed

    def counting(conn: Any, cache: str, seen: Mapping[str, tuple[str, str]]
                 ) -> tuple[dict[str, tuple[str, str]], list[JobMeta]]:
        now, changed = real(conn, cache, seen)
        read.append(sorted(m.id for m in changed))
        return now, changed

    monkeypatch.setattr(spoolpgfeed, "load_changed", counting)
    feeder = spoolpgfeed.Feeder(spool, cast(Scheduler, SimpleNamespace(runners={})))

    async def rounds() -> str:
        with trio.fail_after(30):
            await _send(spool, 1)
            await feeder._full_round()
            first = min(m.id for m in spool.jobs())
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("UPDATE lpd_jobs SET state = 'held' WHERE id = %s", (first,))
            await feeder._full_round()
            return first

    try:
        first = trio.run(rounds)
        assert spool.index is not None
        counts = dict(spool.index.counts())
    finally:
        trio.run(spool.aclose)
    assert read == [[], [first]]
    assert counts == {("q", "queued"): len(SHAPES) - 1, ("q", "held"): 1}
