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
