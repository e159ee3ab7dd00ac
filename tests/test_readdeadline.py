"""ReadDeadline: which bound is armed, and that a read alone moves no deadline."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from relay.readdeadline import ReadDeadline


@dataclass(frozen=True)
class Timeouts:
    idle_timeout: float = 60.0
    command_timeout: float = 30.0
    min_transfer_rate: int = 1000


@dataclass
class Parser:
    body_remaining: int = 0
    buffered: int = 0


def test_idle_between_requests() -> None:
    d = ReadDeadline(Timeouts())
    assert d.due(Parser(), 100.0) == 160.0
    assert d.limit == "idle_timeout" and d.message() == "no data for 60s"


def test_a_partial_line_is_bounded_from_its_first_byte() -> None:
    d = ReadDeadline(Timeouts())
    assert d.due(Parser(buffered=3), 100.0) == 130.0
    assert d.due(Parser(buffered=5), 110.0) == 130.0    # not moved by later bytes
    assert d.limit == "command_timeout"
    assert d.due(Parser(), 111.0) == 171.0              # the line completed
    assert d.due(Parser(buffered=1), 120.0) == 150.0    # a new line, a new start


def test_a_slow_body_is_bounded_by_min_transfer_rate() -> None:
    d = ReadDeadline(Timeouts())
    d.body_since, d.body_bytes = 100.0, 5000
    assert d.due(Parser(body_remaining=10), 101.0) == 135.0  # 100 + 30 + 5000 / 1000
    assert d.limit == "min_transfer_rate"
    assert "min_transfer_rate" in d.message()
    d.body_bytes = 10**6
    assert d.due(Parser(body_remaining=10), 101.0) == 161.0  # fast enough: idle wins


def test_refresh_moves_the_deadline_only_after_bytes_came() -> None:
    d = ReadDeadline(Timeouts())
    scope = trio.CancelScope()
    d.arm(scope, Parser(buffered=2), 100.0)
    assert scope.deadline == 130.0
    d.refresh(scope)
    assert scope.deadline == 130.0           # nothing read since arming: unchanged
    d.read(105.0)
    assert scope.deadline == 130.0           # a read alone changes nothing
    d.refresh(scope)
    assert scope.deadline == 165.0           # before a wait: idle_timeout from that byte
    scope.deadline = 1.0
    d.refresh(scope)
    assert scope.deadline == 1.0             # once per byte, not per call
    d.read(106.0)
    d.begin()                                # a new reading scope
    d.refresh(scope)
    assert scope.deadline == 1.0
