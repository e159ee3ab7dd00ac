"""Receive buffers: a small one per connection, large ones lent while a body streams.

A connection mostly waits: for a command, a file header, the next job.  Giving
each one the 256 KiB buffer that makes bulk transfers cheap cost ~190 KiB of
RSS per idle connection (5,000 idle connections: 0.9 GiB).  So a connection
owns only a ``SMALL`` buffer, enough for command lines and small files, and
borrows a ``LARGE`` one from the server's ``BufferPool`` for as long as a
data body streams in, returning it when the file ends.

The large buffers are anonymous ``mmap`` regions, not ``bytearray``s: freeing
one unmaps it, so memory goes back to the OS after a flood instead of staying
in the C heap (glibc raises its mmap threshold after the first large free and
then keeps later 256 KiB blocks on its heap).  The pool keeps at most ``keep``
idle buffers warm and lends at most ``limit`` at once; beyond that a body is
received through the small buffer — slower, never unbounded.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass

SMALL = 4 * 1024
LARGE = 256 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class BufferPoolStatistics:
    lent: int           # large buffers in use now
    idle: int           # kept for the next body
    refused: int        # bodies received through the small buffer: pool at its limit


class BufferPool:
    """Large receive buffers shared by every connection of a server."""

    def __init__(self, *, size: int = LARGE, limit: int = 256, keep: int = 16) -> None:
        self.size = size
        self.limit = limit
        self.keep = keep
        self._idle: list[mmap.mmap] = []
        self._lent = 0
        self._refused = 0

    def take(self) -> mmap.mmap | None:
        """A large buffer, or None when ``limit`` are lent (use the small one)."""
        if self._lent >= self.limit:
            self._refused += 1
            return None
        self._lent += 1
        return self._idle.pop() if self._idle else mmap.mmap(-1, self.size)

    def give(self, buf: mmap.mmap) -> None:
        """Return a buffer from ``take``; the caller holds no export of it any more."""
        self._lent -= 1
        if len(self._idle) < self.keep:
            self._idle.append(buf)
        # Otherwise dropped: unmapped as soon as the last reference to it goes.

    def statistics(self) -> BufferPoolStatistics:
        return BufferPoolStatistics(lent=self._lent, idle=len(self._idle),
                                    refused=self._refused)


def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


class HeapTrimmer:
    """Gives freed heap back to the OS after a flood of connections has drained.

    What idle connections leave behind (their small buffers, parser and task
    objects) is freed into the C heap, which keeps it: 10,000 idle connections
    left ~80 MiB of RSS after closing.  Each time the number of connections
    falls to half of its peak since the last trim (from at least ``floor``),
    ``malloc_trim(0)`` returns the free pages — a few times per flood, never
    per connection.
    """

    def __init__(self, floor: int = 256) -> None:
        self.floor = floor
        self._peak = 0
        self.trims = 0

    def opened(self, active: int) -> None:
        self._peak = max(self._peak, active)

    def closed(self, active: int) -> None:
        if self._peak >= self.floor and active <= self._peak // 2:
            self._peak = active
            self.trims += 1
            if _TRIM is not None:
                _TRIM(0)
