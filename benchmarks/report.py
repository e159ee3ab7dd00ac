"""Printing a benchmark module's own results, and what a relay's processes cost.

Each module keeps a ``RESULTS`` dict and turns it into lines; this prints
them on the terminal with pytest's output capture off, from a module-scoped
fixture after its ``yield``.  ``tree_cpu`` and ``tree_rss_kib`` read
``/proc`` for a relay and all its processes (workers and other children
count as the relay's own cost).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def print_lines(request: Any, lines: Callable[[], list[str]]) -> None:
    """Write ``lines()`` to the terminal (nothing when it returns no lines)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    text = lines()
    if not text:
        return
    with capture.global_and_fixture_disabled():
        for line in text:
            reporter.write_line(line)


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3 onwards)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (by parent pid, from ``/proc``)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parents.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += parents.get(current, [])
    return tree


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid``, its live descendants and their reaped children.

    A reaped process's CPU moves into its own parent's cutime + cstime (the
    relay's intake workers are reaped by the helper that forks them), and a
    live one's is not there yet: every member's own and reaped-children
    columns, summed, count each process once.
    """
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            total += sum(int(f) for f in _stat(member)[11:15])   # utime stime cutime cstime
    return total / _TICK


def tree_rss_kib(pid: int) -> int:
    """VmRSS summed over ``pid`` and its live descendants, KiB."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{member}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return total
