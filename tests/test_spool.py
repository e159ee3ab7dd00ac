"""The durable spool (SPEC §4.4) on real files: commit/recover round trips, order and
ids across restarts, debris sweeping, delivery state, disk-full, group commit,
hostile wire names, and kill -9 of a real child process at random points."""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import orjson
import pytest
import trio

from relay.errors import DiskFull, SpoolError
from relay.spool import (
    ID_BLOCK,
    MAX_FILES_PER_JOB,
    SEGMENT_THRESHOLD,
    IncomingJob,
    JobMeta,
    Spool,
    SpoolBusy,
)

T = TypeVar("T")


def FileSpool(path: Path | str, **kw: object) -> Spool:
    """A spool that gives every job its own files (``segment_threshold=0``): the layout
    these tests read; small jobs as segment records are tests/test_spool_segjobs.py."""
    return Spool(path, **{"segment_threshold": 0, **kw})  # type: ignore[arg-type]


REPO = Path(__file__).resolve().parent.parent
CF = b"Hhost\nPalice\nJreport.txt\nldfA001host\nNreport.txt\nUdfA001host\n"


def build(spool: Spool, *, queue: str = "q", data: bytes = b"hello\n", data_first: bool = True,
          names: tuple[str, ...] = ("dfA001host",), title: str = "report") -> IncomingJob:
    """A complete job: one data file per name, control file before or after them."""
    job = spool.begin(queue=queue, wire_queue=queue.upper(), peer="10.0.0.9:721")
    control = {"name": "cfA001host", "raw": CF, "number": "001", "user": "alice",
               "host": "host", "title": title, "job_name": "report.txt",
               "formats": {n: "l" for n in names}}
    if not data_first:
        job.set_control(**control)  # type: ignore[arg-type]
    for name in names:
        writer = job.open_data(name)
        writer.write(data)
        assert writer.close() == len(data)
    if data_first:
        job.set_control(**control)  # type: ignore[arg-type]
    return job


async def commit_one(spool: Spool, **kw: object) -> JobMeta:
    return await spool.commit(build(spool, **kw))  # type: ignore[arg-type]


def run(fn: Callable[..., Awaitable[T]], *args: object, timeout: float = 10) -> T:
    """trio.run with a deadline, so no test can hang on the disk."""
    async def bounded() -> T:
        with trio.fail_after(timeout):
            return await fn(*args)
    return trio.run(bounded)


def commit(spool: Spool, **kw: object) -> JobMeta:
    return run(spool.commit, build(spool, **kw))  # type: ignore[arg-type]


def reopen(path: Path, **kw: object) -> tuple[Spool, list[JobMeta], int]:
    spool = FileSpool(path, **kw)
    rec = spool.recover()
    return spool, rec.jobs, rec.discarded


def close(spool: Spool) -> None:
    run(spool.aclose)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = FileSpool(tmp_path / "spool")
    s.recover()
    yield s
    close(s)


def job_files(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "spool" / "jobs").iterdir()}


# --- commit and recover -------------------------------------------------------------------

@pytest.mark.parametrize("method", ["syncfs", "fdatasync"])
def test_commit_then_recover_gives_the_same_jobmeta(tmp_path: Path, method: str) -> None:
    spool, jobs, _ = reopen(tmp_path / "spool", sync_method=method)

    async def main() -> list[JobMeta]:
        with trio.fail_after(10):
            return [await commit_one(spool, data_first=True),
                    await commit_one(spool, data_first=False, data=b"x" * 70_000,
                                     names=("dfA001host", "dfB001host"))]

    metas = trio.run(main)
    stats = spool.statistics()
    assert (stats.sync_method, stats.batches) == (method, 2)
    # syncfs: one call a batch; fdatasync: each file (data, control, metadata) + directory
    assert stats.sync_calls == (2 if method == "syncfs" else (3 + 1) + (4 + 1))
    close(spool)
    assert jobs == []
    spool, recovered, discarded = reopen(tmp_path / "spool")
    assert recovered == metas and discarded == 0
    second = recovered[1]
    assert [f.name for f in second.files] == ["dfA001host", "dfB001host"]
    assert second.total_bytes == 140_000 and second.control_bytes == len(CF)
    assert Path(second.files[1].path).read_bytes() == b"x" * 70_000
    assert Path(second.control_path).read_bytes() == CF
    assert (second.queue, second.wire_queue, second.peer) == ("q", "Q", "10.0.0.9:721")
    assert (second.user, second.title, second.number) == ("alice", "report", "001")
    close(spool)


def test_files_are_listed_in_control_file_order(spool: Spool) -> None:
    job = spool.begin(queue="q", wire_queue="q", peer="p")
    for name in ("dfB1h", "dfC1h", "dfA1h"):
        w = job.open_data(name)
        w.write(name.encode())
        w.close()
    job.set_control("cfA1h", b"x", number="1", user="", host="", title="", job_name="",
                    formats={"dfA1h": "f", "dfB1h": "l"})
    meta = run(spool.commit, job)
    assert [(f.name, f.format) for f in meta.files] == [("dfA1h", "f"), ("dfB1h", "l"),
                                                        ("dfC1h", "")]


def test_a_resent_data_file_supersedes_the_first(spool: Spool, tmp_path: Path) -> None:
    job = spool.begin(queue="q", wire_queue="q", peer="p")
    for payload in (b"first copy", b"second"):
        w = job.open_data("dfA1h")
        w.write(payload)
        w.close()
    job.set_control("cfA1h", b"x", number="1", user="", host="", title="", job_name="",
                    formats={})
    assert job.bytes == len(b"second") + 1
    meta = run(spool.commit, job)
    assert len(meta.files) == 1 and Path(meta.files[0].path).read_bytes() == b"second"
    assert sorted(job_files(tmp_path)) == sorted(
        [f"{meta.id}.json", f"{meta.id}.cf", os.path.basename(meta.files[0].path)])


def test_writer_accepts_memoryview_slices_and_direct_writes(spool: Spool) -> None:
    job = spool.begin(queue="q", wire_queue="q", peer="p")
    buf = bytearray(b"0123456789" * 1000)
    w = job.open_data("dfA1h")
    w.write(memoryview(buf)[10:5010])
    n = os.write(w.fileno(), b"tail")  # what the server does with splice
    w.add(n)
    assert job.bytes == 5004
    assert w.close() == 5004
    job.set_control("cfA1h", b"cf", number="1", user="", host="", title="", job_name="",
                    formats={})
    meta = run(spool.commit, job)
    assert Path(meta.files[0].path).read_bytes() == bytes(buf[10:5010]) + b"tail"


def test_commit_without_control_file_is_refused_and_leaves_nothing(
        spool: Spool, tmp_path: Path) -> None:
    job = spool.begin(queue="q", wire_queue="q", peer="p")
    w = job.open_data("dfA1h")
    w.write(b"data")
    w.close()
    with pytest.raises(SpoolError, match="no control file"):
        run(spool.commit, job)
    assert job_files(tmp_path) == set()
    assert spool.statistics().discarded == 1


def test_commit_with_an_open_data_file_is_refused(spool: Spool) -> None:
    job = build(spool)
    writer = job.open_data("dfB001host")
    with pytest.raises(SpoolError, match="still open"):
        run(spool.commit, job)
    writer.close()  # what the server's cleanup does: harmless after the discard
    assert spool.jobs() == []


def test_a_second_commit_of_the_same_job_keeps_the_first(spool: Spool) -> None:
    job = build(spool)
    meta = run(spool.commit, job)
    with pytest.raises(SpoolError, match="committed"):
        run(spool.commit, job)
    assert spool.jobs() == [meta]


def test_discard_removes_everything_and_is_idempotent(spool: Spool, tmp_path: Path) -> None:
    job = build(spool, data=b"z" * 5000)
    job.open_data("dfB001host").write(b"partial")
    job.discard()
    job.discard()
    assert job_files(tmp_path) == set()
    stats = spool.statistics()
    assert (stats.discarded, stats.discarded_bytes) == (1, 5000 + 7 + len(CF))
    with pytest.raises(SpoolError):
        job.open_data("dfC001host")


def test_discard_after_commit_keeps_the_job(spool: Spool) -> None:
    job = build(spool)
    meta = run(spool.commit, job)
    job.discard()
    assert spool.get(meta.id) == meta


def test_never_fsync_mode_commits_without_sync_calls(tmp_path: Path) -> None:
    spool, _, _ = reopen(tmp_path / "spool", fsync=False)
    meta = commit(spool)
    stats = spool.statistics()
    assert (stats.commits, stats.sync_calls, stats.sync_method) == (1, 0, "none")
    close(spool)
    assert reopen(tmp_path / "spool", fsync=False)[1] == [meta]


def test_text_that_is_not_utf8_is_stored_readably(spool: Spool) -> None:
    odd = b"caf\xe9".decode("utf-8", "surrogateescape")
    meta = commit(spool, title=odd)
    assert meta.title == "caf?"
    assert spool.get(meta.id) == meta


# --- order and ids --------------------------------------------------------------------------

def test_order_and_ids_continue_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    seen: list[str] = []
    for _ in range(3):
        spool, jobs, _ = reopen(path)
        assert [j.id for j in jobs] == seen
        seen += [commit(spool).id for _ in range(3)]
        close(spool)
    assert seen == sorted(seen) and len(set(seen)) == 9
    assert [int(i) for i in seen] == list(range(1, 10))  # a clean stop continues exactly


def test_ids_stay_unique_after_every_job_was_removed_and_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool, _, _ = reopen(path)
    first = [commit(spool).id for _ in range(3)]
    for job_id in first:
        spool.remove(job_id)
    # No aclose(): like kill -9, only the reserved block in next-id survives.
    os.close(spool._lock_fd)
    spool, jobs, _ = reopen(path)
    assert jobs == []
    new = commit(spool).id
    assert int(new) > int(first[-1]) and int(new) <= ID_BLOCK + 1
    close(spool)


def test_recovery_order_is_arrival_order_not_commit_order(spool: Spool, tmp_path: Path) -> None:
    early = build(spool)
    late = build(spool)

    async def main() -> None:
        with trio.fail_after(10):
            await spool.commit(late)
            await spool.commit(early)

    trio.run(main)
    close(spool)
    spool2, jobs, _ = reopen(tmp_path / "spool")
    assert [j.id for j in jobs] == [early.id, late.id]
    assert [j.id for j in spool2.jobs()] == [early.id, late.id]
    close(spool2)


# --- debris --------------------------------------------------------------------------------

def test_partial_jobs_are_discarded_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool, _, _ = reopen(path)
    good = commit(spool)
    short = commit(spool, data=b"s" * 100)
    garbled = commit(spool)
    unfinished = build(spool, data=b"u" * 300)          # never committed: no .json
    removed_state = commit(spool)
    close(spool)
    jobs_dir = path / "jobs"
    os.truncate(short.files[0].path, 40)                   # a file shorter than recorded
    (jobs_dir / f"{garbled.id}.json").write_bytes(b'{"v":1,"id":')   # torn metadata
    (jobs_dir / f".{good.id}.state.4242.tmp").write_bytes(b"{")      # stray temp file
    (jobs_dir / f".{unfinished.id}.json.tmp").write_bytes(b"{}")
    os.unlink(jobs_dir / f"{removed_state.id}.json")       # a removal cut short...
    for p in jobs_dir.glob(f"{removed_state.id}.*"):
        if not p.name.endswith(".json"):
            p.unlink()
    (jobs_dir / f"{removed_state.id}.state").write_bytes(b"{}")  # ...left only its state
    (jobs_dir / "README").write_text("not ours")

    spool, jobs, discarded = reopen(path)
    assert jobs == [good] and discarded == 3
    # data + control bytes of the short, garbled and unfinished jobs (the control
    # file of a job reaches the disk only at commit)
    assert spool.statistics().discarded_bytes == (40 + 6 + 300) + 2 * len(CF)
    assert job_files(tmp_path) == {f"{good.id}.json", f"{good.id}.cf",
                                   os.path.basename(good.files[0].path), "README"}
    close(spool)


def test_recovery_ignores_paths_smuggled_into_metadata(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    spool, _, _ = reopen(path)
    meta = commit(spool)
    close(spool)
    record = orjson.loads((path / "jobs" / f"{meta.id}.json").read_bytes())
    record["files"][0]["file"] = "../../victim"
    (path / "jobs" / f"{meta.id}.json").write_bytes(orjson.dumps(record))
    spool, jobs, discarded = reopen(path)
    assert (jobs, discarded) == ([], 1)
    assert victim.read_bytes() == b"keep"
    close(spool)


def test_hostile_wire_names_never_become_paths(spool: Spool, tmp_path: Path) -> None:
    names = ("../../etc/passwd", "/etc/shadow", "dfA\x00x", "..", "dfA/../../x")
    job = spool.begin(queue="../q", wire_queue="../../q", peer="p")
    for name in names:
        w = job.open_data(name)
        w.write(b"evil")
        w.close()
    job.set_control("../../cfA1h", b"cf", number="1", user="", host="", title="",
                    job_name="", formats={n: "l" for n in names})
    meta = run(spool.commit, job)
    assert [f.name for f in meta.files] == list(names)
    jobs_dir = str(tmp_path / "spool" / "jobs")
    for p in [meta.control_path, *(f.path for f in meta.files)]:
        assert os.path.dirname(p) == jobs_dir and os.path.basename(p).startswith(meta.id)
    everything = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}
    assert all(p.startswith("spool") for p in everything)
    assert spool.get(meta.id) == meta


def test_a_job_cannot_open_data_files_without_bound(spool: Spool) -> None:
    job = spool.begin(queue="q", wire_queue="q", peer="p")
    with pytest.raises(SpoolError, match="data files"):
        for _ in range(MAX_FILES_PER_JOB + 1):  # the same name re-sent over and over
            job.open_data("dfA1h").close()
    job.discard()


def test_recovery_leaves_directories_and_foreign_files_alone(tmp_path: Path) -> None:
    jobs_dir = tmp_path / "spool" / "jobs"
    (jobs_dir / "000000000001.d1").mkdir(parents=True)
    (jobs_dir / "notes.txt").write_text("x")
    spool, jobs, discarded = reopen(tmp_path / "spool")
    assert (jobs, discarded) == ([], 1)
    assert (jobs_dir / "000000000001.d1").is_dir() and (jobs_dir / "notes.txt").exists()
    assert commit(spool).id == "000000000002"  # ids skip whatever the directory shows
    close(spool)


def test_get_and_remove_refuse_ids_that_are_paths(spool: Spool, tmp_path: Path) -> None:
    (tmp_path / "x.json").write_bytes(b"{}")
    with pytest.raises(KeyError):
        spool.get("../x")
    spool.remove("../x")
    assert (tmp_path / "x.json").exists()


# --- delivery state, removal, listing --------------------------------------------------------

def test_update_persists_delivery_state_across_restarts(tmp_path: Path) -> None:
    spool, _, _ = reopen(tmp_path / "spool")
    meta = commit(spool)
    held = dataclasses.replace(meta, state="held", attempts=4, failures=2, destination=1,
                               next_attempt=1234.5, last_error="refused")
    spool.update(held)
    assert spool.get(meta.id) == held
    spool.update(dataclasses.replace(held, attempts=5), durable=True)
    close(spool)
    spool, jobs, _ = reopen(tmp_path / "spool")
    assert jobs == [dataclasses.replace(held, attempts=5)]
    assert orjson.loads((tmp_path / "spool" / "jobs" / f"{meta.id}.json").read_bytes())[
        "title"] == "report"  # immutable metadata untouched
    close(spool)


def test_a_torn_state_file_falls_back_to_defaults(spool: Spool, tmp_path: Path) -> None:
    meta = commit(spool)
    state = tmp_path / "spool" / "jobs" / f"{meta.id}.state"
    for raw in (b"", b"{", b"[1]", b'{"state":"exploded","attempts":"many"}'):
        state.write_bytes(raw)
        assert spool.get(meta.id) == meta


def test_update_refuses_unknown_states_and_removed_jobs(spool: Spool) -> None:
    meta = commit(spool)
    with pytest.raises(ValueError):
        spool.update(dataclasses.replace(meta, state="printing"))
    spool.remove(meta.id)
    with pytest.raises(KeyError):
        spool.update(meta)


def test_remove_is_idempotent_and_leaves_nothing(spool: Spool, tmp_path: Path) -> None:
    keep = commit(spool)
    gone = commit(spool)
    spool.update(dataclasses.replace(gone, attempts=1))
    spool.remove(gone.id)
    spool.remove(gone.id)
    with pytest.raises(KeyError):
        spool.get(gone.id)
    assert [j.id for j in spool.jobs()] == [keep.id]
    assert all(name.startswith(keep.id) for name in job_files(tmp_path))
    run(spool.sync)


def test_jobs_and_usage_by_queue_and_state(spool: Spool) -> None:
    a = commit(spool, queue="a")
    b = commit(spool, queue="b", data=b"x" * 1000)
    c = commit(spool, queue="b")
    spool.update(dataclasses.replace(c, state="held"))
    assert [j.id for j in spool.jobs("b")] == [b.id, c.id]
    assert spool.jobs("nope") == []
    usage = spool.usage()
    assert usage.jobs == 3
    assert usage.bytes == a.total_bytes + b.total_bytes + c.total_bytes + 3 * len(CF)
    assert usage.by_queue_state == {("a", "queued"): 1, ("b", "queued"): 1, ("b", "held"): 1}
    assert usage.free_bytes > 0


def test_a_reader_sees_changes_made_by_another_spool_object(tmp_path: Path) -> None:
    daemon, _, _ = reopen(tmp_path / "spool")
    meta = commit(daemon)
    cli = FileSpool(tmp_path / "spool")       # the CLI: no recover(), daemon still running
    with pytest.raises(SpoolBusy):
        cli.recover()
    cli.update(dataclasses.replace(meta, state="held"))
    assert daemon.get(meta.id).state == "held"
    cli.remove(meta.id)
    assert daemon.jobs() == []
    close(daemon)


def test_a_second_daemon_on_the_same_spool_is_refused(tmp_path: Path) -> None:
    first, _, _ = reopen(tmp_path / "spool")
    with pytest.raises(SpoolBusy):
        reopen(tmp_path / "spool")
    close(first)
    second, _, _ = reopen(tmp_path / "spool")
    close(second)


def test_begin_needs_recover_and_an_open_spool(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "spool")
    with pytest.raises(SpoolError, match="recover"):
        spool.begin(queue="q", wire_queue="q", peer="p")
    spool.recover()
    with pytest.raises(SpoolError, match="once"):
        spool.recover()
    close(spool)
    with pytest.raises(SpoolError, match="closed"):
        spool.begin(queue="q", wire_queue="q", peer="p")


# --- disk space ------------------------------------------------------------------------------

def test_disk_full_below_min_free_disk(tmp_path: Path) -> None:
    probe = FileSpool(tmp_path)
    free = probe.free_bytes()
    spool, _, _ = reopen(tmp_path / "spool", min_free_disk=free + (1 << 30))
    with pytest.raises(DiskFull):
        spool.begin(queue="q", wire_queue="q", peer="p")
    with pytest.raises(DiskFull):
        spool.check_space()
    close(spool)
    spool, _, _ = reopen(tmp_path / "spool", min_free_disk=free // 2)
    spool.check_space()
    with pytest.raises(DiskFull):
        spool.check_space(need=free)
    close(spool)


def test_enospc_while_writing_is_disk_full(spool: Spool, tmp_path: Path) -> None:
    job = spool.begin(queue="q", wire_queue="q", peer="p")
    writer = job.open_data("dfA1h")
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, writer.fileno())  # the kernel now answers ENOSPC to every write
    finally:
        os.close(full)
    with pytest.raises(DiskFull):
        writer.write(b"x" * 4096)
    writer.close()
    job.discard()
    assert job_files(tmp_path) == set()


# --- concurrency and group commit --------------------------------------------------------------

def test_64_concurrent_commits_share_flushes(spool: Spool) -> None:
    jobs = [build(spool) for _ in range(64)]  # received; now all commit at once

    async def main() -> list[JobMeta]:
        results: list[JobMeta] = []

        async def one(job: IncomingJob) -> None:
            results.append(await spool.commit(job))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for job in jobs:
                    nursery.start_soon(one, job)
        return results

    metas = trio.run(main)
    stats = spool.statistics()
    assert len({m.id for m in metas}) == 64 and stats.commits == 64
    # The first commit flushes alone; the others queue behind it and share.
    assert stats.batches <= 4 and stats.sync_calls <= 5 and stats.largest_batch >= 32
    assert [j.id for j in spool.jobs()] == sorted(m.id for m in metas)


def test_commits_racing_with_receiving_still_batch(spool: Spool) -> None:
    async def main() -> None:
        async def worker() -> None:
            for _ in range(8):
                await commit_one(spool)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(32):
                    nursery.start_soon(worker)

    trio.run(main)
    stats = spool.statistics()
    assert stats.commits == 256 and stats.batches < stats.commits // 2


def test_cancelled_commits_leave_no_job_and_in_flight_ones_complete(
        spool: Spool, tmp_path: Path) -> None:
    returned: list[JobMeta] = []

    async def one(job: IncomingJob) -> None:
        returned.append(await spool.commit(job))

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(one, build(spool))
                for _ in range(10_000):  # until the first flush is in its thread
                    await trio.lowlevel.checkpoint()
                    if spool.statistics().batches or spool._group._flushing is not None:
                        break
                nursery.cancel_scope.cancel()

    trio.run(main)
    stats = spool.statistics()
    # The flush already running finishes and its commits return; every other
    # commit raised Cancelled and took its job with it.
    assert returned and stats.discarded and stats.commits + stats.discarded == 20
    assert sorted(j.id for j in spool.jobs()) == sorted(m.id for m in returned)
    assert len(job_files(tmp_path)) == 3 * len(returned)


def test_large_job_streams_through_writeback(spool: Spool) -> None:
    block = os.urandom(1 << 20)
    job = spool.begin(queue="q", wire_queue="q", peer="p")
    w = job.open_data("dfA1h")
    for _ in range(20):
        w.write(block)
    assert w.close() == 20 << 20
    job.set_control("cfA1h", b"cf", number="1", user="", host="", title="", job_name="",
                    formats={})
    meta = run(spool.commit, job)
    with open(meta.files[0].path, "rb") as f:
        f.seek(19 << 20)
        assert f.read() == block


# --- kill -9 ------------------------------------------------------------------------------------

CHILD = r"""
import sys, trio
from relay.spool import Spool

def payload(n):
    return (b"%d:" % n) * (1 + (n * 7919) % 20000)

async def main(path, threshold):
    spool = Spool(path, segment_threshold=int(threshold))
    spool.recover()
    async def worker(w):
        for i in range(400):
            job = spool.begin(queue="q", wire_queue="q", peer="p")
            n = int(job.id)
            if n % 2:
                job.set_control("cfA1h", b"cf%d" % n, number="1", user=str(n), host="h",
                                title="", job_name="", formats={"dfA1h": "l"})
            writer = job.open_data("dfA1h")
            writer.write(payload(n))
            writer.close()
            if not n % 2:
                job.set_control("cfA1h", b"cf%d" % n, number="1", user=str(n), host="h",
                                title="", job_name="", formats={"dfA1h": "l"})
            meta = await spool.commit(job)
            print(meta.id, flush=True)
    async with trio.open_nursery() as nursery:
        for w in range(16):
            nursery.start_soon(worker, w)

trio.run(main, sys.argv[1], sys.argv[2])
"""


def child_payload(n: int) -> bytes:
    return (b"%d:" % n) * (1 + (n * 7919) % 20000)


async def run_and_kill(path: Path, script: Path, rng: random.Random,
                       threshold: int = 0) -> list[str]:
    """Start the child, kill -9 it after a random number of acknowledged jobs."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(script), str(path), str(threshold)], stdout=-1, env=env)
    assert proc.stdout is not None
    kill_after = rng.randint(1, 150)
    out = b""
    with trio.fail_after(30):
        while out.count(b"\n") < kill_after:
            chunk = await proc.stdout.receive_some()
            assert chunk, "child ended early"
            out += chunk
        await trio.sleep(rng.random() * 0.02)
        proc.kill()  # SIGKILL
        while chunk := await proc.stdout.receive_some():
            out += chunk  # ids printed before the kill landed: acknowledged too
        await proc.wait()
    return [line for line in out.decode().split("\n") if line]


# Payloads run from 2 bytes to ~120 KB: under the default threshold about half
# the jobs are segment records and half have files, committed side by side.
@pytest.mark.parametrize("threshold", [0, SEGMENT_THRESHOLD], ids=["files", "mixed"])
def test_kill_9_at_random_points_loses_no_acknowledged_job(tmp_path: Path,
                                                          threshold: int) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path = tmp_path / "spool"
    acked: list[str] = []
    for _ in range(4):
        acked += trio.run(run_and_kill, path, script, rng, threshold)
        spool, jobs, _ = reopen(path, segment_threshold=threshold)
        found = {j.id: j for j in jobs}
        assert len(acked) == len(set(acked)), f"id reused (seed {seed})"
        assert set(acked) <= set(found), f"acknowledged job lost (seed {seed})"
        for job in jobs:
            n = int(job.id)
            with spool.open_body(job.files[0]) as body:
                assert body.read() == child_payload(n), f"seed {seed}"
            with spool.open_control(job) as body:
                assert body.read() == b"cf%d" % n
            assert job.user == str(n)
        filed = [j for j in jobs if Path(j.control_path).parent.name == "jobs"]
        assert not threshold or len(filed) < len(jobs), "no job became a segment record"
        assert all(j.total_bytes + j.control_bytes > threshold for j in filed), f"seed {seed}"
        live = {f"{j.id}.{k}" for j in filed for k in ("json", "cf")} | {
            os.path.basename(j.files[0].path) for j in filed}
        assert job_files(tmp_path) == live, f"partial job survived (seed {seed})"
        close(spool)
