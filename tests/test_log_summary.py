"""The per-interval ``jobs_summary`` line that replaces per-job lines at ``info``."""

from __future__ import annotations

import io
from collections.abc import Iterator

import orjson
import pytest
import trio
import trio.testing

from relay import log


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    log.configure(fmt="json", level="info", stream=buf)
    log.write_summary(0)          # nothing left over from another test
    buf.seek(0)
    buf.truncate()
    yield buf
    log.configure(stream=None)


def _events(buf: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in buf.getvalue().splitlines()]


def test_summary_counts_and_resets(captured: io.StringIO) -> None:
    for _ in range(3):
        log.count("received")
        log.event("debug", "job_received", job="x")    # not written at info
    log.count("delivered", 2)
    log.write_summary(10.0)
    log.write_summary(10.0)                             # idle: no line
    (line,) = _events(captured)
    assert line["event"] == "jobs_summary" and line["level"] == "info"
    assert (line["received"], line["delivered"], line["seconds"]) == (3, 2, 10.0)


def test_summary_loop_writes_each_interval_and_at_the_end(captured: io.StringIO) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.summary_loop, 10.0)
            log.count("received")
            await trio.sleep(15)      # one interval passed
            log.count("delivered")
            await trio.sleep(2)
            nursery.cancel_scope.cancel()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    first, last = _events(captured)
    assert (first["received"], first["seconds"]) == (1, 10.0)
    assert last["delivered"] == 1 and "received" not in last
