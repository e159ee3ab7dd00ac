"""SpoolProxy.check_space (FreeSpace's) counts every worker's bytes received since the
reading, and re-reads before it refuses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import pytest

from relay import spoolspace
from relay.config import config_from_dict
from relay.connectioncounts import SharedCounts, create_table
from relay.errors import DiskFull
from relay.intakechannel import CallClient, Channel
from relay.spoolproxy import SpoolProxy
from tests.daemon import relay_config

MIB = 1 << 20


def _worker(tmp_path: Path, table: int, row: int) -> tuple[SpoolProxy, list[int]]:
    config = config_from_dict(relay_config(tmp_path, server={"min_free_disk": "1MiB"}),
                              "<test>")
    worker = SpoolProxy(config, cast(Channel, None), cast(CallClient, None))
    worker.share(SharedCounts(table, row))
    disk = [10 * MIB]
    reads: list[int] = []

    def read() -> int:
        reads.append(disk[0])
        return disk[0]
    worker.free_bytes = read  # type: ignore[method-assign]
    return worker, reads


def test_the_other_workers_bytes_bring_a_fresh_reading_before_a_refusal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spoolspace, "FREE_SPACE_TTL", 3600.0)
    table = create_table(2)
    try:
        a, reads = _worker(tmp_path, table, 0)
        b, _ = _worker(tmp_path, table, 1)
        a.check_space()
        a.check_space(4 * MIB)
        assert len(reads) == 1                    # a reading that leaves room holds
        b.add_written(6 * MIB)                    # the other worker received 6 MiB since
        a.check_space(2 * MIB)                    # 10 - 6 - 2 = 2 >= 1: room still
        assert len(reads) == 1
        a.check_space(4 * MIB)                    # 10 - 6 - 4 < 1: not on the estimate...
        assert len(reads) == 2                    # ...but on a fresh reading (10 MiB free)
        a._reading = (10 * MIB, a._reading[1], a.written)  # type: ignore[index]
        with pytest.raises(DiskFull):
            a.check_space(10 * MIB)               # a refusal: always a fresh reading
        assert len(reads) == 3
    finally:
        os.close(table)


def test_an_old_reading_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = create_table(2)
    try:
        a, reads = _worker(tmp_path, table, 0)
        a.check_space()
        monkeypatch.setattr(spoolspace, "FREE_SPACE_TTL", -1.0)   # every reading is old
        a.check_space()
        assert len(reads) == 2
    finally:
        os.close(table)
