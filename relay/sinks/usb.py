"""``usb:///dev/usb/lp0`` — a local printer character device (SPEC §3.3).

CUPS' form ``usb://Make/Model?serial=SN`` names the printer instead of the
device; ``relay.usbid`` finds its ``/dev/usb/lpN`` at every attempt (a
replugged printer may come back as another lpN), and no match is a retry.

The job's data files are written to the device in order, in a worker thread
that owns the device descriptor from open to close, so the event loop never
waits on a printer.  The device is opened non-blocking: opening never hangs
(a FIFO without a reader fails at once with ENXIO instead of waiting), and a
full device buffer shows up as EAGAIN, on which the thread polls in short
slices — so it notices both a stalled printer (no progress for the
destination's ``timeout``: offline, out of paper) and a cancelled delivery
(it stops within one slice and closes the device itself).

Bytes go with ``os.sendfile`` from the spool file into the device where the
kernel can do that (FIFOs, ttys); usblp cannot be spliced into, so it gets
plain writes from one reused buffer.  Before closing, the thread waits until
the device reports writable again: usblp kills an unfinished transfer on
close, and its poll says writable only once the last transfer completed.

A printer that is unplugged, switched off, busy or not permitted is a reason
to retry, never to fail the job (``SinkUnavailable``).  A device lost mid-job
means the job is printed again from the start on retry.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import threading
import time

import trio

from relay.errors import SinkUnavailable
from relay.sinks.base import DeliveryJob, Sink, open_spool_file, register
from relay.usbid import UsbNotFound, resolve_device, wanted_label

__all__ = ["UsbSink"]

_CHUNK = 1024 * 1024
_POLL_SLICE = 0.1  # seconds between checks for cancellation while the device is full
_NO_SENDFILE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})

_HINTS = {
    errno.ENOENT: "no such device (printer unplugged or switched off?)",
    errno.ENODEV: "device went away (printer unplugged or switched off?)",
    errno.ENXIO: "device not ready (printer unplugged, or no reader on a FIFO)",
    errno.EBUSY: "device busy (another program has it open)",
    errno.EIO: "I/O error (printer unplugged, switched off or in error?)",
    errno.EPIPE: "device closed during the job",
    errno.EACCES: "permission denied: the daemon's user needs write access to the device "
                  "(e.g. membership of its group, often 'lp')",
    errno.EPERM: "permission denied: the daemon's user needs write access to the device",
}


class _Stalled(Exception):
    """The device accepted no byte for the whole idle timeout."""


class _Stopped(Exception):
    """The delivery was cancelled; the thread closed the device and left."""


class UsbSink(Sink):
    """Write each job's data files to a printer device."""

    def describe(self) -> str:
        d = self.destination
        if d.make:
            return f"USB printer {wanted_label(d)} (found by its IEEE 1284 device ID)"
        return f"printer device {d.path}"

    async def _device(self) -> str:
        d = self.destination
        if not d.make:
            return d.path
        try:
            return await trio.to_thread.run_sync(resolve_device, d)
        except UsbNotFound as exc:
            raise SinkUnavailable(f"usb: {exc}") from None

    async def deliver(self, job: DeliveryJob) -> None:
        device = await self._device()
        stall = self.destination.timeout
        stop = threading.Event()
        work = functools.partial(_print_job, device, [f.path for f in job.files], stall, stop)
        try:
            # Abandon on cancel: the thread sees ``stop`` within one poll slice,
            # and closes the device itself.
            await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        except _Stalled:
            raise SinkUnavailable(f"usb: {device} accepted no data for {stall:g}s "
                                  "(printer offline, out of paper or jammed?)",
                                  reason="timeout") from None
        except OSError as exc:
            hint = _HINTS.get(exc.errno or 0, exc.strerror or str(exc))
            code = errno.errorcode.get(exc.errno or 0, "?")
            raise SinkUnavailable(f"usb: {device}: {hint} [{code}]") from exc
        finally:
            stop.set()


def _print_job(device: str, sources: list[str], stall: float, stop: threading.Event) -> int:
    """Runs in a worker thread: open, copy every file, wait for the last transfer, close."""
    # O_NOCTTY: a tty used as a test or serial printer must not become our
    # controlling terminal.
    fd = os.open(device, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        total = 0
        for path in sources:
            src = open_spool_file(path)
            try:
                total += _copy(fd, src, stall, stop)
            finally:
                os.close(src)
        _wait_writable(fd, time.monotonic() + stall, stop)
        return total
    finally:
        os.close(fd)


def _copy(fd: int, src: int, stall: float, stop: threading.Event) -> int:
    """Copy all of ``src`` into the non-blocking device ``fd``; returns the bytes written."""
    offset = 0
    buf: bytearray | None = None  # allocated only if sendfile cannot write this device
    last_progress = time.monotonic()
    while not stop.is_set():
        try:
            if buf is None:
                written = os.sendfile(fd, src, offset, _CHUNK)
            else:
                written = _write_chunk(fd, src, offset, buf)
        except BlockingIOError:
            _wait_writable(fd, last_progress + stall, stop)
            continue
        except OSError as exc:
            if buf is None and exc.errno in _NO_SENDFILE:
                buf = bytearray(_CHUNK)
                continue
            raise
        if written == 0:
            return offset
        offset += written
        last_progress = time.monotonic()
    raise _Stopped


def _write_chunk(fd: int, src: int, offset: int, buf: bytearray) -> int:
    # A partial write just means the next round re-reads from the new offset.
    got = os.preadv(src, [buf], offset)
    return os.write(fd, memoryview(buf)[:got]) if got else 0


def _wait_writable(fd: int, deadline: float, stop: threading.Event) -> None:
    """Poll in short slices until ``fd`` is writable, ``deadline`` passes, or ``stop``."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Stalled
        # Errors and hang-ups count as events too: the next write reports them.
        if poller.poll(min(left, _POLL_SLICE) * 1000):
            return
    raise _Stopped


register("usb", UsbSink)
