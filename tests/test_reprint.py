"""``lpd-relay spool reprint JOB [--to QUEUE]`` (SPEC §11): a kept delivered job comes
back as a new spool id and reaches the destination again, with the daemon running
(through its lpc channel, as root from a reserved port) and stopped; evented
``reprinted`` with the original's id; only kept jobs are reprinted."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from tests.daemon import DaemonThread, relay_config, write_config_file
from tests.lpdwire import Job, send_job
from tests.relayproc import wait_until
from tests.test_retention import (
    Recorder,
    all_delivered,
    cli,
    events,
    hot_folder,
    spool_of,
    states,
)

__all__ = ["events"]   # the fixture, used by name

DOWN = "socket://127.0.0.1:1"


def config(tmp: Path) -> dict[str, object]:
    out = f"dir://{tmp / 'out'}"
    return relay_config(tmp, retention={"keep": "1h"},
                        retry={"initial": "1h", "max": "1h", "give_up_after": "24h"},
                        queues={"q": {"destinations": [out]}, "r": {"destinations": [out]},
                                "down": {"destinations": [DOWN]}})


def all_delivered_in(tmp: Path, queue: str) -> list[str]:
    return wait_until(lambda: [j.id for j in spool_of(tmp).jobs(queue) if j.state == "delivered"])


def metadata(tmp: Path, queue: str) -> list[dict[str, object]]:
    return [orjson.loads(p.read_bytes()) for p in hot_folder(tmp, queue)]


def data_of(entry: dict[str, object]) -> bytes:
    files = entry["files"]
    assert isinstance(files, list)
    return Path(files[0]["path"]).read_bytes()


@pytest.mark.skipif(os.geteuid() != 0, reason="reprint through the daemon is an admin "
                    "request: a reserved source port needs root")
def test_reprint_with_the_daemon_running_reaches_the_destination_again(
        tmp_path: Path, events: Recorder) -> None:
    data = config(tmp_path)
    cfg = write_config_file(tmp_path / "relay.toml", data)
    body = b"%PDF-1.4 lab results\n" * 500
    with DaemonThread(data) as relay:
        assert all(r == 0 for r in send_job(relay.port, Job(queue="q", files=[body])))
        [original] = all_delivered(tmp_path, 1)
        res = cli(cfg, "reprint", original)
        assert res.returncode == 0, res.stdout + res.stderr
        new = res.stdout.split(" as job ")[1].split()[0]
        assert new != original and f"job {original} reprinted as job {new} on queue q" \
            in res.stdout
        got = wait_until(lambda: len(hot_folder(tmp_path, "q")) == 2 and metadata(tmp_path, "q"))
        assert [m["job"] for m in got] == [original, new]
        assert data_of(got[1]) == body == data_of(got[0])
        res = cli(cfg, "reprint", original, "--to", "r")
        assert res.returncode == 0, res.stdout + res.stderr
        [moved] = wait_until(lambda: metadata(tmp_path, "r"))
        assert data_of(moved) == body and moved["queue"] == "r"
        all_delivered(tmp_path, 3)     # the reprints are kept in turn; the original still is
    reprinted = [(m.id, f) for e, m, f in events.seen if e == "reprinted" and m is not None]
    assert [(job, f["original"], f["by"]) for job, f in reprinted] == [
        (new, original, "cli"), (str(moved["job"]), original, "cli")]


def test_reprint_with_the_daemon_stopped_is_delivered_at_the_next_start(tmp_path: Path) -> None:
    data = config(tmp_path)
    cfg = write_config_file(tmp_path / "relay.toml", data)
    with DaemonThread(data) as relay:
        assert all(r == 0 for r in send_job(relay.port, Job(queue="q")))
        [original] = all_delivered(tmp_path, 1)
    res = cli(cfg, "reprint", original)
    assert res.returncode == 0, res.stdout + res.stderr
    new = res.stdout.split(" as job ")[1].split()[0]
    assert states(tmp_path) == {original: "delivered", new: "queued"}
    with DaemonThread(data):
        got = wait_until(lambda: len(hot_folder(tmp_path, "q")) == 2 and metadata(tmp_path, "q"))
        assert got[1]["job"] == new and data_of(got[1]) == b"hello, printer\n"


def test_only_kept_jobs_are_reprinted_and_an_unknown_queue_is_refused(tmp_path: Path) -> None:
    data = config(tmp_path)
    cfg = write_config_file(tmp_path / "relay.toml", data)
    with DaemonThread(data) as relay:
        assert all(r == 0 for r in send_job(relay.port, Job(queue="down")))
        assert all(r == 0 for r in send_job(relay.port, Job(queue="q", number="124")))
        waiting = wait_until(lambda: [j.id for j in spool_of(tmp_path).jobs("down")])
        res = cli(cfg, "reprint", waiting[0])
        assert res.returncode == 1 and "not a kept delivered job" in res.stderr
        kept = all_delivered_in(tmp_path, "q")
    res = cli(cfg, "reprint", kept[0], "--to", "nowhere")
    assert res.returncode == 1 and "nowhere" in res.stderr
    assert len(states(tmp_path)) == 2
