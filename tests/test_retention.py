"""Retention (SPEC §11, docs/spool.md "Retention"): delivered jobs kept as state
"delivered", never delivered again, not queued work; expired by age and by count on
their own schedule, evented ``expired``; per-queue overrides; kept jobs give way
before a new job is refused for space; spool file modes."""

from __future__ import annotations

import functools
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay import app
from relay.config import InvalidConfig, RetentionConfig, config_from_dict
from relay.jobevents import JobEvents
from relay.retention import MAX_EXPIRY_WAIT
from relay.spool import JobMeta, Spool
from relay.spoolspace import FREE_SPACE_TTL
from tests.daemon import DaemonThread, relay_config, write_config_file
from tests.lpdwire import Job, Wire, send_job
from tests.relayproc import LoggedRelay, PrivateTmpfs, wait_until


class Recorder:
    """A JobEvents subscriber that keeps (event, job id, fields)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, JobMeta | None, dict[str, object]]] = []

    def record(self, event: str, meta: JobMeta | None = None, **fields: object) -> None:
        self.seen.append((event, meta, fields))

    async def durable(self) -> None:
        return None

    def ids(self, event: str, queue: str | None = None) -> list[str]:
        return [m.id for name, m, _ in list(self.seen) if name == event and m is not None
                and queue in (None, m.queue)]


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """Every in-process daemon of the test reports to one Recorder."""
    recorder = Recorder()
    subscriber: JobEvents = recorder
    monkeypatch.setattr(app, "run", functools.partial(app.run, events=subscriber))
    return recorder


def hot_folder(tmp: Path, queue: str = "q") -> list[Path]:
    folder = tmp / "out" / queue
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def spool_of(tmp: Path) -> Spool:
    return Spool(tmp / "spool")


def states(tmp: Path) -> dict[str, str]:
    return {j.id: j.state for j in spool_of(tmp).jobs()}


def all_delivered(tmp: Path, n: int) -> list[str]:
    """Wait until the spool holds exactly ``n`` jobs, all kept; their ids."""
    found = wait_until(lambda: (s := states(tmp)) and len(s) == n
                       and set(s.values()) == {"delivered"} and s)
    return sorted(found)


def send(port: int, n: int, queue: str = "q", first: int = 0) -> None:
    for i in range(first, first + n):
        assert all(r == 0 for r in send_job(port, Job(queue=queue, number=f"{i:03d}")))


def lpq_short(port: int, queue: str = "q") -> str:
    with Wire(port) as w:
        w.send(b"\x04" + queue.encode() + b"\n")
        return w.read_all().decode()


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "spool", *args, "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_retention_keys_parse_override_per_queue_and_are_checked() -> None:
    data = relay_config(Path("/tmp/x"), retention={"keep": "7d"}, queues={
        "a": {"destinations": ["dir:///tmp/x/out"], "retention": {"keep_jobs": 3}},
        "b": {"destinations": ["dir:///tmp/x/out"], "retention": {"keep": "0s"}},
        "c": {"destinations": ["dir:///tmp/x/out"]}})
    config = config_from_dict(data, "<t>")
    assert config.queues["a"].retention == RetentionConfig(keep=7 * 86400.0, keep_jobs=3)
    assert not config.queues["b"].retention.enabled
    assert config.queues["c"].retention == RetentionConfig(keep=7 * 86400.0)
    assert not config_from_dict(relay_config(Path("/tmp/x")), "<t>").queues["*"].retention.enabled
    with pytest.raises(InvalidConfig) as bad:
        config_from_dict(relay_config(Path("/tmp/x"), retention={"keep": "soon", "keep_jobs": -1},
                                      queues={"a": {"destinations": ["dir:///o"],
                                                    "retention": {"kept": 1}}}), "<t>")
    text = str(bad.value)
    assert "retention.keep:" in text and "retention.keep_jobs:" in text
    assert 'queues.a.retention.kept: unknown key' in text


def test_delivered_jobs_are_kept_listed_never_redelivered_and_not_queued(
        tmp_path: Path, events: Recorder) -> None:
    data = relay_config(tmp_path, retention={"keep": "1h"},
                        queues={"q": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    cfg = write_config_file(tmp_path / "relay.toml", data)
    with DaemonThread(data) as relay:
        send(relay.port, 2)
        wait_until(lambda: len(hot_folder(tmp_path)) == 2)
        kept = all_delivered(tmp_path, 2)
        # The spool says "delivered" (Retention.keep) a moment before the
        # scheduler lets go of the job it delivered: lpq is asked until then.
        wait_until(lambda: "no entries" in lpq_short(relay.port), timeout=10)
        assert relay.metric("lpdrelay_spool_jobs", queue="q", state="queued") == 0
        assert cli(cfg, "list").stdout.splitlines()[-1] == "0 job(s)"
        extra = send(relay.port, 1, first=9) or all_delivered(tmp_path, 3)[-1]
        purged = cli(cfg, "purge", extra)
        assert purged.returncode == 0 and "dequeued" in purged.stdout, purged.stderr
        assert sorted(states(tmp_path)) == kept
        wait_until(lambda: len(hot_folder(tmp_path)) == 3)
    # Restarted: the kept jobs are found again, and still not delivered again.
    for path in hot_folder(tmp_path):
        path.unlink()
    with DaemonThread(data) as relay:
        send(relay.port, 1, first=5)
        wait_until(lambda: len(hot_folder(tmp_path)) == 1)
        assert all_delivered(tmp_path, 3)[:2] == kept
    assert events.ids("expired") == []
    listed = cli(cfg, "list", "--delivered")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split()[0] for line in listed.stdout.splitlines()[1:-1]]
    assert rows == sorted(states(tmp_path)) and rows[:2] == kept
    assert listed.stdout.splitlines()[-1] == "3 delivered job(s) kept"


def test_kept_jobs_expire_by_age_on_their_own_schedule(tmp_path: Path, events: Recorder) -> None:
    data = relay_config(tmp_path, retention={"keep": "2s"},
                        queues={"q": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    with DaemonThread(data) as relay:
        send(relay.port, 1)
        job = wait_until(lambda: [i for i, s in states(tmp_path).items() if s == "delivered"])
        # Due 2s after delivery; removed well within MAX_EXPIRY_WAIT (the next due job
        # sets the wake-up).
        wait_until(lambda: not states(tmp_path), timeout=MAX_EXPIRY_WAIT / 6)
        assert events.ids("expired") == job
        assert not list((tmp_path / "spool" / "jobs").iterdir())
        assert len(hot_folder(tmp_path)) == 1


def test_kept_jobs_expire_by_count_and_queues_override_the_default(
        tmp_path: Path, events: Recorder) -> None:
    out = f"dir://{tmp_path / 'out'}"
    data = relay_config(tmp_path, retention={"keep_jobs": 1}, queues={
        "a": {"destinations": [out], "retention": {"keep_jobs": 3}},
        "b": {"destinations": [out], "retention": {"keep": "0s"}},
        "c": {"destinations": [out]}})
    with DaemonThread(data) as relay:
        for queue in ("a", "b", "c"):
            for i in range(4):
                send(relay.port, 1, queue=queue, first=i)
                wait_until(lambda q=queue, n=i: len(hot_folder(tmp_path, q)) == n + 1)
        spool = spool_of(tmp_path)
        kept = wait_until(lambda: {q: [j.id for j in spool.jobs(q)] for q in "abc"}
                          if len(spool.jobs()) == 4 else None)
    assert [len(kept[q]) for q in "abc"] == [3, 0, 1]
    # The oldest went: a's first, c's first three; b kept none, so expired none.
    assert [len(events.ids("expired", q)) for q in "abc"] == [1, 0, 3]
    for queue in "ac":
        assert max(events.ids("expired", queue)) < min(kept[queue])
    assert all("keep_jobs" in str(f.get("reason")) for e, _, f in events.seen if e == "expired")


def test_no_retention_removes_delivered_jobs_at_once(tmp_path: Path, events: Recorder) -> None:
    data = relay_config(tmp_path, queues={"q": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    with DaemonThread(data) as relay:
        send(relay.port, 2)
        wait_until(lambda: len(hot_folder(tmp_path)) == 2)
        wait_until(lambda: not states(tmp_path))
    assert events.ids("expired") == []


def _modes(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    for path in root.rglob("*"):
        if path.is_file():
            yield path, path.stat()


def test_spool_and_kept_files_are_no_wider_than_0640_and_owned_by_the_daemon(
        tmp_path: Path) -> None:
    data = relay_config(tmp_path, retention={"keep": "1h"},
                        queues={"q": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    old = os.umask(0o000)   # the daemon's modes must not depend on its umask
    try:
        with DaemonThread(data) as relay:
            send(relay.port, 2)          # small: records in a segment file
            big = Job(queue="q", number="900", files=[b"x" * (100 << 10)])   # files of its own
            assert all(r == 0 for r in send_job(relay.port, big))
            all_delivered(tmp_path, 3)
    finally:
        os.umask(old)
    files = list(_modes(tmp_path / "spool"))
    # Small jobs live in segment files, large ones in files of their own: both are checked.
    assert any(p.parent.name == "segments" for p, _ in files)
    assert any(p.parent.name == "jobs" for p, _ in files)
    wide = {str(p): oct(stat.S_IMODE(st.st_mode)) for p, st in files
            if stat.S_IMODE(st.st_mode) & ~0o640}
    assert wide == {}
    assert {st.st_uid for _, st in files} == {os.geteuid()}


@pytest.mark.root
# workers = 2: a worker whose free-space check fails asks the main process to make room.
@pytest.mark.parametrize("workers", [1, 2])
def test_kept_jobs_expire_oldest_first_before_a_new_job_is_refused_for_space(
        tmp_path: Path, workers: int) -> None:
    fs = PrivateTmpfs(tmp_path / "spool", "4m")
    try:
        data = relay_config(tmp_path, server={"min_free_disk": "2MiB", "workers": workers},
                            metrics={"listen": ""}, retention={"keep": "1h"},
                            queues={"q": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
        relay = LoggedRelay(write_config_file(tmp_path / "relay.toml", data),
                            wrapper=fs.wrapper).start()
        try:
            _fill_with_kept_jobs(tmp_path, relay, fs)
        finally:
            relay.terminate()
    finally:
        fs.close()


def _fill_with_kept_jobs(tmp_path: Path, relay: LoggedRelay, fs: PrivateTmpfs) -> None:
    size = 600_000   # three kept jobs leave ~2.2 MB free: a fourth does not fit above 2 MiB
    for i in range(6):
        replies = send_job(relay.port, Job(number=f"{i:03d}", files=[bytes([65 + i]) * size]))
        assert all(r == 0 for r in replies), (i, replies, relay.lines[-5:])
        wait_until(lambda n=i: len(hot_folder(tmp_path)) == n + 1)
        wait_until(lambda n=i: len(relay.events("job_expired")) >= max(0, n - 2))
    expired: list[dict[str, Any]] = relay.events("job_expired")
    jobs = fs.inside(fs.path / "jobs")
    kept = sorted(p.stem for p in jobs.glob("*.json"))
    assert len(kept) == 3 and len(expired) == 3
    assert [e["job"] for e in expired] < kept and all("free space" in e["reason"]
                                                      for e in expired)
    fs.fill()   # now nothing kept can make room: refused with 0x02
    time.sleep(2 * FREE_SPACE_TTL)   # the relay's last free-space reading is stale by now
    with Wire(relay.port) as w:
        w.send(b"\x02q\n")
        assert w.read_all()[:1] == b"\x02"
    assert not list(jobs.glob("*.json"))
    wait_until(lambda: len(relay.events("job_expired")) == 6)   # the log is read by a thread

