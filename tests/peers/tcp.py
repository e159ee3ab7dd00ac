"""TIME_WAIT hygiene for the reserved ports.

LPRng and rlpr bind reserved source ports without SO_REUSEADDR, so a test
that leaves them in TIME_WAIT can break the next one; these helpers see
those sockets (``/proc/net/tcp``) and move them out of the way.
"""

from __future__ import annotations

import socket
from pathlib import Path

from tests.peers.process import LOOPBACK


def tcp_pairs(state: str) -> set[tuple[int, int]]:
    """(local port, remote port) of every IPv4 socket in ``state`` (/proc/net/tcp
    hex code: 06 TIME_WAIT, 08 CLOSE_WAIT)."""
    pairs = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == state:
            pairs.add((int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)))
    return pairs


def time_wait_pairs() -> set[tuple[int, int]]:
    """(local port, remote port) of every IPv4 TIME_WAIT socket."""
    return tcp_pairs("06")


def release_time_wait(ports: range, remote_port: int, host: str = LOOPBACK) -> None:
    """Move our TIME_WAITs from ``ports`` to ``host:remote_port`` onto the other side.

    After a test whose sender closed first, reserved ports stay in TIME_WAIT
    for 60 s and programs that bind them without SO_REUSEADDR (LPRng, rlpr)
    fail.  Reusing each pair once (Linux allows it for our own TIME_WAIT with
    SO_REUSEADDR and timestamps) with a listener that closes first leaves the
    TIME_WAIT on the listener's port instead.  Call it after the real
    receiver on ``remote_port`` has stopped.
    """
    pending = sorted(p for p, r in time_wait_pairs() if r == remote_port and p in ports)
    if not pending:
        return
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, remote_port))
        listener.listen(len(pending))
        listener.settimeout(5)
        for local in pending:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.settimeout(5)
                try:
                    s.bind((host, local))
                    s.connect((host, remote_port))
                except OSError:
                    continue          # not reusable after all: it simply expires
                conn, _ = listener.accept()
                conn.close()          # the listener's FIN first
                s.recv(1)
