"""When an inbound connection's next bytes must have come (docs/server.md, "Timeouts").

The bounds a trickling client cannot dodge: ``idle_timeout`` since the last
byte always; a partial command line, file header or control file complete
within ``command_timeout`` of its first byte; a data body averaging
``min_transfer_rate`` after a grace of ``command_timeout``.

``relay.connection`` reads under one cancel scope and moves its deadline
only where a wait can begin: ``arm`` before a read that may wait,
``refresh`` before a handler's await that may wait (a commit, a worker's
answer, a send into a full socket buffer), which is then bounded by
``idle_timeout`` from the last byte.  A read the socket answers at once
changes nothing: each change of a trio deadline costs a context manager and
a deadline-heap update, and a small job is a dozen reads.

``relay._fastloop`` (plain sessions in one epoll set) asks ``due`` instead:
the time by which the connection must have sent more, whenever it stops
reading one (the socket empty, or its turn over); a sweep hands the late
ones to ``Connection``, which then times them out as above.
"""

from __future__ import annotations

from typing import Protocol

import trio

__all__ = ["ReadDeadline", "Timeouts"]


class Timeouts(Protocol):
    """The three ``[server]`` keys (``relay.config.ServerConfig`` has them)."""

    @property
    def idle_timeout(self) -> float: ...
    @property
    def command_timeout(self) -> float: ...
    @property
    def min_transfer_rate(self) -> int: ...


class _Parser(Protocol):
    @property
    def body_remaining(self) -> int: ...
    @property
    def buffered(self) -> int: ...


class ReadDeadline:
    """One connection's timeout bounds and which of them is in force."""

    __slots__ = ("_config", "_last_byte", "_stale", "body_bytes", "body_since", "limit",
                 "line_since")

    def __init__(self, config: Timeouts) -> None:
        self._config = config
        self.line_since: float | None = None  # a partial line or control file since then
        self.body_since = 0.0                 # the data body being received began then
        self.body_bytes = 0
        self.limit = "idle_timeout"           # which bound the armed deadline is
        self._last_byte = 0.0                 # when the reading loop last got bytes
        self._stale = False                   # the armed deadline predates that byte

    def begin(self) -> None:
        """A new reading scope: nothing read under it yet (``refresh`` leaves it alone)."""
        self._stale = False

    def arm(self, scope: trio.CancelScope, parser: _Parser, now: float) -> None:
        """Before a read that may wait: the tightest bound in force now."""
        scope.deadline = self.due(parser, now)
        self._stale = False

    def read(self, now: float) -> None:
        """Bytes came at ``now`` (the deadline is moved only when a wait needs it)."""
        self._last_byte, self._stale = now, True

    def refresh(self, scope: trio.CancelScope | None) -> None:
        """Before a handler's await that may wait: ``idle_timeout`` since the last byte."""
        if self._stale and scope is not None:
            self._stale = False
            scope.deadline = self._last_byte + self._config.idle_timeout

    def due(self, parser: _Parser, now: float) -> float:
        """When the next bytes must have come (sets ``limit``, the bound it is)."""
        cfg = self._config
        deadline, self.limit = now + cfg.idle_timeout, "idle_timeout"
        if parser.body_remaining:
            self.line_since = None
            if cfg.min_transfer_rate:
                due = (self.body_since + cfg.command_timeout
                       + self.body_bytes / cfg.min_transfer_rate)
                if due < deadline:
                    deadline, self.limit = due, "min_transfer_rate"
        elif parser.buffered:
            if self.line_since is None:
                self.line_since = now
            due = self.line_since + cfg.command_timeout
            if due < deadline:
                deadline, self.limit = due, "command_timeout"
        else:
            self.line_since = None
        return deadline

    def message(self) -> str:
        """What the connection's timeout log line says of the bound that fired."""
        cfg = self._config
        if self.limit == "command_timeout":
            return f"line not complete within {cfg.command_timeout:g}s (command_timeout)"
        if self.limit == "min_transfer_rate":
            return (f"data file slower than {cfg.min_transfer_rate} bytes/s "
                    "(min_transfer_rate)")
        return f"no data for {cfg.idle_timeout:g}s"
