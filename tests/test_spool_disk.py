"""The spool when the disk refuses writes, and the modes of what it creates.

The daemon's bookkeeping (state changes, removals, the id reservation at
start) must never need free space: a refused write is kept in memory, served
to every reader of the process, and written once the disk takes it.  These
tests make the disk refuse by injecting ENOSPC/EROFS into the spool's two
write primitives; tests/test_full_disk.py does it for real on a full tmpfs.
Files are 0640 and folders 0750 whatever the umask (docs/spool.md).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from relay import daemoninfo, durablefiles, spoolindex
from relay.errors import DiskFull
from relay.metrics import Metrics
from relay.spool import Spool
from tests.test_spool import REPO, close, commit, reopen, run


class Refusing:
    """Makes the spool's state writes and/or unlinks fail with ``code`` while ``on``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, code: int = errno.ENOSPC) -> None:
        self.on = False
        self.code = code
        real_write, real_unlink = spoolindex.write_atomic, spoolindex.unlink_quiet

        def write(path: str, data: bytes, *, fsync: bool) -> None:
            if self.on:
                raise OSError(self.code, os.strerror(self.code))
            real_write(path, data, fsync=fsync)

        def unlink(path: str) -> None:
            if self.on:
                raise OSError(self.code, os.strerror(self.code))
            real_unlink(path)
        monkeypatch.setattr(spoolindex, "write_atomic", write)
        monkeypatch.setattr(spoolindex, "unlink_quiet", unlink)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s, _, _ = reopen(tmp_path / "spool")
    yield s
    close(s)


def test_a_refused_state_write_holds_in_memory_and_is_written_later(
        spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = Refusing(monkeypatch)
    meta = commit(spool)
    disk.on = True
    held = dataclasses.replace(meta, state="held", attempts=3, last_error="gave up")
    spool.update(held, durable=True)           # no exception: the daemon goes on
    assert spool.get(meta.id) == held          # this process sees the change at once
    assert [j.state for j in spool.jobs()] == ["held"]
    assert spool.usage().by_queue_state == {("q", "held"): 1}
    state = tmp_path / "spool" / "jobs" / f"{meta.id}.state"
    assert not state.exists()
    assert spool.save_unsaved() == 1           # still refused: still waiting
    disk.on = False
    run(spool.sync)                            # e.g. after a delivery freed space
    assert state.exists() and spool.save_unsaved() == 0
    reader = Spool(tmp_path / "spool")         # another process (the CLI) sees it now
    assert reader.get(meta.id) == held


def test_on_a_full_disk_an_existing_state_file_takes_the_record_in_place(
        spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = Refusing(monkeypatch)
    meta = commit(spool)
    long = dataclasses.replace(meta, attempts=1, last_error="x" * 300)
    spool.update(long)                          # while there is room: a .state exists
    disk.on = True
    state = tmp_path / "spool" / "jobs" / f"{meta.id}.state"
    inode = state.stat().st_ino
    short = dataclasses.replace(meta, state="held", attempts=2, last_error="held")
    spool.update(short, durable=True)
    assert spool.save_unsaved() == 0            # nothing owed: it is on disk
    assert state.stat().st_ino == inode         # the same file, no new name or block
    assert Spool(tmp_path / "spool").get(meta.id) == short   # padding parses


def test_overwrite_refuses_what_the_file_has_no_blocks_for(tmp_path: Path) -> None:
    path = tmp_path / "small"
    path.write_bytes(b"{}")
    with pytest.raises(OSError) as info:
        durablefiles.overwrite(str(path), b"[" + b"0," * 40_000 + b"0]")
    assert info.value.errno == errno.ENOSPC and path.read_bytes() == b"{}"


def test_unsaved_state_is_written_at_a_clean_stop(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    disk = Refusing(monkeypatch)
    spool, _, _ = reopen(tmp_path / "spool")
    meta = commit(spool)
    disk.on = True
    spool.update(dataclasses.replace(meta, attempts=7))
    disk.on = False
    close(spool)
    spool, jobs, _ = reopen(tmp_path / "spool")
    assert [j.attempts for j in jobs] == [7]
    close(spool)


def test_a_refused_removal_is_done_later_and_the_job_is_gone_at_once(
        spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = Refusing(monkeypatch, errno.EROFS)
    keep, gone = commit(spool), commit(spool)
    disk.on = True
    spool.remove(gone.id)
    assert [j.id for j in spool.jobs()] == [keep.id]
    with pytest.raises(KeyError):
        spool.get(gone.id)
    with pytest.raises(KeyError):
        spool.update(gone)
    assert spool.usage().jobs == 1
    assert (tmp_path / "spool" / "jobs" / f"{gone.id}.json").exists()
    disk.on = False
    assert spool.save_unsaved() == 0
    assert not any(p.name.startswith(gone.id) for p in (tmp_path / "spool" / "jobs").iterdir())


def test_the_cli_still_sees_its_own_write_errors(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    daemon, _, _ = reopen(tmp_path / "spool")
    meta = commit(daemon)
    close(daemon)
    disk = Refusing(monkeypatch)
    disk.on = True
    cli = Spool(tmp_path / "spool")            # no recover(): no bookkeeping to defer to
    with pytest.raises(DiskFull):
        cli.update(dataclasses.replace(meta, state="held"))
    with pytest.raises(OSError):
        cli.remove(meta.id)


def test_start_without_an_id_reservation_refuses_jobs_until_space_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, _, _ = reopen(tmp_path / "spool")
    first = commit(spool)
    close(spool)                                # next-id = exactly the next id
    real = durablefiles.write_atomic
    full = True

    def write_atomic(path: str, data: bytes, *, fsync: bool) -> None:
        if full and path.endswith("next-id"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, fsync=fsync)
    monkeypatch.setattr("relay.spool.write_atomic", write_atomic)
    spool, jobs, _ = reopen(tmp_path / "spool")  # starts anyway
    assert [j.id for j in jobs] == [first.id]
    with pytest.raises(DiskFull):
        spool.begin(queue="q", wire_queue="q", peer="p")
    with pytest.raises(DiskFull):                # a failed reservation reserved nothing
        spool.begin(queue="q", wire_queue="q", peer="p")
    full = False
    assert int(commit(spool).id) == int(first.id) + 1
    close(spool)


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def write_all(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(durablefiles, "write_all", write_all)
    with pytest.raises(OSError):
        durablefiles.write_atomic(str(tmp_path / "next-id"), b"1000\n", fsync=True)
    assert list(tmp_path.iterdir()) == []


def test_enospc_gives_the_partial_jobs_space_back_at_once(spool: Spool, tmp_path: Path) -> None:
    job = spool.begin(queue="q", wire_queue="q", peer="p")
    writer = job.open_data("dfA1h")
    writer.write(b"x" * 4096)
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, writer.fileno())  # the kernel now answers ENOSPC to every write
    finally:
        os.close(full)
    with pytest.raises(DiskFull):
        writer.write(b"x" * 4096)
    # Before the caller cleans up (it may first drain the refused sender):
    assert list((tmp_path / "spool" / "jobs").iterdir()) == []
    assert spool.statistics().discarded == 1
    writer.close()
    job.discard()                              # the caller's clean-up: no-ops now
    assert spool.statistics().discarded == 1


def test_no_free_byte_is_full_even_without_min_free_disk(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool, "free_bytes", lambda: 0)
    with pytest.raises(DiskFull):
        spool.check_space()


def test_spool_gauges_follow_commit_state_and_removal_at_once(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, queues=["q", "lab"], destinations=[])
    index = spool.index
    assert index is not None
    metrics.follow_spool(index.counts(), lambda: index.bytes, spool.free_bytes)

    def v(queue: str, state: str) -> float | None:
        return registry.get_sample_value("lpdrelay_spool_jobs", {"queue": queue, "state": state})
    a, b = commit(spool), commit(spool, queue="elsewhere")
    assert (v("q", "queued"), v("other", "queued"), v("lab", "queued")) == (1, 1, 0)
    assert registry.get_sample_value("lpdrelay_spool_bytes") == spool.usage().bytes > 0
    Refusing(monkeypatch).on = True              # a refused write changes the count too
    spool.update(dataclasses.replace(a, state="held"))
    assert (v("q", "queued"), v("q", "held")) == (0, 1)
    spool.remove(b.id)
    assert v("other", "queued") == 0
    spool.remove(a.id)
    assert v("q", "held") == 0 and registry.get_sample_value("lpdrelay_spool_bytes") == 0


def test_daemon_info_on_a_full_disk_never_stops_the_daemon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(path: str, data: bytes, *, fsync: bool) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    info = tmp_path / daemoninfo.DAEMON_INFO
    assert daemoninfo.write_daemon_info(tmp_path, [("127.0.0.1", 5515)])
    monkeypatch.setattr(daemoninfo, "write_atomic", full)
    # The last daemon's file takes the new address in place ...
    assert daemoninfo.write_daemon_info(tmp_path, [("127.0.0.1", 40000)])
    assert orjson.loads(info.read_bytes())["lpd"] == [["127.0.0.1", 40000]]
    # ... and without one the daemon goes on and tries again later.
    info.unlink()
    assert daemoninfo.write_daemon_info(tmp_path, [("127.0.0.1", 40001)]) is False
    assert not info.exists()


MODES_SCRIPT = """
import os, sys, trio
os.umask(int(sys.argv[2], 8))
from relay.daemoninfo import write_daemon_info
from relay.spool import Spool
from tests.test_spool import build
spool = Spool(sys.argv[1], segment_threshold=int(sys.argv[3]))
spool.recover()
meta = trio.run(spool.commit, build(spool))
spool.update(meta)
write_daemon_info(sys.argv[1], [("127.0.0.1", 515)])
trio.run(spool.aclose)
"""


@pytest.mark.parametrize("umask", ["0", "022", "077"])
@pytest.mark.parametrize("threshold", [0, 65536], ids=["files", "segments"])
def test_files_are_0640_and_folders_0750_whatever_the_umask(tmp_path: Path, umask: str,
                                                           threshold: int) -> None:
    target = tmp_path / "var" / "spool"
    subprocess.run([sys.executable, "-c", MODES_SCRIPT, str(target), umask, str(threshold)],
                   cwd=REPO, check=True, timeout=60)
    modes = {str(p.relative_to(target)): stat.S_IMODE(p.stat().st_mode)
             for p in [target, *target.rglob("*")]}
    assert {"daemon.json", "lock", "next-id", "jobs", "segments"} <= modes.keys()
    if threshold:   # the small job is a record in the first segment: no file of its own
        assert [n for n in modes if n.startswith(("jobs/", "segments/"))] == [
            "segments/000000000001.seg"]
    else:
        assert sum(name.startswith("jobs/") for name in modes) == 4   # .d1 .cf .json .state
    for name, mode in modes.items():
        want = 0o750 if (target / name).is_dir() else 0o640
        assert mode == want, f"{name}: {mode:o} under umask {umask}"
