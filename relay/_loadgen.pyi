"""Typed face of the load generator's compiled loop (relay/_loadgen.pyx).

Plain LPD jobs over epoll without the GIL; ``relay.loadgenfast`` drives it.
"""

class EpollLoad:
    """Plain LPD jobs over at most ``concurrency`` connections at once."""

    def __init__(self, family: int, host: str, port: int, *, concurrency: int,
                 io_timeout: float, half_close: bool, nodelay: bool,
                 flowinfo: int = 0, scope_id: int = 0) -> None: ...
    @property
    def queued(self) -> int:
        """Jobs added and not yet connected."""
    @property
    def open(self) -> int:
        """Connections under way."""
    def add(self, jobs: list[list[list[bytes]]]) -> None:
        """Queue ``jobs``: each a list of steps, each step a list of ``bytes``."""
    def run(self, more: bool) -> int:
        """Send until nothing is left (or, ``more``, until a refill is due); jobs finished."""
    def latencies(self) -> list[float]:
        """Seconds from connect to the last acknowledgement, one per job that went through."""
    def failures(self) -> dict[str, int]:
        """Failed jobs by key: "refused", "closed", "timeout", "error" or a reply "0x01"."""
    def close(self) -> None:
        """Fail every connection still open as "error" (an interrupted run)."""
