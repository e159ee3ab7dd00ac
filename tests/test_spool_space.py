"""Free-space checks are cached: one ``statvfs`` per interval or per N bytes written,
not one per check (three per job), yet a job is still refused below
``min_free_disk`` — and a refusal always rests on a fresh reading."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import spoolspace as spoolmod  # where check_space reads its limits
from relay.errors import DiskFull
from relay.spool import Spool
from tests.test_spool import build, close, reopen, run


class FakeDisk:
    """``free_bytes`` answers from ``free`` and counts the calls."""

    def __init__(self, spool: Spool, monkeypatch: pytest.MonkeyPatch, free: int) -> None:
        self.free = free
        self.reads = 0
        monkeypatch.setattr(spool, "free_bytes", self.read)

    def read(self) -> int:
        self.reads += 1
        return self.free


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s, _, _ = reopen(tmp_path / "spool", fsync=False, min_free_disk=1 << 20)
    yield s
    close(s)


def receive(spool: Spool, data: bytes) -> None:
    """What the server does per job: check at 0x02, at the data file's length, commit."""
    spool.check_space()
    spool.check_space(len(data))
    run(spool.commit, build(spool, data=data))


def test_many_jobs_share_one_reading(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spoolmod, "FREE_SPACE_TTL", 3600.0)
    disk = FakeDisk(spool, monkeypatch, 10 << 30)
    for _ in range(200):
        receive(spool, b"x" * 1024)
    assert disk.reads == 1
    assert spool.statistics().free_space_reads == 1


def test_bytes_written_bring_a_fresh_reading(spool: Spool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spoolmod, "FREE_SPACE_TTL", 3600.0)
    monkeypatch.setattr(spoolmod, "FREE_SPACE_EVERY", 64 * 1024)
    disk = FakeDisk(spool, monkeypatch, 10 << 30)
    for _ in range(20):
        receive(spool, b"x" * 16 * 1024)   # 320 KiB in all: a reading per ~64 KiB
    assert 5 <= disk.reads <= 7


def test_the_estimate_counts_what_was_written(spool: Spool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spoolmod, "FREE_SPACE_TTL", 3600.0)
    disk = FakeDisk(spool, monkeypatch, (1 << 20) + 100_000)
    receive(spool, b"x" * 60_000)
    assert disk.reads == 1
    # 60,000 written: the estimate is below 50,000 more, so the disk is asked again.
    disk.free = (1 << 20) + 100_000          # a delivery freed the space meanwhile
    spool.check_space(50_000)
    assert disk.reads == 2
    spool.check_space(50_000)                # nothing written since: that reading holds
    assert disk.reads == 2


def test_a_refusal_is_always_a_fresh_reading(spool: Spool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spoolmod, "FREE_SPACE_TTL", 3600.0)
    disk = FakeDisk(spool, monkeypatch, (1 << 20) - 1)   # below min_free_disk
    for reads in range(1, 4):
        with pytest.raises(DiskFull):
            spool.begin(queue="q", wire_queue="q", peer="p")
        assert disk.reads == reads
    disk.free = 2 << 20                          # space came back: taken at once
    spool.check_space()
    assert disk.reads == 4


def test_a_disk_filled_from_outside_is_seen_after_the_interval(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = FakeDisk(spool, monkeypatch, 10 << 30)
    spool.check_space()
    disk.free = 0
    spool.check_space()                          # within the interval: the cached reading
    monkeypatch.setattr(spoolmod, "FREE_SPACE_TTL", 0.0)
    with pytest.raises(DiskFull):
        spool.check_space()


def test_each_group_commit_takes_a_reading_off_the_event_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spoolmod, "FREE_SPACE_TTL", 3600.0)
    spool, _, _ = reopen(tmp_path / "spool", fsync=True, min_free_disk=1 << 20)
    disk = FakeDisk(spool, monkeypatch, 10 << 30)
    receive(spool, b"x" * 1024)             # one reading at 0x02, one by the batch
    assert disk.reads == 2
    disk.free = (1 << 20) - 1               # another process fills the disk ...
    run(spool.sync)                         # ... and the next batch sees it
    assert disk.reads == 3
    disk.free = 10 << 30
    spool.check_space()                     # the batch's reading refused: a fresh one took it
    assert disk.reads == 4 and spool.statistics().free_space_reads == 4
    close(spool)
