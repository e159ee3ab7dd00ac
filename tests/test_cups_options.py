"""CUPS' lpd and socket backend options change the bytes on the wire as in CUPS.

Every option is checked end to end: a job from a real spool goes through the
``lpd://`` (or ``socket://``) sink to a recording receiver, and the test reads
what arrived — the control file's L and J lines, the format letters, the
order of the files, the declared lengths, the source port the receiver saw.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from relay.controlfile import parse_control_file, sanitized_title
from relay.errors import SinkUnavailable
from relay.sinks import SinkContext, make_sink
from relay.spool import JobMeta, Spool
from relay.uri import parse_destination
from tests.peers import LpdScript, RecordingLpdServer
from tests.peers.script import RecordedConnection

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="reserved source ports need root")
PAYLOADS = [b"%!PS-Adobe-3.0\nshowpage\n", b"second file\n" * 50]
TITLE = "discharge letter (Dr. M\u00fcller) #3"


def make_job(tmp_path: Path, extra: str = "") -> JobMeta:
    """A two-file job from "nurse" titled TITLE; ``extra`` control lines go after P."""
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.recover()

    async def build() -> JobMeta:
        job = spool.begin(queue="ward3", wire_queue="Ward3", peer="10.1.2.3:721")
        names = [f"df{chr(65 + i)}042winserver" for i in range(len(PAYLOADS))]
        for name, data in zip(names, PAYLOADS, strict=True):
            writer = job.open_data(name)
            writer.write(data)
            writer.close()
        control = (f"Hwinserver\nPnurse\n{extra}J{TITLE}\n".encode()
                   + "".join(f"l{n}\nNletter.ps\n" for n in names).encode())
        job.set_control("cfA042winserver", control, number="042", user="nurse",
                        host="winserver", title=TITLE, job_name=TITLE,
                        formats=dict.fromkeys(names, "l"))
        return await spool.commit(job)
    return trio.run(build)


def deliver(uri: str, job: JobMeta, limit: float = 30.0) -> None:
    sink = make_sink(parse_destination(uri), SinkContext())

    async def main() -> None:
        with trio.fail_after(limit):
            await sink.deliver(job)
    trio.run(main)


def received_control(tmp_path: Path, query: str, extra: str = "") -> list[tuple[str, str]]:
    job = make_job(tmp_path, extra)
    with RecordingLpdServer() as server:
        deliver(f"lpd://127.0.0.1:{server.port}/Ward3?{query}", job)
        (received,) = server.wait_jobs(1)
    assert received.raw_control is not None
    assert [f.data for f in received.files] == PAYLOADS
    return list(parse_control_file(received.raw_control).lines)


def letters(lines: list[tuple[str, str]], letter: str) -> list[str]:
    return [value for key, value in lines if key == letter]


# -- control file: banner, format, sanitize_title ------------------------------

def test_banner_on_adds_an_l_line_for_the_p_user(tmp_path: Path) -> None:
    lines = received_control(tmp_path, "banner=on")
    assert letters(lines, "L") == ["nurse"]
    keys = [key for key, _ in lines]
    assert keys.index("L") == keys.index("P") + 1


def test_banner_on_keeps_the_senders_own_l_line(tmp_path: Path) -> None:
    assert letters(received_control(tmp_path, "banner=yes", "Lward clerk\n"), "L") == [
        "ward clerk"]


def test_banner_off_removes_l_lines(tmp_path: Path) -> None:
    lines = received_control(tmp_path, "banner=off", "Lnurse\n")
    assert letters(lines, "L") == []
    assert letters(lines, "P") == ["nurse"]


def test_without_banner_the_l_lines_travel_as_sent(tmp_path: Path) -> None:
    assert letters(received_control(tmp_path, "mode=count", "Lnurse\n"), "L") == ["nurse"]
    assert letters(received_control(tmp_path / "2", "mode=count"), "L") == []


def test_format_sets_every_data_files_format_letter(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    with RecordingLpdServer() as server:
        deliver(f"lpd://127.0.0.1:{server.port}/Ward3?format=o", job)
        (received,) = server.wait_jobs(1)
    assert [f.format for f in received.files] == ["o", "o"]
    assert received.raw_control is not None and b"\nl" not in received.raw_control


def test_sanitize_title_reduces_j_as_cups_does(tmp_path: Path) -> None:
    lines = received_control(tmp_path, "sanitize_title=yes")
    # Each byte of the UTF-8 "ü" is one non-alphanumeric character to CUPS.
    assert letters(lines, "J") == ["discharge letter _Dr_ M__ller_ _3"]
    assert letters(received_control(tmp_path / "2", "sanitize_title=no"), "J") == [
        TITLE.encode().decode("latin-1")]


def test_sanitized_title_keeps_at_most_99_characters() -> None:
    assert sanitized_title("a/b" * 50) == ("a_b" * 33)
    assert sanitized_title("Q3 report\tfinal") == "Q3 report\tfinal"


def job_connections(server: RecordingLpdServer) -> list[RecordedConnection]:
    """The 0x02 sessions: the sink first asks an unknown receiver's lpq once."""
    return [c for c in server.connections if c.command == 0x02]


# -- order, mode, timeout -------------------------------------------------------

@pytest.mark.parametrize(("order", "first"), [
    ("control,data", "control_header"), ("data,control", "data_header"),
    ("control-first", "control_header"), ("data-first", "data_header")])
def test_order_decides_which_file_goes_first(tmp_path: Path, order: str, first: str) -> None:
    job = make_job(tmp_path)
    with RecordingLpdServer() as server:
        deliver(f"lpd://127.0.0.1:{server.port}/Ward3?order={order}", job)
        server.wait_jobs(1)
        (conn,) = job_connections(server)
    steps = [step for step, _ in conn.replies if step.endswith("_header")]
    assert steps[0] == first


def test_mode_standard_sends_exact_counts(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    with RecordingLpdServer() as server:
        deliver(f"lpd://127.0.0.1:{server.port}/Ward3?mode=standard", job)
        (received,) = server.wait_jobs(1)
    assert [f.declared_length for f in received.files] == [len(p) for p in PAYLOADS]


def test_bare_integer_timeout_is_seconds(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    with RecordingLpdServer(LpdScript(silent_at="job")) as server:
        start = time.monotonic()
        with pytest.raises(SinkUnavailable, match="timed out after 1s"):
            deliver(f"lpd://127.0.0.1:{server.port}/Ward3?timeout=1", job)
    assert 0.8 < time.monotonic() - start < 5


@contextmanager
def unanswering_port() -> Iterator[int]:
    """A loopback port whose connects time out: a listener with a full accept queue
    (Linux drops the SYNs then, as a firewall dropping them would look)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        yield port
    finally:
        filler.close()
        listener.close()


@pytest.mark.parametrize("scheme", ["lpd", "socket"])
def test_contimeout_bounds_the_connect_apart_from_timeout(tmp_path: Path, scheme: str) -> None:
    job = make_job(tmp_path)
    with unanswering_port() as port:
        path = "/Ward3" if scheme == "lpd" else ""
        start = time.monotonic()
        with pytest.raises(SinkUnavailable):
            deliver(f"{scheme}://127.0.0.1:{port}{path}?timeout=60&contimeout=1", job)
        took = time.monotonic() - start
    assert 0.8 < took < 10


# -- reserve: the source port the receiver sees --------------------------------

def source_port(tmp_path: Path, reserve: str) -> int:
    job = make_job(tmp_path)
    with RecordingLpdServer() as server:
        deliver(f"lpd://127.0.0.1:{server.port}/Ward3?reserve={reserve}", job)
        server.wait_jobs(1)
        (conn,) = job_connections(server)
    return conn.peer[1]


def test_reserve_none_is_an_unprivileged_ephemeral_port(tmp_path: Path) -> None:
    assert source_port(tmp_path, "none") >= 1024


@needs_root
def test_reserve_any_is_a_reserved_port_like_cups(tmp_path: Path) -> None:
    assert 1 <= source_port(tmp_path, "any") <= 1023


@needs_root
def test_reserve_rfc1179_is_721_to_731(tmp_path: Path) -> None:
    assert 721 <= source_port(tmp_path, "rfc1179") <= 731


# -- socket:// waiteof ------------------------------------------------------------

def test_socket_waiteof_false_does_not_wait_for_the_printers_close(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    got = bytearray()

    async def main() -> None:
        sink = make_sink(parse_destination(f"socket://127.0.0.1:{port}?waiteof=false"))
        with trio.fail_after(10):
            await sink.deliver(job)     # the printer never closes: only waiteof=false returns
        conn, _ = listener.accept()
        conn.settimeout(5)
        with conn:
            while chunk := conn.recv(65536):
                got.extend(chunk)
    try:
        trio.run(main)
    finally:
        listener.close()
    assert bytes(got) == b"".join(PAYLOADS)


def test_socket_waits_for_eof_by_default(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        with pytest.raises(SinkUnavailable, match="waiting for the printer to close"):
            deliver(f"socket://127.0.0.1:{port}?timeout=1", job, limit=10)
    finally:
        listener.close()
