"""relay.log: JSON lines parse back, text lines stay one line, hostile values are defused."""

from __future__ import annotations

import calendar
import io
import logging
import re
from collections.abc import Iterator

import orjson
import pytest

from relay import log

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
HOSTILE = "Ward3\x1b[2J\r\n2026-01-01T00:00:00.000Z ERROR forged=1\x00\x7f\u2028\"'\\ \t"


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """The root logger's handlers and level restored after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buf = io.StringIO()
    log.configure(fmt="json", level="debug", stream=buf)
    yield buf
    log.configure(stream=None)
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def records(buf: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in lines(buf)]


def test_json_line_has_the_keys_in_order(out: io.StringIO) -> None:
    log.event("info", "job_received", peer="10.0.0.5:721", queue="ward3", job="123",
              size=4096, ok=True)
    [rec] = records(out)
    assert list(rec) == ["ts", "level", "event", "job", "queue", "peer", "size", "ok"]
    assert TS.match(str(rec["ts"]))
    assert rec["level"] == "info"
    assert rec["event"] == "job_received"
    assert rec["size"] == 4096 and rec["ok"] is True


def test_timestamp_is_rfc3339_utc_with_milliseconds() -> None:
    t = calendar.timegm((2026, 11, 24, 10, 0, 0)) + 0.1239
    assert log.format_ts(t) == "2026-11-24T10:00:00.123Z"
    assert log.format_ts(0) == "1970-01-01T00:00:00.000Z"


def test_text_format_matches_the_terminal_layout(out: io.StringIO) -> None:
    log.configure(fmt="text", level="info", stream=out)
    log.event("info", "job_received", job="123", queue="ward3", peer="10.0.0.5:721")
    [line] = lines(out)
    ts, rest = line.split(" ", 1)
    assert TS.match(ts)
    assert rest == "INFO job_received job=123 queue=ward3 peer=10.0.0.5:721"


def test_disabled_level_formats_nothing(out: io.StringIO) -> None:
    log.configure(fmt="json", level="warning", stream=out)

    class Costly:
        def __str__(self) -> str:
            raise AssertionError("formatted although the level is disabled")

    log.event("info", "job_received", job=Costly())
    log.event("debug", "chunk", job=Costly())
    assert out.getvalue() == ""
    assert not log.enabled("info") and log.enabled("error")
    log.event("error", "disk_full", error="ENOSPC")
    assert records(out)[0]["event"] == "disk_full"


def test_hostile_values_round_trip_in_json(out: io.StringIO) -> None:
    log.event("warning", "bad_job", queue=HOSTILE, peer="x\x00y", title="\x9b31m")
    # No raw control character or line separator: one inert line for any reader.
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", out.getvalue()[:-1])
    [rec] = records(out)
    assert rec["title"] == "\x9b31m"
    assert rec["queue"] == HOSTILE
    assert rec["peer"] == "x\x00y"


def test_hostile_values_are_escaped_in_text(out: io.StringIO) -> None:
    log.configure(fmt="text", level="info", stream=out)
    log.event("warning", "bad_job", queue=HOSTILE, job="1 2")
    [line] = lines(out)
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028]", line)
    assert 'job="1 2"' in line
    assert r'queue="Ward3\x1b[2J\r\n2026-01-01T00:00:00.000Z ERROR forged=1\x00\x7f\u2028\"' in line
    assert line.endswith(r"'\\ \t" + '"')


def test_surrogates_from_wire_bytes_do_not_break_json(out: io.StringIO) -> None:
    user = b"j\xf6rg".decode("utf-8", "surrogateescape")
    log.event("info", "job_received", user=user)
    assert records(out)[0]["user"] == "j\\udcf6rg"
    log.configure(fmt="text", level="info", stream=out)
    log.event("info", "job_received", user=user)
    assert lines(out)[-1].endswith('user="j\\udcf6rg"')


def test_long_values_are_truncated(out: io.StringIO) -> None:
    log.event("error", "sink_failed", error="E" * 100_000)
    [rec] = records(out)
    value = str(rec["error"])
    assert value.startswith("E" * log.MAX_VALUE)
    assert len(value) < log.MAX_VALUE + 32
    assert value.endswith("[truncated]")


def test_non_json_values_are_stringified(out: io.StringIO) -> None:
    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    log.event("error", "sink_failed", error=ConnectionRefusedError(111, "refused"),
              path=b"/tmp/x", huge=2**80, ratio=0.5, none=None, obj=Broken(), items=[1, 2])
    [rec] = records(out)
    assert rec["error"] == "ConnectionRefusedError: [Errno 111] refused"
    assert rec["path"] == "b'/tmp/x'"
    assert rec["huge"] == str(2**80)
    assert rec["ratio"] == 0.5 and rec["none"] is None
    assert rec["obj"] == "<unprintable Broken>"
    assert rec["items"] == "[1, 2]"


def test_reserved_keys_do_not_overwrite_the_header(out: io.StringIO) -> None:
    log.event("info", "x", level="forged", ts="forged", event="forged")
    [rec] = records(out)
    assert rec["level"] == "info" and rec["event"] == "x"
    assert rec["level_"] == "forged" and rec["ts_"] == "forged" and rec["event_"] == "forged"


def test_logging_never_raises(out: io.StringIO) -> None:
    log.event("no-such-level", "still_written")
    assert records(out)[0]["level"] == "info"
    out.close()  # writing to a closed stream fails inside; the caller never sees it
    log.event("error", "after_close", error="x")
    logging.getLogger("lib").error("after close")


def test_a_broken_format_in_a_library_record_is_still_logged(out: io.StringIO) -> None:
    # pytest's own capture handler on the root logger raises on such records,
    # so the record goes to the relay's handler alone.
    ours = [h for h in logging.getLogger().handlers if type(h).__module__ == "relay.log"]
    lib = logging.getLogger("lib.isolated")
    lib.propagate = False
    lib.handlers[:] = ours
    try:
        lib.error("broken %d format", "not a number")
    finally:
        lib.handlers[:] = []
        lib.propagate = True
    [rec] = records(out)
    assert rec["msg"] == "broken %d format ('not a number',)"


def test_stdlib_records_come_out_in_the_same_format(out: io.StringIO) -> None:
    logging.getLogger("trio.lib").warning("peer %s went away", "10.0.0.5")
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        logging.getLogger("spool").exception("write failed")
    logging.getLogger("quiet").debug("x")
    first, second, third = records(out)
    assert first["event"] == "log" and first["level"] == "warning"
    assert first["logger"] == "trio.lib" and first["msg"] == "peer 10.0.0.5 went away"
    assert second["level"] == "error"
    assert second["error"] == "OSError: [Errno 28] No space left on device"
    assert third["level"] == "debug"


def test_reconfigure_keeps_one_handler(out: io.StringIO) -> None:
    log.configure(fmt="json", level="info", stream=out)
    log.configure(fmt="json", level="info", stream=out)
    logging.getLogger("lib").warning("once")
    assert len(lines(out)) == 1


@pytest.mark.parametrize(("fmt", "level"), [("xml", "info"), ("json", "verbose")])
def test_configure_rejects_unknown_values(fmt: str, level: str) -> None:
    with pytest.raises(ValueError):
        log.configure(fmt=fmt, level=level)
