"""Client side of the core: header builders, ReplyParser, and sender -> server round trips."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import _core
from relay._core import (
    LENGTH_STREAM,
    LENGTH_WINDOWS,
    NEED_DATA,
    ControlFileEnd,
    ControlFileStart,
    DataChunk,
    DataFileEnd,
    DataFileStart,
    EndOfStream,
    ReceiveJob,
    Reply,
    ReplyParser,
)
from relay.errors import ProtocolError
from tests.conftest import parse_chunks


def test_builders_write_rfc_1179_lines() -> None:
    assert _core.receive_job("ward3") == b"\x02ward3\n"
    assert _core.control_header("cfA123relay", 58) == b"\x0258 cfA123relay\n"
    assert _core.data_header("dfA123relay", 4096) == b"\x034096 dfA123relay\n"
    assert _core.data_header("dfA123relay", 10**10, "count") == b"\x0310000000000 dfA123relay\n"
    assert _core.data_header("dfA123relay", 4096, "stream") == b"\x030 dfA123relay\n"
    assert _core.data_header("dfA123relay", 4096, "windows") == b"\x03125899906843000 dfA123relay\n"
    assert (LENGTH_STREAM, LENGTH_WINDOWS) == (0, 125899906843000)
    assert _core.abort_job() == b"\x01\n"
    assert _core.print_waiting("ward3") == b"\x01ward3\n"
    assert _core.queue_state("ward3", long=False) == b"\x03ward3\n"
    assert _core.queue_state("ward3", long=True, items=["alice", "12"]) == b"\x04ward3 alice 12\n"
    assert _core.remove_jobs("ward3", "root", ["-all"]) == b"\x05ward3 root -all\n"
    assert _core.remove_jobs("ward3", "alice", []) == b"\x05ward3 alice\n"


@pytest.mark.parametrize("call", [
    lambda: _core.receive_job(""),
    lambda: _core.receive_job("a\nb"),
    lambda: _core.receive_job("a b"),
    lambda: _core.receive_job("caf\u20ac"),
    lambda: _core.control_header("cfA1 h", 10),
    lambda: _core.control_header("cfA1h", 0),
    lambda: _core.data_header("dfA1h", -1),
    lambda: _core.data_header("dfA1h", 1, "chunked"),
    lambda: _core.queue_state("q", items=["a\tb"]),
    lambda: _core.remove_jobs("q", "", []),
])
def test_builders_refuse_what_would_break_framing(call: Any) -> None:
    with pytest.raises(ValueError):
        call()


def replies(*chunks: bytes, eof: bool = True) -> list[Any]:
    parser = ReplyParser()
    out: list[Any] = []
    for chunk in [*chunks, *([b""] if eof else [])]:
        parser.feed(chunk)
        while (reply := parser.next_reply()) is not NEED_DATA:
            out.append(reply)
            if reply.code == -1:
                return out
    return [*out, NEED_DATA]


CLOSED = Reply(code=-1, message="connection closed")
REPLY_CASES: dict[str, tuple[bytes, list[Any]]] = {
    "ok": (b"\x00", [Reply(code=0), CLOSED]),
    "ok-ok-ok": (b"\x00\x00\x00", [Reply(code=0)] * 3 + [CLOSED]),
    "stray-lf": (b"\x00\n\x00\r\n\x00", [Reply(code=0)] * 3 + [CLOSED]),
    "lprng-error-line": (b"\x03lp: job size 5000 is larger than 10K\n",
                         [Reply(code=3, message="lp: job size 5000 is larger than 10K"), CLOSED]),
    "lprng-error-eof": (b"\x02lp: spooling disabled",
                        [Reply(code=2, message="lp: spooling disabled"), CLOSED]),
    "cups-bare-01": (b"\x01", [Reply(code=1, message=""), CLOSED]),
    "bsd-text": (b"lpd: Your host does not have line printer access\n",
                 [Reply(code=1, message="lpd: Your host does not have line printer access"),
                  CLOSED]),
    "ok-then-refusal": (b"\x00\x01queue not accepting\n",
                        [Reply(code=0), Reply(code=1, message="queue not accepting"), CLOSED]),
    "nothing": (b"", [CLOSED]),
    "utf8-message": ("\x03file trop grande: é\n".encode(),
                     [Reply(code=3, message="file trop grande: é"), CLOSED]),
}


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("case", REPLY_CASES)
def test_reply_parser(case: str, bytewise: bool) -> None:
    raw, expected = REPLY_CASES[case]
    chunks = [raw[i:i + 1] for i in range(len(raw))] if bytewise else [raw]
    assert replies(*chunks) == expected


def test_refusal_waits_for_its_line_but_ok_does_not() -> None:
    assert replies(b"\x00", eof=False) == [Reply(code=0), NEED_DATA]
    assert replies(b"\x03too big", eof=False) == [NEED_DATA]


def test_long_messages_are_cut_and_the_rest_of_the_line_skipped() -> None:
    got = replies(b"\x03" + b"x" * 3000, b"y" * 3000 + b"\n\x00")
    assert got[0].code == 3 and len(got[0].message) == 1023
    assert got[1:] == [Reply(code=0), CLOSED]


@pytest.mark.parametrize("case", REPLY_CASES)
def test_take_ok_reads_as_next_reply_does(case: str) -> None:
    """Counting ok replies in bulk, then reading the rest one by one, gives the
    same replies as reading them all one by one."""
    raw, expected = REPLY_CASES[case]
    for most in range(len(expected) + 2):
        parser = ReplyParser()
        for chunk in (raw, b"") if raw else (b"",):
            parser.feed(chunk)
        taken = parser.take_ok(most)
        assert taken <= most
        rest = [parser.next_reply() for _ in expected[taken:]]
        assert [Reply(code=0)] * taken + rest == expected


def test_take_ok_stops_at_a_refusal_and_at_most() -> None:
    parser = ReplyParser()
    parser.feed(b"\x00\n\x00\r\n\x00\x00\x02busy\n\x00")
    assert parser.take_ok(3) == 3
    assert parser.take_ok(9) == 1          # then the refusal
    assert parser.take_ok(9) == 0
    assert parser.next_reply() == Reply(code=2, message="busy")
    assert parser.take_ok(9) == 1 and parser.next_reply() is NEED_DATA
    cut = ReplyParser()                    # in the middle of a cut-off message's line
    cut.feed(b"\x03" + b"x" * 3000)
    assert cut.next_reply().code == 3 and cut.take_ok(1) == 0


def test_reply_parser_misuse() -> None:
    parser = ReplyParser()
    parser.feed(b"")
    assert parser.next_reply() == CLOSED and parser.next_reply() == CLOSED
    with pytest.raises(RuntimeError):
        parser.feed(b"\x00")
    flood = ReplyParser()
    with pytest.raises(ProtocolError):
        flood.feed(b"\x01" * 20000)


# ---------------------------------------------------------- round trips

_NAME_HOST = st.text("abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=40)


@st.composite
def sessions(draw: st.DrawFn) -> list[dict[str, Any]]:
    """1-3 jobs: names, sizes up to 200 KiB, order, and the last file's mode."""
    jobs: list[dict[str, Any]] = []
    for j in range(draw(st.integers(1, 3))):
        host = draw(_NAME_HOST)
        num = f"{draw(st.integers(0, 999999)):0{draw(st.sampled_from([3, 6]))}d}"
        sizes = draw(st.lists(st.integers(1, 200 * 1024), min_size=1, max_size=3))
        jobs.append({"cf": f"cfA{num}{host}", "df": [f"df{'ABC'[i]}{num}{host}"
                                                     for i in range(len(sizes))],
                     "sizes": sizes, "control_first": draw(st.booleans()),
                     "seed": j, "queue": draw(_NAME_HOST)})
    last = jobs[-1]
    last["mode"] = draw(st.sampled_from(["count", "stream", "windows"]))
    if last["mode"] != "count":
        last["control_first"] = True  # only the session's very last file may run to EOF
        last["sizes"][-1] = draw(st.integers(0, 200 * 1024))
    return jobs


def _send(jobs: list[dict[str, Any]]) -> tuple[bytes, list[Any]]:
    wire: list[bytes] = [_core.receive_job(jobs[0]["queue"])]
    expected: list[Any] = [ReceiveJob(queue=jobs[0]["queue"])]
    for job in jobs:
        rng = random.Random(job["seed"])
        cf = "".join(f"l{n}\n" for n in job["df"]).encode() + b"Hhost\nPuser\n"
        cf_wire = [_core.control_header(job["cf"], len(cf)), cf, b"\0"]
        cf_events = [ControlFileStart(name=job["cf"], length=len(cf)),
                     ControlFileEnd(name=job["cf"], data=cf)]
        df_wire: list[bytes] = []
        df_events: list[Any] = []
        for i, (name, size) in enumerate(zip(job["df"], job["sizes"], strict=True)):
            body = rng.randbytes(size)
            streamed = job is jobs[-1] and i == len(job["df"]) - 1 and job["mode"] != "count"
            mode = job["mode"] if streamed else "count"
            df_wire += [_core.data_header(name, size, mode), body, b"" if streamed else b"\0"]
            df_events += [DataFileStart(name=name, length=None if streamed else size),
                          *([DataChunk(data=body)] if size else []),
                          DataFileEnd(name=name, size=size, terminated=not streamed)]
        first, then = (cf_wire, df_wire) if job["control_first"] else (df_wire, cf_wire)
        wire += first + then
        expected += (cf_events + df_events) if job["control_first"] else (df_events + cf_events)
    return b"".join(wire), [*expected, EndOfStream()]


@settings(max_examples=60, deadline=None)
@given(sessions(), st.integers(1, 70000))
def test_client_serialize_server_parse_round_trip(jobs: list[dict[str, Any]], step: int) -> None:
    wire, expected = _send(jobs)
    chunks = [wire[i:i + step] for i in range(0, len(wire), step)]
    assert parse_chunks(chunks) == expected
