"""Tests of the originate-port pool (relay.originports) on real loopback sockets.

Each test runs a small trio LPD-like receiver on 127.0.0.1: it records the
source port of every connection and either closes first after a one-byte "ack"
(as LPD receivers do after the final acknowledgement) or waits for our close.
Small pools use three ports above the kernel's ephemeral range, checked free;
the reserved-port tests (721-731) need root.  Who ends up in TIME_WAIT is read
from /proc/net/tcp, the kernel's own table.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from relay.errors import ConfigError, SinkUnavailable
from relay.originports import OriginConnection, OriginPortPool
from tests.peers import time_wait_pairs

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0
root = pytest.mark.root
needs_root = pytest.mark.skipif(not IS_ROOT, reason="reserved ports need root")


def _sysctl(name: str, default: int) -> int:
    try:
        return int(Path("/proc/sys/net/ipv4", name).read_text().split()[0])
    except OSError:
        return default


# Linux recycles our own TIME_WAIT pair for a bound socket only with timestamps.
TIMESTAMPS = _sysctl("tcp_timestamps", 0) != 0


def run(test: Callable[[], Awaitable[None]], seconds: float = 20.0) -> None:
    async def main() -> None:
        with trio.fail_after(seconds):
            await test()
    trio.run(main)


def free_range(count: int) -> range:
    """``count`` consecutive ports above the ephemeral range that nothing holds now."""
    rng = random.Random()
    for _attempt in range(50):
        start = rng.randrange(61000, 65000 - count)
        ports = range(start, start + count)
        if all(_bindable(p) for p in ports):
            return ports
    pytest.skip("no free port range found")


def _bindable(port: int) -> bool:
    # Without SO_REUSEADDR even a TIME_WAIT on the port makes bind fail.
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


class Receiver:
    """Records peer ports; mode "close": ack then close first, "wait": wait for EOF,
    "hold": read to EOF and keep the socket open."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = 0
        self.peers: list[int] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.socket.socket() as listener:
            await listener.bind((LOOPBACK, 0))
            listener.listen(128)
            self.port = listener.getsockname()[1]
            task_status.started()
            async with trio.open_nursery() as nursery:
                for _conn in range(100_000):   # ended by cancellation
                    conn, peer = await listener.accept()
                    self.peers.append(peer[1])
                    nursery.start_soon(self._serve, conn)

    async def _serve(self, conn: trio.socket.SocketType) -> None:
        with conn:
            try:
                if self.mode == "close":
                    await conn.send(b"\0")
                    return
                for _read in range(1000):
                    if not await conn.recv(4096):
                        break
                if self.mode == "hold":
                    await trio.sleep_forever()
            except OSError:
                pass   # a reset from the client is part of some tests


@asynccontextmanager
async def receiver(mode: str) -> AsyncIterator[Receiver]:
    rx = Receiver(mode)
    async with trio.open_nursery() as nursery:
        await nursery.start(rx.run)
        yield rx
        nursery.cancel_scope.cancel()


class PoolMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.origin_ports_in_use = Gauge("lpdrelay_origin_ports_in_use", "in use",
                                         registry=self.registry)
        self.origin_port_exhausted_total = Counter("lpdrelay_origin_port_exhausted", "waits",
                                                   registry=self.registry)
        self.origin_port_wait_seconds = Histogram("lpdrelay_origin_port_wait_seconds", "wait",
                                                  registry=self.registry)

    def value(self, name: str) -> float | None:
        return self.registry.get_sample_value(name)


async def finish_after_peer_close(conn: OriginConnection) -> None:
    """The receiver acked and closed first: read the ack and its EOF, then close."""
    assert await conn.receive_some() == b"\0"
    assert await conn.receive_some() == b""
    await conn.aclose(peer_closed=True)


# -- distinct ports, waiting, fairness -------------------------------------

def test_connections_take_distinct_source_ports() -> None:
    ports = free_range(3)

    async def main() -> None:
        pool = OriginPortPool(ports.start, ports[-1])
        async with receiver("wait") as rx:
            conns = [await pool.connect(LOOPBACK, rx.port, timeout=5) for _ in range(3)]
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(rx.peers) == list(ports)
            assert [c.local_port for c in conns] == list(ports)
            # Nagle + delayed ACK would stall small LPD writes.
            assert conns[0].socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert conns[0].socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            stats = pool.statistics()
            assert (stats.size, stats.in_use, stats.connects, stats.waiting) == (3, 3, 3, 0)
            for c in conns:
                await c.aclose()
        stats = pool.statistics()
        assert stats.in_use == 0 and stats.cooling == 3   # we closed first: all cool
    run(main)


def test_a_spare_port_means_one_left_free_and_nobody_waiting() -> None:
    # has_spare gates optional connections (lpd://'s connect ahead).
    ports = free_range(3)

    async def main() -> None:
        pool = OriginPortPool(ports.start, ports[-1])
        assert OriginPortPool(None, None).has_spare()      # "none": ephemeral ports
        async with receiver("wait") as rx:
            conns = [await pool.connect(LOOPBACK, rx.port, timeout=5)]
            assert pool.has_spare()                  # 1 of 3 busy: a second leaves one
            conns.append(await pool.connect(LOOPBACK, rx.port, timeout=5))
            assert not pool.has_spare()              # a third would take the last one
            for c in conns:
                await c.aclose()
        assert pool.has_spare()
    run(main)


def test_waiters_are_served_in_arrival_order_as_ports_free() -> None:
    ports = free_range(3)

    async def main() -> None:
        metrics = PoolMetrics()
        pool = OriginPortPool(ports.start, ports[-1], metrics=metrics)
        got: list[tuple[int, int]] = []
        opened: list[OriginConnection] = []

        async def waiter(i: int) -> None:
            conn = await pool.connect(LOOPBACK, rx.port, timeout=10)
            got.append((i, conn.local_port))
            opened.append(conn)

        # The receiver closes first, so released ports do not cool.
        async with receiver("close") as rx:
            held = [await pool.connect(LOOPBACK, rx.port, timeout=5) for _ in range(3)]
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(waiter, i)
                    await trio.testing.wait_all_tasks_blocked()
                assert pool.statistics().waiting == 3
                assert metrics.value("lpdrelay_origin_ports_in_use") == 3
                for conn in (held[1], held[0], held[2]):
                    await finish_after_peer_close(conn)
                    await trio.testing.wait_all_tasks_blocked()
            for conn in opened:
                await finish_after_peer_close(conn)
        assert got == [(0, ports[1]), (1, ports[0]), (2, ports[2])]
        stats = pool.statistics()
        assert (stats.exhausted_total, stats.waiting, stats.in_use) == (3, 0, 0)
        assert stats.max_wait_seconds > 0
        assert metrics.value("lpdrelay_origin_port_exhausted_total") == 3
        assert metrics.value("lpdrelay_origin_port_wait_seconds_count") == 6
        assert metrics.value("lpdrelay_origin_ports_in_use") == 0
    run(main)


def test_wait_that_times_out_is_sink_unavailable_and_counted() -> None:
    ports = free_range(3)

    async def main() -> None:
        pool = OriginPortPool(ports.start, ports[-1])
        async with receiver("wait") as rx:
            held = [await pool.connect(LOOPBACK, rx.port, timeout=5) for _ in range(3)]
            with pytest.raises(SinkUnavailable, match="all 3 origin ports busy"):
                await pool.connect(LOOPBACK, rx.port, timeout=0.2)
            stats = pool.statistics()
            assert (stats.exhausted_total, stats.waiting, stats.in_use) == (1, 0, 3)
            assert stats.wait_seconds_total >= 0.2
            for c in held:
                await c.aclose()
    run(main)


def test_cancelled_waiter_leaves_the_queue() -> None:
    ports = free_range(1)

    async def main() -> None:
        pool = OriginPortPool(ports.start, ports[-1])
        async with receiver("close") as rx:
            held = await pool.connect(LOOPBACK, rx.port, timeout=5)
            with trio.move_on_after(0.1):
                await pool.connect(LOOPBACK, rx.port, timeout=10)
            assert pool.statistics().waiting == 0
            await finish_after_peer_close(held)
            # The port went back to the pool, not to the cancelled waiter.
            conn = await pool.connect(LOOPBACK, rx.port, timeout=5)
            assert conn.local_port == ports[0]
            await finish_after_peer_close(conn)
        stats = pool.statistics()
        assert (stats.exhausted_total, stats.in_use, stats.connects) == (1, 0, 2)
    run(main)


# -- ports that cannot be used ---------------------------------------------

def test_port_held_by_another_listener_is_skipped() -> None:
    ports = free_range(3)

    async def main() -> None:
        pool = OriginPortPool(ports.start, ports[-1])
        with socket.socket() as blocker:   # no SO_REUSEADDR, listening: bind must fail
            blocker.bind(("0.0.0.0", ports[1]))
            blocker.listen(1)
            async with receiver("wait") as rx:
                conns = [await pool.connect(LOOPBACK, rx.port, timeout=5) for _ in range(2)]
                assert [c.local_port for c in conns] == [ports[0], ports[2]]
                assert pool.statistics().binds_failed == 1
                for c in conns:
                    await c.aclose()
    run(main)


def test_no_bindable_port_fails_at_once() -> None:
    ports = free_range(3)

    async def main() -> None:
        pool = OriginPortPool(ports.start, ports[-1])
        blockers = [socket.socket() for _ in ports]
        try:
            for s, p in zip(blockers, ports, strict=True):
                s.bind(("0.0.0.0", p))
                s.listen(1)
            async with receiver("wait") as rx:
                with pytest.raises(SinkUnavailable, match="can be bound"):
                    await pool.connect(LOOPBACK, rx.port, timeout=5)
            stats = pool.statistics()
            assert (stats.binds_failed, stats.in_use, stats.waiting) == (3, 0, 0)
        finally:
            for s in blockers:
                s.close()
    run(main)


def test_refused_connection_fails_fast_on_one_port() -> None:
    ports = free_range(3)
    with socket.socket() as s:   # a port with nothing listening
        s.bind((LOOPBACK, 0))
        dead = s.getsockname()[1]

    async def main() -> None:
        pool = OriginPortPool(ports.start, ports[-1])
        with pytest.raises(SinkUnavailable, match="refused"):
            await pool.connect(LOOPBACK, dead, timeout=5)
        stats = pool.statistics()
        assert (stats.in_use, stats.binds_failed, stats.cooling, stats.connects) == (0, 0, 0, 0)
        # Round-robin moved past exactly one port: only one was tried.
        async with receiver("wait") as rx:
            conn = await pool.connect(LOOPBACK, rx.port, timeout=5)
            assert conn.local_port == ports[1]
            await conn.aclose()
    run(main)


def test_connect_timeout_is_sink_unavailable() -> None:
    ports = free_range(3)

    async def main() -> None:
        pool = OriginPortPool(ports.start, ports[-1])
        with socket.socket() as full:   # backlog 0, never accepted: later SYNs are dropped
            full.bind((LOOPBACK, 0))
            full.listen(0)
            with socket.socket() as first:
                first.connect(full.getsockname())
                with pytest.raises(SinkUnavailable, match="timed out"):
                    await pool.connect(LOOPBACK, full.getsockname()[1], timeout=0.3)
        stats = pool.statistics()
        assert (stats.in_use, stats.cooling, stats.connects) == (0, 0, 0)
    run(main)


# -- TIME_WAIT: cooling, peer-closed, collisions ---------------------------

def test_closed_first_port_cools_for_that_destination_only() -> None:
    ports = free_range(2)

    async def main() -> None:
        pool = OriginPortPool(ports.start, ports[-1])
        async with receiver("wait") as a, receiver("close") as b:
            first = await pool.connect(LOOPBACK, a.port, timeout=5)
            assert first.local_port == ports[0]
            await first.aclose()                       # our FIN first: TIME_WAIT is ours
            assert (ports[0], a.port) in time_wait_pairs()
            to_b = await pool.connect(LOOPBACK, b.port, timeout=5)
            assert to_b.local_port == ports[1]
            await finish_after_peer_close(to_b)
            # Round-robin points at ports[0] again, but it cools for A ...
            again_a = await pool.connect(LOOPBACK, a.port, timeout=5)
            assert again_a.local_port == ports[1]
            # ... while B may have it at once.
            again_b = await pool.connect(LOOPBACK, b.port, timeout=5)
            assert again_b.local_port == ports[0]
            await finish_after_peer_close(again_b)
            await again_a.aclose()
        stats = pool.statistics()
        assert (stats.exhausted_total, stats.cooling_reuses, stats.cooling) == (0, 0, 2)
    run(main)


def test_without_reuse_addr_a_closed_first_port_cools_for_everyone() -> None:
    ports = free_range(2)

    async def main() -> None:
        pool = OriginPortPool(ports.start, ports[-1], reuse_addr=False)
        async with receiver("wait") as a, receiver("close") as b:
            first = await pool.connect(LOOPBACK, a.port, timeout=5)
            await first.aclose()
            assert not _bindable(ports[0])   # our TIME_WAIT blocks a plain bind
            for _cycle in range(2):
                conn = await pool.connect(LOOPBACK, b.port, timeout=5)
                assert conn.local_port == ports[1]
                await finish_after_peer_close(conn)
        assert pool.statistics().binds_failed == 0   # never tried blindly
    run(main)


def test_peer_closed_port_is_reusable_at_once() -> None:
    ports = free_range(1)

    async def main() -> None:
        pool = OriginPortPool(ports.start, ports[-1])
        async with receiver("close") as rx:
            for _cycle in range(5):
                conn = await pool.connect(LOOPBACK, rx.port, timeout=5)
                assert conn.local_port == ports[0]
                await finish_after_peer_close(conn)
                assert pool.statistics().cooling == 0
            # The receiver closed first: the TIME_WAIT is on its side, not ours.
            assert (ports[0], rx.port) not in time_wait_pairs()
            assert (rx.port, ports[0]) in time_wait_pairs()
        assert pool.statistics().exhausted_total == 0
    run(main)


def test_kernel_state_overrides_a_wrong_peer_closed_hint() -> None:
    ports = free_range(1)

    async def main() -> None:
        pool = OriginPortPool(ports.start, ports[-1])
        async with receiver("close") as closer, receiver("wait") as waiter:
            conn = await pool.connect(LOOPBACK, closer.port, timeout=5)
            assert await conn.receive_some() == b"\0"
            assert await conn.receive_some() == b""
            await conn.aclose(peer_closed=False)       # wrong: the peer did close first
            assert pool.statistics().cooling == 0
            conn = await pool.connect(LOOPBACK, waiter.port, timeout=5)
            await conn.aclose(peer_closed=True)        # wrong: the peer had not closed
            assert pool.statistics().cooling == 1
    run(main)


@pytest.mark.skipif(not TIMESTAMPS, reason="net.ipv4.tcp_timestamps is off")
def test_cooling_port_is_tried_when_nothing_else_is_free() -> None:
    ports = free_range(1)

    async def main() -> None:
        pool = OriginPortPool(ports.start, ports[-1])
        async with receiver("wait") as rx:
            for _cycle in range(3):
                conn = await pool.connect(LOOPBACK, rx.port, timeout=5)
                assert conn.local_port == ports[0]
                await conn.aclose()
        stats = pool.statistics()
        assert (stats.cooling_reuses, stats.exhausted_total, stats.binds_failed) == (2, 0, 0)
    run(main)


def test_pair_collision_cools_hard_and_waits_instead_of_retrying() -> None:
    ports = free_range(1)

    async def main() -> None:
        pool = OriginPortPool(ports.start, ports[-1], cooldown=0.5)
        async with receiver("wait") as rx, trio.open_nursery() as nursery:
            # Another socket already owns the pair (our port, the receiver).
            other = socket.socket()
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            other.bind(("0.0.0.0", ports[0]))
            other.connect((LOOPBACK, rx.port))
            got: list[OriginConnection] = []

            async def connect() -> None:
                got.append(await pool.connect(LOOPBACK, rx.port, timeout=10))
            nursery.start_soon(connect)
            await trio.testing.wait_all_tasks_blocked()
            stats = pool.statistics()
            assert (stats.binds_failed, stats.waiting, stats.exhausted_total) == (1, 1, 1)
            # A reset leaves no TIME_WAIT: the pair is free once the cooldown ends.
            other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            other.close()
        assert got[0].local_port == ports[0]
        assert pool.statistics().max_wait_seconds >= 0.4
        await got[0].aclose()
    run(main)


def test_linger_resets_a_peer_that_never_closes() -> None:
    ports = free_range(1)

    async def main() -> None:
        pool = OriginPortPool(ports.start, ports[-1], linger=0.2)
        async with receiver("hold") as rx:
            conn = await pool.connect(LOOPBACK, rx.port, timeout=5)
            await conn.send_all(b"job")
            await conn.aclose()
            # The reset left no TIME_WAIT anywhere, so the port does not cool.
            assert pool.statistics().cooling == 0
            assert (ports[0], rx.port) not in time_wait_pairs()
    run(main)


# -- privilege, "any" -------------------------------------------------------

@root
@needs_root
def test_check_privilege_passes_as_root() -> None:
    OriginPortPool.for_reserve("rfc1179").check_privilege()
    OriginPortPool.for_reserve("privileged").check_privilege()


def test_check_privilege_ignores_unprivileged_ranges() -> None:
    OriginPortPool.for_reserve("none").check_privilege()
    OriginPortPool(61000, 61010).check_privilege()


_CHILD = """
import sys
from relay.errors import ConfigError
from relay.originports import OriginPortPool
try:
    OriginPortPool.for_reserve("rfc1179").check_privilege()
except ConfigError as exc:
    print(exc)
    sys.exit(3)
print("no error")
"""


@root
@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv not installed")
@pytest.mark.skipif(_sysctl("ip_unprivileged_port_start", 1024) <= 721,
                    reason="this kernel lets anyone bind 721")
@pytest.mark.parametrize("drop", [
    ["--reuid=65534", "--regid=65534", "--clear-groups"],   # nobody
    ["--bounding-set=-net_bind_service"],                    # root without the capability
], ids=["nobody", "root-without-cap"])
def test_check_privilege_refuses_an_unprivileged_process(drop: list[str]) -> None:
    child = subprocess.run(["setpriv", *drop, sys.executable, "-c", _CHILD], cwd=REPO,
                           capture_output=True, text=True, timeout=30, check=False)
    assert child.returncode == 3, child.stdout + child.stderr
    assert "reserve=rfc1179: origin ports 721-731 need root or CAP_NET_BIND_SERVICE" \
        in child.stdout


def test_unknown_reserve_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="none, rfc1179, privileged, any"):
        OriginPortPool.for_reserve("reserved")


def test_none_mode_uses_ephemeral_ports_without_limit() -> None:
    async def main() -> None:
        pool = OriginPortPool.for_reserve("none")
        async with receiver("wait") as rx:
            conns = [await pool.connect(LOOPBACK, rx.port, timeout=5) for _ in range(15)]
            locals_ = {c.local_port for c in conns}
            assert len(locals_) == 15 and min(locals_) >= 1024
            stats = pool.statistics()
            assert (stats.size, stats.in_use, stats.exhausted_total) == (0, 15, 0)
            for c in conns:
                await c.aclose()
        assert pool.statistics().in_use == 0
    run(main)


# -- 500 jobs through the 11 reserved ports ---------------------------------

@root
@needs_root
def test_500_cycles_through_rfc1179_ports_when_the_receiver_closes_first() -> None:
    async def main() -> None:
        pool = OriginPortPool.for_reserve("rfc1179")
        async with receiver("close") as rx:
            for _job in range(500):
                await finish_after_peer_close(await pool.connect(LOOPBACK, rx.port, timeout=5))
            ours = {p for p, remote in time_wait_pairs() if remote == rx.port}
        stats = pool.statistics()
        print(f"\nreceiver closes first: {stats}")
        assert stats.connects == 500 and stats.in_use == 0
        assert not ours & set(range(721, 732))   # no TIME_WAIT left on our ports
    run(main, seconds=60)


async def clear_our_time_wait(rx: Receiver, ports: range) -> None:
    """Reuse each of our TIME_WAIT pairs once with the receiver closing first.

    Leaves the reserved ports clean for other programs that bind them without
    SO_REUSEADDR (LPRng, rlpr): the TIME_WAIT moves to the receiver's side.
    """
    rx.mode = "close"
    for local, remote in sorted(time_wait_pairs()):
        if remote != rx.port or local not in ports:
            continue
        with trio.socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await s.bind(("0.0.0.0", local))
            await s.connect((LOOPBACK, rx.port))
            for _read in range(3):   # the ack, then EOF
                if not await s.recv(64):
                    break


@root
@needs_root
@pytest.mark.skipif(not TIMESTAMPS, reason="net.ipv4.tcp_timestamps is off")
def test_500_cycles_through_rfc1179_ports_when_we_close_first() -> None:
    rfc1179 = range(721, 732)

    async def main() -> None:
        pool = OriginPortPool.for_reserve("rfc1179")
        async with receiver("wait") as rx:
            try:
                for _job in range(500):
                    conn = await pool.connect(LOOPBACK, rx.port, timeout=5)
                    await conn.send_all(b"job")
                    await conn.aclose()
                stats = pool.statistics()
                print(f"\nwe close first: {stats}")
                assert stats.connects == 500 and stats.in_use == 0
                # Our FIN came first, so the TIME_WAIT pairs are ours.
                assert any(r == rx.port and p in rfc1179 for p, r in time_wait_pairs())
            finally:
                await clear_our_time_wait(rx, rfc1179)
            assert not {(p, rx.port) for p in rfc1179} & time_wait_pairs()
    run(main, seconds=60)
