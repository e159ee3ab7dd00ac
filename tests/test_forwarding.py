"""Forwarding through the origin-port pool to a real LPRng lpd (SPEC §5): 500 jobs
through the 11 reserved ports 721-731, none failing, the pool's waits reported."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio

from relay.loadgen import run_load
from relay.sinks.lpdoverlap import OVERLAP
from relay.uri import parse_destination
from tests.daemon import DaemonThread, relay_config
from tests.peers import LprngServer, release_time_wait
from tests.test_server import wait_for

pytestmark = [pytest.mark.peers, pytest.mark.root]

JOBS = 500


@pytest.mark.skipif(os.geteuid() != 0, reason="binding ports 721-731 needs root")
def test_500_jobs_through_721_731_to_lprng(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           ) -> None:
    with LprngServer(tmp_path / "lprng", queues=("Ward3",)) as lprng:
        dest = f"lpd://127.0.0.1:{lprng.port}/Ward3"
        cfg = relay_config(
            tmp_path, queues={"ward3": {"destinations": [dest], "concurrency": 16}},
            origin_ports={"range": "721-731"},
            retry={"initial": "100ms", "max": "1s", "give_up_after": "1h"})
        with DaemonThread(cfg) as relay:
            src = parse_destination(f"lpd://127.0.0.1:{relay.port}/ward3")
            start = time.monotonic()
            sent = trio.run(lambda: run_load(src, jobs=JOBS, concurrency=32, size=1024))
            assert sent.ok == JOBS, sent.failures
            wait_for(lambda: relay.metric("lpdrelay_jobs_delivered_total", queue="ward3",
                                          destination=dest) == JOBS, timeout=120)
            seconds = time.monotonic() - start
            jobs = lprng.wait_jobs("Ward3", JOBS, timeout=30)
            retries = relay.metric("lpdrelay_delivery_attempts_total", destination=dest,
                                   result="retry")
            exhausted = relay.metric("lpdrelay_origin_port_exhausted_total")
            waits = relay.metric("lpdrelay_origin_port_wait_seconds_count")
            wait_sum = relay.metric("lpdrelay_origin_port_wait_seconds_sum")
            in_use = relay.metric("lpdrelay_origin_ports_in_use")
    # Leave 721-731 free for the next program that binds them without SO_REUSEADDR.
    release_time_wait(range(721, 732), lprng.port)
    assert len(jobs) == JOBS
    assert sorted(j.data for j in jobs) == sorted([jobs[0].data] * JOBS)
    assert all(len(j.data) == 1024 for j in jobs)
    # One pool acquisition per attempt, and one for the lpq that tells the
    # sink this receiver is no lpd-relay (so it keeps one job a connection).
    # To LPRng a run's connections overlap: a run that fails also drops the
    # connections made ahead for the jobs behind it (at most OVERLAP - 1,
    # relay.sinks.lpdoverlap), and those jobs connect again when retried.
    assert JOBS + retries + 1 <= waits <= JOBS + retries * OVERLAP + 1
    assert in_use == 0
    with capsys.disabled():
        print(f"\n500 jobs relay -> LPRng via 721-731: {JOBS / seconds:.0f} jobs/s end to end, "
              f"retries {retries:.0f}, pool exhaustion waits {exhausted:.0f}, "
              f"total wait {wait_sum:.3f}s over {waits:.0f} acquisitions")
