"""Free-space checks are cached: one ``statvfs`` per interval or per N bytes written,
not one per check (three per job), yet a job is still refused below
``min_free_disk`` — and a refusal always rests on a fresh reading."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from relay import spoolspace as spoolmod  # where check_space reads its limits
from relay.config import config_from_dict
from relay.connectioncounts import FreeBoard, SharedCounts, create_table
from relay.errors import DiskFull
from relay.intakechannel import CallClient, Channel
from relay.spool import Spool
from relay.spoolproxy import SpoolProxy
from tests.daemon import relay_config
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


def test_a_worker_heeds_the_main_processes_later_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With intake workers each keeps its own reading; a disk the main process
    # found full after it must refuse the worker's next job at once, not once
    # the worker's reading is FREE_SPACE_TTL old.
    monkeypatch.setattr(spoolmod, "FREE_SPACE_TTL", 3600.0)
    table = create_table(2)
    try:
        main, _, _ = reopen(tmp_path / "spool", fsync=True, min_free_disk=1 << 20)
        main.publish_free = FreeBoard(table).publish
        config = config_from_dict(relay_config(tmp_path, server={"min_free_disk": "1MiB"}),
                                  "<test>")
        worker = SpoolProxy(config, cast(Channel, None), cast(CallClient, None))
        worker.share(SharedCounts(table, 0))
        main_disk = FakeDisk(main, monkeypatch, 10 << 30)
        worker_disk = FakeDisk(cast(Spool, worker), monkeypatch, 10 << 30)
        assert worker.main_free() is None        # no reading published yet
        worker.check_space()
        receive(main, b"x" * 1024)
        assert worker.main_free() == 10 << 30
        worker.check_space()
        assert worker_disk.reads == 1            # both readings say room: the cached one holds
        main_disk.free = worker_disk.free = (1 << 20) - 1   # another process fills the disk
        run(main.sync)                           # the main process's next batch sees it
        assert worker.main_free() is not None and worker.main_free() < 1 << 20
        with pytest.raises(DiskFull):
            worker.check_space()                 # refused on the worker's own fresh reading
        assert worker_disk.reads == 2
        main_disk.free = worker_disk.free = 10 << 30   # space came back
        worker.check_space()                     # the main process's low reading: re-read
        assert worker_disk.reads == 3
        run(main.sync)
        worker.check_space()                     # both say room again: no reading
        assert worker_disk.reads == 3
        close(main)
    finally:
        os.close(table)


def test_a_write_refused_for_space_makes_every_next_check_read_afresh(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    # A retry's state write refused with ENOSPC (the disk filled from outside
    # since the last reading): the next job's check reads, in this process and,
    # through the published reading, in every worker.
    monkeypatch.setattr(spoolmod, "FREE_SPACE_TTL", 3600.0)
    published: list[int] = []
    spool.publish_free = published.append
    disk = FakeDisk(spool, monkeypatch, 10 << 30)
    receive(spool, b"x" * 1024)
    meta = spool.jobs()[0]
    assert disk.reads == 1 and published == [10 << 30]
    disk.free = 0

    def refused() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert spool.index is not None
    spool.index.set_state(meta, refused)
    assert published[-1] == 0 and meta.id in spool.index.unsaved
    with pytest.raises(DiskFull):
        spool.begin(queue="q", wire_queue="q", peer="p")
    assert disk.reads == 2
