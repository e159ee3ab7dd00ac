"""sd_notify: a real unix datagram socket stands in for systemd (relay/sdnotify.py)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from relay import sdnotify
from tests.daemon import RelayProcess, relay_config, write_config_file


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket, as systemd's notify socket, and its $NOTIFY_SOCKET value."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    yield sock, str(path)
    sock.close()


def messages(sock: socket.socket, until: str, timeout: float = 15) -> list[str]:
    """Datagrams received until one holds the assignment ``until``."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if until in got[-1].split("\n"):
            return got
    raise AssertionError(f"no {until} within {timeout}s; got {got}")


def test_socket_address_forms() -> None:
    assert sdnotify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.socket_address("@sd-notify") == b"\0sd-notify"
    assert sdnotify.socket_address("") is None
    assert sdnotify.socket_address("vsock:2:1234") is None


def test_watchdog_interval_is_half_and_only_for_this_pid() -> None:
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "500000"}) == 0.25
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert sdnotify.watchdog_interval({}) is None
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert sdnotify.watchdog_interval(mine) == 1.0
    assert sdnotify.watchdog_interval({**mine, "WATCHDOG_PID": "1"}) is None


def test_unset_socket_is_a_no_op() -> None:
    notifier = sdnotify.Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False


def test_send_to_path_socket(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    notifier = sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.send("READY=1", "STATUS=two\nlines") is True
    # One datagram; a newline inside a value cannot forge another assignment.
    assert sock.recv(4096) == b"READY=1\nSTATUS=two lines"


def test_send_to_abstract_socket() -> None:
    name = f"lpd-relay-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).send("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_vanished_manager_does_not_raise(tmp_path: Path) -> None:
    notifier = sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.send("READY=1") is False


def test_summary_counts_every_queue() -> None:
    class Runner:
        def __init__(self, pending: int, in_flight: int, held: int) -> None:
            self.pending, self.in_flight, self.held = [0] * pending, [0] * in_flight, [0] * held

    line = sdnotify.summary({"a": Runner(2, 1, 0), "b": Runner(1, 0, 3)})
    assert line == "2 queue(s): 3 job(s) queued, 1 in delivery, 3 held"


def test_daemon_notifies_ready_status_watchdog_stopping(
        tmp_path: Path, manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    config = write_config_file(tmp_path / "relay.toml", relay_config(tmp_path))
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "500000"}
    with RelayProcess(config, env=env) as relay:
        ready = messages(sock, "READY=1")
        assert relay.port > 0   # the banner (listeners up) came first
        lines = ready[-1].split("\n")
        status = next(a for a in lines if a.startswith("STATUS="))
        assert "1 queue(s): 0 job(s) queued" in status
        # Pings at half of WATCHDOG_USEC (0.25 s): at least 4 in the next 1.5 s.
        start = time.monotonic()
        pings = 0
        while time.monotonic() - start < 1.5:
            sock.settimeout(1.0)
            if sock.recv(4096) == b"WATCHDOG=1":
                pings += 1
        assert 4 <= pings <= 8, pings
        assert relay.proc is not None
        relay.proc.send_signal(15)
        stopping = messages(sock, "STOPPING=1")
        assert relay.proc.wait(30) == 0
        assert any("STATUS=stopping" in m for m in stopping)


def test_keep_alive_sends_status_changes_and_pings(
        manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    sock.setblocking(False)
    # Few datagrams: a unix datagram socket queues at most net.unix.max_dgram_qlen (10).
    notifier = sdnotify.Notifier(address=path, watchdog_interval=2.5)
    lines = iter(["idle", "idle", "2 queued", "2 queued"])

    async def main() -> None:
        with trio.move_on_after(sdnotify.STATUS_INTERVAL * 2 + 0.5):
            await sdnotify.keep_alive(notifier, lambda: next(lines, "2 queued"))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    got = []
    while True:
        try:
            got.append(sock.recv(4096).decode())
        except BlockingIOError:
            break
    assert got[0] == "READY=1\nSTATUS=idle"
    assert got.count("WATCHDOG=1") == 4                   # every 2.5 s for 10.5 s
    assert [m for m in got if m.startswith("STATUS=")] == ["STATUS=2 queued"]  # once, changed
