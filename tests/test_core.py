"""ServerParser: RFC 1179 and field streams, every refusal, API rules, fuzzing.

Each stream is fed whole, one byte at a time, as a bytearray and as 7-byte
memoryview slices; the events must not depend on the split.  Streams are
written out byte for byte here (not built with the client helpers) so the
expectations come from the RFC and FIELD-NOTES, not from the code under test.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay._core import (
    NEED_DATA,
    AbortJob,
    Command,
    ControlFileEnd,
    ControlFileStart,
    DataChunk,
    DataFileEnd,
    DataFileStart,
    EndOfStream,
    ReceiveJob,
    ServerParser,
)
from relay.errors import REJECT_REASONS, ProtocolError
from tests.conftest import parse_chunks

CF = b"Hlaptop\nPalice\nJreport.pdf\nldfA123laptop\nUdfA123laptop\nNreport.pdf\n"
DATA = b"%!PS-Adobe-3.0\nshowpage\n"


def _whole(s: bytes) -> list[Any]:
    return [s]


def _bytewise(s: bytes) -> list[Any]:
    return [s[i:i + 1] for i in range(len(s))]


def _bytearray(s: bytes) -> list[Any]:
    return [bytearray(s)]


def _memoryview7(s: bytes) -> list[Any]:
    view = memoryview(bytearray(s))
    return [view[i:i + 7] for i in range(0, len(s), 7)]


SPLITS: dict[str, Callable[[bytes], list[Any]]] = {
    "whole": _whole, "bytewise": _bytewise, "bytearray": _bytearray, "mv7": _memoryview7,
}


def control(name: str, body: bytes = CF, tail: bytes = b"\0") -> bytes:
    return b"\x02%d %s\n" % (len(body), name.encode()) + body + tail


def data(name: str, body: bytes = DATA, tail: bytes = b"\0", count: int | None = None) -> bytes:
    n = len(body) if count is None else count
    return b"\x03%d %s\n" % (n, name.encode()) + body + tail


def job_events(cf_name: str, df_names: Iterable[str], *, control_first: bool = True,
               body: bytes = DATA) -> list[Any]:
    cf = [ControlFileStart(name=cf_name, length=len(CF)), ControlFileEnd(name=cf_name, data=CF)]
    dfs: list[Any] = []
    for name in df_names:
        dfs += [DataFileStart(name=name, length=len(body)), DataChunk(data=body),
                DataFileEnd(name=name, size=len(body), terminated=True)]
    return cf + dfs if control_first else dfs + cf


STREAM = DataFileStart  # alias for readability in the table below
CASES: dict[str, tuple[bytes, list[Any]]] = {
    "rfc-control-first": (
        b"\x02lp\n" + control("cfA123laptop") + data("dfA123laptop"),
        [ReceiveJob(queue="lp"), *job_events("cfA123laptop", ["dfA123laptop"]), EndOfStream()]),
    "bsd-data-first": (
        b"\x02lp\n" + data("dfA123laptop") + control("cfA123laptop"),
        [ReceiveJob(queue="lp"), *job_events("cfA123laptop", ["dfA123laptop"],
                                             control_first=False), EndOfStream()]),
    "several-data-files": (
        b"\x02lp\n" + control("cfA123laptop") + data("dfA123laptop") + data("dfB123laptop")
        + data("dfa123laptop"),
        [ReceiveJob(queue="lp"),
         *job_events("cfA123laptop", ["dfA123laptop", "dfB123laptop", "dfa123laptop"]),
         EndOfStream()]),
    "lprng-6-digits": (
        b"\x02lp\n" + control("cfA123456laptop") + data("dfA123456laptop"),
        [ReceiveJob(queue="lp"), *job_events("cfA123456laptop", ["dfA123456laptop"]),
         EndOfStream()]),
    "hp-c-prefix": (
        b"\x02lp\n" + control("cA123laptop") + data("dA123laptop"),
        [ReceiveJob(queue="lp"), *job_events("cA123laptop", ["dA123laptop"]), EndOfStream()]),
    "crlf-lines": (
        b"\x02lp\r\n" + b"\x02%d cfA1host\r\n" % len(CF) + CF + b"\0"
        + b"\x03%d dfA1host\r\n" % len(DATA) + DATA + b"\0",
        [ReceiveJob(queue="lp"), *job_events("cfA1host", ["dfA1host"]), EndOfStream()]),
    "two-jobs-one-session": (
        b"\x02lp\n" + control("cfA001h") + data("dfA001h") + control("cfA002h") + data("dfA002h"),
        [ReceiveJob(queue="lp"), *job_events("cfA001h", ["dfA001h"]),
         *job_events("cfA002h", ["dfA002h"]), EndOfStream()]),
    "abort-then-new-job": (
        b"\x02lp\n" + control("cfA001h") + b"\x01\n" + control("cfA002h") + data("dfA002h"),
        [ReceiveJob(queue="lp"), *job_events("cfA001h", []), AbortJob(),
         *job_events("cfA002h", ["dfA002h"]), EndOfStream()]),
    "resent-queue-line": (
        b"\x02lp\n" + control("cfA001h") + b"\x02lp\n" + data("dfA001h"),
        [ReceiveJob(queue="lp"), *job_events("cfA001h", []), ReceiveJob(queue="lp"),
         *job_events("cfA001h", ["dfA001h"])[2:], EndOfStream()]),
    "missing-nul-before-eof": (
        b"\x02lp\n" + control("cfA001h") + data("dfA001h", tail=b""),
        [ReceiveJob(queue="lp"), *job_events("cfA001h", [])[:2],
         DataFileStart(name="dfA001h", length=len(DATA)), DataChunk(data=DATA),
         DataFileEnd(name="dfA001h", size=len(DATA), terminated=False), EndOfStream()]),
    "missing-nul-before-subcommand": (
        b"\x02lp\n" + data("dfA001h", tail=b"") + control("cfA001h", tail=b""),
        [ReceiveJob(queue="lp"), DataFileStart(name="dfA001h", length=len(DATA)),
         DataChunk(data=DATA), DataFileEnd(name="dfA001h", size=len(DATA), terminated=False),
         *job_events("cfA001h", []), EndOfStream()]),
    "empty-connection": (b"", [EndOfStream()]),
    "lpq-short": (b"\x03lp\n", [Command(code=3, queue="lp", operands=()), EndOfStream()]),
    "lpq-long-items": (b"\x04lp alice 12\n",
                       [Command(code=4, queue="lp", operands=("alice", "12")), EndOfStream()]),
    "lprm-tabs": (b"\x05lp\troot \t-all 7\r\n",
                  [Command(code=5, queue="lp", operands=("root", "-all", "7")), EndOfStream()]),
    "lpc-control": (b"\x06ward3 root move ward3 all lab\n",
                    [Command(code=6, queue="ward3",
                             operands=("root", "move", "ward3", "all", "lab")), EndOfStream()]),
    "lpc-status-bare": (b"\x06ward3 root status\n",
                        [Command(code=6, queue="ward3", operands=("root", "status")),
                         EndOfStream()]),
    "print-waiting-then-junk": (b"\x01lp\n\xff\x00junk\n" * 3,
                                [Command(code=1, queue="lp", operands=()), EndOfStream()]),
}
# Fake lengths: the data runs until EOF, kept byte for byte (a final NUL stays).
# A count above max_job (default 4 GiB) reads the same way (SPEC §4.2).
for label, count in [("zero", 0), ("int32max", 2147483647), ("cups", 999999999999),
                     ("windows", 125899906843000), ("over-max-job", 4 * 2**30 + 1),
                     ("saturated", 10**30)]:
    for tail in (b"", b"\0"):
        CASES[f"until-eof-{label}-{'nul' if tail else 'nonul'}"] = (
            b"\x02lp\n" + control("cfA001win") + data("dfA001win", tail=tail, count=count),
            [ReceiveJob(queue="lp"), *job_events("cfA001win", []),
             STREAM(name="dfA001win", length=None), DataChunk(data=DATA + tail),
             DataFileEnd(name="dfA001win", size=len(DATA) + len(tail), terminated=False),
             EndOfStream()])
CASES["until-eof-empty-body"] = (
    b"\x02lp\n" + b"\x030 dfA001h\n",
    [ReceiveJob(queue="lp"), DataFileStart(name="dfA001h", length=None),
     DataFileEnd(name="dfA001h", size=0, terminated=False), EndOfStream()])


@pytest.mark.parametrize("impl", ["c", "py"])
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("case", CASES)
def test_stream(case: str, split: str, impl: str) -> None:
    stream, expected = CASES[case]
    assert parse_chunks(SPLITS[split](stream), impl) == expected


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1][0] == ReceiveJob(queue="lp")
                                  and "until-eof" not in c and "missing-nul-before-eof" not in c])
def test_trailing_bytes_wait_for_the_next_subcommand(case: str) -> None:
    """A job stream followed by the start of another line: same events, then NEED_DATA."""
    stream, expected = CASES[case]
    parser = ServerParser()
    parser.receive_data(stream + b"\x03" + b"12")
    events = []
    while (ev := parser.next_event()) is not NEED_DATA:
        events.append(DataChunk(data=bytes(ev.data)) if isinstance(ev, DataChunk) else ev)
    assert events == expected[:-1]
    assert parser.buffered == 3


def test_trailing_bytes_after_a_command_are_discarded() -> None:
    parser = ServerParser(max_line=16)
    parser.receive_data(b"\x03lp\n" + b"x" * 100_000)
    assert parser.next_event() == Command(code=3, queue="lp", operands=())
    assert parser.next_event() is NEED_DATA
    assert parser.buffered == 0


REFUSALS: dict[str, tuple[bytes, dict[str, int], int | None, str]] = {
    "long-command-line": (b"\x02" + b"q" * 2000 + b"\n", {}, 3, "malformed"),
    "long-subcommand-line": (b"\x02lp\n\x03" + b"9" * 1100 + b" dfA1h\n", {}, 3, "malformed"),
    "control-over-max": (b"\x02lp\n\x0270000 cfA1h\n", {}, 3, "too_large"),
    "control-over-small-max": (b"\x02lp\n" + control("cfA1h"), {"max_control": 10}, 3,
                               "too_large"),
    "control-length-0": (b"\x02lp\n\x020 cfA1h\n", {}, 3, "malformed"),
    "control-length-int32max": (b"\x02lp\n\x022147483647 cfA1h\n", {}, 3, "malformed"),
    "control-length-cups": (b"\x02lp\n\x02999999999999 cfA1h\n", {}, 3, "malformed"),
    # A count above max_job reads as until-EOF (SPEC §4.2), still bounded by max_job.
    "data-over-max-job": (b"\x02lp\n\x031001 dfA1h\n" + b"x" * 1001, {"max_job": 1000}, 3,
                          "too_large"),
    "stream-over-max-job": (b"\x02lp\n\x030 dfA1h\n" + b"x" * 1001, {"max_job": 1000}, 3,
                            "too_large"),
    "bad-command-0x00": (b"\x00lp\n", {}, 3, "malformed"),
    "bad-command-0x06": (b"\x06lp\n", {}, 3, "malformed"),
    "lpc-without-operation": (b"\x06lp root\n", {}, 3, "malformed"),
    "bad-command-0x09": (b"\x09lp root status\n", {}, 3, "malformed"),
    "block-transfer-0x07": (b"\x07lp 100\n", {}, 3, "malformed"),
    "bad-command-text": (b"GET / HTTP/1.0\r\n\r\n", {}, 3, "malformed"),
    "empty-command-line": (b"\n", {}, 3, "malformed"),
    "queue-missing": (b"\x02\n", {}, 3, "malformed"),
    "queue-control-char": (b"\x02l\x1bp\n", {}, 3, "malformed"),
    "queue-two-tokens": (b"\x02lp extra\n", {}, 3, "malformed"),
    "lprm-without-agent": (b"\x05lp\n", {}, 3, "malformed"),
    "bad-subcommand": (b"\x02lp\n\x04 12 dfA1h\n", {}, 3, "malformed"),
    "bad-count": (b"\x02lp\n\x0312x dfA1h\n", {}, 3, "malformed"),
    "negative-count": (b"\x02lp\n\x03-5 dfA1h\n", {}, 3, "malformed"),
    "count-without-name": (b"\x02lp\n\x0312\n", {}, 3, "malformed"),
    "three-operands": (b"\x02lp\n\x0312 dfA1h extra\n", {}, 3, "malformed"),
    "byte-instead-of-nul": (b"\x02lp\n" + data("dfA1h", tail=b"X"), {}, 3, "malformed"),
    "truncated-data": (b"\x02lp\n\x03100 dfA1h\n" + b"x" * 99, {}, None, "malformed"),
    "truncated-control": (b"\x02lp\n\x02100 cfA1h\n" + b"H" * 50, {}, None, "malformed"),
    "truncated-command-line": (b"\x02lp", {}, None, "malformed"),
    "truncated-subcommand-line": (b"\x02lp\n\x03100 df", {}, None, "malformed"),
}
for bad in ["..", ".", ".hidden", "cf/etc/passwd", "cfA\\x", "cfA\x01x", "cfA\x7fx",
            "c" * 256, "dfA123h", "xfA123h"]:
    REFUSALS[f"control-name-{bad[:12]!r}"] = (
        b"\x02lp\n\x0210 " + bad.encode("latin-1") + b"\n", {}, 3, "malformed")
for bad in ["../x", "/etc/passwd", "d\\x", "cfA123h", "d" * 256]:
    REFUSALS[f"data-name-{bad[:12]!r}"] = (
        b"\x02lp\n\x0310 " + bad.encode("latin-1") + b"\n", {}, 3, "malformed")


@pytest.mark.parametrize("impl", ["c", "py"])
@pytest.mark.parametrize("split", ["whole", "bytewise", "mv7"])
@pytest.mark.parametrize("case", REFUSALS)
def test_refusal(case: str, split: str, impl: str) -> None:
    stream, limits, reply, reason = REFUSALS[case]
    with pytest.raises(ProtocolError) as info:
        parse_chunks(SPLITS[split](stream), impl, **limits)
    assert (info.value.reply, info.value.reason) == (reply, reason)


def test_long_line_refused_before_its_end_arrives() -> None:
    parser = ServerParser(max_line=64)
    parser.receive_data(b"\x02" + b"q" * 64)
    with pytest.raises(ProtocolError):
        parser.next_event()
    assert parser.buffered <= 64


def test_names_are_latin1() -> None:
    events = parse_chunks([b"\x02dru\xe9\n\x02%d cfA1h\xe9\n" % len(CF) + CF + b"\0"])
    assert events[:2] == [ReceiveJob(queue="dru\xe9"), ControlFileStart(name="cfA1h\xe9",
                                                                          length=len(CF))]


def test_chunks_are_slices_of_the_callers_buffer() -> None:
    buf = bytearray(b"\x02lp\n\x0310 dfA1h\n0123456789\0")
    parser = ServerParser()
    parser.receive_data(memoryview(buf))
    events = [parser.next_event() for _ in range(3)]
    chunk = events[2]
    assert isinstance(chunk, DataChunk)
    assert chunk.data.obj is buf and bytes(chunk.data) == b"0123456789"
    buf[23] = ord("X")  # a view, not a copy
    assert bytes(chunk.data)[-1:] == b"X"


def test_a_body_only_buffer_is_handed_out_without_slicing() -> None:
    parser = ServerParser()
    parser.receive_data(b"\x02lp\n\x0310 dfA1h\n")
    while parser.next_event() is not NEED_DATA:
        pass
    view = memoryview(b"0123456789")
    parser.receive_data(view)
    chunk = parser.next_event()
    assert isinstance(chunk, DataChunk) and chunk.data is view


def test_consume_body_counted() -> None:
    parser = ServerParser()
    parser.receive_data(b"\x02lp\n\x03100 dfA1h\n" + b"x" * 10)
    assert parser.next_event() == ReceiveJob(queue="lp")
    assert parser.next_event() == DataFileStart(name="dfA1h", length=100)
    assert parser.body_remaining == 100
    assert isinstance(parser.next_event(), DataChunk)
    assert parser.next_event() is NEED_DATA
    assert parser.body_remaining == 90
    with pytest.raises(ValueError):
        parser.consume_body(91)
    parser.consume_body(90)  # e.g. moved with os.splice
    assert parser.body_remaining == 0
    parser.receive_data(b"\0")
    assert parser.next_event() == DataFileEnd(name="dfA1h", size=100, terminated=True)


def test_consume_body_until_eof_and_its_bound() -> None:
    parser = ServerParser(max_job=1000)
    parser.receive_data(b"\x02lp\n\x030 dfA1h\n")
    assert [parser.next_event() for _ in range(3)][2] is NEED_DATA
    assert parser.body_remaining == -1
    parser.consume_body(600)
    parser.receive_data(b"")
    assert parser.next_event() == DataFileEnd(name="dfA1h", size=600, terminated=False)
    over = ServerParser(max_job=1000)
    over.receive_data(b"\x02lp\n\x030 dfA1h\n")
    while over.next_event() is not NEED_DATA:
        pass
    over.consume_body(1000)
    with pytest.raises(ProtocolError) as info:
        over.consume_body(1)
    assert info.value.reason == "too_large"


def test_consume_body_outside_a_body_is_an_error() -> None:
    parser = ServerParser()
    parser.receive_data(b"\x02lp\n")
    assert parser.next_event() == ReceiveJob(queue="lp")
    assert parser.next_event() is NEED_DATA
    assert parser.body_remaining == 0
    with pytest.raises(RuntimeError):
        parser.consume_body(1)


def test_receive_data_only_after_need_data() -> None:
    parser = ServerParser()
    parser.receive_data(b"\x02lp\n")
    with pytest.raises(RuntimeError):
        parser.receive_data(b"more")
    assert parser.next_event() == ReceiveJob(queue="lp")
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"")
    assert parser.next_event() == EndOfStream()
    assert parser.next_event() == EndOfStream()
    with pytest.raises(RuntimeError):
        parser.receive_data(b"x")


def test_no_use_after_a_protocol_error() -> None:
    parser = ServerParser()
    parser.receive_data(b"\x09\n")
    with pytest.raises(ProtocolError):
        parser.next_event()
    with pytest.raises(RuntimeError):
        parser.next_event()
    with pytest.raises(RuntimeError):
        parser.receive_data(b"x")


def test_the_compiled_core_is_what_runs() -> None:
    import relay._core

    assert relay._core.__file__ is not None and relay._core.__file__.endswith(".so")
    assert type(ServerParser.next_event).__name__ != "function"


def test_events_are_immutable_values() -> None:
    ev = DataFileEnd(name="dfA1h", size=3, terminated=True)
    assert ev == DataFileEnd(name="dfA1h", size=3, terminated=True)
    assert ev != DataFileEnd(name="dfA1h", size=3, terminated=False)
    assert hash(ev) == hash(DataFileEnd(name="dfA1h", size=3, terminated=True))
    assert repr(ev) == "DataFileEnd(name='dfA1h', size=3, terminated=True)"
    with pytest.raises(AttributeError):
        ev.size = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        ReceiveJob("lp")  # type: ignore[call-arg]
    assert repr(NEED_DATA) == "NEED_DATA"


# ---------------------------------------------------------------- hypothesis

def _valid_stream() -> bytes:
    return b"".join(CASES[name][0] for name in ("rfc-control-first",)) + control(
        "cfA002h") + data("dfA002h", body=bytes(range(256)) * 3) + b"\x01\n" + data(
        "dfA003h", tail=b"") + control("cfA003h") + data("dfA004h", count=0, tail=b"\0")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_split_gives_the_same_events(draw: st.DataObject) -> None:
    stream = _valid_stream()
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(stream)), max_size=40)))
    bounds = [0, *cuts, len(stream)]
    # b"" means EOF to the parser, so empty pieces are not fed.
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    assert parse_chunks(chunks) == parse_chunks([stream]) == parse_chunks(chunks, "py")


_ATOMS = st.sampled_from([b"\x02lp\n", b"\x0210 cfA1h\n", b"\x0310 dfA1h\n", b"\x030 dfA1h\n",
                          b"\x01\n", b"\0", b"\n", b"\r\n", b"HP\n", b"0123456789", b"\x03",
                          b"\x02", b" ", b"..", b"/"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(_ATOMS, st.binary(max_size=40)), max_size=30),
       st.integers(1, 64))
def test_arbitrary_bytes_give_events_or_protocol_error(atoms: list[bytes], step: int) -> None:
    stream = b"".join(atoms)
    parser = ServerParser(max_line=32, max_control=64, max_job=500)
    try:
        for i in range(0, len(stream) + 1, step):
            chunk = stream[i:i + step]
            if not chunk:
                break
            parser.receive_data(chunk)
            while parser.next_event() is not NEED_DATA:
                assert parser.buffered <= 64 + 16
        parser.receive_data(b"")
        for _ in range(len(stream) + 2):
            if isinstance(parser.next_event(), EndOfStream):
                break
        else:
            raise AssertionError("no EndOfStream after EOF")
    except ProtocolError as exc:
        assert exc.reason in REJECT_REASONS
        assert exc.reply in (None, 3)
