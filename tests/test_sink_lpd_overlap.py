"""The lpd:// sink's overlapped one-job connections (relay/sinks/lpdoverlap.py):
against real LPRng, and a scripted receiver that refuses a job in the middle."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from relay.sinks import SinkContext, make_sink
from relay.sinks.lpd import LpdSink
from relay.sinks.lpdoverlap import OVERLAP_RUN
from relay.spool import JobMeta
from relay.uri import parse_destination
from tests.peers import LprngServer
from tests.test_sink_lpd import make_job, make_job_in


def _jobs(tmp_path: Path, n: int) -> list[JobMeta]:
    spool, first = make_job(tmp_path)
    return [first] + [make_job_in(spool, i) for i in range(2, n + 1)]


def _run(sink: LpdSink, jobs: list[JobMeta]) -> tuple[int, Exception | None]:
    async def main() -> tuple[int, Exception | None]:
        with trio.fail_after(60):
            return await sink.deliver_many(jobs)
    return trio.run(main)


@pytest.mark.peers
def test_lprng_gets_overlapped_jobs_in_order(tmp_path: Path) -> None:
    jobs = _jobs(tmp_path, 12)
    with LprngServer(tmp_path / "lprng", queues=("q",)) as lprng:
        sink = make_sink(parse_destination(f"lpd://127.0.0.1:{lprng.port}/q"), SinkContext())
        assert isinstance(sink, LpdSink)
        assert _run(sink, jobs[:1]) == (1, None)
        assert sink.overlap and sink.per_attempt == OVERLAP_RUN
        assert _run(sink, jobs[1:]) == (11, None)
        received = lprng.wait_jobs("q", 12)
    assert [j.control.get("P") for j in received] == ["nurse"] + [f"u{i}" for i in range(2, 13)]
