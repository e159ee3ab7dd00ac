"""The sd_notify protocol, spoken directly: readiness, status and watchdog for systemd.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a unix datagram
socket (a name starting with ``@`` is in the abstract namespace), and
expects newline-separated ``KEY=VALUE`` assignments in single datagrams:
``READY=1`` once the service is usable, ``STATUS=`` a one-line summary that
``systemctl status`` shows, ``STOPPING=1`` when shutdown begins, ``RELOADING=1`` then ``READY=1``
around a SIGHUP reload, and with
``WatchdogSec=`` a ``WATCHDOG=1`` at least every ``$WATCHDOG_USEC``
microseconds (sd_watchdog_enabled(3) recommends half of it).  The protocol
is a dozen lines of socket code, so it is spoken here rather than through
libsystemd bindings; without ``$NOTIFY_SOCKET`` every call is a no-op, so
the daemon runs the same from a terminal.

A datagram is sent without blocking: a full or vanished socket means the
message is dropped, never that the relay waits on its service manager.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass
from typing import Protocol

import trio

# How often STATUS= is refreshed (only sent when the line changed).
STATUS_INTERVAL = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Notifier:
    """Where to send notifications; ``address`` None = not under a service manager."""

    address: str | bytes | None
    watchdog_interval: float | None = None   # seconds between WATCHDOG=1, or None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` as systemd sets them."""
        env = os.environ if environ is None else environ
        return cls(address=socket_address(env.get("NOTIFY_SOCKET", "")),
                   watchdog_interval=watchdog_interval(env))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; True when it went out."""
        if self.address is None or not assignments:
            return False
        message = "\n".join(a.replace("\n", " ") for a in assignments).encode("utf-8", "replace")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(message, socket.MSG_DONTWAIT, self.address)
            except OSError:   # no manager listening, or its queue is full: drop it
                return False
        return True


def socket_address(value: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as an ``AF_UNIX`` address: a path, or ``@name`` = abstract."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None   # unset, or a kind this relay does not speak (e.g. vsock:)


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, when the watchdog is meant for this process."""
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1e6 if usec > 0 else None


class _Runner(Protocol):
    @property
    def pending(self) -> Sized: ...
    @property
    def in_flight(self) -> Sized: ...
    @property
    def held(self) -> Sized: ...


def summary(runners: Mapping[str, _Runner]) -> str:
    """The one-line STATUS=: jobs waiting, being delivered, held, over all queues."""
    queued = sum(len(r.pending) for r in runners.values())
    active = sum(len(r.in_flight) for r in runners.values())
    held = sum(len(r.held) for r in runners.values())
    return (f"{len(runners)} queue(s): {queued} job(s) queued, {active} in delivery, "
            f"{held} held")


async def keep_alive(notifier: Notifier, status: Callable[[], str]) -> None:
    """READY=1 with the first STATUS=, then the watchdog pings and status changes, forever."""
    line = status()
    notifier.send("READY=1", f"STATUS={line}")
    if not notifier.enabled:
        return
    tick = min(STATUS_INTERVAL, notifier.watchdog_interval or STATUS_INTERVAL)
    since_status = 0.0
    while True:
        await trio.sleep(tick)
        since_status += tick
        if notifier.watchdog_interval is not None:
            notifier.send("WATCHDOG=1")
        if since_status >= STATUS_INTERVAL:
            since_status = 0.0
            if (new := status()) != line:
                line = new
                notifier.send(f"STATUS={line}")


def reloading(notifier: Notifier) -> None:
    """RELOADING=1 (with MONOTONIC_USEC, as systemd's notify-reload wants) before a reload."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")


def reloaded(notifier: Notifier, outcome: str) -> None:
    """READY=1 after a reload, whatever its outcome (a refused file leaves the old one running)."""
    notifier.send("READY=1", f"STATUS=reload {outcome}")
