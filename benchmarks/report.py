"""Printing a benchmark module's own results once its benchmarks ran.

Each module keeps a ``RESULTS`` dict and turns it into lines; this prints
them on the terminal with pytest's output capture off, from a module-scoped
fixture after its ``yield``.
"""

from __future__ import annotations

from collections.abc import Callable
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
