"""Connections held by the other intake workers: ``max_connections`` for the whole daemon.

``max_connections`` and ``max_connections_per_host`` bound the daemon, not
one process (docs/architecture.md, "Processes").  Asking the main process
at every accept would cost a round trip per connection, so the workers
share a small table in memory instead (a ``memfd`` the main process creates
and every worker maps): one row per worker, which only that worker writes,
of ``SLOTS`` per-host counters (a host's slot is a CRC of its address), one
total, and the bytes the worker received into jobs (in 4 KiB units, modulo
2**31), so each worker's free-space estimate counts every worker's bytes.
After the rows one cell is the main process's: its last free-space reading
(``FreeBoard``), so a worker whose own reading is recent does not accept a job
the main process already found no room for.  A check reads the other rows:
no lock, no message.  Two hosts
sharing a slot make the count larger, never smaller, so a limit is never
exceeded by it; workers admitting at the same instant can pass a limit by
at most one connection each.  A single-process daemon uses ``NO_OTHERS``.
"""

from __future__ import annotations

import mmap
import os
import zlib

__all__ = ["NO_OTHERS", "FreeBoard", "NoOthers", "Received", "SharedCounts", "create_table"]

SLOTS = 1 << 14
_ROW = SLOTS + 2          # the per-host slots, the row's total, its bytes received
_INT = 4
_BLOCK = 12               # bytes received are kept in units of 1 << _BLOCK
_WRAP = 1 << 31


class NoOthers:
    """One process: nobody else holds connections."""

    def add(self, host: str, n: int) -> None:
        pass

    def others(self, host: str) -> int:
        return 0

    def others_total(self) -> int:
        return 0

    def received(self, total: int) -> None:
        """This process has received ``total`` bytes into jobs, ever."""

    def others_received(self) -> int:
        """What the other workers received, ever, modulo ``_WRAP`` units (see ``Received``)."""
        return 0

    def main_free(self) -> int | None:
        """The main process's last free-space reading in bytes (``FreeBoard``); None: none."""
        return None


NO_OTHERS = NoOthers()


def create_table(workers: int) -> int:
    """A zeroed table for ``workers`` rows and the main process's cell; the
    descriptor (inheritable, for the workers)."""
    fd = os.memfd_create("lpd-relay-connections", 0)
    os.ftruncate(fd, workers * _ROW * _INT + _INT)
    return fd


def _free_cell(fd: int) -> int:
    return os.fstat(fd).st_size // _INT - 1


class FreeBoard:
    """The main process's side of the table: its spool's free-space readings.

    Stored as 4 KiB units plus one (0: no reading yet), at most ``_WRAP - 1``;
    less than one unit free reads as 0 bytes, which every check takes as short.
    """

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, os.fstat(fd).st_size)
        self._cells = memoryview(self._map).cast("i")
        self._cell = _free_cell(fd)

    def publish(self, free: int) -> None:
        self._cells[self._cell] = min((max(free, 0) >> _BLOCK) + 1, _WRAP - 1)


def clear_row(fd: int, row: int) -> None:
    """A worker that died held nothing: its replacement starts from zero."""
    os.pwrite(fd, bytes(_ROW * _INT), row * _ROW * _INT)


class SharedCounts(NoOthers):
    """Row ``row`` of the table in ``fd`` is this worker's; the others are read."""

    def __init__(self, fd: int, row: int) -> None:
        size = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, size)
        self._cells = memoryview(self._map).cast("i")
        self._row = row * _ROW
        # The other workers' rows: read on every accept and free-space check.
        self._others = tuple(r * _ROW for r in range(size // (_ROW * _INT)) if r != row)
        self._free = _free_cell(fd)
        self._host, self._host_slot = "", zlib.crc32(b"") & (SLOTS - 1)

    def _slot(self, host: str) -> int:
        # A connection asks three times for its host (admission, then +1 and -1).
        if host != self._host:
            self._host = host
            self._host_slot = zlib.crc32(host.encode("utf-8", "replace")) & (SLOTS - 1)
        return self._host_slot

    def add(self, host: str, n: int) -> None:
        cells = self._cells
        cells[self._row + self._slot(host)] += n
        cells[self._row + SLOTS] += n

    def others(self, host: str) -> int:
        return self._sum(self._slot(host))

    def others_total(self) -> int:
        return self._sum(SLOTS)

    def received(self, total: int) -> None:
        self._cells[self._row + SLOTS + 1] = (total >> _BLOCK) % _WRAP

    def others_received(self) -> int:
        return self._sum(SLOTS + 1) % _WRAP

    def main_free(self) -> int | None:
        units = self._cells[self._free]
        return (units - 1) << _BLOCK if units else None

    def _sum(self, offset: int) -> int:
        cells = self._cells
        if len(self._others) == 1:   # two workers: the common case, no generator
            return cells[self._others[0] + offset]
        return sum(cells[r + offset] for r in self._others)


class Received:
    """The other workers' bytes received, ever, as a growing count (their cells wrap)."""

    def __init__(self, others: NoOthers) -> None:
        self.others = others
        self._last = others.others_received()
        self.total = 0

    def now(self) -> int:
        seen = self.others.others_received()
        self.total += ((seen - self._last) % _WRAP) << _BLOCK
        self._last = seen
        return self.total
