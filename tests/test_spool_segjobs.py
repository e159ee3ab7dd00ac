"""Small jobs as segment records (relay.spoolsegjobs) through the whole Spool, on real
files: no file per job, one fdatasync per batch, recovery merging records with job files
in arrival order, state and removal as records, the CLI's view beside the daemon and its
changes with the daemon stopped, torn tails at every byte offset, a long-held job moved
forward, a disk that refuses appends, and the cmd sink reading a body at an offset."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import threading
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import relay.spoolsegjobs
from relay.errors import SpoolError
from relay.sinks import SinkContext, make_sink
from relay.spool import FileMeta, JobMeta, Spool
from relay.spoolformat import encode_job
from relay.spoolsegjobs import MOVE_AFTER, _record_bound
from relay.spoolsegment import RECORD, read_only
from relay.uri import parse_destination
from tests.test_spool import build, run

SMALL = b"small job\n" * 10


def opened(path: Path, **kw: object) -> tuple[Spool, list[JobMeta]]:
    spool = Spool(path, **kw)  # type: ignore[arg-type]
    return spool, spool.recover().jobs


def commit(spool: Spool, data: bytes = SMALL, hold: str = "") -> JobMeta:
    return run(lambda: spool.commit(build(spool, data=data), hold=hold))


def body(spool: Spool, job: JobMeta) -> tuple[bytes, bytes]:
    with spool.open_control(job) as cf, spool.open_body(job.files[0]) as df:
        return cf.read(), df.read()


def segments(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "segments").iterdir())


def test_a_small_job_is_one_record_and_comes_back_the_same(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path / "spool")
    meta = commit(spool)
    assert list((tmp_path / "spool" / "jobs").iterdir()) == []    # no file of its own
    assert Path(meta.control_path).parent.name == "segments"       # a body name, not a file
    assert not Path(meta.control_path).exists()
    stats = spool.statistics()
    assert (stats.batches, stats.sync_calls) == (1, 2)   # fdatasync + the new segment's name
    assert body(spool, meta)[1] == SMALL
    run(spool.aclose)
    again, jobs = opened(tmp_path / "spool")
    assert jobs == [meta] and again.get(meta.id) == meta
    assert body(again, meta) == (build(again).control_raw, SMALL)
    run(again.aclose)


def test_ids_keep_arrival_order_across_records_and_files(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path / "spool")
    large = b"L" * 70_000                      # over the threshold: files of its own

    async def main() -> list[str]:
        first, second, third = build(spool), build(spool, data=large), build(spool)
        return [(await spool.commit(j)).id for j in (third, second, first)]

    committed = run(main)
    assert [j.id for j in spool.jobs()] == sorted(committed)
    run(spool.aclose)
    again, jobs = opened(tmp_path / "spool")
    assert [j.id for j in jobs] == sorted(committed)
    assert [Path(j.control_path).parent.name for j in jobs] == ["segments", "jobs", "segments"]
    assert body(again, jobs[1])[1] == large and body(again, jobs[2])[1] == b"hello\n"
    run(again.aclose)


def test_state_hold_and_removal_are_records_that_survive_restarts(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path / "spool")
    a, b, c = commit(spool), commit(spool), commit(spool, hold="queue disabled")
    spool.update(dataclasses.replace(a, attempts=3, last_error="refused"))
    spool.update(dataclasses.replace(b, state="held", last_error="gave up"), durable=True)
    spool.remove(a.id)
    run(spool.sync)
    run(spool.aclose)
    again, jobs = opened(tmp_path / "spool")
    assert [(j.id, j.state, j.last_error) for j in jobs] == [
        (b.id, "held", "gave up"), (c.id, "held", "queue disabled")]
    assert list((tmp_path / "spool" / "jobs").iterdir()) == []
    with pytest.raises(KeyError):
        again.update(dataclasses.replace(a, attempts=4))
    run(again.aclose)


def test_the_cli_reads_beside_the_daemon_and_appends_only_when_it_is_stopped(
        tmp_path: Path) -> None:
    daemon, _ = opened(tmp_path / "spool")
    job = commit(daemon, hold="gave up")
    cli = Spool(tmp_path / "spool")               # no recover(): the CLI
    assert cli.get(job.id).state == "held" and [j.id for j in cli.jobs()] == [job.id]
    with pytest.raises(SpoolError):               # only the lock holder appends
        cli.update(dataclasses.replace(job, state="queued"))
    daemon.update(dataclasses.replace(job, state="queued"))   # what `spool retry` asks for
    assert cli.get(job.id).state == "queued"      # seen at once: a consistent prefix
    run(daemon.aclose)
    cli.update(dataclasses.replace(job, state="held", last_error="by hand"))  # daemon stopped
    assert cli.get(job.id).last_error == "by hand"
    cli.remove(job.id)
    assert cli.jobs() == []
    again, jobs = opened(tmp_path / "spool")
    assert jobs == []
    run(again.aclose)


def record_bounds(path: Path) -> list[tuple[int, int]]:
    """(start, end) of each record in the spool's only segment."""
    records = read_only(str(path / "segments"))
    return [(r.offset - RECORD.size, r.offset + len(r.body)) for r in records]


@pytest.mark.parametrize("zeros", [False, True], ids=["cut", "cut-then-zeros"])
def test_a_torn_last_record_at_every_byte_offset_loses_only_that_job(
        tmp_path: Path, zeros: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay.spoolsegjobs, "SEGMENT_SIZE", 16 << 10)  # quick to copy
    spool, _ = opened(tmp_path / "spool", fsync=False)
    kept, torn = commit(spool, data=b"a" * 40), commit(spool, data=b"b" * 40)
    run(spool.aclose)
    (seg,) = segments(tmp_path / "spool")
    original = (tmp_path / "spool" / "segments" / seg).read_bytes()
    (_, end_kept), (start, end) = record_bounds(tmp_path / "spool")
    assert end_kept == start
    for cut in range(start, end):   # every byte of the last record, bounded by its size
        trial = tmp_path / f"trial{cut}"
        (trial / "segments").mkdir(parents=True)
        data = original[:cut] + (b"\0" * (len(original) - cut) if zeros else b"")
        (trial / "segments" / seg).write_bytes(data)
        shutil.copy(tmp_path / "spool" / "next-id", trial / "next-id")
        again, jobs = opened(trial, fsync=False)
        assert [j.id for j in jobs] == [kept.id], f"cut at {cut}"
        assert body(again, jobs[0])[1] == b"a" * 40
        if cut % 16 == 0:                # appends go to a new segment, ids move on
            after = commit(again)
            assert int(after.id) > int(torn.id) and body(again, after)[1] == SMALL
        run(again.aclose)
        shutil.rmtree(trial)
    whole, jobs = opened(tmp_path / "spool", fsync=False)
    assert [j.id for j in jobs] == [kept.id, torn.id]
    run(whole.aclose)


def test_a_thousand_small_jobs_create_files_per_segment_not_per_job(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path / "spool")
    calls: list[tuple[str, bool]] = []
    main = threading.get_ident()
    real = {name: getattr(os, name) for name in ("open", "rename", "statvfs", "fsync",
                                                  "fdatasync")}

    def spy(name: str):  # type: ignore[no-untyped-def]
        def call(*args, **kw):  # type: ignore[no-untyped-def]
            creates = name != "open" or bool(args[1] & os.O_CREAT)
            if creates:
                calls.append((name, threading.get_ident() == main))
            return real[name](*args, **kw)
        return call

    async def many() -> None:
        async def worker() -> None:
            for _ in range(1000 // 50):
                await spool.commit(build(spool, data=os.urandom(1024)))
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(worker)

    commit(spool)   # the first segment and the first free-space reading
    syncfs: list[object] = []
    with pytest.MonkeyPatch.context() as mp:
        for name in real:
            mp.setattr(os, name, spy(name))
        mp.setattr(spool._syncer, "sync", syncfs.append)
        run(many, timeout=120)
    assert len(spool.jobs()) == 1001
    assert list((tmp_path / "spool" / "jobs").iterdir()) == []
    assert len(segments(tmp_path / "spool")) <= 2          # 1001 records of ~1.2 KB
    on_loop = [name for name, loop in calls if loop]
    assert on_loop == [], on_loop                           # no create/rename/statfs/fsync
    assert syncfs == []                                     # fdatasync of the segment only
    assert len([n for n, _ in calls if n == "fsync"]) <= 2  # the id block's directory entry
    stats = spool.statistics()
    assert stats.sync_calls <= stats.batches + 2            # one per batch (+ new segment)
    run(spool.aclose)


def test_a_long_held_job_moves_forward_and_lets_old_segments_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay.spoolsegjobs, "SEGMENT_SIZE", 64 << 10)
    spool, _ = opened(tmp_path / "spool")
    held = commit(spool, data=b"held\n" * 100, hold="destination refused it")

    async def traffic() -> None:   # jobs delivered as they come: each removed, then synced
        for i in range(300):
            meta = await spool.commit(build(spool, data=b"%d" % i * 1000))
            spool.remove(meta.id)
            await spool.sync()

    run(traffic, timeout=60)
    live = segments(tmp_path / "spool")
    assert len([n for n in live if n.endswith(".seg")]) <= MOVE_AFTER + 2, live
    assert spool.get(held.id).state == "held"
    assert body(spool, spool.get(held.id))[1] == b"held\n" * 100
    run(spool.aclose)
    again, jobs = opened(tmp_path / "spool")
    assert [(j.id, j.state, j.last_error) for j in jobs] == [
        (held.id, "held", "destination refused it")]
    assert body(again, jobs[0])[1] == b"held\n" * 100
    run(again.aclose)


def test_a_refused_append_is_kept_in_memory_and_written_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, _ = opened(tmp_path / "spool")
    a, b = commit(spool), commit(spool)
    real = os.pwritev

    def full(fd: int, buffers: list[bytes], offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    spool.update(dataclasses.replace(a, state="held", last_error="x"))   # does not raise
    spool.remove(b.id)
    assert spool.get(a.id).state == "held" and [j.id for j in spool.jobs()] == [a.id]
    assert spool.save_unsaved() == 2
    monkeypatch.setattr(os, "pwritev", real)
    assert spool.save_unsaved() == 0
    run(spool.aclose)
    again, jobs = opened(tmp_path / "spool")
    assert [(j.id, j.state) for j in jobs] == [(a.id, "held")]
    run(again.aclose)


def test_a_batch_removal_is_one_write_and_survives_restarts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, _ = opened(tmp_path / "spool")
    jobs = [commit(spool) for _ in range(5)]
    writes: list[int] = []
    real = os.pwritev

    def counted(fd: int, buffers: list[bytes], offset: int) -> int:
        writes.append(len(buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", counted)
    spool.remove_many([j.id for j in jobs[1:4]] + ["../../etc/passwd"])
    assert writes == [3]                                   # three DONE records, one write
    assert [j.id for j in spool.jobs()] == [jobs[0].id, jobs[4].id]
    with pytest.raises(KeyError):
        spool.get(jobs[2].id)
    run(spool.aclose)
    again, left = opened(tmp_path / "spool")
    assert [j.id for j in left] == [jobs[0].id, jobs[4].id]
    run(again.aclose)


def test_a_refused_batch_removal_keeps_each_job_owed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, _ = opened(tmp_path / "spool")
    a, b, c = commit(spool), commit(spool), commit(spool)
    real = os.pwritev

    def full(fd: int, buffers: list[bytes], offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    spool.remove_many([a.id, c.id])                        # does not raise
    assert [j.id for j in spool.jobs()] == [b.id]          # gone for the daemon at once
    assert spool.save_unsaved() == 2
    monkeypatch.setattr(os, "pwritev", real)
    assert spool.save_unsaved() == 0
    run(spool.aclose)
    again, left = opened(tmp_path / "spool")
    assert [j.id for j in left] == [b.id]
    run(again.aclose)


_TEXT = st.text(max_size=40)


@settings(max_examples=300, deadline=None)
@given(fields=st.lists(_TEXT, min_size=9, max_size=9), received=st.floats(allow_nan=False),
       files=st.lists(st.tuples(_TEXT, _TEXT, st.integers(0, 2**63)), max_size=8))
def test_the_fits_check_bounds_the_record_without_encoding_it(
        fields: list[str], received: float, files: list[tuple[str, str, int]]) -> None:
    job_id, queue, wire, peer, name, number, user, host, title = fields
    meta = JobMeta(id=job_id, queue=queue, wire_queue=wire, peer=peer, received=received,
                   control_name=name, control_path=f"/s/{job_id}.cf", number=number,
                   user=user, host=host, title=title, job_name=title, tls_peer=user,
                   control_bytes=2**63,
                   files=tuple(FileMeta(name=n, format=f, bytes=b, path=f"/s/{n}")
                               for n, f, b in files))
    assert len(encode_job(meta)) <= _record_bound(meta)


def test_state_and_removal_need_no_new_blocks_inside_the_current_segment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, _ = opened(tmp_path / "spool")
    a, b = commit(spool), commit(spool)
    blocks = os.stat(tmp_path / "spool" / "segments" / segments(tmp_path / "spool")[0]).st_blocks

    def no_space(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)   # no new segment could start
    spool.update(dataclasses.replace(a, attempts=1, last_error="down"))
    spool.remove(b.id)
    assert spool.save_unsaved() == 0                      # both went into the segment
    (seg,) = segments(tmp_path / "spool")
    assert os.stat(tmp_path / "spool" / "segments" / seg).st_blocks == blocks
    run(spool.aclose)


def test_the_cmd_sink_feeds_a_body_from_inside_a_segment(tmp_path: Path) -> None:
    spool, _ = opened(tmp_path / "spool")
    first, second = commit(spool, data=b"first\n"), commit(spool, data=b"second job\n")
    out = tmp_path / "printed"
    sink = make_sink(parse_destination(f"cmd:sh -c 'cat > {out}'"),
                     SinkContext(bodies=spool))
    run(lambda: sink.deliver(second))
    assert out.read_bytes() == b"second job\n"      # exactly its range, not the segment
    fallback = make_sink(parse_destination(f"cmd:sh -c 'cat > {out}'"))   # no bodies given
    run(lambda: fallback.deliver(first))
    assert out.read_bytes() == b"first\n"
    run(spool.aclose)
