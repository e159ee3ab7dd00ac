"""SIGHUP: re-read the configuration file and apply it without a restart.

What a reload changes: queues, destinations, aliases, ACLs, limits, retry
policy, the log level, and the ``listen`` addresses (new ones are bound,
dropped ones closed).  Nothing in flight is dropped: a connection keeps the
``ConnectionContext`` it started with, an attempt finishes on the sink it
started on, and a removed queue's jobs are held in the spool ("queue X
removed by reload"), never deleted.

Keys that only a restart can change (``RESTART_KEYS``: the spool, its
durability, the connection limit's semaphore, the metrics listener, the log
format, the origin-port pool) keep their running values; a reload that
changes them says so in one ``reload_restart_needed`` line.  A file that
does not validate, or a new listen address that cannot be bound, is refused
with one ``reload_refused`` line naming the key; the running configuration
stays.  Each outcome is also written to the spool's daemon.json
(``reload``: generation, outcome, error), where ``lpd-relay reload`` reads it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import trio

from relay import log
from relay.audit import config_sha256
from relay.config import Config, InvalidConfig, Listen, QueueConfig, load_config
from relay.daemoninfo import DAEMON_INFO
from relay.dispatch import Scheduler
from relay.errors import BindError, ConfigError
from relay.metrics import Metrics
from relay.queues import QueueRouter
from relay.scheduler import QueueRunner
from relay.server import LpdServer
from relay.sinks import Sink, SinkContext, make_sink
from relay.spool import Spool

__all__ = ["RESTART_KEYS", "ReloadOutcome", "Reloader", "main_reload", "restart_changes"]

# (section, key or None for the whole section): what only a restart changes.
RESTART_KEYS: tuple[tuple[str, str | None], ...] = (
    ("server", "spool_dir"), ("server", "fsync"), ("server", "min_free_disk"),
    ("server", "segment_threshold"),
    ("server", "max_connections"), ("metrics", "listen"), ("log", "format"),
    ("origin_ports", None), ("server", "listen_tls"), ("server", "proxy_protocol"),
    ("server", "proxy_trusted"), ("server", "workers"), ("privacy", None), ("audit", None),
)


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What one reload did, as daemon.json records it."""

    generation: int
    outcome: str                    # "ok" | "refused"
    error: str = ""                 # "key: problem" when refused
    restart_needed: tuple[str, ...] = ()

    def as_json(self) -> dict[str, object]:
        return {"generation": self.generation, "outcome": self.outcome, "error": self.error,
                "restart_needed": list(self.restart_needed)}


def restart_changes(old: Config, new: Config) -> list[str]:
    """The restart-only keys whose value differs between ``old`` and ``new``."""
    changed = []
    for section, key in RESTART_KEYS:
        a, b = getattr(old, section), getattr(new, section)
        if key is None:
            if a != b:
                changed.append(section)
        elif getattr(a, key) != getattr(b, key):
            changed.append(f"{section}.{key}")
    return changed


def effective(old: Config, new: Config) -> Config:
    """``new`` with every restart-only key at its running (``old``) value."""
    kept = {key: getattr(old.server, key) for section, key in RESTART_KEYS
            if section == "server" and key is not None}
    return dataclasses.replace(
        new, server=dataclasses.replace(new.server, **kept), metrics=old.metrics,
        log=dataclasses.replace(new.log, format=old.log.format), origin_ports=old.origin_ports,
        privacy=old.privacy, audit=old.audit)


@dataclass(slots=True, kw_only=True)
class Reloader:
    """The running daemon's parts a reload swaps; ``apply`` does one reload."""

    config: Config
    spool: Spool
    metrics: Metrics
    scheduler: Scheduler
    server: LpdServer
    sinks: SinkContext
    pools: Callable[[Config, Metrics], object | None]   # app's origin-pool builder
    generation: int = 0

    def apply(self) -> ReloadOutcome:
        """Reload ``config.source``; never raises for a bad file (refused instead)."""
        self.generation += 1
        if self.config.source.startswith("<"):
            return self._refused("started without -c FILE: there is no configuration file "
                                 "to reload")
        try:
            new = load_config(self.config.source)
        except InvalidConfig as exc:
            first = exc.problems[0] if exc.problems else ("", str(exc))
            return self._refused(f"{first[0]}: {first[1]}" if first[0] else first[1])
        except (ConfigError, OSError) as exc:
            return self._refused(f"{self.config.source}: {exc}")
        restart = restart_changes(self.config, new)
        config = effective(self.config, new)
        try:
            self._check_origin_ports(config)
            self.server.reload_tls(config.server)   # certificates re-read (SPEC §9)
            opened = self.server.open_listeners(config.server.listen)
        except (BindError, ConfigError) as exc:
            return self._refused(str(exc))
        self._commit(config, opened)
        self.spool.events.record("config", config_sha256=config_sha256(self.config.source))
        if restart:
            log.event("warning", "reload_restart_needed", keys=", ".join(restart),
                      error="changed in the file; a restart applies them, the running "
                            "values stay")
        return ReloadOutcome(self.generation, "ok", restart_needed=tuple(restart))

    def announce(self, outcome: ReloadOutcome) -> None:
        """Log a reload that took effect (the caller waited for intake workers first)."""
        if outcome.outcome == "ok":
            log.event("info", "reloaded", generation=outcome.generation,
                      queues=len(self.config.queues),
                      listen=", ".join(str(a) for a in self.config.server.listen))

    def _refused(self, error: str) -> ReloadOutcome:
        log.event("error", "reload_refused", source=self.config.source,
                  error=f"{error}; the running configuration stays")
        return ReloadOutcome(self.generation, "refused", error=error)

    def _check_origin_ports(self, config: Config) -> None:
        """Pools for the reloaded lpd:// destinations; privilege checked before anything changes."""
        pools = self.sinks.origin_ports
        if pools is None:
            self.sinks = dataclasses.replace(self.sinks, origin_ports=self.pools(config,
                                                                                 self.metrics))
            return
        for queue in config.queues.values():
            for dest in queue.destinations:
                if dest.scheme in ("lpd", "lpds"):
                    pools.for_reserve(dest.reserve)  # type: ignore[attr-defined]
        pools.check_privilege()  # type: ignore[attr-defined]

    def _commit(self, config: Config, opened: dict[Listen, trio.socket.SocketType]) -> None:
        self.metrics.add_labels(config.queues, [d.uri for q in config.queues.values()
                                                for d in q.destinations])
        self.scheduler.default_retention = config.retention
        self.scheduler.reconfigure(config.queues, self._sinks, self._runner)
        self.server.reconfigure(config.server, QueueRouter(config, self.scheduler.states), opened)
        if config.log.level != self.config.log.level:
            log.configure(fmt=config.log.format, level=config.log.level)
        self.config = config

    def _sinks(self, queue: QueueConfig) -> list[Sink]:
        return [make_sink(d, self.sinks) for d in queue.destinations]

    def _runner(self, queue: QueueConfig, sinks: list[Sink]) -> QueueRunner:
        return QueueRunner(queue, sinks, self.spool, self.metrics)


# ---- `lpd-relay reload`: SIGHUP to the daemon of the configuration's spool ----

def _daemon_info(spool_dir: str) -> dict[str, Any]:
    with open(os.path.join(spool_dir, DAEMON_INFO), "rb") as f:
        info: dict[str, Any] = orjson.loads(f.read())
    return info


def _generation(info: Mapping[str, Any]) -> int:
    reload = info.get("reload")
    return int(reload.get("generation", 0)) if isinstance(reload, dict) else 0


def _wait_outcome(spool_dir: str, before: int, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            info = _daemon_info(spool_dir)
            if _generation(info) > before:
                outcome: dict[str, Any] = info["reload"]
                return outcome
        time.sleep(0.05)
    return None


def main_reload(args: argparse.Namespace) -> int:
    """Send SIGHUP to the daemon serving the configuration's spool; report what it did."""
    from relay.spoolcli import cli_config, daemon_running  # the CLI side only

    if (config := cli_config(args)) is None:
        return 2
    spool_dir = str(config.server.spool_dir)
    try:
        if not daemon_running(spool_dir):
            raise FileNotFoundError(spool_dir)
        info = _daemon_info(spool_dir)
        before, pid = _generation(info), int(info["pid"])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, KeyError) as exc:
        print(f"lpd-relay: no running daemon found for spool {spool_dir} ({exc})",
              file=sys.stderr)
        return 1
    outcome = _wait_outcome(spool_dir, before, args.timeout)
    if outcome is None:
        print(f"lpd-relay: daemon {pid} got SIGHUP but reported no reload within "
              f"{args.timeout:g}s; see its log", file=sys.stderr)
        return 1
    if outcome.get("outcome") != "ok":
        print(f"lpd-relay: reload refused, the running configuration stays: "
              f"{outcome.get('error', '')}", file=sys.stderr)
        return 1
    print(f"daemon {pid} reloaded its configuration (reload {outcome['generation']})")
    for key in outcome.get("restart_needed") or ():
        print(f"warning: {key}: changed, takes effect only after a restart", file=sys.stderr)
    return 0
