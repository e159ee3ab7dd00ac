"""`lpd-relay ctl`: LPRng's lpc operations from the relay's own command line.

``lpd-relay ctl QUEUE OP [ARGS]`` (or lpc's order, ``OP QUEUE [ARGS]``).
While a daemon serves the configuration's spool the request goes to it as
LPRng's 0x06 control request over loopback, from a reserved source port
when run as root (as ``spool purge`` does), so it needs what lpc needs:
root on an ``admin_allow`` host.  With the daemon stopped the operations
that keep state work on the spool directly: hold/release/move of spooled
jobs and the queue states (disable/enable, stop/start, redirect), which the
daemon reads when it starts; ``topq`` needs the running daemon (queue order
lives in memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import sys

import trio

from relay import status
from relay.audit import cli_events
from relay.config import Config
from relay.errors import SinkError, SpoolError
from relay.lpc import JOB_OPERATIONS, OPERATIONS
from relay.queuestate import QueueStates
from relay.spool import Spool
from relay.spoolcli import (  # the daemon, found as `spool` does
    _ask_daemon,
    cli_config,
    daemon_running,
)

__all__ = ["main_ctl"]


class _Refused(Exception):
    """A request this command cannot do; the message is the one stderr line."""


def parse_words(words: list[str]) -> tuple[str, str, list[str]]:
    """(queue, operation, arguments) from QUEUE OP ARGS or OP QUEUE ARGS."""
    if len(words) < 2:
        raise _Refused("ctl needs a queue and an operation, e.g. `ctl ward3 status`")
    first, second, rest = words[0], words[1], words[2:]
    if second.lower() in OPERATIONS:
        return first, second.lower(), rest
    if first.lower() in OPERATIONS:
        return second, first.lower(), rest
    raise _Refused(f"unknown operation; one of {', '.join(OPERATIONS)}")


def _request(queue: str, operation: str, args: list[str]) -> bytes:
    user = getpass.getuser()
    return ("\x06" + " ".join([queue, user, operation, queue, *args]) + "\n").encode()


def _queue(config: Config, name: str) -> str:
    if name not in config.queues:
        raise _Refused(f"queue {name!r} is not configured ({', '.join(config.queues)})")
    return name


def offline(config: Config, spool: Spool, queue: str, operation: str, args: list[str]) -> str:
    """The operation on the spool and the state file, with no daemon running."""
    states = QueueStates(config.server.spool_dir)
    queue = _queue(config, queue)
    if operation == "status":
        jobs = [j for j in spool.jobs(queue) if j.state != "delivered"]
        held = sum(1 for j in jobs if j.state == "held")
        notice = states.get(queue).notice() or "enabled, printing"
        return (f"{queue}: {notice}; {len(jobs) - held} queued, {held} held "
                "(daemon not running)\n")
    if operation in ("disable", "enable"):
        states.change(queue, disabled=operation == "disable")
    elif operation in ("stop", "start"):
        states.change(queue, stopped=operation == "stop")
    elif operation == "redirect":
        if len(args) != 1:
            raise _Refused("redirect takes the target queue, or off")
        target = "" if args[0] == "off" else _queue(config, args[0])
        states.change(queue, redirect=target)
    elif operation in JOB_OPERATIONS:
        return _offline_jobs(config, spool, states, queue, operation, args)
    else:
        raise _Refused(f"{operation} needs the running daemon")
    return f"{queue}: {states.get(queue).notice() or 'enabled, printing'}\n"


def _offline_jobs(config: Config, spool: Spool, states: QueueStates, queue: str,
                  operation: str, args: list[str]) -> str:
    if operation == "topq":
        raise _Refused("topq needs the running daemon (the queue order lives in memory)")
    items = args[:-1] if operation == "move" else args
    if not items:
        raise _Refused(f"{operation} needs a job number, a user, or all")
    mine = [j for j in spool.jobs() if states.moved.get(j.id, j.queue) == queue
            and j.state != "delivered"]   # kept by [retention]: not the queue's work
    chosen = status.select_for_removal(mine, agent="root", items=items, host="", admin=True)
    if not chosen:
        return "no matching jobs\n"
    if operation == "move":
        target = _queue(config, args[-1])
        states.move([j.id for j in chosen], target, keep={j.id for j in spool.jobs()})
    else:
        held = operation == "hold"
        for job in chosen:
            spool.update(dataclasses.replace(
                job, state="held" if held else "queued",
                last_error=f"held by {getpass.getuser()} (ctl hold)" if held else "",
                failures=job.failures if held else 0), durable=True)
            if held != (job.state == "held"):
                spool.events.record("held" if held else "released", job,
                                    reason="ctl hold" if held else "")
    return "".join(f"{j.control_name} {operation}: done\n" for j in chosen)


def main_ctl(args: argparse.Namespace) -> int:
    if (config := cli_config(args)) is None:
        return 2
    try:
        queue, operation, rest = parse_words([args.queue, args.operation, *args.args])
        spool_dir = str(config.server.spool_dir)
        if daemon_running(spool_dir):
            text = trio.run(_ask_daemon, config, _request(queue, operation, rest))
        else:
            spool = Spool(spool_dir, fsync=config.server.fsync)
            # The audit records of what it changes, by=cli.
            with cli_events(config, spool, operation in ("hold", "release")):
                text = offline(config, spool, queue, operation, rest)
    except _Refused as exc:
        print(f"lpd-relay: {exc}", file=sys.stderr)
        return 2
    except SpoolError as exc:   # the audit log cannot be written: nothing was changed
        print(f"lpd-relay: {exc}", file=sys.stderr)
        return 1
    except (SinkError, OSError, trio.TooSlowError) as exc:
        print(f"lpd-relay: cannot reach the running daemon: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 1 if text.startswith("lpd-relay:") else 0
