"""Free space: ``check_space`` for the spool without one ``statvfs`` per check.

The server asks three times per job whether it still fits (docs/spool.md,
"Free space"); a reading of ``statvfs`` is trusted for ``FREE_SPACE_TTL`` or
until ``FREE_SPACE_EVERY`` bytes were written since, and the estimate in
between is that reading less what the spool wrote.  A refusal always rests
on a fresh reading.  ``relay.spool.Spool`` mixes this in; the group-commit
thread takes one reading per batch (``_read_free``), off the event loop.
With intake workers each keeps its own reading, and the main process
publishes its own (``publish_free``, relay.connectioncounts.FreeBoard): a
worker whose estimate would accept re-reads when the main process's last
reading would not, so a disk found full after a worker's last reading
refuses at once.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable

from relay.errors import DiskFull

# A free-space reading is trusted for this long, or until this many bytes were
# written since (docs/spool.md, "Free space"): one statvfs per interval, not 3 per job.
FREE_SPACE_TTL = 0.5
FREE_SPACE_EVERY = 8 << 20


class FreeSpace:
    """The free-space half of the spool: its directory, floor and last reading."""

    directory: str
    min_free_disk: int
    written: int             # bytes the spool wrote, ever
    _stats: Counter[str]
    # The last statvfs: (free bytes, monotonic time, ``written`` then); replaced
    # whole, also by the flush thread after each batch.
    _reading: tuple[int, float, int] | None
    # Who hears of every reading taken (the main process's FreeBoard).
    publish_free: Callable[[int], None] | None = None

    def free_bytes(self) -> int:
        """Bytes available to this process on the spool's filesystem."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def check_space(self, need: int = 0) -> None:
        """Raise DiskFull when storing ``need`` more bytes would go below ``min_free_disk``.

        No free byte at all is full whatever ``min_free_disk`` says: no job fits.
        A recent reading less what was written since is used when it suffices;
        a refusal is always based on a fresh ``statvfs``.
        """
        free, fresh = self._free_estimate(fresh=False)
        if not fresh and (self._short(free, need) or self._short(self.main_free(), need)):
            free, _ = self._free_estimate(fresh=True)
        if self._short(free, need):
            raise DiskFull(f"spool {self.directory}: free space below min_free_disk")

    def saw_full(self) -> None:
        """A write was refused for space: the next check reads afresh, and so do the
        workers' (the main process publishes no free byte until its next reading)."""
        self._reading = None
        if self.publish_free is not None:
            self.publish_free(0)

    def _short(self, free: int | None, need: int) -> bool:
        return free is not None and (free <= 0 or free - need < self.min_free_disk)

    def main_free(self) -> int | None:
        """Another process's later reading to heed (a worker's: the main process's)."""
        return None

    def _free_estimate(self, *, fresh: bool) -> tuple[int, bool]:
        reading, now = self._reading, time.monotonic()
        if (fresh or reading is None or now - reading[1] > FREE_SPACE_TTL
                or self.written - reading[2] >= FREE_SPACE_EVERY):
            reading = self._read_free(now)
            self._stats["free_space_reads"] += 1
            return reading[0], True
        return reading[0] - (self.written - reading[2]), False

    def _read_free(self, now: float) -> tuple[int, float, int]:
        # ``written`` is taken first: bytes written meanwhile count twice (safe side).
        mark = self.written
        self._reading = reading = (self.free_bytes(), now, mark)
        if self.publish_free is not None:
            self.publish_free(reading[0])
        return reading
