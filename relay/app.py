"""Daemon wiring: config -> spool, sinks, scheduler, server, metrics endpoint.

``run()`` is the whole daemon as one trio task, so tests start it in-process
with port 0 and read the bound addresses from ``task_status``; ``main_serve``
is the CLI face (embedded default without ``-c``, SIGTERM/SIGINT = graceful
stop: no new connections, jobs in flight get ``graceful_timeout``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import orjson
import trio
from prometheus_client import CollectorRegistry

from relay import __version__, forkserver, log, sdnotify
from relay.audit import AuditLog, config_sha256
from relay.auditsyslog import SyslogShipper
from relay.config import Config, InvalidConfig, choose_default_port, embedded_default, load_config
from relay.context import Delivery
from relay.dispatch import Scheduler
from relay.errors import BindError, ConfigError, LpdError, SpoolError
from relay.groupcommit import overwrite, unlink_quiet, write_atomic
from relay.httpd import serve_http
from relay.jobevents import NO_EVENTS, JobEvents
from relay.limits import fd_warning, raise_nofile
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
                         reload: Callable[[], None],
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()   # before the banner: a SIGHUP right after start reloads
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.event("info", "reload", signal="SIGHUP", source="configuration file")
                reload()
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


def _reload(reloader: Reloader, notifier: sdnotify.Notifier, info: DaemonInfo) -> None:
    """One SIGHUP: reload, tell systemd around it, record the outcome in daemon.json."""
    sdnotify.reloading(notifier)
    outcome = reloader.apply()
    server: object = reloader.server
    if outcome.outcome == "ok" and isinstance(server, WorkerPool):
        server.reloaded(reloader.config)    # the workers reload too
    info.reload = outcome.as_json()
    info.write()
    sdnotify.reloaded(notifier, outcome.outcome)


DAEMON_INFO = "daemon.json"


@dataclass(slots=True)
class DaemonInfo:
    """daemon.json's content: where the daemon listens now and its last reload."""

    spool_dir: os.PathLike[str] | str
    server: LpdServer | WorkerPool
    reload: dict[str, object] | None = None

    def write(self) -> bool:
        return write_daemon_info(self.spool_dir, self.server.bound(), reload=self.reload)


def write_daemon_info(spool_dir: os.PathLike[str] | str, lpd: list[tuple[str, int]], *,
                      reload: dict[str, object] | None = None) -> bool:
    """Where this daemon listens, for ``lpd-relay spool`` to reach it (port 0 included).

    Never stops the daemon: on a full disk the last daemon's file is
    overwritten in place (it has the blocks), else removed so the CLI falls
    back to the configured address; False means "try again later".
    """
    path = os.path.join(os.fspath(spool_dir), DAEMON_INFO)
    info: dict[str, object] = {"pid": os.getpid(), "lpd": [list(a) for a in lpd]}
    if reload is not None:
        info["reload"] = reload
    data = orjson.dumps(info)
    try:
        write_atomic(path, data, fsync=False)
        return True
    except OSError as exc:
        error = str(exc)
    try:
        overwrite(path, data)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            unlink_quiet(path)
    log.event("warning", "daemon_info_unsaved", path=path, error=error)
    return False


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
    warning = fd_warning(config, *raise_nofile())
    if warning:
        print(warning, file=sys.stderr, flush=True)
    log.configure(fmt=config.log.format, level=config.log.level)
    if config.server.workers > 1 and not one_process_reason(config):
        forkserver.prefork()    # before trio: the workers' helper without a new interpreter
    started = False

    async def main() -> None:
        nonlocal started
        async with trio.open_nursery() as nursery:
            bound: Bound = await nursery.start(functools.partial(run, config,
                                                                 handle_signals=True))
            started = True
            for line in bound.banner:
                print(line, flush=True)

    try:
        trio.run(main)
    except BaseException as exc:  # one line and an exit code, never a traceback
        code, line = failure(exc, started=started)
        print(line, file=sys.stderr)
        return code
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside nested groups, flattened (trio nests one per nursery)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


# Bind errors that mean "this configuration cannot work here" (exit 2, like a
# bad file): no privilege for the port, an address this host does not have.
_CONFIG_ERRNOS = {errno.EACCES, errno.EPERM, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT}


def failure(exc: BaseException, *, started: bool) -> tuple[int, str]:
    """Exit code and the one stderr line for what ended (or prevented) the daemon.

    2 for configuration errors, including a listen address this host or user
    cannot have; 1 for everything else (port in use, spool unwritable or
    locked, an unexpected error).  docs/configuration.md lists the cases.
    """
    leaves = [e for e in _leaves(exc) if not isinstance(e, trio.Cancelled)] or [exc]
    first = next((e for e in leaves if isinstance(e, LpdError | OSError)), leaves[0])
    what = "stopped" if started else "cannot start"
    if isinstance(first, KeyboardInterrupt):
        return 130, "lpd-relay: interrupted"
    if isinstance(first, BindError):
        code = 2 if first.error.errno in _CONFIG_ERRNOS else 1
        return code, _one_line(f"lpd-relay: {what}: {first}")
    if isinstance(first, ConfigError):
        return 2, _one_line(f"lpd-relay: {first}")
    if isinstance(first, SpoolError):
        return 1, _one_line(f"lpd-relay: {what}: server.spool_dir: {first}")
    if isinstance(first, OSError):
        where = f": {first.filename}" if first.filename else ""
        return 1, _one_line(f"lpd-relay: {what}: {first.strerror or first}{where}")
    return 1, _one_line(f"lpd-relay: {what}: {type(first).__name__}: {first}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except InvalidConfig as exc:
        print(f"{args.config}: invalid\n{exc}", file=sys.stderr)
        return 2
    # serve raises the soft limit to the hard one: judge by what it will get.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    warning = fd_warning(config, hard, hard)
    if warning:
        print(warning, file=sys.stderr)
    for warning in config_warnings(config):   # usable config, but a destination will fail
        print(f"warning: {warning}", file=sys.stderr)
    queues = ", ".join(config.queues) or "none"
    print(f"{args.config}: ok ({len(config.queues)} queue(s): {queues})")
    return 0
