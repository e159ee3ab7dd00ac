"""Bytes out of spool files: open one, and copy it into a socket or pipe (SPEC §5).

``stream_file`` is the zero-copy path shared by the outbound LPD client and
the socket and command sinks: ``os.sendfile`` from the spool file straight
into a non-blocking socket or pipe, parking on ``trio.lowlevel.wait_writable``
when the kernel buffer is full, so no data byte passes through Python and no
thread is needed.  A spool file is opened only through ``open_spool_file``, so
a job whose file vanished (purged while it was being delivered) means the same
everywhere: ``relay.errors.SpoolFileMissing``.  This module sits below the
sinks and the client and imports neither, so a command-line tool that sends
files loads no sink.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

import trio

from relay.spoolbackend import open_flat

if TYPE_CHECKING:
    from relay.spoolbackend import Body

__all__ = ["SENDFILE_CHUNK", "open_spool_file", "stream_body", "stream_file"]

# Linux caps one sendfile() at 0x7ffff000 bytes; asking for less keeps every
# call (and so the time between checkpoints) short on fast paths like loopback.
SENDFILE_CHUNK = 8 * 1024 * 1024

# sendfile() into a file type the kernel cannot splice into (some character
# devices since Linux 5.10) fails with one of these: copy through a buffer then.
_NO_SENDFILE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


def open_spool_file(path: str) -> int:
    """Open one of a job's own spool files for reading; ``SpoolFileMissing`` if it cannot be.

    The one way a sink opens spool files, so a vanished file (purged while the
    job was being delivered) means the same thing for every sink.  A small
    job's body inside a segment comes as a descriptor of just that body
    (``relay.spoolbackend.open_flat``).
    """
    return open_flat(path)


async def stream_body(out_fd: int, body: Body, *, idle_timeout: float) -> int:
    """``stream_file`` for one ``Body``: its range only, zero-copy where the kernel can."""
    return await stream_file(out_fd, body.fd, idle_timeout=idle_timeout,
                             offset=body.offset, length=body.length)


async def stream_file(out_fd: int, src_fd: int, *, idle_timeout: float, offset: int = 0,
                      length: int = -1) -> int:
    """Copy ``length`` bytes (-1: to the end) of regular file ``src_fd`` from ``offset``
    into non-blocking ``out_fd``.

    Zero-copy with ``os.sendfile``; when ``out_fd`` is full, wait for it to drain,
    at most ``idle_timeout`` seconds each time (``trio.TooSlowError`` after that:
    a peer that stops reading is as good as gone).  Returns the bytes copied.
    OS errors (EPIPE, ECONNRESET, ...) propagate for the caller to classify.
    """
    start = pos = offset
    end = offset + length if length >= 0 else -1
    while True:
        # sendfile on a fast path never blocks; this keeps us cancellable anyway.
        await trio.lowlevel.checkpoint()
        want = SENDFILE_CHUNK if end < 0 else min(SENDFILE_CHUNK, end - pos)
        if want == 0:
            return pos - start
        try:
            sent = os.sendfile(out_fd, src_fd, pos, want)
        except BlockingIOError:
            with trio.fail_after(idle_timeout):
                await trio.lowlevel.wait_writable(out_fd)
            continue
        except OSError as exc:
            if exc.errno in _NO_SENDFILE and pos == start:
                return await _stream_buffered(out_fd, src_fd, idle_timeout=idle_timeout,
                                              offset=start, end=end)
            raise
        if sent == 0:
            return pos - start
        pos += sent


async def _stream_buffered(out_fd: int, src_fd: int, *, idle_timeout: float, offset: int = 0,
                           end: int = -1) -> int:
    """``stream_file`` for targets sendfile cannot write: one reused buffer, no joins."""
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    pos = offset
    while True:
        got = os.preadv(src_fd, [view if end < 0 else view[:min(len(buf), end - pos)]], pos)
        if got == 0:
            return pos - offset
        done = 0
        while done < got:
            await trio.lowlevel.checkpoint()
            try:
                done += os.write(out_fd, view[done:got])
            except BlockingIOError:
                with trio.fail_after(idle_timeout):
                    await trio.lowlevel.wait_writable(out_fd)
        pos += got
