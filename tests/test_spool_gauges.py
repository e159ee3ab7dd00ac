"""The spool gauges of a real relay equal what ``lpd-relay spool list`` shows (SPEC §7):
after deliveries, refusals (too large, malformed), a job waiting for a destination
that is down, holds, a kill -9 and restart, a purge and a release — read at
once, not a scan interval later."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.spool import Spool
from tests.daemon import ROOT, relay_config, write_config_file
from tests.lpdwire import Job, Wire, send_job
from tests.relayproc import LoggedRelay, wait_until
from tests.test_recovery import closed_port

SAMPLE = re.compile(r'^lpdrelay_spool_jobs\{queue="([^"]*)",state="([^"]*)"\} (\S+)$')


def cli(cfg: Path, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "relay", "spool", *args, "-c", str(cfg)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def listed(cfg: Path) -> Counter[tuple[str, str]]:
    """Jobs by (queue, state) as ``spool list`` prints them."""
    rows = [line.split() for line in cli(cfg, "list").splitlines() if re.match(r"\d{12} ", line)]
    return Counter((row[1], row[2]) for row in rows)


def scrape(relay: LoggedRelay) -> str:
    with urllib.request.urlopen(relay.metrics_url(), timeout=10) as resp:
        return str(resp.read().decode())


def gauges(text: str) -> Counter[tuple[str, str]]:
    found: Counter[tuple[str, str]] = Counter()
    for line in text.splitlines():
        if (m := SAMPLE.match(line)) and float(m.group(3)):
            found[(m.group(1), m.group(2))] = int(float(m.group(3)))
    return found


def sample(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith(name + " ")))


def stored_bytes(tmp_path: Path) -> int:
    """Bytes of the data and control files on disk, as lpdrelay_spool_bytes counts them:
    each job's own files, and the bodies of the small jobs kept as segment records."""
    files = sum(p.stat().st_size for p in (tmp_path / "spool" / "jobs").iterdir()
                if re.fullmatch(r"\d{12}\.(cf|d\d+)", p.name))
    small = [j for j in Spool(tmp_path / "spool").jobs() if "/segments/" in j.control_path]
    return files + sum(j.total_bytes + j.control_bytes for j in small)


def assert_gauges_match(relay: LoggedRelay, cfg: Path, tmp_path: Path) -> Counter[tuple[str, str]]:
    text = scrape(relay)
    want = listed(cfg)
    assert gauges(text) == want
    assert sample(text, "lpdrelay_spool_bytes") == stored_bytes(tmp_path)
    return want


@pytest.fixture
def cfg(tmp_path: Path) -> Iterator[Path]:
    out = tmp_path / "out"
    data = relay_config(
        tmp_path, server={"max_job_size": "4KiB"}, retry={"initial": "1h", "max": "1h"},
        queues={"obs": {"destinations": [f"dir://{out}"]},
                "down": {"destinations": [f"socket://127.0.0.1:{closed_port()}"]},
                "stuck": {"destinations": ["cmd:false"]}})
    yield write_config_file(tmp_path / "relay.toml", data)


def test_gauges_equal_spool_list_through_refusals_holds_and_restarts(
        cfg: Path, tmp_path: Path) -> None:
    relay = LoggedRelay(cfg).start()
    try:
        assert gauges(scrape(relay)) == Counter()
        for n in range(5):
            assert all(r == 0 for r in send_job(relay.port, Job(queue="obs", number=f"{n:03d}")))
        assert send_job(relay.port, Job(queue="obs", files=[b"y" * 10_000]))[-1] == 0x03
        with Wire(relay.port) as w:   # malformed: a path as the control file's name
            w.send(b"\x02obs\n\x0210 ../../etc/passwd\n")
            assert w.read_all()[-1:] == b"\n"
        assert all(r == 0 for r in send_job(relay.port, Job(queue="down")))
        # Read at once: the acknowledged job is counted before any scan could run.
        assert gauges(scrape(relay))[("down", "queued")] == 1
        for n in range(2):
            assert all(r == 0 for r in send_job(relay.port, Job(queue="stuck", number=f"{n}00")))
        # Delivered: counted once the job has left the spool (scheduler._delivered).
        wait_until(lambda: re.search(r'^lpdrelay_jobs_delivered_total\{[^}]*queue="obs"\} 5\.0$',
                                     scrape(relay), re.M)
                   and listed(cfg)[("stuck", "held")] == 2, timeout=30)
        assert len(list((tmp_path / "out" / "obs").glob("*.json"))) == 5
        assert gauges(scrape(relay))[("obs", "queued")] == 0   # delivered means gone, at once
        assert assert_gauges_match(relay, cfg, tmp_path) == Counter(
            {("down", "queued"): 1, ("stuck", "held"): 2})

        relay.kill9()
        relay = LoggedRelay(cfg).start()
        assert_gauges_match(relay, cfg, tmp_path)   # rebuilt at start, before any scan

        held = [line.split()[0] for line in cli(cfg, "list").splitlines() if " held " in line]
        assert "dequeued" in cli(cfg, "purge", held[0])
        assert assert_gauges_match(relay, cfg, tmp_path)[("stuck", "held")] == 1
        cli(cfg, "retry", held[1])      # released, tried again, held again
        wait_until(lambda: len(relay.events("job_held")) >= 1, timeout=30)
        assert assert_gauges_match(relay, cfg, tmp_path) == Counter(
            {("down", "queued"): 1, ("stuck", "held"): 1})
        assert not relay.tracebacks()
    finally:
        relay.kill9() if relay.alive() else None
