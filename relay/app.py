"""Daemon wiring: config -> spool, sinks, scheduler, server, metrics endpoint.

``run()`` is the whole daemon as one trio task, so tests start it in-process
with port 0 and read the bound addresses from ``task_status``; the CLI face
(``lpd-relay serve``, signals, exit codes) is ``relay.servecli``, daemon.json
``relay.daemoninfo``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import trio
from prometheus_client import CollectorRegistry

from relay import __version__, log, sdnotify
from relay.audit import AuditLog, config_sha256
from relay.auditsyslog import SyslogShipper
from relay.config import Config
from relay.context import Delivery
from relay.daemoninfo import DaemonInfo
from relay.dispatch import Scheduler
from relay.errors import BindError
from relay.httpd import serve_http
from relay.jobevents import NO_EVENTS, JobEvents
from relay.metrics import Metrics
from relay.originports import OriginPortPool, PoolSet
from relay.privacy import Redactor
from relay.queues import QueueRouter
from relay.queuestate import QueueStates
from relay.reload import Reloader, ReloadOutcome
from relay.reprint import Reprinter
from relay.retention import Retention
from relay.scheduler import QueueRunner
from relay.server import LpdServer
from relay.sinks import SinkContext, config_warnings, make_sink
from relay.spool import Recovery, Spool
from relay.spoolopen import body_source, cluster, open_spool, problem
from relay.uri import format_hostport
from relay.workers import WorkerPool

# How often the daemon writes what a full disk refused (delivery state, the
# daemon.json); a delivery that frees space writes it at once (Spool.sync).
SPOOL_UPKEEP_INTERVAL = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Bound:
    """Where the running daemon listens (reported through task_status)."""

    lpd: tuple[tuple[str, int], ...]
    metrics: tuple[str, int] | None
    banner: tuple[str, ...]       # the start-up lines (SPEC §3.1)


def _origin_pools(config: Config, metrics: Metrics) -> PoolSet | None:
    """One pool per port range used by the lpd:// destinations; privilege checked now."""
    lpd = [d for q in config.queues.values() for d in q.destinations
           if d.scheme in ("lpd", "lpds")]
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
                    context: SinkContext, states: QueueStates | None = None) -> Scheduler:
    runners = {
        name: QueueRunner(queue, [make_sink(d, context) for d in queue.destinations],
                          spool, metrics)
        for name, queue in config.queues.items()
    }
    retention = Retention(spool, lambda queue: config.retention)
    scheduler = Scheduler(runners, spool, states, retention)
    scheduler.default_retention = config.retention
    retention.policy = scheduler.retention_of   # follows reloads of the queues
    scheduler.reprinter = Reprinter(spool, scheduler.submit)
    return scheduler


def _health(server: LpdServer | WorkerPool, spool: Spool,
            config: Config) -> Callable[[], tuple[bool, str]]:
    def check() -> tuple[bool, str]:
        if not server.listeners or any(s.fileno() < 0 for s in server.listeners):
            return False, "LPD listener down"
        if database := problem(spool):     # the shared spool (SPEC §10)
            return False, database
        if isinstance(server, WorkerPool) and (down := server.workers_down()) > 0:
            return False, f"{down} intake worker process(es) down"
        if not os.access(config.server.spool_dir, os.W_OK):
            return False, f"spool {config.server.spool_dir} not writable"
        free = spool.free_bytes()
        if free <= 0 or free < config.server.min_free_disk:  # as Spool.check_space
            return False, f"spool free space {free} below min_free_disk"
        return True, "ok"
    return check


def _spool_gauges(spool: Spool, metrics: Metrics) -> None:
    """The spool gauges read the spool's bookkeeping at each scrape (never stale)."""
    index = spool.index
    assert index is not None, "recover() first"
    metrics.follow_spool(index.counts(), lambda: index.bytes, spool.free_bytes)


async def _spool_upkeep(spool: Spool, write_info: Callable[[], bool], info_written: bool) -> None:
    """Write what a full disk refused, once a second, until the disk takes it."""
    while True:
        await trio.sleep(SPOOL_UPKEEP_INTERVAL)
        spool.save_unsaved()
        info_written = info_written or write_info()


async def _watch_signals(server: LpdServer | WorkerPool, notifier: sdnotify.Notifier,
                         reload: Callable[[], Awaitable[None]],
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()   # before the banner: a SIGHUP right after start reloads
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.event("info", "reload", signal="SIGHUP", source="configuration file")
                await reload()
                continue
            log.event("info", "shutdown", signal=signal.Signals(signum).name)
            notifier.send("STOPPING=1", "STATUS=stopping: jobs in flight get graceful_timeout")
            server.stop_accepting()
            return


async def run(config: Config, *, registry: CollectorRegistry | None = None,
              handle_signals: bool = False, events: JobEvents = NO_EVENTS,
              task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until its server stops (signal or cancellation)."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry, queues=list(config.queues),
                      destinations=[d.uri for q in config.queues.values()
                                    for d in q.destinations])
    # Privilege for reserved source ports is checked before anything else
    # starts, so a misconfigured relay fails at once with a clear error (SPEC §5).
    pools = _origin_pools(config, metrics)
    spool = open_spool(config)
    context = SinkContext(origin_ports=pools, metrics=metrics, bodies=body_source(spool),
                          privacy=Redactor(config.privacy))
    recovery = spool.recover()
    _spool_gauges(spool, metrics)
    spool.events = events          # the subscriber (the audit log replaces it when configured)
    audit = None
    try:
        audit = _open_audit(config, spool)     # SPEC §11; None without [audit]
        states = QueueStates(config.server.spool_dir)    # lpc's disable/stop/redirect/move
        if states.moved:   # forget moves of jobs delivered or purged since (a full disk: later)
            with contextlib.suppress(OSError):
                states.move([], "", keep={job.id for job in recovery.jobs})
        scheduler = build_scheduler(config, spool, metrics, context, states)
        for job in recovery.jobs:
            scheduler.submit(job)
        delivery, spool_service = cluster(spool, scheduler)
        server = _intake(config, spool, QueueRouter(config, states), scheduler, metrics,
                         registry, delivery=delivery, context=context)
        log.event("info", "started", version=__version__, recovered=len(recovery.jobs),
                  discarded=recovery.discarded)
        async with trio.open_nursery() as nursery:
            lpd = await nursery.start(server.serve)
            mbound = None
            if config.metrics.listen is not None:
                mbound = await nursery.start(partial_http(config, registry,
                                                          _health(server, spool, config)))
            nursery.start_soon(scheduler.run)
            if audit is not None:
                nursery.start_soon(audit.run)
                if config.audit is not None and config.audit.syslog:   # SPEC §11 shipping
                    nursery.start_soon(SyslogShipper(audit, config.audit, metrics).run)
            if spool_service is not None:
                nursery.start_soon(spool_service)
            notifier = sdnotify.Notifier.from_environ()
            reloader = Reloader(config=config, spool=spool, metrics=metrics,
                                scheduler=scheduler, server=cast(LpdServer, server),
                                sinks=context, pools=_origin_pools)   # the same reload face
            info = DaemonInfo(config.server.spool_dir, server,
                              reload=ReloadOutcome(0, "none").as_json())
            if handle_signals:
                await nursery.start(_watch_signals, server, notifier,
                                    functools.partial(_reload, reloader, notifier, info))
            nursery.start_soon(_spool_upkeep, spool, info.write, info.write())
            task_status.started(Bound(lpd=tuple(lpd), metrics=mbound,
                                      banner=_banner(config, lpd, mbound, scheduler, recovery)))
            # Listening and recovered: READY=1 for Type=notify, then STATUS/WATCHDOG.
            nursery.start_soon(sdnotify.keep_alive, notifier,
                               functools.partial(sdnotify.summary, scheduler.runners))
            await server.closed.wait()
            nursery.cancel_scope.cancel()
    finally:
        # Shielded: a cancelled daemon still records its id sequence and
        # releases the spool lock, so the next start (or the CLI) finds it free.
        with trio.CancelScope(shield=True):
            await spool.aclose()
        if audit is not None:
            audit.record("stop")
            audit.close()


def _open_audit(config: Config, spool: Spool) -> AuditLog | None:
    """The audit log, subscribed to the spool's events, with its start and config records."""
    if config.audit is None:
        return None
    audit = AuditLog(config.audit, fsync=config.server.fsync)
    audit.open()
    spool.events = audit
    audit.record("start")
    audit.record("config", config_sha256=config_sha256(config.source))
    return audit


def _intake(config: Config, spool: Spool, router: QueueRouter, scheduler: Scheduler,
            metrics: Metrics, registry: CollectorRegistry, *, delivery: Delivery,
            context: SinkContext) -> LpdServer | WorkerPool:
    """This process's LPD server, or the intake worker processes (``[server] workers``)."""
    make_room = None if scheduler.retention is None else scheduler.retention.make_room
    if config.server.workers > 1:
        alone = one_process_reason(config, spool)
        if not alone:
            return WorkerPool(config, spool=spool, router=router, delivery=delivery,
                              metrics=metrics, registry=registry, make_room=make_room,
                              privacy=context.privacy)
        log.event("info", "intake_in_one_process", workers=config.server.workers, reason=alone)
    return LpdServer(config.server, spool=spool, router=router, delivery=delivery,
                     metrics=metrics, make_room=make_room, privacy=context.privacy)


def one_process_reason(config: Config, spool: Spool | None = None) -> str:
    """Why intake stays in this process although ``workers`` > 1 ("" = it need not).

    The PostgreSQL spool's intake stays in the process that holds the
    database pool (docs/architecture.md, "Processes").  ``spool``: the opened
    backend; without it (before one is opened), the configured one.
    """
    local = config.spool.backend != "postgresql" if spool is None else type(spool) is Spool
    if not local:
        return "[spool] backend = postgresql configured"
    return ""


async def _reload(reloader: Reloader, notifier: sdnotify.Notifier, info: DaemonInfo) -> None:
    """One SIGHUP: reload, tell systemd around it, record the outcome in daemon.json.

    With intake workers the outcome is logged and recorded only once they
    applied it too: until then a client could be refused at an added address.
    """
    sdnotify.reloading(notifier)
    outcome = reloader.apply()
    server: object = reloader.server
    if outcome.outcome == "ok" and isinstance(server, WorkerPool):
        await server.reloaded(reloader.config)    # the workers reload too
    reloader.announce(outcome)
    info.reload = outcome.as_json()
    info.write()
    sdnotify.reloaded(notifier, outcome.outcome)


def partial_http(config: Config, registry: CollectorRegistry,
                 health: Callable[[], tuple[bool, str]]) -> Callable[..., Awaitable[None]]:
    listen = config.metrics.listen
    assert listen is not None

    async def start(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        try:
            await serve_http(listen.host, listen.port, registry=registry, health=health,
                             task_status=task_status)
        except OSError as exc:  # binding: the accept loop itself never raises OSError
            raise BindError("metrics.listen", str(listen), exc) from exc
    return start


def _banner(config: Config, lpd: list[tuple[str, int]], mbound: tuple[str, int] | None,
            scheduler: Scheduler, recovery: Recovery) -> tuple[str, ...]:
    lines = [f"lpd-relay {__version__} ({config.source})"]
    plain = len(config.server.listen)   # then the listen_tls addresses (SPEC §9)
    lines += [f"listening for LPD{' over TLS' if i >= plain else ''} on {format_hostport(h, p)}"
              for i, (h, p) in enumerate(lpd)]
    for name, runner in scheduler.runners.items():
        for sink in runner.sinks:
            label = "any queue" if name == "*" else f"queue {name}"
            lines.append(f"{label} -> {sink.describe()}")
    lines += [f"warning: {w}" for w in config_warnings(config)]   # also logged by the runners
    if config.server.workers > 1:
        lines.append(f"intake in {config.server.workers} worker processes")
    lines.append(f"spool {config.server.spool_dir}: {len(recovery.jobs)} "
                 f"job(s) recovered, {recovery.discarded} partial discarded")
    if mbound:
        lines.append(f"metrics on http://{mbound[0]}:{mbound[1]}/metrics")
    return tuple(lines)
