"""Free space: ``check_space`` for the spool without one ``statvfs`` per check.

The server asks three times per job whether it still fits (docs/spool.md,
"Free space"); a reading of ``statvfs`` is trusted for ``FREE_SPACE_TTL`` or
until ``FREE_SPACE_EVERY`` bytes were written since, and the estimate in
between is that reading less what the spool wrote.  A refusal always rests
on a fresh reading.  ``relay.spool.Spool`` mixes this in; the group-commit
thread takes one reading per batch (``_read_free``), off the event loop.
"""

from __future__ import annotations

import os
import time
from collections import Counter

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
        if not fresh and (free <= 0 or free - need < self.min_free_disk):
            free, _ = self._free_estimate(fresh=True)
        if free <= 0 or free - need < self.min_free_disk:
            raise DiskFull(f"spool {self.directory}: free space below min_free_disk")

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
        self._reading = (self.free_bytes(), now, mark)
        return self._reading
