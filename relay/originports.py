"""The originate-port pool: source ports for outbound LPD connections (SPEC §5).

RFC 1179 senders bind a reserved source port before they connect, and the side
that closes first keeps the (port, peer) pair in TIME_WAIT for 60 s on Linux:
with the 11 ports 721-731 that is LPRng's and CUPS' stall (FIELD-NOTES, pain
point 2).  So one pool per range, shared by every ``lpd://`` destination, hands
ports out round-robin, skips ports others hold, lets a port we closed first
*cool* for that destination only (preferring other ports, and trying a cooling
one only when nothing else is free, since Linux recycles a TIME_WAIT pair for a
bound socket when TCP timestamps are on), and makes senders wait, FIFO-fair and
bounded, when nothing is usable.  ``docs/origin-ports.md`` has the reasoning.
What happens on the socket itself (bind, connect, reading who holds TIME_WAIT,
the lingering close) is in ``relay.originconn``.
"""

from __future__ import annotations

import bisect
import itertools
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import trio

from relay.errors import ConfigError, OriginPortUnavailable, SinkUnavailable
from relay.originconn import (
    AddressBusy,
    Dest,
    OriginConnection,
    bind_probe,
    open_socket,
    resolve,
    show_dest,
)

__all__ = [
    "RESERVE_RANGES", "Dest", "OriginConnection", "OriginPortMetrics", "OriginPortPool",
    "PoolSet", "PoolStatistics", "reserve_range",
]

# reserve= of an lpd:// URI (SPEC §3.3) -> port range; None/None = kernel ephemeral.
# CUPS' meanings: none = ephemeral, any = any reserved port 1-1023.
RESERVE_RANGES: Final[dict[str, tuple[int | None, int | None]]] = {
    "none": (None, None), "rfc1179": (721, 731), "privileged": (512, 1023), "any": (1, 1023)}

_PRIVILEGED_BELOW: Final = 1024


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _Gauge(_Counter, Protocol):
    def dec(self, amount: float = 1) -> None: ...


class _Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


class OriginPortMetrics(Protocol):
    """The three metric objects the pool updates (``relay.metrics.Metrics`` has them)."""

    @property
    def origin_ports_in_use(self) -> _Gauge: ...
    @property
    def origin_port_exhausted_total(self) -> _Counter: ...
    @property
    def origin_port_wait_seconds(self) -> _Histogram: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStatistics:
    """A snapshot of the pool; ``size`` 0 means "none" (ephemeral, unlimited)."""

    size: int
    in_use: int                 # connections holding a port (connecting or open)
    waiting: int                # connect() calls queued for a port now
    cooling: int                # (port, destination) pairs cooling after our close
    exhausted_total: int        # connect() calls that had to wait
    binds_failed: int           # bind/connect attempts that met EADDRINUSE/EADDRNOTAVAIL
    cooling_reuses: int         # connects that reused a still-cooling pair successfully
    wait_seconds_total: float
    max_wait_seconds: float
    connects: int               # successful connections


@dataclass(frozen=True, slots=True)
class _Cooling:
    expiry: float               # time.monotonic(): TIME_WAIT is a kernel timer
    hard: bool                  # the kernel refused this pair: never probe early


_ANY_DEST: Final[Dest] = ("*", 0)  # without SO_REUSEADDR a TIME_WAIT blocks every bind


@dataclass(slots=True, eq=False)
class _Claim:
    """One connect() call's place in the FIFO queue for a port."""

    seq: int
    dest: Dest
    tried: set[int] = field(default_factory=set)
    port: int | None = None
    event: trio.Event = field(default_factory=trio.Event)
    exhausted: bool = False
    waited: float = 0.0


class OriginPortPool:
    """Source ports ``low``..``high`` for outbound connections; ``None``/``None`` = "none".

    Use it from one ``trio.run`` at a time; share it between every destination
    that uses the same range (``reserve_range`` gives the key).  ``metrics`` (optional) gets
    ``origin_ports_in_use.inc()/.dec()``, ``origin_port_exhausted_total.inc()``
    and ``origin_port_wait_seconds.observe(s)`` (one observation per pooled
    connect, 0 when a port was free).
    """

    def __init__(self, low: int | None, high: int | None, *, reuse_addr: bool = True,
                 linger: float = 5.0, cooldown: float = 60.0,
                 metrics: OriginPortMetrics | None = None) -> None:
        if (low is None) != (high is None):
            raise ValueError("low and high must both be set or both be None")
        if low is not None and high is not None and not 0 < low <= high <= 65535:
            raise ValueError(f"bad origin port range {low}-{high}")
        if linger < 0 or cooldown < 0:
            raise ValueError("linger and cooldown must be >= 0")
        # An empty range is "none": no bind, no limit, no waiting.
        self._ports = range(low, high + 1) if low is not None and high is not None else range(0)
        self._label = f"{low}-{high}"
        self._reuse_addr = reuse_addr
        self._linger = linger
        self._cooldown = cooldown
        self._metrics = metrics
        self._config_path = "origin_ports.range"
        self._cursor = 0
        self._busy: set[int] = set()
        self._cooling: dict[tuple[int, Dest], _Cooling] = {}   # insertion = expiry order
        self._queue: list[_Claim] = []                        # sorted by seq: FIFO
        self._seq = itertools.count()
        self._in_use = 0
        self._exhausted = self._binds_failed = self._reuses = self._connects = 0
        self._wait_total = self._wait_max = 0.0

    @property
    def range(self) -> tuple[int | None, int | None]:
        """(low, high), or (None, None) for "none" — the key pools are shared by."""
        if not self._ports:
            return (None, None)
        return (self._ports.start, self._ports.stop - 1)

    @classmethod
    def for_reserve(cls, reserve: str, *, reuse_addr: bool = True, linger: float = 5.0,
                    metrics: OriginPortMetrics | None = None) -> OriginPortPool:
        """A pool for an ``lpd://...?reserve=`` value: none | rfc1179 | privileged | any."""
        low, high = reserve_range(reserve)
        pool = cls(low, high, reuse_addr=reuse_addr, linger=linger, metrics=metrics)
        pool._config_path = f"reserve={reserve}"
        return pool

    def check_privilege(self) -> None:
        """Raise ``ConfigError`` if ports under 1024 are in range and cannot be bound.

        Really binds the lowest port (nothing is sent).  Linux checks the
        privilege before whether the port is in use, so EADDRINUSE passes.
        """
        if not self._ports or self._ports.start >= _PRIVILEGED_BELOW:
            return
        probe = self._ports.start
        exc = bind_probe(probe)
        if exc is not None:
            raise ConfigError(self._config_path, (
                f"origin ports {self._label} need root or CAP_NET_BIND_SERVICE; "
                f"binding port {probe} failed ({exc.strerror}). Run as root, grant the "
                "capability (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE), or use "
                '"none" if the destination does not check source ports')) from exc

    def has_spare(self) -> bool:
        """Whether a connect now would leave a port free and make nobody wait.

        For optional connections (``lpd://``'s connect ahead): with the 11
        ports of 721-731 shared by every destination, they must never take a
        port another delivery is waiting for.  "none" (ephemeral) always has.
        """
        if not self._ports:
            return True
        return not self._queue and len(self._busy) + 2 <= len(self._ports)

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot (see :class:`PoolStatistics`)."""
        self._prune()
        return PoolStatistics(
            size=len(self._ports), in_use=self._in_use,
            waiting=len(self._queue), cooling=len(self._cooling),
            exhausted_total=self._exhausted, binds_failed=self._binds_failed,
            cooling_reuses=self._reuses, wait_seconds_total=self._wait_total,
            max_wait_seconds=self._wait_max, connects=self._connects)

    # The destination's configured timeout bounds resolve + wait + connect as
    # one deadline, so it is a parameter rather than the caller's cancel scope.
    async def connect(self, host: str, port: int, *,
                      timeout: float) -> OriginConnection:  # noqa: ASYNC109
        """Bind a pool port, then connect; everything within ``timeout`` seconds.

        Raises ``SinkUnavailable`` when the name does not resolve, the peer
        refuses (at once: a refusal means the destination is down, not the port
        bad), the connect times out, or no port frees up in time ("all N origin
        ports busy").
        """
        deadline = trio.current_time() + timeout
        error: SinkUnavailable | None = None
        for family, sockaddr in await resolve(host, port, deadline):
            try:   # every address in order: refused or unreachable -> the next
                return await self._connect_to(family, sockaddr, port, deadline)
            except OriginPortUnavailable:
                raise
            except SinkUnavailable as exc:
                error = exc
                if exc.reason == "timeout":
                    break
        raise error or SinkUnavailable(f"{host!r} resolves to no address")

    async def _connect_to(self, family: socket.AddressFamily, sockaddr: Any, port: int,
                          deadline: float) -> OriginConnection:
        dest: Dest = (str(sockaddr[0]), port)
        claim = _Claim(seq=next(self._seq), dest=dest)
        try:
            # Each failed round uses up a port (tried) or cools it hard; "any" has one.
            for _round in range(2 * len(self._ports) + 1):
                local = await self._acquire(claim, deadline) if self._ports else None
                conn = await self._attempt(claim, local, family, sockaddr, deadline)
                if conn is not None:
                    return conn
            raise OriginPortUnavailable(f"no usable origin port for {show_dest(dest)}")
        finally:
            if self._ports:
                self._record_wait(claim)

    async def _attempt(self, claim: _Claim, local: int | None, family: socket.AddressFamily,
                       sockaddr: Any, deadline: float) -> OriginConnection | None:
        if local is None:
            self._take(None)
        ok = False
        try:
            sock = await open_socket(family, sockaddr, local, self._reuse_addr, deadline,
                                     claim.dest)
            ok = True
        except AddressBusy as busy:
            if local is None:
                raise OriginPortUnavailable(
                    f"no ephemeral port left for {show_dest(claim.dest)}") from busy
            self._binds_failed += 1
            if busy.at_connect:   # a TIME_WAIT (or live) pair with this destination
                self._cool(local, claim.dest, hard=True)
            else:                 # someone else's socket: skip it for this connect
                claim.tried.add(local)
            return None
        finally:
            if not ok:
                self._give_back(local)
        if local is not None and self._cooling.pop((local, claim.dest), None) is not None:
            self._reuses += 1     # the kernel recycled the TIME_WAIT pair
        return self._wrap(sock, local, claim.dest)

    def _wrap(self, sock: trio.socket.SocketType, local: int | None,
              dest: Dest) -> OriginConnection:
        self._connects += 1

        def release(time_wait_ours: bool) -> None:
            if local is not None and time_wait_ours:
                self._cool(local, dest, hard=False)
            self._give_back(local)
        return OriginConnection(sock, remote=dest, linger=self._linger, release=release)

    # -- port bookkeeping (synchronous: no checkpoint between a decision and its effect)

    async def _acquire(self, claim: _Claim, deadline: float) -> int:
        claim.port, claim.event = None, trio.Event()
        bisect.insort(self._queue, claim, key=lambda c: c.seq)
        self._dispatch()
        granted = False
        start = trio.current_time()
        try:
            while claim.port is None:   # each round waits; the deadline ends it
                if len(claim.tried) >= len(self._ports):
                    raise OriginPortUnavailable(
                        f"no origin port in {self._label} can be bound (all in use elsewhere)")
                if not claim.exhausted:
                    claim.exhausted = True
                    self._exhausted += 1
                    if self._metrics is not None:
                        self._metrics.origin_port_exhausted_total.inc()
                await self._wait_turn(claim, deadline)
            granted = True
            return claim.port
        finally:
            if claim.exhausted:
                claim.waited += trio.current_time() - start
            if not granted:
                self._withdraw(claim)

    async def _wait_turn(self, claim: _Claim, deadline: float) -> None:
        """Sleep until a port is granted, a cooling pair may expire, or the deadline."""
        wake = deadline
        expiry = self._next_expiry(claim.dest)
        if expiry is not None:
            # A millisecond late, so the pair has expired when the dispatch looks.
            wake = min(deadline, trio.current_time() + max(0.0, expiry - time.monotonic()) + 0.001)
        with trio.move_on_at(wake):
            await claim.event.wait()
        if claim.port is None:
            if trio.current_time() >= deadline:
                raise OriginPortUnavailable(
                    f"all {len(self._ports)} origin ports busy ({self._label})")
            self._dispatch()

    def _dispatch(self) -> None:
        """Grant free ports to queued claims, oldest first (FIFO-fair)."""
        self._prune()
        for claim in self._queue:
            if len(self._busy) >= len(self._ports):
                break
            port = self._pick(claim)
            if port is not None:
                self._take(port)
                claim.port = port
                claim.event.set()
        self._queue = [c for c in self._queue if c.port is None]

    def _pick(self, claim: _Claim) -> int | None:
        """Round-robin over free ports not cooling for this destination; else the
        soft-cooling one closest to expiry (the kernel may recycle its TIME_WAIT)."""
        ports = self._ports
        fallback: tuple[float, int] | None = None
        for i in range(len(ports)):
            index = (self._cursor + i) % len(ports)
            port = ports[index]
            if port in self._busy or port in claim.tried:
                continue
            cooling = self._cooling.get((port, claim.dest)) or self._cooling.get((port, _ANY_DEST))
            if cooling is None:
                self._cursor = index + 1
                return port
            if self._reuse_addr and not cooling.hard and (
                    fallback is None or cooling.expiry < fallback[0]):
                fallback = (cooling.expiry, port)
        return fallback[1] if fallback is not None else None

    def _withdraw(self, claim: _Claim) -> None:
        if claim in self._queue:
            self._queue.remove(claim)
        if claim.port is not None:   # granted, but the caller is gone (cancelled)
            port, claim.port = claim.port, None
            self._give_back(port)

    def _take(self, port: int | None) -> None:
        if port is not None:
            self._busy.add(port)
        self._in_use += 1
        if self._metrics is not None:
            self._metrics.origin_ports_in_use.inc()

    def _give_back(self, port: int | None) -> None:
        if port is not None:
            self._busy.discard(port)
        self._in_use -= 1
        if self._metrics is not None:
            self._metrics.origin_ports_in_use.dec()
        if port is not None:
            self._dispatch()

    def _cool(self, port: int, dest: Dest, *, hard: bool) -> None:
        # Without SO_REUSEADDR our TIME_WAIT makes bind() fail for every
        # destination, so the port cools for all of them.
        key = (port, dest if self._reuse_addr or hard else _ANY_DEST)
        self._cooling.pop(key, None)   # re-insert at the end: keeps expiry order
        self._cooling[key] = _Cooling(time.monotonic() + self._cooldown, hard)

    def _prune(self) -> None:
        now = time.monotonic()
        while self._cooling:   # bounded by the table's size
            key, cooling = next(iter(self._cooling.items()))
            if cooling.expiry > now:
                break
            del self._cooling[key]

    def _next_expiry(self, dest: Dest) -> float | None:
        for (_port, d), cooling in self._cooling.items():
            if d in (dest, _ANY_DEST):
                return cooling.expiry
        return None

    def _record_wait(self, claim: _Claim) -> None:
        self._wait_total += claim.waited
        self._wait_max = max(self._wait_max, claim.waited)
        if self._metrics is not None:
            self._metrics.origin_port_wait_seconds.observe(claim.waited)


def reserve_range(reserve: str) -> tuple[int | None, int | None]:
    """The port range of a ``reserve=`` value; raises ``ConfigError`` for others."""
    try:
        return RESERVE_RANGES[reserve]
    except KeyError:
        raise ConfigError("reserve", f"expected one of {', '.join(RESERVE_RANGES)}, "
                          f"got {reserve!r}") from None



class PoolSet:
    """The daemon's pools: one per port range, shared by every destination using it.

    ``[origin_ports]`` gives the default range; an ``lpd://...?reserve=`` names
    another, and destinations naming the same range share one pool (one pool
    per range is what keeps two senders off the same port — SPEC §5).
    """

    def __init__(self, default: OriginPortPool, *, reuse_addr: bool, linger: float,
                 metrics: OriginPortMetrics | None = None) -> None:
        self.default = default
        self._reuse_addr = reuse_addr
        self._linger = linger
        self._metrics = metrics
        self._by_range: dict[tuple[int | None, int | None], OriginPortPool] = {
            default.range: default}

    def for_reserve(self, reserve: str | None) -> OriginPortPool:
        """The pool for a destination's ``reserve=`` (None: the default range)."""
        if reserve is None:
            return self.default
        key = reserve_range(reserve)
        pool = self._by_range.get(key)
        if pool is None:
            pool = OriginPortPool.for_reserve(reserve, reuse_addr=self._reuse_addr,
                                              linger=self._linger, metrics=self._metrics)
            self._by_range[key] = pool
        return pool

    def pools(self) -> list[OriginPortPool]:
        return list(self._by_range.values())

    def check_privilege(self) -> None:
        """Fail at start, with a clear error, for any range we may not bind (SPEC §5)."""
        for pool in self._by_range.values():
            pool.check_privilege()
