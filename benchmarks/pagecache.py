"""Free memory made ready before a timed large write, so both sides of a row write alike.

A virtual machine whose balloon device reports free pages to the host (the
``virtio-balloon`` free page reporting the development VM runs) hands memory
it has not used for a few seconds back to the host; the first touch of such a
page then costs a fault on the host.  Writing 1 GiB into new page-cache pages
took 0.27-0.33 s of CPU when that memory had been freed a moment before (a
1 GiB file just deleted) and 2.7-3.4 s when it came from reported memory: a
receiver's CPU per GiB tripled with nothing about the receiver changed.

Which one a side got depended on the harness: the raw receiver deletes its
output after each round, so its next round wrote into warm pages, while the
relay's rounds kept their spools and wrote into reported memory.  In module
order the 1 GiB forwarded row measured 0.23x its baseline, alone 1.15x.
``warm`` writes a scratch file of the size about to be written and deletes
it, just before the clock starts, on both sides of a row; the rows' rounds
also delete what they wrote (``cleanup``), as the raw receiver always did.
On a machine without free page reporting this costs one page-cache copy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_BLOCK = b"\xa5" * (1 << 20)


def warm(directory: Path, nbytes: int) -> None:
    """Allocate ``nbytes`` of page cache (a scratch file in ``directory``), then free it.

    The pages are freed by the unlink before any writeback (no fsync), so
    the disk sees none of it; the next page-cache allocations reuse them.
    """
    if nbytes <= 0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".warm"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for _ in range(-(-nbytes // len(_BLOCK))):
            os.write(fd, _BLOCK)
    finally:
        os.close(fd)
        path.unlink()


def cleanup(directory: Path) -> None:
    """Delete a round's files (spools, received copies): every side ends a round alike."""
    shutil.rmtree(directory, ignore_errors=True)
