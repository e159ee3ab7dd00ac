"""Soak: many jobs through a real relay process into a hot folder — every job
arrives, the spool drains to nothing, and the relay's memory does not grow
with the number of jobs.  `make test` runs the bounded variant, `make bench`
the long one (marked slow)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from relay.loadgen import run_load
from relay.uri import parse_destination
from tests.daemon import RelayProcess

# RSS the relay may gain between the warm-up and the end of the run: far less
# than the spool metadata of the jobs would take if anything kept them all.
RSS_GROWTH_LIMIT = 40 * 1024 * 1024


def soak_config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f"""
[server]
listen = ["127.0.0.1:0"]
spool_dir = "{tmp_path / 'spool'}"
min_free_disk = "0B"
max_connections_per_host = 1000
[metrics]
listen = ""
[log]
level = "warning"
[queues.q]
destinations = ["dir://{tmp_path / 'out'}"]
concurrency = 4
""")
    return path


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def count(folder: Path, pattern: str) -> int:
    return sum(1 for _ in folder.glob(pattern)) if folder.exists() else 0


def soak(tmp_path: Path, jobs: int, concurrency: int, seconds: float) -> None:
    with RelayProcess(soak_config(tmp_path)) as relay:
        assert relay.proc is not None
        dest = parse_destination(f"lpd://127.0.0.1:{relay.port}/q")
        warm = trio.run(lambda: run_load(dest, jobs=200, concurrency=concurrency, size=1024))
        assert warm.ok == 200, warm.failures
        before = rss(relay.proc.pid)
        result = trio.run(lambda: run_load(dest, jobs=jobs, concurrency=concurrency,
                                           size=1024))
        assert result.ok == jobs, result.failures
        deadline = time.monotonic() + seconds
        while count(tmp_path / "out" / "q", "*.json") < jobs + 200:
            assert time.monotonic() < deadline, "jobs not all delivered in time"
            time.sleep(0.2)
        after = rss(relay.proc.pid)
        assert count(tmp_path / "spool" / "jobs", "*") == 0   # drained, no debris
        assert after - before < RSS_GROWTH_LIMIT, (before, after)


def test_soak_bounded(tmp_path: Path) -> None:
    soak(tmp_path, jobs=2000, concurrency=128, seconds=120)


@pytest.mark.slow
def test_soak_long(tmp_path: Path) -> None:
    soak(tmp_path, jobs=30000, concurrency=256, seconds=900)
