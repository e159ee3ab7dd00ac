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
from tests.daemon import RelayProcess, relay_config, write_config_file

# RSS the relay may gain between the first and the last round: far less than
# the jobs' buffers and metadata would take if anything kept them all.
RSS_GROWTH_LIMIT = 40 * 1024 * 1024


def soak_config(tmp_path: Path) -> Path:
    data = relay_config(tmp_path, server={"max_connections_per_host": 1000},
                        metrics={"listen": ""}, log={"format": "json", "level": "warning"},
                        queues={"q": {"destinations": [f"dir://{tmp_path / 'out'}"],
                                      "concurrency": 4}})
    return write_config_file(tmp_path / "relay.toml", data)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def count(folder: Path, pattern: str) -> int:
    return sum(1 for _ in folder.glob(pattern)) if folder.exists() else 0


def soak(tmp_path: Path, rounds: int, jobs: int, concurrency: int, seconds: float) -> None:
    """``rounds`` rounds of ``jobs`` jobs; memory is compared after the first round,
    once buffers, the delivery backlog and the allocator have reached their
    working size, so only growth with the number of jobs counts."""
    with RelayProcess(soak_config(tmp_path)) as relay:
        assert relay.proc is not None
        dest = parse_destination(f"lpd://127.0.0.1:{relay.port}/q")
        deadline = time.monotonic() + seconds
        sizes = []
        for n in range(1, rounds + 1):
            result = trio.run(lambda: run_load(dest, jobs=jobs, concurrency=concurrency,
                                               size=1024))
            assert result.ok == jobs, result.failures
            while count(tmp_path / "out" / "q", "*.json") < n * jobs:
                assert time.monotonic() < deadline, "jobs not all delivered in time"
                time.sleep(0.2)
            sizes.append(rss(relay.proc.pid))
        assert count(tmp_path / "spool" / "jobs", "*") == 0   # drained, no debris
        assert sizes[-1] - sizes[0] < RSS_GROWTH_LIMIT, sizes


def test_soak_bounded(tmp_path: Path) -> None:
    soak(tmp_path, rounds=3, jobs=300, concurrency=128, seconds=120)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_soak_long(tmp_path: Path) -> None:
    soak(tmp_path, rounds=6, jobs=5000, concurrency=256, seconds=1100)
