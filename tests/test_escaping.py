"""Wire bytes shown to people are inert: lpq/lprm answers and log lines (SPEC §4.3, §7).

A job whose title, user, host and file names carry ESC sequences and C1
controls (0x9b is CSI, decoded latin-1 to U+009B) must not reach the terminal
of whoever runs lpq, nor a log reader, raw: every non-printable character is
escaped (``\\x1b``, ``\\x9b``, ...).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from relay import log
from relay.printable import printable
from relay.spoolformat import FileMeta, JobMeta
from relay.status import DestinationState, QueueState, render, render_removal
from tests.daemon import DaemonThread, relay_config
from tests.lpdwire import Wire
from tests.test_server import refused, wait_for

# C0 (but LF), DEL, C1 and the other non-printable code points used here.
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u202e\u2028\u00a0]")
ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x9b31m\x90q\x9c\x85"
# On the wire only C1 can reach a value: the parsers refuse C0 controls (ESC)
# in command lines, names and control-file values, so ESC sequences are
# checked with the spool record directly (test_render_escapes_every_field).
HOSTILE = b"\x9b2J\x9d0;pwned\x9c\x90q\x9c\x85\x9b31m"


@pytest.mark.parametrize(("text", "shown"), [
    ("plain é ü", "plain é ü"),
    ("\x1b[2J", "\\x1b[2J"),
    ("a\x9b31m", "a\\x9b31m"),
    ("\x00\x7f\x85\u2028\u202e", "\\x00\\x7f\\x85\\u2028\\u202e"),
    ("\U000e0041", "\\U000e0041"),
])
def test_printable_escapes_every_non_printable(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert printable(shown) == shown


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_log_values_never_carry_raw_controls(fmt: str) -> None:
    value = ESCAPES + HOSTILE.decode("latin-1") + "\u202e\u2028\U000e0041 é"
    line = log.format_event(0, 20, "job_received", {"user": value, "title": value}, fmt)
    assert not RAW.search(line) and line.isprintable(), line
    if fmt == "json":
        assert orjson.loads(line)["user"] == value   # escaped, not lost


def _meta(text: str) -> JobMeta:
    return JobMeta(id="000001", queue="*", wire_queue=text, peer="127.0.0.1:721", received=0.0,
                   control_name=f"cfA777{text}", control_path="/x", number="777", user=text,
                   host=text, title=text, job_name=text, last_error=text, attempts=1,
                   files=(FileMeta(name=f"dfA777{text}", format="l", bytes=5, path="/x"),))


@pytest.mark.parametrize("long", [False, True])
def test_render_escapes_every_field(long: bool) -> None:
    job = _meta(ESCAPES)
    state = QueueState(queue=ESCAPES, jobs=(job,), in_flight=frozenset(), destinations=(
        DestinationState(name="lpd://h/q", up=False, active=True, last_error=ESCAPES),))
    for text in (render(state, long=long), render_removal([job], {job.id})):
        assert not RAW.search(text), repr(text)
        assert "\\x1b[2J" in text and "\\x9b31m" in text, text
    empty = render(QueueState(queue=ESCAPES, jobs=(), in_flight=frozenset(), destinations=()),
                   long=long)
    assert empty == "\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\x90q\\x9c\\x85 is ready\nno entries\n"


def _hostile_job() -> tuple[bytes, bytes]:
    """A control file (bytes) with hostile H/P/J/N lines and its data-file name."""
    df = b"dfA777cl\x9bient"
    cf = (b"Hclient\nP" + b"mal\x9blory\nJtitle" + HOSTILE + b"\nLmallory\n"
          b"l" + df + b"\nU" + df + b"\nN" + b"name" + HOSTILE + b"\n")
    return cf, df


def _send(port: int, queue: bytes) -> None:
    cf, df = _hostile_job()
    with Wire(port) as w:
        for line, body in ((b"\x02" + queue + b"\n", None), (b"\x02%d cfA777client\n" % len(cf),
                           cf), (b"\x03%d " % 5 + df + b"\n", b"hello")):
            w.send(line)
            assert w.reply() == 0
            if body is not None:
                w.send(body + b"\0")
                assert w.reply() == 0


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    log.configure(fmt="text", level="debug", stream=buf)
    yield buf
    log.configure(stream=None)


def test_lpq_and_lprm_answers_and_logs_escape_a_hostile_job(tmp_path: Path,
                                                           logged: io.StringIO) -> None:
    # A destination that refuses connections keeps the job in the spool for lpq.
    cfg = relay_config(tmp_path, queues={"*": {"destinations": ["socket://127.0.0.1:1"]}},
                       retry={"initial": "1h", "max": "1h", "give_up_after": "24h"})
    queue = b"ward\x9b3"   # C1 in the queue name itself (the catch-all takes any)
    with DaemonThread(cfg) as relay:
        _send(relay.port, queue)
        answers = []
        for command in (b"\x03", b"\x04"):
            first, rest = refused(relay.port, command + queue + b"\n")
            answers.append(bytes([first]) + rest)
        wait_for(lambda: "job_received" in logged.getvalue() or None)
        first, rest = refused(relay.port, b"\x05" + queue + b" root mal\x9blory\n")
        answers.append(bytes([first]) + rest)
    short, long_, removal = (a.decode("utf-8") for a in answers)
    assert "title\\x9b2J\\x9d0;pwned\\x9c" in short, short
    assert "mal\\x9blory" in long_ and "ward\\x9b3" in long_, long_
    for answer in (short, long_, removal):
        assert not RAW.search(answer), repr(answer)
        assert "\x1b" not in answer and "\x9b" not in answer
    lines = logged.getvalue().splitlines()
    assert any("mal\\x9blory" in line for line in lines), lines
    assert not any(RAW.search(line) for line in lines), lines
