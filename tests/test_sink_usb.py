"""The printer-device sink against real FIFOs and pseudo-terminals."""

from __future__ import annotations

import dataclasses
import errno
import os
import select
import shutil
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import pytest
import trio

from relay.errors import SinkUnavailable, SpoolFileMissing
from relay.sinks import Sink, SinkContext, make_sink
from relay.sinks.usb import UsbSink
from relay.uri import parse_destination
from tests.sinkjobs import Job, job_bytes, make_job


def device_sink(path: Path | str, timeout: float = 10.0) -> Sink:
    destination = parse_destination(f"usb://{path}")
    return make_sink(dataclasses.replace(destination, timeout=timeout), SinkContext())


def deliver(sink: Sink, job: Job, limit: float = 20.0) -> None:
    async def main() -> None:
        with trio.fail_after(limit):
            await sink.deliver(job)
    trio.run(main)


class FifoReader:
    """Reads a FIFO from a thread until the writer goes away (or ``stop_after`` bytes)."""

    def __init__(self, path: Path, *, stop_after: int | None = None, read: bool = True) -> None:
        # Opened non-blocking so this open does not wait for the writer; poll()
        # reports a hang-up only after a writer has come and gone.
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.data = bytearray()
        self.eof = threading.Event()
        self.stop_after = stop_after
        self.thread = threading.Thread(target=self._run if read else self._wait_eof)
        self.thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not poller.poll(100):
                continue
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                break
            self.data += chunk
            if self.stop_after is not None and len(self.data) >= self.stop_after:
                break
        os.close(self.fd)
        self.eof.set()

    def _wait_eof(self) -> None:
        # Reads nothing until the writer closes: a printer that is out of paper.
        poller = select.poll()
        poller.register(self.fd, select.POLLHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            events = poller.poll(100)
            if events and events[0][1] & select.POLLHUP and not events[0][1] & select.POLLIN:
                break
            if events:  # data waiting too: drop it, we only watch for the close
                os.read(self.fd, 1 << 16)
        self.eof.set()
        os.close(self.fd)

    def join(self) -> bytes:
        self.thread.join(30)
        return bytes(self.data)


def test_describe_names_the_device() -> None:
    sink = device_sink("/dev/usb/lp0")
    assert isinstance(sink, UsbSink)
    assert sink.describe() == "printer device /dev/usb/lp0"


def test_fifo_gets_every_file_in_order(tmp_path: Path) -> None:
    fifo = tmp_path / "lp0"
    os.mkfifo(fifo)
    job = make_job(tmp_path, [b"\x1bE", 2 * 1024 * 1024 + 13, b"", b"\x0c\x1bE"])
    reader = FifoReader(fifo)
    deliver(device_sink(fifo), job)
    assert reader.join() == job_bytes(job)


def test_pty_in_raw_mode_gets_the_exact_bytes(tmp_path: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)  # no output processing: \n must not become \r\n
    job = make_job(tmp_path, [bytes(range(256)) * 64, b"line\nline\r\n\x03\x04", 300_000])
    expected = job_bytes(job)
    received = bytearray()

    def read_master() -> None:
        deadline = time.monotonic() + 30
        while len(received) < len(expected) and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                received.extend(os.read(master, 1 << 16))

    reader = threading.Thread(target=read_master)
    reader.start()
    try:
        deliver(device_sink(os.ttyname(slave)), job)
        reader.join(30)
    finally:
        os.close(slave)
        os.close(master)
    assert bytes(received) == expected


def test_missing_device_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SinkUnavailable, match=r"no such device .*unplugged.*\[ENOENT\]"):
        deliver(device_sink(tmp_path / "lp9"), make_job(tmp_path, [b"x"]))


def test_fifo_without_reader_is_unavailable_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "lp0"
    os.mkfifo(fifo)
    with pytest.raises(SinkUnavailable, match=r"\[ENXIO\]"):
        deliver(device_sink(fifo), make_job(tmp_path, [b"x"]), limit=5)


def test_reader_closing_mid_job_is_unavailable(tmp_path: Path) -> None:
    fifo = tmp_path / "lp0"
    os.mkfifo(fifo)
    reader = FifoReader(fifo, stop_after=100_000)
    with pytest.raises(SinkUnavailable, match=r"closed during the job \[EPIPE\]"):
        deliver(device_sink(fifo), make_job(tmp_path, [8 * 1024 * 1024]))
    assert len(reader.join()) >= 100_000


def test_device_vanishing_mid_job_is_unavailable(tmp_path: Path) -> None:
    # Closing a pty's master is the nearest thing to pulling the USB cable:
    # writes to the slave then fail with EIO.
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)

    def unplug_after_some_bytes() -> None:
        got = 0
        deadline = time.monotonic() + 30
        while got < 50_000 and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                got += len(os.read(master, 1 << 16))
        os.close(master)

    unplug = threading.Thread(target=unplug_after_some_bytes)
    unplug.start()
    try:
        with pytest.raises(SinkUnavailable, match=r"\[EIO\]"):
            deliver(device_sink(path), make_job(tmp_path, [4 * 1024 * 1024]))
    finally:
        unplug.join(30)
        os.close(slave)


def test_stalled_printer_times_out(tmp_path: Path) -> None:
    fifo = tmp_path / "lp0"
    os.mkfifo(fifo)
    reader = FifoReader(fifo, read=False)
    started = time.monotonic()
    with pytest.raises(SinkUnavailable, match=r"accepted no data for 0\.5s"):
        deliver(device_sink(fifo, timeout=0.5), make_job(tmp_path, [1024 * 1024]))
    assert time.monotonic() - started < 5
    assert reader.eof.wait(5), "the device was left open"
    reader.join()


def test_cancelled_delivery_closes_the_device_promptly(tmp_path: Path) -> None:
    fifo = tmp_path / "lp0"
    os.mkfifo(fifo)
    reader = FifoReader(fifo, read=False)
    sink = device_sink(fifo, timeout=60)
    job = make_job(tmp_path, [1024 * 1024])

    async def main() -> None:
        with trio.move_on_after(0.3):
            await sink.deliver(job)

    trio.run(main)
    # The worker thread notices within one poll slice and closes the FIFO.
    assert reader.eof.wait(5), "the abandoned worker kept the device open"
    reader.join()


def test_missing_spool_file_is_spool_file_missing(tmp_path: Path) -> None:
    fifo = tmp_path / "lp0"
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    job = make_job(tmp_path, [b"x"])
    os.unlink(job.files[0].path)
    with pytest.raises(SpoolFileMissing, match="cannot be read") as caught:
        deliver(device_sink(fifo), job)
    assert (caught.value.path, caught.value.errno) == (job.files[0].path, errno.ENOENT)
    reader.join()


_DELIVER_ONE = """
import sys, trio
from relay.errors import SinkUnavailable
from relay.sinks import SinkContext, make_sink
from relay.uri import parse_destination
from tests.sinkjobs import make_job
from pathlib import Path
sink = make_sink(parse_destination("usb://" + sys.argv[1]), SinkContext())
try:
    trio.run(sink.deliver, make_job(Path(sys.argv[2]), [b"x"]))
except SinkUnavailable as exc:
    print("UNAVAILABLE", exc)
"""


@pytest.mark.root
def test_permission_denied_is_unavailable_with_a_hint(tmp_path: Path) -> None:
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run without the permission-override capability")
    device = tmp_path / "lp0"
    device.touch()
    os.chmod(device, 0)
    repo = Path(__file__).resolve().parent.parent
    # Root without CAP_DAC_OVERRIDE obeys file modes like the daemon's own user.
    result = subprocess.run(
        [setpriv, "--bounding-set", "-dac_override,-dac_read_search",
         sys.executable, "-c", _DELIVER_ONE, str(device), str(tmp_path)],
        cwd=repo, capture_output=True, text=True, timeout=60)
    assert "UNAVAILABLE" in result.stdout, result.stderr
    assert "permission denied: the daemon's user needs write access" in result.stdout
    assert "[EACCES]" in result.stdout
