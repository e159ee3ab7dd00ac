"""Large exact byte counts in the core (SPEC §4.2), against both parsers.

A count is exact unless it is one of the known "until the sender closes"
forms (0, 2147483647, 999999999999, 125899906843000) or above ``max_job``.
An exact count of 4 GiB and more ends after that many bytes and its NUL:
the file's end event comes then, not at EOF, so a sender waiting for the ack
gets it, and the NUL is never part of the data.  The 5 GiB streams here are
one reused buffer fed again and again (no 5 GiB in memory); the end-to-end
runs through a real daemon are in tests/test_large_job.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.reference_parser import ReferenceParser
from relay import _core
from relay._core import (
    FAKE_LENGTHS,
    AbortJob,
    DataChunk,
    DataFileEnd,
    DataFileStart,
    ReceiveJob,
    ServerParser,
)
from relay.errors import ProtocolError
from tests.conftest import _as_core, parse_chunks

GIB = 2**30
CHUNK = 1024 * 1024


def _parser(impl: str, **limits: int) -> Any:
    return (ServerParser if impl == "c" else ReferenceParser)(**limits)


def _need(impl: str) -> object:
    return _core.NEED_DATA if impl == "c" else "NEED_DATA"


def _events(parser: Any, impl: str, data: bytes) -> list[Any]:
    """Feed one buffer; the events up to NEED_DATA."""
    parser.receive_data(data)
    out: list[Any] = []
    while (ev := parser.next_event()) is not _need(impl):
        out.append(ev)
    return out


def test_the_fake_lengths_are_exactly_the_known_forms() -> None:
    assert {0, 2147483647, 999999999999, 125899906843000} == FAKE_LENGTHS


@pytest.mark.parametrize("impl", ["c", "py"])
@pytest.mark.parametrize("count", [2**32 - 1, 2**32, 2**32 + 1, 5 * GIB, 999999999998,
                                   999999999999 + 1, 125899906843000 - 1])
def test_a_large_count_is_exact_and_a_short_stream_is_truncated(impl: str, count: int) -> None:
    stream = b"\x02lp\n\x03%d dfA001h\n" % count + b"x" * 100
    with pytest.raises(ProtocolError) as info:
        parse_chunks([stream], impl, max_job=2**50)
    assert (info.value.reply, info.value.reason) == (None, "malformed")
    parser = _parser(impl, max_job=2**50)
    events = _events(parser, impl, stream)
    assert [type(e).__name__ for e in events] == ["ReceiveJob", "DataFileStart", "DataChunk"]
    assert events[1].length == count


@pytest.mark.parametrize("impl", ["c", "py"])
@pytest.mark.parametrize("count", sorted(FAKE_LENGTHS))
def test_the_fake_forms_run_until_eof_whatever_max_job(impl: str, count: int) -> None:
    body = b"%!PS\nshowpage\n\0"
    events = parse_chunks([b"\x02lp\n\x03%d dfA001h\n" % count + body], impl, max_job=2**50)
    assert events[1] == DataFileStart(name="dfA001h", length=None)
    assert events[-2] == DataFileEnd(name="dfA001h", size=len(body), terminated=False)


@pytest.mark.parametrize("impl", ["c", "py"])
def test_a_count_above_max_job_runs_until_eof_and_is_bounded(impl: str) -> None:
    kept = parse_chunks([b"\x02lp\n\x032000 dfA001h\n" + b"x" * 1000], impl, max_job=1000)
    assert kept[1:3] == [DataFileStart(name="dfA001h", length=None), DataChunk(data=b"x" * 1000)]
    assert kept[3] == DataFileEnd(name="dfA001h", size=1000, terminated=False)
    with pytest.raises(ProtocolError) as info:
        parse_chunks([b"\x02lp\n\x032000 dfA001h\n" + b"x" * 1001], impl, max_job=1000)
    assert (info.value.reply, info.value.reason) == (3, "too_large")


@pytest.mark.parametrize("impl", ["c", "py"])
@pytest.mark.parametrize("nul_apart", [False, True], ids=["nul-with-tail", "nul-alone"])
def test_a_5gib_exact_file_ends_at_its_nul_not_at_eof(impl: str, nul_apart: bool) -> None:
    """5 GiB + NUL, byte for byte: the end event before EOF, NUL not in the data."""
    count = 5 * GIB
    parser = _parser(impl, max_job=8 * GIB)
    head = _events(parser, impl, b"\x02lp\n\x03%d dfA001h\n" % count)
    assert [_as_core(e) for e in head] == [ReceiveJob(queue="lp"),
                                           DataFileStart(name="dfA001h", length=count)]
    block = bytes(range(256)) * (CHUNK // 256)
    seen = 0
    for _ in range(count // CHUNK - 1):
        chunks = _events(parser, impl, block)
        assert len(chunks) == 1 and chunks[0].data.obj is block
        seen += len(chunks[0].data)
    # The last MiB ends in a marker, then the NUL (with or without more bytes).
    last = block[:-4] + b"END!"
    tail = _events(parser, impl, last + (b"" if nul_apart else b"\0\x01\n"))
    if nul_apart:
        tail += _events(parser, impl, b"\0")
    assert bytes(tail[0].data) == last
    seen += len(tail[0].data)
    end = tail[1]
    assert (end.name, end.size, end.terminated) == ("dfA001h", count, True)
    assert seen == count
    if not nul_apart:
        assert _as_core(tail[2]) == AbortJob()   # the bytes after the NUL parse on


def test_consume_body_moves_a_5gib_exact_body() -> None:
    """The splice path: the body is accounted, never seen, and the NUL still ends it."""
    parser = ServerParser(max_job=8 * GIB)
    parser.receive_data(b"\x02lp\n\x03%d dfA001h\n" % (5 * GIB))
    assert parser.next_event() == ReceiveJob(queue="lp")
    assert parser.next_event() == DataFileStart(name="dfA001h", length=5 * GIB)
    assert parser.next_event() is _core.NEED_DATA
    for _ in range(5):
        parser.consume_body(GIB - 1)
    assert parser.body_remaining == 5
    parser.consume_body(5)
    parser.receive_data(b"\0")
    assert parser.next_event() == DataFileEnd(name="dfA001h", size=5 * GIB, terminated=True)


@pytest.mark.parametrize("impl", ["c", "py"])
def test_an_absurd_count_is_until_eof_even_under_a_huge_max_job(impl: str) -> None:
    """30 digits saturate in the core; with max_job of 2**62 that is still until EOF."""
    events = parse_chunks([b"\x02lp\n\x03%d dfA001h\n" % 10**30 + b"data"], impl,
                          max_job=2**62)
    assert events[1] == DataFileStart(name="dfA001h", length=None)
    assert events[-2] == DataFileEnd(name="dfA001h", size=4, terminated=False)
