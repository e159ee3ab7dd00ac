"""``lpd-relay serve`` and ``lpd-relay check-config``: the daemon's command-line face.

``main_serve`` loads the configuration (the embedded default without
``-c``), raises the descriptor limit, and runs ``relay.app.run`` under trio
with signals handled (SIGTERM/SIGINT = graceful stop: no new connections,
jobs in flight get ``graceful_timeout``; SIGHUP = reload).  Whatever ends
or prevents the daemon becomes one stderr line and an exit code
(``failure``), never a traceback.  ``main_check_config`` validates a file
as ``serve`` would read it.
"""

from __future__ import annotations

import argparse
import errno
import functools
import resource
import sys

import trio

from relay import forkserver, log
from relay.app import Bound, one_process_reason, run
from relay.config import Config, InvalidConfig, choose_default_port, embedded_default, load_config
from relay.errors import BindError, ConfigError, LpdError, SpoolError
from relay.limits import fd_warning, raise_nofile
from relay.sinks import config_warnings


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
