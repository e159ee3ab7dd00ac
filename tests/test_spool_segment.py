"""The segment log (relay.spoolsegment) on real files: round trips, a torn tail cut at
every byte offset of a record, flipped bytes, recycled segments whose old records must
not come back, oldest-first collection, and a failed write sealing its segment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay import spoolsegment
from relay.spoolsegment import (
    DONE,
    HEADER,
    JOB,
    RECORD,
    STATE,
    Record,
    SegmentLog,
    fold,
    job_body,
    job_meta,
    read_only,
    scan,
    segment_name,
)


def opened(path: Path, **kw: int) -> tuple[SegmentLog, list[Record]]:
    log = SegmentLog(str(path), **kw)  # type: ignore[arg-type]
    return log, log.replay()


@pytest.fixture
def seg_dir(tmp_path: Path) -> Path:
    return tmp_path / "segments"


@pytest.fixture
def log(seg_dir: Path) -> Iterator[SegmentLog]:
    log, records = opened(seg_dir)
    assert records == []
    yield log
    log.close()


def summary(records: list[Record]) -> list[tuple[int, int, bytes]]:
    return [(r.type, r.job, r.body) for r in records]


def test_records_come_back_in_order_and_bodies_read_through_the_descriptor(
        log: SegmentLog, seg_dir: Path) -> None:
    body = job_body(b'{"id":"7"}', b"Hhost\nPalice\n", [b"data one", b"two"])
    job = log.append(JOB, 7, body)
    log.append(STATE, 7, [b'{"state":"held"}'])
    log.append(JOB, 8, job_body(b"{}", b"cf", [b"x"]))
    log.append(DONE, 8)
    assert log.sync() == 2          # the segment, and the directory naming it
    assert log.sync() == 0          # nothing appended since: nothing to flush
    log.append(STATE, 7, [b'{"state":"queued"}'])
    assert log.sync() == 1          # later batches: that one file only
    assert os.pread(log.reader(job.segment), 8, job.offset + 4 + 10 + 13) == b"data one"
    log.close()
    again, records = opened(seg_dir)
    assert summary(records) == [(JOB, 7, b"".join(body)), (STATE, 7, b'{"state":"held"}'),
                                (JOB, 8, b"".join(job_body(b"{}", b"cf", [b"x"]))),
                                (DONE, 8, b""), (STATE, 7, b'{"state":"queued"}')]
    meta, control_at = job_meta(records[0].body)
    assert meta == b'{"id":"7"}' and records[0].body[control_at:control_at + 5] == b"Hhost"
    assert records[0].offset == job.offset and again.live(7) == 1 and again.live(8) is None
    again.close()


def two_record_segment(seg_dir: Path) -> tuple[bytes, int]:
    """A segment with records A (job 1) and B (job 2); returns its bytes and B's start."""
    log, _ = opened(seg_dir)
    log.append(JOB, 1, job_body(b'{"a":1}', b"cfA", [b"A" * 40]))
    b = log.append(JOB, 2, job_body(b'{"b":2}', b"cfB", [b"B" * 40]))
    log.sync()
    log.close()
    path = seg_dir / segment_name(1)
    return path.read_bytes(), b.offset - RECORD.size


def test_a_tail_cut_at_every_byte_offset_keeps_exactly_the_whole_records(
        seg_dir: Path) -> None:
    data, b_start = two_record_segment(seg_dir)
    end = len(data.rstrip(b"\0"))
    assert end > b_start + RECORD.size
    for cut in range(HEADER.size, end + 1):
        torn = data[:cut]
        found = scan(torn, 1)
        want = [1, 2] if cut == end else [1] if cut >= b_start else []
        assert [r.job for r in found.records] == want, cut
        # preallocated: the same cut followed by zeros up to the segment's size
        assert [r.job for r in scan(torn.ljust(len(data), b"\0"), 1).records] == want, cut


def test_replay_of_a_torn_segment_then_appends_elsewhere(seg_dir: Path) -> None:
    data, b_start = two_record_segment(seg_dir)
    for cut in range(b_start, b_start + RECORD.size + 20):
        path = seg_dir / segment_name(1)
        path.write_bytes(data[:cut])
        for name in os.listdir(seg_dir):
            if name != segment_name(1):
                os.unlink(seg_dir / name)
        log, records = opened(seg_dir)
        assert [r.job for r in records] == [1]
        new = log.append(JOB, 3, [b"{}"])
        log.sync()
        log.close()
        assert new.segment == 2     # never after possibly torn bytes
        _, records = opened(seg_dir)
        assert [r.job for r in records] == [1, 3], cut


def test_a_flipped_byte_ends_the_log_there(seg_dir: Path) -> None:
    data, b_start = two_record_segment(seg_dir)
    end = len(data.rstrip(b"\0"))
    for pos in range(end):
        flipped = bytearray(data)
        flipped[pos] ^= 0xFF
        jobs = [r.job for r in scan(bytes(flipped), 1).records]
        assert jobs == ([] if pos < b_start else [1]), pos


def test_the_segment_number_seeds_the_checksum(seg_dir: Path) -> None:
    data, _ = two_record_segment(seg_dir)
    renumbered = HEADER.pack(spoolsegment.MAGIC, 9) + data[HEADER.size:]
    assert scan(renumbered, 9).records == []   # a recycled file's old records are dead
    assert scan(data, 9).records == []         # a header that is not this segment's


def test_recycled_segments_do_not_bring_old_records_back(seg_dir: Path) -> None:
    log, _ = opened(seg_dir, segment_size=4096)
    for job in range(1, 300):                  # ~17 segments' worth of 200-byte records
        log.append(JOB, job, [b"j" * 200])
        log.done(job)
        log.sync()
        log.collect()
    assert log.stats["recycled"] > 5 and log.stats["created"] <= 3
    assert len(log.segments()) == 1
    log.append(JOB, 100, [b"new"])
    log.sync()
    log.close()
    _, records = opened(seg_dir, segment_size=4096)
    live = {r.job for r in records if r.type == JOB} - {r.job for r in records if r.type == DONE}
    assert live == {100}


def test_segments_go_oldest_first_once_their_jobs_are_done(seg_dir: Path) -> None:
    log, _ = opened(seg_dir, segment_size=4096)
    log.append(JOB, 1, [b"held" * 50])          # a held job in the first segment
    for job in range(2, 80):
        log.append(JOB, job, [b"j" * 200])
        log.done(job)
    log.sync()
    assert log.collect() == 0 and log.pinned_by() == 1
    before = log.segments()
    assert len(before) > 3
    log.done(1)
    log.sync()
    assert log.collect() == len(before) - 1 and log.pinned_by() is None
    log.close()
    again, records = opened(seg_dir, segment_size=4096)
    assert len(again.segments()) == 1 and again.pinned_by() is None   # nothing comes back
    assert {r.job for r in records if r.type == JOB} <= {r.job for r in records
                                                         if r.type == DONE}
    again.close()


def test_a_failed_append_seals_its_segment(log: SegmentLog, monkeypatch: pytest.MonkeyPatch,
                                           seg_dir: Path) -> None:
    first = log.append(JOB, 1, [b"ok"])
    real = os.pwritev

    def broken(fd: int, buffers: list[bytes], offset: int) -> int:
        real(fd, [b"".join(buffers)[:5]], offset)   # a torn record, then the error
        raise OSError(5, "I/O error")
    monkeypatch.setattr(os, "pwritev", broken)
    with pytest.raises(OSError):
        log.append(JOB, 2, [b"lost"])
    monkeypatch.setattr(os, "pwritev", real)
    after = log.append(JOB, 3, [b"next"])
    assert after.segment == first.segment + 1
    log.sync()
    log.close()
    _, records = opened(seg_dir)
    assert [r.job for r in records] == [1, 3]


def test_a_record_larger_than_a_segment_is_refused(log: SegmentLog) -> None:
    with pytest.raises(ValueError):
        log.append(JOB, 1, [b"x" * spoolsegment.SEGMENT_SIZE])


def test_fold_keeps_the_newest_job_record_and_state_until_done(log: SegmentLog,
                                                               seg_dir: Path) -> None:
    log.append(JOB, 1, [b"first copy"])
    log.append(STATE, 1, [b'{"attempts":1}'])
    log.append(JOB, 2, [b"two"])
    log.append(STATE, 1, [b'{"attempts":2}'])
    log.append(JOB, 1, [b"moved forward"])       # a job moved out of an old segment
    log.append(STATE, 1, [b'{"attempts":3}'])
    log.append(DONE, 2)
    log.append(STATE, 9, [b'{"orphan":1}'])      # a state for a job that is gone
    log.sync()
    live = fold(read_only(str(seg_dir)))
    assert list(live) == [1]
    assert live[1].record.body == b"moved forward" and live[1].state == b'{"attempts":3}'


def test_a_reader_beside_the_writer_sees_a_consistent_prefix(log: SegmentLog,
                                                             seg_dir: Path) -> None:
    names = set(os.listdir(seg_dir))
    assert read_only(str(seg_dir)) == [] and read_only(str(seg_dir / "absent")) == []
    for job in range(1, 6):
        log.append(JOB, job, [b"x" * 100])
    path = seg_dir / segment_name(1)
    whole = path.read_bytes()
    # A record half-appended when the reader looks: the reader stops before it.
    log.append(JOB, 6, [b"y" * 100])
    data = path.read_bytes()
    end = len(whole.rstrip(b"\0"))
    path.write_bytes(data[:end + 50].ljust(len(data), b"\0"))
    assert [r.job for r in read_only(str(seg_dir))] == [1, 2, 3, 4, 5]
    assert set(os.listdir(seg_dir)) - names == {segment_name(1)}   # it created nothing


def test_a_job_done_while_its_record_is_read_for_a_move_is_not_revived(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # move_forward reads the record outside the lock; the event loop's removal
    # (its DONE record) may come before the copy is appended.  The copy must
    # then not be appended: after it, the job would be live again on replay.
    log = SegmentLog(str(tmp_path), fsync=False)
    log.replay()
    log.append(JOB, 1, [b"x" * 100])
    real = log.append_many

    def removal_first(records: Any, **kwargs: Any) -> Any:
        if kwargs.get("still_in"):
            real([(DONE, 1, ())])          # the removal lands in the gap
        return real(records, **kwargs)
    monkeypatch.setattr(log, "append_many", removal_first)
    assert log.move_forward(1) is None
    assert log.live(1) is None
    log.close()
    assert 1 not in fold(read_only(str(tmp_path)))
