"""Progress bars for long CLI operations, on a terminal only (SPEC §6).

``send`` of a large file, ``loadgen`` and ``spool purge`` of many jobs show a
tqdm bar on stderr when stderr is a terminal, and write nothing otherwise, so
scripts, pipes and logs see exactly the output they saw before.  tqdm draws
it (rates, ETA, terminal width, redraw throttling) rather than code here.
"""

from __future__ import annotations

import os
import sys
from typing import Protocol, TextIO

from tqdm import tqdm

# Below this many bytes a send is over before a bar would be readable.
LARGE_FILE = 1 << 20


class Progress(Protocol):
    def update(self, n: float | None = 1) -> bool | None: ...
    def close(self) -> None: ...


class _Silent:
    """What a bar is when stderr is not a terminal: nothing at all."""

    def update(self, n: float | None = 1) -> bool | None:
        return None

    def close(self) -> None:
        return None


def on_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # closed or replaced stream
        return False


def bar(*, total: int | None, desc: str, unit: str = "it", scale: bool = False,
        stream: TextIO | None = None) -> Progress:
    """A tqdm bar on stderr when it is a terminal, else a silent stand-in.

    ``total`` None = unknown (e.g. a job read from a pipe): the bar counts and
    shows the rate.  ``scale`` shows bytes as KiB/MiB/GiB.
    """
    stream = sys.stderr if stream is None else stream
    if not on_terminal(stream):
        return _Silent()
    # A terminal that reports no size (a fresh pty, a serial console) would
    # make tqdm hide the bar (0 rows, 0 columns): assume 80x24 there.
    try:
        sized = os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):
        sized = False
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale,
                unit_divisor=1024 if scale else 1000, file=stream, leave=False,
                dynamic_ncols=sized, ncols=None if sized else 80,
                nrows=None if sized else 24, mininterval=0.2)
