"""The benchmark table: one row per target workload, medians and spreads of rounds.

Each round of a row measures the relay and its baseline side by side (the
caller alternates which goes first); a row's ratio is the median of the
rounds' ratios and its spread their range.  ``render`` gives the Markdown
table ``make bench`` prints; ``write`` stores it with the raw rounds as
``benchmarks/results/latest.md`` and ``latest.json`` (at a reduced
``LPD_BENCH_SCALE``: ``latest-scale<s>.*``, so a smoke run never replaces
a real one).

A row whose benchmark is skipped (a missing peer, not root) or fails shows
``skipped: reason`` (or ``failed: ...``) in place of its numbers: the table
is always printed.  A table benchmark names its rows with ``@table.rows(...)``
so the conftest can mark them even when the test never ran its body.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
RowSpecs = list[tuple[str, dict[str, Any]]]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(slots=True)
class Row:
    workload: str
    unit: str                      # of the relay and baseline values, e.g. "jobs/s"
    baseline_name: str
    target: str                    # as the issue words it
    min_ratio: float | None = None    # the ratio target, when there is one
    max_ratio: float | None = None    # a ratio upper bound (relay CPU over baseline CPU)
    min_value: float | None = None    # an absolute target on the relay's value
    max_value: float | None = None    # an upper bound on the relay's value (CPU, RSS)
    relay: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    note: str = ""                    # "skipped: reason" / "failed: reason"

    def ratios(self) -> list[float]:
        return [r / b for r, b in zip(self.relay, self.baseline, strict=False) if b]

    def met(self) -> bool | None:
        if self.note.startswith("failed"):   # a round failed (a lost job, a timeout): no
            return False
        targets = (self.min_ratio, self.max_ratio, self.min_value, self.max_value)
        if not self.relay or all(t is None for t in targets):
            return None
        ok = True
        value = statistics.median(self.relay)
        ratios = self.ratios()
        if self.min_ratio is not None and ratios:
            ok &= statistics.median(ratios) >= self.min_ratio
        if self.max_ratio is not None and ratios:
            ok &= statistics.median(ratios) <= self.max_ratio
        if self.min_value is not None:
            ok &= value >= self.min_value
        if self.max_value is not None:
            ok &= value <= self.max_value
        return ok


ROWS: dict[str, Row] = {}
TOUCHED: list[Row] = []       # the rows the running test asked for (conftest resets it)


def row(workload: str, **spec: object) -> Row:
    """The row for ``workload``, created from ``spec`` (Row's fields) the first time."""
    if workload not in ROWS:
        ROWS[workload] = Row(workload=workload, **spec)  # type: ignore[arg-type]
    TOUCHED.append(ROWS[workload])
    return ROWS[workload]


def rows(make: Callable[..., RowSpecs]) -> Callable[[F], F]:
    """Mark a benchmark with the rows it fills: ``make(**params)`` gives (workload, spec)s."""
    def mark(fn: F) -> F:
        fn.table_rows = make  # type: ignore[attr-defined]
        return fn
    return mark


def rows_for(make: Callable[..., RowSpecs], **params: Any) -> list[Row]:
    """The rows ``make`` names for these parameters (created the first time)."""
    return [row(workload, **spec) for workload, spec in make(**params)]


def mark_not_run(make: Callable[..., RowSpecs], params: dict[str, Any], note: str) -> None:
    """``note`` ("skipped: ...") on each of ``make``'s rows that has no numbers."""
    mark(rows_for(make, **params), note)


def mark(rows: list[Row], note: str) -> None:
    """``note`` on each row: "skipped: ..." where it has no numbers, "failed: ..." always.

    A failed round fails its row even when earlier rounds gave numbers:
    a lost job or a timeout is a result, not noise.
    """
    for r in rows:
        if not r.note and (note.startswith("failed") or not r.relay):
            r.note = note[:120]


def alternate(rounds: int, relay: Callable[[int], float],
              baseline: Callable[[int], float]) -> tuple[list[float], list[float]]:
    """``rounds`` rounds of both sides, the first side alternating; round index passed."""
    ours: list[float] = []
    theirs: list[float] = []
    for i in range(rounds):
        if i % 2 == 0:
            ours.append(relay(i))
            theirs.append(baseline(i))
        else:
            theirs.append(baseline(i))
            ours.append(relay(i))
    return ours, theirs


def run(benchmark: Any, r: Row, rounds: int, relay: Callable[[int], float],
        baseline: Callable[[int], float]) -> None:
    """``alternate`` under pytest-benchmark (one timed call); the rounds go into ``r``."""
    ours, theirs = benchmark.pedantic(alternate, args=(rounds, relay, baseline),
                                      rounds=1, iterations=1)
    r.relay += ours
    r.baseline += theirs
    benchmark.extra_info.update(relay=ours, baseline=theirs)


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.3g}"


def _value(values: list[float], unit: str, name: str = "") -> str:
    """``median unit`` and, over several rounds, their range: ``1,234 jobs/s (1,100-1,300)``."""
    text = f"{_num(statistics.median(values))} {unit}".rstrip()
    if len(values) > 1:
        text += f" ({_num(min(values))}-{_num(max(values))})"
    return f"{text} {name}".rstrip() if name else text


def _cells(r: Row) -> list[str]:
    if r.note and not r.relay:
        return [r.workload, r.note, r.baseline_name or "-", "-", "-", "0", r.target, "-"]
    relay = _value(r.relay, r.unit) if r.relay else "-"
    base = (_value(r.baseline, r.unit, f"[{r.baseline_name}]") if r.baseline
            else r.baseline_name or "-")
    ratios = r.ratios()
    ratio = f"{statistics.median(ratios):.2f}x" if ratios else "-"
    spread = f"{min(ratios):.2f}-{max(ratios):.2f}x" if len(ratios) > 1 else "-"
    met = {True: "yes", False: "no", None: "-"}[r.met()]
    if r.note:                               # numbers, then a failure in a later round
        met += f" ({r.note})"
    return [r.workload, relay, base, ratio, spread, str(len(r.relay)), r.target, met]


HEADER = ["workload", "relay: median (range)", "baseline: median (range)", "ratio median",
          "ratio spread", "rounds", "target", "met"]

# os.getloadavg() when the benchmark session started (benchmarks/conftest.py sets it).
START: dict[str, Any] = {}


def session_started() -> None:
    """Note the time and the load average: the table's header shows both."""
    START.update(time=time.time(), load=os.getloadavg())


def _load(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


def header(rounds: int) -> list[str]:
    """The lines above the table: what ran where, how long, how loaded the machine was."""
    now = time.time()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now))
    lines = [f"lpd-relay benchmark table ({rounds} alternating rounds a row, median; "
             f"{platform.node() or 'this machine'}, {os.cpu_count()} cores, {when})"]
    if START:
        lines.append(f"load average (1/5/15 min) at the start {_load(START['load'])}, "
                     f"at the end {_load(os.getloadavg())}; "
                     f"benchmarks ran {now - START['time']:,.0f} s")
    return lines


# The order of issue 10's targets table, then the other issues' rows; a row's
# place is that of the first of these its title starts with (others last).
ORDER = ("intake, 1 KiB, c=64", "intake, 1 KiB, c=1 ", "intake, 1 KiB, c=512",
         "forwarding relay -> relay", "forwarding relay -> LPRng", "relay -> relay through",
         "one 1,024 MiB job into", "one 1,024 MiB job forwarded", "one ", "CPU per 1 KiB",
         "sender CPU", "10,000 idle", "loadgen", "PostgreSQL", "relay capacity")


def _place(r: Row) -> int:
    return next((i for i, p in enumerate(ORDER) if r.workload.startswith(p)), len(ORDER))


def render(rounds: int) -> str:
    lines = [*header(rounds), "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in sorted(ROWS.values(), key=_place)]
    return "\n".join(lines) + "\n"


def write(scale: float, rounds: int, directory: Path = RESULTS_DIR) -> Path:
    """Write the table (.md) and every round (.json); returns the .md path."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = "latest" if scale == 1.0 else f"latest-scale{scale:g}"
    md = directory / f"{stem}.md"
    md.write_text(render(rounds))
    data = {"scale": scale, "rounds": rounds, "header": header(rounds),
            "load_start": START.get("load"), "load_end": os.getloadavg(), "rows": [
        {**asdict(r), "ratio_median": statistics.median(r.ratios()) if r.ratios() else None,
         "met": r.met()} for r in ROWS.values()]}
    (directory / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    return md
