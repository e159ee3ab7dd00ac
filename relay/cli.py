"""The `lpd-relay` command line (SPEC §6).

Subcommands are declared in one table (name, help, arguments, handler) rather
than a long ``main()``; each handler returns the process exit code: 0 ok,
1 failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True, slots=True, kw_only=True)
class Arg:
    """One argparse argument: positional names or flags, plus keyword options."""

    names: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    name: str
    help: str
    handler: str  # "module:function", imported lazily so `--help` stays fast
    args: tuple[Arg, ...] = ()


CONFIG_ARG = Arg(names=("-c", "--config"), options={
    "metavar": "FILE", "help": "the TOML configuration file (man 5 lpd-relay.toml)"})
MODE_ARG = Arg(names=("--mode",), options={
    "choices": ("count", "stream", "windows"), "default": "count",
    "help": "data-file length: count = exact byte count (every receiver takes it), "
            "stream = 0 and data until close (LPRng), windows = the fake length of "
            "Windows with LPR byte counting off (default: count)"})
URI_ARG = Arg(names=("uri",), options={
    "metavar": "URI", "help": "lpd://host[:port]/queue or lpds://host:port/queue?ca=...&cert=..."})


def _timeout_arg(what: str) -> Arg:
    return Arg(names=("--timeout",), options={
        "default": "30s", "metavar": "DURATION",
        "help": f"give up when the server sends nothing for this long while {what} "
                "(default: 30s)"})


COMMANDS: tuple[Command, ...] = (
    Command(name="serve", help="run the relay (embedded default without -c)",
            handler="relay.servecli:main_serve", args=(CONFIG_ARG,)),
    Command(name="check-config", help="validate a config file, name every bad key, and exit",
            handler="relay.servecli:main_check_config",
            args=(Arg(names=("-c", "--config"), options={
                "metavar": "FILE", "required": True, "help": "the TOML configuration file"}),)),
    Command(name="send", help="send files as one print job (an lpr)",
            handler="relay.clientcli:main_send", args=(
                URI_ARG,
                Arg(names=("files",), options={
                    "nargs": "+", "metavar": "FILE",
                    "help": "files to print, one job; - reads standard input"}),
                MODE_ARG,
                Arg(names=("--user",), options={
                    "metavar": "USER", "help": "job owner, the P line (default: you)"}),
                Arg(names=("--title",), options={
                    "metavar": "TITLE", "help": "job title, the J line (default: first file)"}),
                _timeout_arg("sending"))),
    Command(name="queue", help="show a queue's state (an lpq)",
            handler="relay.clientcli:main_queue", args=(
                URI_ARG,
                Arg(names=("--long", "-l"), options={
                    "action": "store_true", "help": "the long format (lpq -l)"}),
                _timeout_arg("answering"))),
    Command(name="remove", help="remove jobs by number or user (an lprm)",
            handler="relay.clientcli:main_remove", args=(
                URI_ARG,
                Arg(names=("items",), options={
                    "nargs": "+", "metavar": "JOB|USER",
                    "help": "job numbers or user names whose jobs to remove"}),
                Arg(names=("--agent",), options={
                    "metavar": "USER", "help": "requesting user (default: you)"}),
                _timeout_arg("answering"))),
    Command(name="spool", help="inspect and act on the spool (daemon may be stopped)",
            handler="relay.spoolcli:main_spool", args=(
                Arg(names=("action",), options={
                    "choices": ("list", "show", "retry", "purge", "reprint", "init-db"),
                    "help": "list all jobs, show one, retry (release) one, purge (delete) "
                            "one or more, reprint a kept delivered one as a new job; "
                            "init-db: create/migrate the PostgreSQL schema"}),
                Arg(names=("job",), options={
                    "nargs": "*", "metavar": "JOB",
                    "help": "spool job id (from spool list); purge takes several"}),
                Arg(names=("--delivered",), options={
                    "action": "store_true",
                    "help": "list: the delivered jobs [retention] keeps (what reprint takes)"}),
                Arg(names=("--to",), options={
                    "metavar": "QUEUE", "help": "reprint: the queue for the new job "
                                                "(default: the job's own)"}),
                CONFIG_ARG)),
    Command(name="ctl",
            help="control a queue as LPRng's lpc does (daemon may be stopped)",
            handler="relay.ctlcli:main_ctl", args=(
                Arg(names=("queue",), options={
                    "metavar": "QUEUE", "help": "the configured queue (lpc's order, OP "
                                                "first, works too)"}),
                Arg(names=("operation",), options={
                    "metavar": "OP", "help": "status, hold, release, topq, move, redirect, "
                                             "disable, enable, stop or start"}),
                Arg(names=("args",), options={
                    "nargs": "*", "metavar": "ARG",
                    "help": "hold/release/topq: JOB|USER|all; move: JOB|USER|all TARGET; "
                            "redirect: TARGET|off"}),
                CONFIG_ARG)),
    Command(name="audit", help="verify the audit log's hash chain, or show its records",
            handler="relay.auditcli:main_audit", args=(
                Arg(names=("action",), options={
                    "choices": ("verify", "show"),
                    "help": "verify: exit 0 when the chain is whole, 1 naming the first bad "
                            "record; show: print the records"}),
                Arg(names=("file",), options={
                    "nargs": "?", "metavar": "FILE",
                    "help": "the audit log (default: [audit] path of -c FILE)"}),
                Arg(names=("--job",), options={"metavar": "ID", "help": "only this spool job"}),
                Arg(names=("--user",), options={"metavar": "USER", "help": "only this user"}),
                Arg(names=("--since",), options={
                    "metavar": "WHEN", "help": "only records since an ISO-8601 time or a "
                                               "duration ago (24h)"}),
                CONFIG_ARG)),
    Command(name="reload",
            help="make the running daemon re-read its configuration file (SIGHUP)",
            handler="relay.reload:main_reload", args=(
                CONFIG_ARG,
                Arg(names=("--timeout",), options={
                    "type": float, "default": 10.0, "metavar": "SECONDS",
                    "help": "how long to wait for the daemon to report the outcome "
                            "(default: 10)"}))),
    Command(name="probe",
            help="diagnose a destination: lpd://, lpds:// (field checklist), socket://, usb://",
            handler="relay.probe:main_probe", args=(
                URI_ARG,
                Arg(names=("--json",), options={
                    "action": "store_true", "help": "the report as one JSON object"}),
                Arg(names=("--no-print",), options={
                    "action": "store_true",
                    "help": "do not send test pages; only connect and ask for the queue"}),
                Arg(names=("--all-modes",), options={
                    "action": "store_true",
                    "help": "try every length form (count, stream, windows) in both file "
                            "orders and show the matrix, even when the first one works"}),
                Arg(names=("--timeout",), options={
                    "default": "10s", "metavar": "DURATION",
                    "help": "time limit of each step, e.g. 3s or 3 (default: 10s)"}))),
    Command(name="loadgen", help="generate LPD load and report rates and latencies",
            handler="relay.loadgen:main_loadgen", args=(
                URI_ARG,
                Arg(names=("--jobs",), options={
                    "type": int, "default": 1000, "metavar": "N",
                    "help": "jobs to send in all (default: 1000)"}),
                Arg(names=("--concurrency",), options={
                    "type": int, "default": 16, "metavar": "C",
                    "help": "connections at once, one job each (default: 16)"}),
                Arg(names=("--processes",), options={
                    "type": int, "default": 1, "metavar": "N",
                    "help": "share the jobs over N processes (default: 1)"}),
                Arg(names=("--size",), options={
                    "default": "1KiB", "metavar": "SIZE",
                    "help": "bytes per job, e.g. 1KiB, 4MiB (default: 1KiB)"}),
                MODE_ARG,
                Arg(names=("--json",), options={
                    "action": "store_true", "help": "the summary as one JSON object"}))),
    Command(name="import-printcap",
            help="print a relay configuration for an LPRng or BSD printcap",
            handler="relay.printcap:main_import", args=(
                Arg(names=("file",), options={
                    "nargs": "?", "default": "-", "metavar": "FILE",
                    "help": "the printcap to read (default and -: standard input)"}),)),
    Command(name="completion", help="print the shell completion script for bash or zsh",
            handler="relay.cli:main_completion", args=(
                Arg(names=("shell",), options={
                    "choices": ("bash", "zsh"), "help": "the shell to complete for"}),)),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpd-relay", description="Store-and-forward relay for LPD (RFC 1179).")
    parser.add_argument("--version", action="version", version=f"lpd-relay {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        for arg in command.args:
            p.add_argument(*arg.names, **arg.options)
        p.set_defaults(handler=command.handler)
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser of each subcommand, by name (for man pages and completion)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def walk_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every option and argument of the parser and of its subcommands."""
    found = [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]
    for sub in subcommands(parser).values():
        found += walk_actions(sub)
    return found


def main_completion(args: argparse.Namespace) -> int:
    """Completion generated from this very parser, so it knows every command and option."""
    import shtab  # only here: nothing else needs it

    parser = build_parser()
    for action in walk_actions(parser):
        if action.metavar == "FILE":   # -c FILE, send FILE..., import-printcap FILE
            action.complete = shtab.FILE  # type: ignore[attr-defined]
    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return EXIT_OK


def _resolve(spec: str) -> Handler | None:
    module_name, _, func_name = spec.partition(":")
    try:
        module = __import__(module_name, fromlist=[func_name])
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    handler: Handler = getattr(module, func_name)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = _resolve(args.handler)
    if handler is None:
        print(f"lpd-relay {args.command}: not yet implemented", file=sys.stderr)
        return EXIT_FAILURE
    try:
        return handler(args)
    except KeyboardInterrupt:
        return EXIT_FAILURE
