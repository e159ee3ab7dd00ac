"""Microbenchmarks of the protocol core, each against a baseline, reported as ratios.

small-jobs: 10,000 small jobs (one 0x02 session each: a ~100-byte control
file and a 1 KiB data file), parsed by the compiled core ("c") and by the
pure-Python reference parser ("py").  Target: c at least 10x faster.

body-stream: 1 GiB of data-file body through ServerParser in 64 KiB chunks
(one reused buffer, as ``recv_into`` gives it), against a loop that only
takes a memoryview slice of each chunk.  Target: within 2x of slicing.

Sizes scale with LPD_BENCH_SCALE; see benchmarks/conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from benchmarks.reference_parser import NEED_DATA as PY_NEED_DATA
from benchmarks.reference_parser import ReferenceParser
from relay import _core

CHUNK = 64 * 1024


def small_job(i: int) -> bytes:
    host = f"ws{i % 10000:04d}.example.org"
    num = f"{i % 1000:03d}"
    cf = (f"H{host}\nPuser{i % 97}\nJreport-{i}.txt\nldfA{num}{host}\n"
          f"UdfA{num}{host}\nNreport-{i}.txt\n").encode()
    body = bytes([i % 251]) * 1024
    return (b"\x02lp\n" + b"\x02%d cfA%s%s\n" % (len(cf), num.encode(), host.encode()) + cf
            + b"\0" + b"\x03%d dfA%s%s\n" % (len(body), num.encode(), host.encode()) + body
            + b"\0")


def parse_all(jobs: list[bytes], factory: Callable[[], Any], need: object) -> int:
    """Parse each job as its own connection; the number of events seen."""
    count = 0
    for job in jobs:
        parser = factory()
        parser.receive_data(job)
        while parser.next_event() is not need:
            count += 1
        parser.receive_data(b"")
        count += 1
        parser.next_event()  # EndOfStream
    return count


@pytest.fixture(scope="module")
def jobs(bench_scale: float) -> list[bytes]:
    return [small_job(i) for i in range(max(1, int(10_000 * bench_scale)))]


@pytest.mark.parametrize("impl", ["c", "py"])
def test_small_jobs(benchmark: Any, record_ratio: Any, jobs: list[bytes], impl: str) -> None:
    benchmark.group = "small-jobs"
    if impl == "c":
        events = benchmark(parse_all, jobs, _core.ServerParser, _core.NEED_DATA)
    else:
        events = benchmark(parse_all, jobs, ReferenceParser, PY_NEED_DATA)
    # ReceiveJob, 2 control, 3 data events, EndOfStream per job
    assert events == 7 * len(jobs)
    record_ratio(benchmark, "small-jobs", impl, len(jobs), "jobs")


def stream_through_parser(buf: bytearray, chunks: int) -> int:
    parser = _core.ServerParser(max_job=2**62)
    parser.receive_data(b"\x02lp\n\x03%d dfA001relay\n" % (chunks * len(buf)))
    while parser.next_event() is not _core.NEED_DATA:
        pass
    seen = 0
    need = _core.NEED_DATA
    for _ in range(chunks):
        parser.receive_data(buf)
        while (ev := parser.next_event()) is not need:
            seen += len(ev.data)  # type: ignore[union-attr]
    return seen


def slice_only(buf: bytearray, chunks: int) -> int:
    remaining = chunks * len(buf)
    seen = 0
    for _ in range(chunks):
        view = memoryview(buf)[:remaining]
        remaining -= len(view)
        seen += len(view)
    return seen


@pytest.mark.parametrize("impl", ["parser", "slicing"])
def test_body_stream(benchmark: Any, record_ratio: Any, bench_scale: float, impl: str) -> None:
    benchmark.group = "body-stream"
    buf = bytearray(CHUNK)
    chunks = max(1, int(2**30 * bench_scale) // CHUNK)
    fn = stream_through_parser if impl == "parser" else slice_only
    assert benchmark(fn, buf, chunks) == chunks * CHUNK
    record_ratio(benchmark, "body-stream", impl, chunks * CHUNK, "bytes")
