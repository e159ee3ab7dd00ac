"""Daemon wiring: config -> spool, sinks, scheduler, server, metrics endpoint.

``run()`` is the whole daemon as one trio task, so tests start it in-process
with port 0 and read the bound addresses from ``task_status``; ``main_serve``
is the CLI face (embedded default without ``-c``, SIGTERM/SIGINT = graceful
stop: no new connections, jobs in flight get ``graceful_timeout``).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
import trio
from prometheus_client import CollectorRegistry

from relay import __version__, log
from relay.config import Config, InvalidConfig, choose_default_port, embedded_default, load_config
from relay.errors import ConfigError
from relay.httpd import serve_http
from relay.metrics import Metrics
from relay.originports import OriginPortPool, PoolSet
from relay.queues import QueueRouter
from relay.scheduler import QueueRunner, Scheduler
from relay.server import LpdServer
from relay.sinks import SinkContext, make_sink
from relay.spool import Recovery, Spool
from relay.uri import format_hostport

SPOOL_GAUGE_INTERVAL = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Bound:
    """Where the running daemon listens (reported through task_status)."""

    lpd: tuple[tuple[str, int], ...]
    metrics: tuple[str, int] | None
    banner: tuple[str, ...]       # the start-up lines (SPEC §3.1)


def _origin_pools(config: Config, metrics: Metrics) -> PoolSet | None:
    """One pool per port range used by the lpd:// destinations; privilege checked now."""
    lpd = [d for q in config.queues.values() for d in q.destinations if d.scheme == "lpd"]
    if not lpd:
        return None
    op = config.origin_ports
    pools = PoolSet(OriginPortPool(op.low, op.high, reuse_addr=op.reuse_addr, linger=op.linger,
                                   metrics=metrics),
                    reuse_addr=op.reuse_addr, linger=op.linger, metrics=metrics)
    for dest in lpd:
        pools.for_reserve(dest.reserve)
    pools.check_privilege()
    return pools


def build_scheduler(config: Config, spool: Spool, metrics: Metrics,
                    context: SinkContext) -> Scheduler:
    runners = {
        name: QueueRunner(queue, [make_sink(d, context) for d in queue.destinations],
                          spool, metrics)
        for name, queue in config.queues.items()
    }
    return Scheduler(runners)


def _health(server: LpdServer, spool: Spool, config: Config) -> Callable[[], tuple[bool, str]]:
    def check() -> tuple[bool, str]:
        if not server.listeners or any(s.fileno() < 0 for s in server.listeners):
            return False, "LPD listener down"
        if not os.access(config.server.spool_dir, os.W_OK):
            return False, f"spool {config.server.spool_dir} not writable"
        free = spool.free_bytes()
        if free < config.server.min_free_disk:
            return False, f"spool free space {free} below min_free_disk"
        return True, "ok"
    return check


async def _spool_gauges(spool: Spool, metrics: Metrics) -> None:
    while True:
        try:
            usage = await trio.to_thread.run_sync(spool.usage)
        except OSError as exc:  # e.g. EMFILE for a moment: the next round will do
            log.event("warning", "spool_gauges_failed", error=str(exc))
        else:
            metrics.set_spool(usage.by_queue_state, usage.bytes, usage.free_bytes)
        await trio.sleep(SPOOL_GAUGE_INTERVAL)


async def _watch_signals(server: LpdServer) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.event("info", "shutdown", signal=signal.Signals(signum).name)
            server.stop_accepting()
            return


async def run(config: Config, *, registry: CollectorRegistry | None = None,
              handle_signals: bool = False,
              task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until its server stops (signal or cancellation)."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry, queues=list(config.queues),
                      destinations=[d.uri for q in config.queues.values()
                                    for d in q.destinations])
    # Privilege for reserved source ports is checked before anything else
    # starts, so a misconfigured relay fails at once with a clear error (SPEC §5).
    context = SinkContext(origin_ports=_origin_pools(config, metrics))
    spool = Spool(config.server.spool_dir, fsync=config.server.fsync,
                  min_free_disk=config.server.min_free_disk)
    recovery = spool.recover()
    try:
        scheduler = build_scheduler(config, spool, metrics, context)
        for job in recovery.jobs:
            scheduler.submit(job)
        server = LpdServer(config.server, spool=spool, router=QueueRouter(config),
                           delivery=scheduler, metrics=metrics)
        log.event("info", "started", version=__version__, recovered=len(recovery.jobs),
                  discarded=recovery.discarded)
        async with trio.open_nursery() as nursery:
            lpd = await nursery.start(server.serve)
            mbound = None
            if config.metrics.listen is not None:
                mbound = await nursery.start(partial_http(config, registry,
                                                          _health(server, spool, config)))
            nursery.start_soon(scheduler.run)
            nursery.start_soon(_spool_gauges, spool, metrics)
            if handle_signals:
                nursery.start_soon(_watch_signals, server)
            write_daemon_info(config.server.spool_dir, lpd)
            task_status.started(Bound(lpd=tuple(lpd), metrics=mbound,
                                      banner=_banner(config, lpd, mbound, scheduler, recovery)))
            await server.closed.wait()
            nursery.cancel_scope.cancel()
    finally:
        # Shielded: a cancelled daemon still records its id sequence and
        # releases the spool lock, so the next start (or the CLI) finds it free.
        with trio.CancelScope(shield=True):
            await spool.aclose()


DAEMON_INFO = "daemon.json"


def write_daemon_info(spool_dir: os.PathLike[str] | str, lpd: list[tuple[str, int]]) -> None:
    """Where this daemon listens, for ``lpd-relay spool`` to reach it (port 0 included)."""
    path = os.path.join(spool_dir, DAEMON_INFO)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps({"pid": os.getpid(), "lpd": [list(a) for a in lpd]}))
    os.replace(tmp, path)


def partial_http(config: Config, registry: CollectorRegistry,
                 health: Callable[[], tuple[bool, str]]) -> Callable[..., Awaitable[None]]:
    listen = config.metrics.listen
    assert listen is not None

    async def start(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        await serve_http(listen.host, listen.port, registry=registry, health=health,
                         task_status=task_status)
    return start


def _banner(config: Config, lpd: list[tuple[str, int]], mbound: tuple[str, int] | None,
            scheduler: Scheduler, recovery: Recovery) -> tuple[str, ...]:
    lines = [f"lpd-relay {__version__} ({config.source})"]
    lines += [f"listening for LPD on {format_hostport(h, p)}" for h, p in lpd]
    for name, runner in scheduler.runners.items():
        for sink in runner.sinks:
            label = "any queue" if name == "*" else f"queue {name}"
            lines.append(f"{label} -> {sink.describe()}")
    lines.append(f"spool {config.server.spool_dir}: {len(recovery.jobs)} "
                 f"job(s) recovered, {recovery.discarded} partial discarded")
    if mbound:
        lines.append(f"metrics on http://{mbound[0]}:{mbound[1]}/metrics")
    return tuple(lines)


def _load(args: argparse.Namespace) -> Config:
    if getattr(args, "config", None):
        return load_config(args.config)
    return embedded_default(port=choose_default_port())


def main_serve(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
    except InvalidConfig as exc:
        print(f"lpd-relay: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    log.configure(fmt=config.log.format, level=config.log.level)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound: Bound = await nursery.start(functools.partial(run, config,
                                                                 handle_signals=True))
            for line in bound.banner:
                print(line, flush=True)

    # Start-up errors surface from inside the daemon's nurseries, grouped.
    code = 0
    try:
        trio.run(main)
    except* ConfigError as group:
        print(f"lpd-relay: {group.exceptions[0]}", file=sys.stderr)
        code = 2
    except* OSError as group:
        print(f"lpd-relay: cannot start: {group.exceptions[0]}", file=sys.stderr)
        code = code or 1
    return code


def main_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except InvalidConfig as exc:
        print(f"{args.config}: invalid\n{exc}", file=sys.stderr)
        return 2
    queues = ", ".join(config.queues) or "none"
    print(f"{args.config}: ok ({len(config.queues)} queue(s): {queues})")
    return 0
