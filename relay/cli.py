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


CONFIG_ARG = Arg(names=("-c", "--config"), options={"metavar": "FILE", "help": "TOML config"})
MODE_ARG = Arg(names=("--mode",), options={
    "choices": ("count", "stream", "windows"), "default": "count",
    "help": "data-file length form (SPEC §3.3)"})

COMMANDS: tuple[Command, ...] = (
    Command(name="serve", help="run the relay (embedded default without -c)",
            handler="relay.app:main_serve", args=(CONFIG_ARG,)),
    Command(name="check-config", help="validate a config file and exit",
            handler="relay.app:main_check_config",
            args=(Arg(names=("-c", "--config"), options={"metavar": "FILE", "required": True}),)),
    Command(name="send", help="send files as one print job (an lpr)",
            handler="relay.clientcli:main_send", args=(
                Arg(names=("uri",), options={"help": "lpd://host[:port]/queue"}),
                Arg(names=("files",), options={"nargs": "+", "metavar": "FILE"}),
                MODE_ARG,
                Arg(names=("--user",), options={"help": "job owner (P line)"}),
                Arg(names=("--title",), options={"help": "job title (J/N lines)"}),
                Arg(names=("--timeout",), options={"default": "30s"}))),
    Command(name="queue", help="show a queue's state (an lpq)",
            handler="relay.clientcli:main_queue", args=(
                Arg(names=("uri",)),
                Arg(names=("--long", "-l"), options={"action": "store_true"}),
                Arg(names=("--timeout",), options={"default": "30s"}))),
    Command(name="remove", help="remove jobs by number or user (an lprm)",
            handler="relay.clientcli:main_remove", args=(
                Arg(names=("uri",)),
                Arg(names=("items",), options={"nargs": "+", "metavar": "JOB|USER"}),
                Arg(names=("--agent",), options={"help": "requesting user (default: you)"}),
                Arg(names=("--timeout",), options={"default": "30s"}))),
    Command(name="spool", help="inspect and act on the spool (daemon may be stopped)",
            handler="relay.spoolcli:main_spool", args=(
                Arg(names=("action",), options={"choices": ("list", "show", "retry", "purge")}),
                Arg(names=("job",), options={"nargs": "?", "metavar": "JOB"}),
                CONFIG_ARG)),
    Command(name="probe", help="diagnose an LPD destination (field checklist)",
            handler="relay.probe:main_probe", args=(
                Arg(names=("uri",)),
                Arg(names=("--json",), options={"action": "store_true"}),
                Arg(names=("--no-print",), options={"action": "store_true"}))),
    Command(name="loadgen", help="generate LPD load and report rates (SPEC §8)",
            handler="relay.loadgen:main_loadgen", args=(
                Arg(names=("uri",)),
                Arg(names=("--jobs",), options={"type": int, "default": 1000}),
                Arg(names=("--concurrency",), options={"type": int, "default": 16}),
                Arg(names=("--size",), options={"default": "1KiB"}),
                MODE_ARG,
                Arg(names=("--json",), options={"action": "store_true"}))),
    Command(name="import-printcap",
            help="print a relay configuration for an LPRng or BSD printcap",
            handler="relay.printcap:main_import", args=(
                Arg(names=("file",), options={
                    "nargs": "?", "default": "-", "metavar": "FILE",
                    "help": "the printcap to read (default: standard input)"}),)),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpd-relay", description="Store-and-forward relay for LPD (RFC 1179).")
    parser.add_argument("--version", action="version", version=f"lpd-relay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        for arg in command.args:
            p.add_argument(*arg.names, **arg.options)
        p.set_defaults(handler=command.handler)
    return parser


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
