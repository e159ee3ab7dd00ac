"""The raw socket (AppSocket/JetDirect) sink against real loopback listeners."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from relay.errors import SinkError, SinkUnavailable, SpoolFileMissing
from relay.sinks import Sink, SinkContext, make_sink
from relay.sinks.socket import SocketSink
from relay.streams import _stream_buffered
from relay.uri import parse_destination
from tests.peers import P910nd
from tests.sinkjobs import Job, job_bytes, job_digest, make_job

Handler = Callable[[trio.socket.SocketType], Awaitable[None]]


def socket_sink(port: int, timeout: float = 10.0) -> Sink:
    destination = parse_destination(f"socket://127.0.0.1:{port}")
    return make_sink(dataclasses.replace(destination, timeout=timeout), SinkContext())


class Printer:
    """A loopback listener whose per-connection behaviour is one async function."""

    def __init__(self) -> None:
        self.size = 0
        self.digest = hashlib.sha256()
        self.closed_by_us = trio.Event()

    async def record(self, conn: trio.socket.SocketType) -> None:
        """Read to EOF (the sender's half-close), hash it, then close like a printer."""
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := await conn.recv_into(buf):
            self.digest.update(view[:n])
            self.size += n

    async def chatty(self, conn: trio.socket.SocketType) -> None:
        """Say things the sink must read and ignore (PJL status) while taking the job."""
        await conn.send(b"@PJL USTATUS DEVICE\r\nCODE=10001\r\n\x0c" * 100)
        await self.record(conn)
        await conn.send(b"@PJL USTATUS JOB\r\nEND\r\n\x0c")

    async def close_early(self, conn: trio.socket.SocketType) -> None:
        await conn.recv(1024)

    async def stall(self, conn: trio.socket.SocketType) -> None:
        """Accept, then read nothing: paper out, and the buffers fill up."""
        await trio.sleep_forever()

    async def never_close(self, conn: trio.socket.SocketType) -> None:
        await self.record(conn)
        await trio.sleep_forever()


async def run_against(handler: Handler, sink_for_port: Callable[[int], Sink], job: Job) -> None:
    """Deliver ``job`` to a listener serving one connection with ``handler``."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    async def serve_one() -> None:
        conn, _ = await listener.accept()
        with conn:
            await handler(conn)

    failure: SinkError | None = None
    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            try:
                await sink_for_port(port).deliver(job)
            except SinkError as exc:
                failure = exc  # raised below, outside the nursery's exception group
            finally:
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


def deliver_to(handler_name: str, job: Job, *, timeout: float = 10.0,
               limit: float = 30.0) -> Printer:
    printer = Printer()

    async def main() -> None:
        with trio.fail_after(limit):
            await run_against(getattr(printer, handler_name),
                              lambda port: socket_sink(port, timeout), job)
    trio.run(main)
    return printer


def run(delivery: Awaitable[None], limit: float = 30.0) -> None:
    async def main() -> None:
        with trio.fail_after(limit):
            await delivery
    trio.run(main)


def test_describe_names_the_printer() -> None:
    sink = socket_sink(9100)
    assert isinstance(sink, SocketSink)
    assert sink.describe() == "raw socket (AppSocket/JetDirect) 127.0.0.1:9100"


def test_several_files_arrive_byte_exact_and_in_order(tmp_path: Path) -> None:
    job = make_job(tmp_path, [b"\x1b%-12345X@PJL ENTER LANGUAGE=PCL\r\n", 300_001, b"", b"\x0c"])
    printer = deliver_to("record", job)
    assert (printer.size, printer.digest.hexdigest()) == job_digest(job)


def test_fifty_mebibytes_arrive_byte_exact(tmp_path: Path) -> None:
    job = make_job(tmp_path, [50 * 1024 * 1024])
    printer = deliver_to("record", job)
    assert (printer.size, printer.digest.hexdigest()) == job_digest(job)


def test_printer_chatter_is_read_and_ignored(tmp_path: Path) -> None:
    job = make_job(tmp_path, [2 * 1024 * 1024, b"tail"])
    printer = deliver_to("chatty", job)
    assert (printer.size, printer.digest.hexdigest()) == job_digest(job)


def test_printer_that_closes_early_is_unavailable(tmp_path: Path) -> None:
    job = make_job(tmp_path, [32 * 1024 * 1024])
    with pytest.raises(SinkUnavailable, match=r"socket: .*\[(ECONNRESET|EPIPE)\]"):
        deliver_to("close_early", job)


def test_printer_that_never_closes_times_out(tmp_path: Path) -> None:
    job = make_job(tmp_path, [b"%!PS\nshowpage\n"])
    started = time.monotonic()
    with pytest.raises(SinkUnavailable,
                       match=r"timed out after 0\.5s waiting for the printer to close"):
        deliver_to("never_close", job, timeout=0.5)
    assert time.monotonic() - started < 5


def test_printer_that_stops_reading_times_out_while_sending(tmp_path: Path) -> None:
    job = make_job(tmp_path, [64 * 1024 * 1024])
    with pytest.raises(SinkUnavailable, match=r"timed out after 0\.5s sending to 127\.0\.0\.1:"):
        deliver_to("stall", job, timeout=0.5)


def test_buffered_fallback_copies_exactly_through_a_full_socket(tmp_path: Path) -> None:
    # The path for targets sendfile cannot write to (some character devices):
    # a reused buffer, waiting whenever the non-blocking target is full.
    job = make_job(tmp_path, [3 * 1024 * 1024 + 5])
    ours, theirs = trio.socket.socketpair()
    received = hashlib.sha256()
    size = 0

    async def read_slowly() -> None:
        nonlocal size
        while chunk := await theirs.recv(100_000):
            received.update(chunk)
            size += len(chunk)
            await trio.sleep(0.001)

    async def main() -> None:
        with trio.fail_after(30), ours, theirs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_slowly)
                src = os.open(job.files[0].path, os.O_RDONLY)
                try:
                    copied = await _stream_buffered(ours.fileno(), src, idle_timeout=5)
                finally:
                    os.close(src)
                ours.shutdown(socket.SHUT_WR)
        assert copied == job.files[0].bytes

    trio.run(main)
    assert (size, received.hexdigest()) == job_digest(job)


def test_refused_connection_is_unavailable(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once closed
    job = make_job(tmp_path, [b"x"])
    with pytest.raises(SinkUnavailable, match=r"Connection refused \[ECONNREFUSED\] connecting"):
        run(socket_sink(port).deliver(job))


def test_missing_spool_file_is_spool_file_missing(tmp_path: Path) -> None:
    job = make_job(tmp_path, [b"x"])
    os.unlink(job.files[0].path)
    with pytest.raises(SpoolFileMissing, match="cannot be read") as caught:
        deliver_to("record", job)
    assert (caught.value.path, caught.value.errno) == (job.files[0].path, errno.ENOENT)


@pytest.mark.peers
@pytest.mark.root
def test_p910nd_prints_the_job_byte_exact(tmp_path: Path) -> None:
    job = make_job(tmp_path, [b"\x1b%-12345X@PJL\r\n", 3 * 1024 * 1024 + 7, b"\x0c"])
    with P910nd(tmp_path / "p910nd") as printer:
        run(socket_sink(printer.port).deliver(job))
        # p910nd closes only once it has written everything to the printer.
        assert printer.wait_jobs(1) == [job_bytes(job)]


@pytest.mark.peers
@pytest.mark.root
def test_bidirectional_p910nd_talking_back_still_gets_the_job(tmp_path: Path) -> None:
    job = make_job(tmp_path, [b"%!PS\n", 1024 * 1024])
    with P910nd(tmp_path / "p910nd", bidirectional=True) as printer:
        printer.reply(b"%%[ status: idle ]%%\r\n")
        run(socket_sink(printer.port).deliver(job))
        assert printer.wait_jobs(1) == [job_bytes(job)]
