"""Start-up resource limits: the file-descriptor budget (RLIMIT_NOFILE).

Every inbound connection holds a socket and, while a data file streams in,
that file open in the spool; every delivery in flight holds a socket and the
spool file it sends.  With systemd's or a shell's default soft limit of 1,024
a relay configured for 10,000 connections runs out of descriptors after about
500 busy ones.  So ``serve`` raises the soft limit to the hard limit at start
(as systemd itself recommends for daemons), and both ``serve`` and
``check-config`` print one warning line when ``max_connections`` cannot be
honoured with what the process got.  The estimate is deliberately simple and
documented in docs/configuration.md.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from relay.config import Config

__all__ = ["FDS_PER_CONNECTION", "FD_RESERVE", "FdBudget", "fd_budget", "fd_warning",
           "raise_nofile"]

# An inbound connection: its socket + the data file being written.
FDS_PER_CONNECTION = 2
# A delivery in flight: its socket (or pipe/device) + the spool file it reads.
FDS_PER_DELIVERY = 2
# Everything else: stdio, listeners, the spool lock and directory fds, group
# commit, /metrics connections (capped at 64), trio's wakeup pipe, sinks' spare.
FD_RESERVE = 128


@dataclass(frozen=True, slots=True, kw_only=True)
class FdBudget:
    """Descriptors the configuration needs against the limit the process has."""

    inbound: int     # for max_connections connections
    other: int       # deliveries in flight and the reserve
    soft: int
    hard: int

    @property
    def needed(self) -> int:
        return self.inbound + self.other

    @property
    def connections(self) -> int:
        """How many connections fit in the soft limit beside deliveries and the reserve."""
        return max(0, (self.soft - self.other) // FDS_PER_CONNECTION)


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (soft, hard) afterwards.

    An unlimited hard limit is left alone (the kernel refuses a soft limit
    above fs.nr_open, and the current soft limit is then what there is).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft, hard


def fd_budget(config: Config, soft: int, hard: int) -> FdBudget:
    deliveries = sum(q.concurrency for q in config.queues.values()) * FDS_PER_DELIVERY
    return FdBudget(inbound=config.server.max_connections * FDS_PER_CONNECTION,
                    other=deliveries + FD_RESERVE, soft=soft, hard=hard)


def fd_warning(config: Config, soft: int, hard: int) -> str | None:
    """One "warning: server.max_connections: ..." line, or None when the limit suffices."""
    budget = fd_budget(config, soft, hard)
    if soft == resource.RLIM_INFINITY or budget.needed <= soft:
        return None
    return (f"warning: server.max_connections: {config.server.max_connections} connections "
            f"need about {budget.needed} file descriptors (2 each, plus deliveries and a "
            f"reserve), but the limit is {soft} (hard limit {hard}): about "
            f"{budget.connections} can be served at once; raise the limit (ulimit -n, "
            f"systemd LimitNOFILE=) or lower max_connections")
