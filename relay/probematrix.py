"""The mode x order matrix of ``lpd-relay probe`` and what it recommends.

The admin's question at a Windows print server is "byte counting on or off,
and which order does this receiver take?".  The answer is a matrix: each
length form (``count`` = exact byte counts, Windows' "LPR Byte Counting
Enabled"; ``stream`` = length 0; ``windows`` = the huge fake length Windows
sends with byte counting off) in each file order.  A streamed data file runs
until the connection's half-close, so nothing can follow it: the streamed
forms only exist control file first, and their data-first cells say so.

Pure functions over the cell texts (``"ok"``, ``"refused: ..."``, ``"n/a:
..."``), so rendering and the recommendation are tested without a network.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from relay.probe import ProbeReport

__all__ = ["MODES", "NOT_STREAMABLE", "ORDERS", "Matrix", "cells", "lpr_byte_counting",
           "recommended", "render", "render_matrix"]

MODES: Final = ("count", "stream", "windows")
ORDERS: Final = ("control-first", "data-first")
NOT_STREAMABLE: Final = "n/a: a streamed data file must come last"

Matrix = dict[str, dict[str, str]]


def cells(first_order: str) -> list[tuple[str, str]]:
    """(mode, order) in the order probe tries them: counts first (the receiver's
    preferred form for every Windows server), ``first_order`` before the other."""
    other = ORDERS[1] if first_order == ORDERS[0] else ORDERS[0]
    return [("count", first_order), ("count", other), ("stream", "control-first"),
            ("windows", "control-first")]


def empty_matrix() -> Matrix:
    return {mode: ({"data-first": NOT_STREAMABLE} if mode != "count" else {})
            for mode in MODES}


def recommended(matrix: Matrix, first_order: str) -> tuple[str, str] | None:
    """The (mode, order) to configure: the first cell that worked, in ``cells`` order."""
    for mode, order in cells(first_order):
        if matrix.get(mode, {}).get(order) == "ok":
            return mode, order
    return None


def lpr_byte_counting(matrix: Matrix) -> bool | None:
    """The Windows port's "LPR Byte Counting Enabled": on when exact counts work,
    off when only the Windows fake length does, None when neither."""
    if "ok" in matrix.get("count", {}).values():
        return True
    if matrix.get("windows", {}).get("control-first") == "ok":
        return False
    return None


def _short(cell: str) -> str:
    # The table shows the receiver's own words; the steps above have the rest.
    if cell.startswith("refused: "):
        cell = "refused: " + cell.rsplit(": ", 1)[-1]
    return cell if len(cell) <= 40 else cell[:37] + "..."


def render_matrix(matrix: Matrix) -> list[str]:
    """The matrix as text lines: one row per mode, one column per order."""
    rows = {mode: {order: _short(text) for order, text in matrix.get(mode, {}).items()}
            for mode in MODES}
    width = max([len("control-first")] + [len(r.get("control-first", "")) for r in
                                          rows.values()])
    lines = [f"{'mode':<8} {'control-first':<{width}}  data-first"]
    for mode, row in rows.items():
        lines.append(f"{mode:<8} {row.get('control-first', 'not tried'):<{width}}  "
                     f"{row.get('data-first', 'not tried')}")
    return lines


def _marks() -> tuple[str, str]:
    try:
        "✓✗".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "+", "-"
    return "✓", "✗"


def render(report: ProbeReport) -> str:
    """The readable report: one line per step, then the verdict and the URI."""
    yes, no = _marks()
    width = max(len(s.name) for s in report.steps)
    lines = [f"probe {report.target}"]
    lines += [f"{yes if s.ok else no} {s.name:<{width}}  {s.detail}  ({s.ms:.1f} ms)"
              for s in report.steps]
    if report.modes is not None:
        lines += ["", "modes (length form x file order):"]
        lines += ["  " + line for line in render_matrix(report.modes)]
        if report.windows_port is not None:
            counting = report.windows_port["lpr_byte_counting"]
            lines.append("Windows port: " + (
                "no LPR setting works" if counting is None else
                f'"LPR Byte Counting Enabled" {"on" if counting else "off"}'))
    lines += [report.verdict, f"uri: {report.uri or '(none works)'}"]
    return "\n".join(lines) + "\n"
