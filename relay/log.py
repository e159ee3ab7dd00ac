"""Structured logs: one JSON object a line (orjson), or text for a terminal (SPEC §7).

``event("info", "job_received", job=..., queue=..., peer=...)`` writes::

    {"ts":"2026-11-24T10:00:00.123Z","level":"info","event":"job_received","job":"...",...}
    2026-11-24T10:00:00.123Z INFO job_received job=... queue=... peer=...

Values often come from the wire (queue names, user names, titles), so they are
hostile: non-JSON values are ``str()``'d, long values are cut at ``MAX_VALUE``
characters, and the text format escapes control characters so a job title can
neither forge a log line nor drive the terminal.  Logging never raises: a value
that cannot be written is replaced, a stream that fails is skipped.

Per-job events (``job_received``, ``job_delivered``) are written at ``debug``:
at ``info`` a busy relay writes one ``jobs_summary`` line per
``SUMMARY_INTERVAL`` instead, with what ``count`` tallied since the last one.

``configure`` also routes the standard ``logging`` module through the same
formatter, so records of libraries come out in the same format.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Final, TextIO

import orjson
import trio

from relay.printable import escape_char

LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                 "error": logging.ERROR, "critical": logging.CRITICAL}
_NAMES: Final = {v: k for k, v in LEVELS.items()}
FORMATS: Final = ("json", "text")

# A value longer than this (in characters) is cut; a whole data file pasted
# into an error message must not turn into a megabyte log line.
MAX_VALUE: Final = 1024
_TRUNCATED: Final = "...[truncated]"

# Fields that most events carry, written first in this order.
_COMMON: Final = ("job", "queue", "destination", "peer", "error")
_RESERVED: Final = frozenset({"ts", "level", "event"})
# orjson refuses integers outside 64 bits; those are written as strings.
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1


class _State:
    """What ``configure`` set: one writer shared by ``event`` and stdlib records."""

    def __init__(self) -> None:
        self.fmt = "json"
        self.level = logging.INFO
        self.stream: TextIO | None = None  # None: sys.stderr at write time
        # Threads (trio.to_thread, libraries) may log too; lines must not interleave.
        self.lock = threading.Lock()


_state = _State()


def configure(*, fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Choose the format (``json`` | ``text``), minimum level and stream (stderr).

    Raises ``ValueError`` for an unknown format or level (config validates
    them first, so this only catches programming errors).
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    lvl = LEVELS.get(level.lower())
    if lvl is None:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    _state.fmt, _state.level, _state.stream = fmt, lvl, stream
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(h)
    root.addHandler(_Handler())
    root.setLevel(lvl)


def enabled(level: str) -> bool:
    """True when ``event(level, ...)`` would write; for callers that build costly fields."""
    return LEVELS.get(level, logging.INFO) >= _state.level


SUMMARY_INTERVAL: Final = 10.0
_counts: dict[str, int] = {}


def count(name: str, n: int = 1) -> None:
    """Add ``n`` to this interval's ``name`` (e.g. ``received``) for ``jobs_summary``."""
    _counts[name] = _counts.get(name, 0) + n


def write_summary(seconds: float) -> None:
    """One ``jobs_summary`` event with the counts since the last one; none when idle."""
    if not _counts:
        return
    counts = dict(_counts)
    _counts.clear()
    event("info", "jobs_summary", seconds=round(seconds, 3), **counts)


async def summary_loop(interval: float = SUMMARY_INTERVAL) -> None:
    """Write ``jobs_summary`` every ``interval`` seconds, and once more when cancelled."""
    last = trio.current_time()
    try:
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            write_summary(now - last)
            last = now
    finally:
        write_summary(trio.current_time() - last)


def event(level: str, name: str, /, **fields: object) -> None:
    """Write one event. Unknown levels count as ``info``; never raises."""
    lvl = LEVELS.get(level, logging.INFO)
    if lvl < _state.level:
        return  # the cheap path: nothing is formatted for a disabled level
    with contextlib.suppress(Exception):  # a log call must never break the relay
        _write(format_event(time.time(), lvl, name, fields, _state.fmt))


def format_event(ts: float, level: int, name: str, fields: dict[str, object], fmt: str) -> str:
    """One line, without its newline, in ``fmt``; exposed for tests and tools."""
    line: dict[str, object] = {"ts": format_ts(ts), "level": _NAMES.get(level, "info"),
                               "event": _clip(name)}
    for k in _COMMON:
        v = fields.get(k)
        if v is not None:
            line[k] = _value(v)
    for k, v in fields.items():
        if k not in _COMMON:
            line[k + "_" if k in _RESERVED else k] = _value(v)
    return _text(line) if fmt == "text" else _json(line)


# gmtime + strftime cost as much as the JSON encoding; events come many per
# second, so the formatted second is reused.
_ts_cache: tuple[int, str] = (-1, "")


def format_ts(ts: float) -> str:
    """RFC 3339 UTC with milliseconds: ``2026-11-24T10:00:00.123Z``."""
    global _ts_cache
    sec, ms = divmod(int(ts * 1000), 1000)
    if _ts_cache[0] != sec:
        _ts_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{_ts_cache[1]}.{ms:03d}Z"


def _value(v: object) -> object:
    """A JSON-native value, with strings cut to ``MAX_VALUE``."""
    if isinstance(v, str):  # the common case first
        return _clip(v)
    if v is None or isinstance(v, bool | float):
        return v
    if isinstance(v, int):
        return v if _INT_MIN <= v <= _INT_MAX else str(v)
    if isinstance(v, BaseException):
        return _clip(f"{type(v).__name__}: {v}")
    return _clip(_safe_str(v))


def _safe_str(v: object) -> str:
    try:
        return str(v)
    except Exception:  # a broken __str__ must not lose the event
        return f"<unprintable {type(v).__name__}>"


def _clip(s: str) -> str:
    return s if len(s) <= MAX_VALUE else s[:MAX_VALUE] + _TRUNCATED


def _json(obj: dict[str, object]) -> str:
    try:
        line = orjson.dumps(obj).decode()
    except TypeError:
        # Lone surrogates (bytes decoded with surrogateescape) are not UTF-8;
        # orjson refuses them, so spell them as \\udcXX text instead.
        fixed = {k: _utf8(v) if isinstance(v, str) else v for k, v in obj.items()}
        line = orjson.dumps(fixed).decode()
    # orjson escapes C0 but leaves DEL, C1 controls (U+009B is a terminal's
    # CSI), the Unicode line separators, bidi overrides and every other
    # non-printable code point raw; escape them so `tail -f` and
    # line-splitting readers see one inert line.  They can only occur inside
    # JSON strings, where \uXXXX (a surrogate pair above the BMP) is exact.
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else _json_escape(c) for c in line)


def _json_escape(c: str) -> str:
    n = ord(c)
    if n < 0x10000:
        return f"\\u{n:04x}"
    n -= 0x10000
    return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}"


def _utf8(s: str) -> str:
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _text(line: dict[str, object]) -> str:
    items = iter(line.items())
    (_, ts), (_, level), (_, name) = next(items), next(items), next(items)
    parts = [str(ts), str(level).upper(), _escape(str(name))]
    parts += [f"{_escape(k)}={_text_value(v)}" for k, v in items]
    return " ".join(parts)


def _text_value(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    s = str(v)
    if s and s.isprintable() and not any(c in s for c in ' "=\\'):
        return s
    return '"' + _escape(s) + '"'


_ESCAPES: Final = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(s: str) -> str:
    """Backslash-escape quotes, backslashes and every non-printable character."""
    if s.isprintable() and '"' not in s and "\\" not in s:
        return s
    out = []
    for c in s:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c.isprintable():
            out.append(c)
        else:
            # ESC, DEL, NUL, C1, U+2028, lone surrogates...: shown, never obeyed.
            out.append(escape_char(c))
    return "".join(out)


def write_line(line: str) -> None:
    """Write a line another process of this relay formatted (its intake workers)."""
    _write(line)


def _write(line: str) -> None:
    stream = _state.stream if _state.stream is not None else sys.stderr
    # A closed pipe or a full disk drops the line, never the caller.
    with _state.lock, contextlib.suppress(Exception):
        stream.write(line + "\n")
        stream.flush()


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # the caller's %-format does not fit its arguments
        return f"{record.msg!s} {record.args!r}"


class _Handler(logging.Handler):
    """Writes records of the ``logging`` module (libraries) in the relay's format."""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            fields: dict[str, object] = {"logger": record.name, "msg": _message(record)}
            if record.exc_info and record.exc_info[1] is not None:
                fields["error"] = record.exc_info[1]
            _write(format_event(record.created, record.levelno, "log", fields, _state.fmt))
