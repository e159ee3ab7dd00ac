"""An intake worker's data file: in memory while the job is small, then a spool file.

``relay.spoolproxy.IncomingProxy.open_data`` returns one.  Its bytes stay in
the worker's memory while the job's data total at most ``IN_MEMORY_MAX``
and travel in the job's ``Commit``; past that the file is moved, at that
moment, into a spool file the main process opens for it (``promote``) and
the rest is written straight there (docs/architecture.md, "Processes").
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

from relay.durablefiles import disk_error, write_all
from relay.errors import SpoolError
from relay.groupcommit import start_writeback
from relay.spooljob import WRITEBACK_CHUNK

if TYPE_CHECKING:
    from relay.spoolproxy import IncomingProxy

__all__ = ["IN_MEMORY_MAX", "MemoryFile"]

# Data kept in memory per job before a data file goes to a spool file of its own.
IN_MEMORY_MAX = 64 * 1024


class MemoryFile:
    """A data file held in memory until it outgrows ``IN_MEMORY_MAX`` (then: a spool file)."""

    __slots__ = ("_fd", "_job", "_mark", "_sha", "_size", "buf", "name", "promoted")

    def __init__(self, job: IncomingProxy, name: str) -> None:
        self._job, self.name = job, name
        self.buf = bytearray()
        self._fd = -1
        self._size = 0
        self._mark = 0
        self.promoted = False   # in a spool file of the main process's, not in memory
        # The audit log's SHA-256, taken as the bytes pass (as relay.spooljob.DataWriter).
        self._sha = hashlib.sha256() if job.digests is not None else None

    def fileno(self) -> int:
        return -1     # the connection writes through write()

    def add(self, n: int) -> None:
        raise SpoolError("an intake worker's data file takes write() only")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if self._sha is not None:
            self._sha.update(data)
        if self._fd < 0:
            # Promoting takes the job's id now: not before the job before it in its
            # session has sent its Commit (ids go in the order jobs were acked).
            if self._job.in_memory + n <= IN_MEMORY_MAX or not self._job.its_turn():
                self.buf += data
                self._job.in_memory += n
                self._size += n
                self._job.bytes += n
                self._job.spool.add_written(n)
                return
            self._fd = self._job.promote(self)
            self.promoted = True
            self._job.in_memory -= len(self.buf)
            self._write(self.buf)
            self.buf = bytearray()
        self._write(data)
        self._size += n
        self._job.bytes += n
        self._job.spool.add_written(n)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            write_all(self._fd, data)
        except OSError as exc:
            raise disk_error(exc, f"job {self._job.id} data file") from exc
        if self._job.fsync and self._size - self._mark >= WRITEBACK_CHUNK:
            start_writeback(self._fd, self._mark, self._size - self._mark)
            self._mark = self._size

    def close(self) -> int:
        self.abandon()
        self._job.closed(self)
        if self._sha is not None and self._job.digests is not None:
            self._job.digests[self.name] = self._sha.hexdigest()
        return self._size

    def abandon(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -2
