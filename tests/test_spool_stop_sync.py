"""The syncs a delivery owes: a stop right after a delivery leaves its DONE durable
(``Spool.aclose`` syncs the DONE records and unlinks still owed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from relay.scheduler import QueueRunner
from relay.spool import Spool
from tests.test_groupcommit import until
from tests.test_scheduler import runner_for, spool_job


def _fsync_runner(tmp_path: Path) -> QueueRunner:
    runner = runner_for(tmp_path / "unused", [f"dir://{tmp_path / 'out'}"])
    spool = Spool(tmp_path / "spool", fsync=True)   # the daemon's: removals owe a sync
    spool.recover()
    return QueueRunner(runner.queue, runner.sinks, spool, runner.metrics)


def test_a_stop_right_after_a_delivery_leaves_its_done_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _fsync_runner(tmp_path)
    spool = runner.spool
    synced: list[bool] = []

    async def main() -> None:
        with trio.fail_after(20):
            runner.submit(await spool_job(spool, 1))
            # The removal's sync is cut off by the stop before it runs.
            monkeypatch.setattr(spool, "sync", trio.sleep_forever)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(runner.run)
                await until(lambda: spool.jobs() == [])   # delivered, DONE written
                nursery.cancel_scope.cancel()
            monkeypatch.undo()
            log = spool._seg.log
            assert log is not None and log.dirty   # the DONE record is not durable yet
            real_sync = log.sync

            def counting(*, collect: bool = False) -> int:
                synced.append(collect)
                return real_sync(collect=collect)

            monkeypatch.setattr(log, "sync", counting)
            with trio.CancelScope(shield=True):
                await spool.aclose()
            assert synced and not log.dirty

    trio.run(main)
    again = Spool(tmp_path / "spool", fsync=True)
    again.recover()
    assert again.jobs() == []   # delivered once: no job comes back
    trio.run(again.aclose)
