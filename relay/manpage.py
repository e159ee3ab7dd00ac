"""Man pages generated from the code: ``lpd-relay(8)`` and ``lpd-relay.toml(5)``.

``lpd-relay(8)`` is written from the argparse parser of ``relay.cli`` (every
subcommand, its usage line and every option with its help text), and
``lpd-relay.toml(5)`` from the key tables of ``relay.configsections`` (every
section and key with its default, rendered from the very value the loader uses) and
the option table of ``relay.uri``; neither can drift from what the program
accepts.  The prose for each key (type and meaning) comes from the tables of
``docs/configuration.md`` when the source tree is at hand, so the words are
written once; a key the docs do not describe still gets its entry, default
and the type its converter implies.

``python -m relay.manpage DIR`` (``make man``) writes ``lpd-relay.8`` and
``lpd-relay.toml.5`` into DIR.  Output is plain man(7) roff.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from relay import __version__, configschema, configsections, uri
from relay.cli import build_parser, subcommands

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
HEADER = '.TH {name} {section} "" "lpd-relay {version}" "{manual}"'

# Types the shared converters imply, for keys the docs do not describe.
_CONVERTER_TYPES: dict[Callable[[object], Any], str] = {
    configschema.to_duration: "duration",
    configschema.to_positive_duration: "duration > 0",
    configschema.to_size: "size",
    configschema.to_positive_size: "size > 0",
    configschema.to_count: "integer >= 1",
    configschema.to_bool: "boolean",
    configschema.to_fsync: '"always" | "never"',
    configschema.to_path: "path",
    configschema.to_port_range: '"LOW-HIGH" | "none" | "rfc1179" | "any"',
    configschema.to_table: "table",
}


# ---- roff ----

def roff(text: str) -> str:
    """Text safe in a roff line: backslashes, leading dots/quotes and hyphens escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    # Plain ASCII out, whatever the reader's locale: "≥" becomes groff's \[u2265].
    text = "".join(ch if ord(ch) < 128 else f"\\[u{ord(ch):04X}]" for ch in text)
    return "\\&" + text if text[:1] in (".", "'") else text


def _bold(text: str) -> str:
    return f"\\fB{roff(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{roff(text)}\\fR"


def _paragraphs(title: str, body: Iterable[str]) -> list[str]:
    return [f".SH {title}", *body]


# ---- lpd-relay(8), from the parser ----

def _usage(parser: argparse.ArgumentParser) -> str:
    text = " ".join(parser.format_usage().split())
    return text.removeprefix("usage: ")


def _option(action: argparse.Action) -> list[str]:
    if action.option_strings:
        choices = "|".join(map(str, action.choices or ()))
        metavar = "" if action.nargs == 0 else \
            f" {action.metavar or choices or action.dest.upper()}"
        names = ", ".join(_bold(o) for o in action.option_strings)
        head = names + (f" {_italic(metavar.strip())}" if metavar else "")
    else:
        head = _italic(str(action.metavar or action.dest))
    help_text = action.help or ""
    if action.choices and not action.option_strings:
        help_text += f" ({', '.join(map(str, action.choices))})"
    return [".TP", head, roff(help_text)]


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        lines += _option(action)
    return lines


def _command_trailer() -> list[str]:
    """EXIT STATUS, ENVIRONMENT, FILES and SEE ALSO of lpd-relay(8)."""
    lines: list[str] = []
    lines += _paragraphs("EXIT STATUS", [
        ".TP", "0", "success", ".TP", "1",
        roff("failure: a server refused or could not be reached, a job failed"),
        ".TP", "2", "usage or configuration error"])
    lines += _paragraphs("ENVIRONMENT", [
        ".TP", _bold("NOTIFY_SOCKET"),
        roff("set by systemd for Type=notify: serve sends READY=1, STATUS=, STOPPING=1 "
             "there."),
        ".TP", _bold("WATCHDOG_USEC"),
        roff("set by systemd with WatchdogSec=: serve sends WATCHDOG=1 at half of it.")])
    lines += _paragraphs("SIGNALS", [
        ".TP", _bold("SIGTERM, SIGINT"),
        roff("serve stops accepting, gives jobs in flight [server] graceful_timeout, then "
             "exits 0; acknowledged jobs stay in the spool."),
        ".TP", _bold("SIGHUP"),
        roff("not handled yet: it ends the process. Restart to load a changed "
             "configuration.")])
    lines += _paragraphs("FILES", [
        ".TP", _italic("/etc/lpd-relay/relay.toml"),
        roff("the configuration the systemd unit reads; see lpd-relay.toml(5)."),
        ".TP", _italic("/var/lib/lpd-relay/spool"), roff("the spool of the systemd service."),
        ".TP", _italic("/usr/lib/systemd/system/lpd-relay.service"), "the unit."])
    lines += _paragraphs("SEE ALSO", [
        "\\fBlpd-relay.toml\\fR(5), \\fBlpr\\fR(1), \\fBlpq\\fR(1), \\fBprintcap\\fR(5), "
        "\\fBsystemd.service\\fR(5)"])
    return lines


def command_page(parser: argparse.ArgumentParser | None = None) -> str:
    """``lpd-relay(8)`` as roff."""
    parser = parser or build_parser()
    subs = subcommands(parser)
    lines = [HEADER.format(name="LPD-RELAY", section=8, version=__version__,
                           manual="System Administration"),
             ".SH NAME", "lpd\\-relay \\- store\\-and\\-forward relay for the Line Printer "
             "Daemon protocol (RFC 1179)", ".SH SYNOPSIS"]
    for sub in subs.values():
        lines += [".PP", roff(_usage(sub))]
    lines += _paragraphs("DESCRIPTION", [
        roff("lpd-relay accepts LPD print jobs from any real sender (BSD lpd, LPRng, CUPS, "
             "the Windows LPR port monitor with byte counting on or off), keeps each one "
             "on disk before acknowledging it, and forwards it to another LPD, a raw "
             "port-9100 printer, a USB printer, a local spooler command or a hot folder, "
             "retrying through outages. It exposes Prometheus metrics."),
        ".PP", roff("Each subcommand below has its own --help."),
        ".SS Global options", *_arguments(parser)])
    lines.append(".SH COMMANDS")
    for name, sub in subs.items():
        lines += [f".SS {roff(name)}", roff(sub.description or ""), ".PP",
                  roff(_usage(sub)), *_arguments(sub)]
    lines += _command_trailer()
    return "\n".join(lines) + "\n"


# ---- lpd-relay.toml(5), from the key tables ----

def _plain(markdown: str) -> str:
    """A docs table cell as plain text: no backticks, emphasis or link targets."""
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", markdown)
    # Pointers into the project's own notes mean nothing to a reader of the manual.
    text = re.sub(r"\s*\((?:FIELD-NOTES|SPEC)[^)]*\)", "", text)
    return text.replace("\\|", "|").replace("`", "").replace("*", "").strip()


def docs_tables(text: str) -> dict[str, dict[str, tuple[str, str]]]:
    """``docs/configuration.md``'s key tables: section -> key -> (type, meaning)."""
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    current: dict[str, tuple[str, str]] | None = None
    for line in text.splitlines():
        heading = re.match(r"###\s+`\[([^\]]+)\]`", line)
        if heading:
            current = tables.setdefault(heading.group(1), {})
            continue
        if line.startswith("## "):
            current = None
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if current is not None and len(cells) >= 4 and cells[0].startswith("`"):
            current[_plain(cells[0])] = (_plain(cells[1]), _plain(cells[-1]))
    return tables


def option_tables(text: str) -> dict[str, str]:
    """The meanings in the docs' table of destination URI options, by option."""
    meanings = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and _plain(cells[0]) in uri._OPTIONS:
            meanings[_plain(cells[0])] = _plain(cells[3])
    return meanings


def toml_value(value: object) -> str:
    """A schema default as it would be written in the file."""
    if isinstance(value, configschema.Required):
        return "required"
    if isinstance(value, configschema.Unset):
        return "not set"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else json.dumps(value)
    return json.dumps(value)


def _key_entries(schema: configschema.Schema, docs: Mapping[str, tuple[str, str]]) -> list[str]:
    lines = []
    for key, (convert, default) in schema.items():
        kind, meaning = docs.get(key, (_CONVERTER_TYPES.get(convert, ""), ""))
        head = _bold(key) + (f" ({roff(kind)})" if kind else "")
        lines += [".TP", head, f"Default: {_bold(toml_value(default))}."]
        if meaning:
            lines.append(roff(meaning))
    return lines


def sections() -> dict[str, configschema.Schema]:
    """Every table of the file and its key table, as the loader reads them."""
    tables = {name: schema for name, schema in configsections.SECTIONS.items()
              if name != "queues"}
    tables["queues.NAME"] = configsections.QUEUE
    tables["queues.NAME.retry"] = configsections.RETRY
    tables["queues.NAME.retention"] = configsections.RETENTION
    return tables


def config_page(docs_text: str | None = None) -> str:
    """``lpd-relay.toml(5)`` as roff; ``docs_text`` is docs/configuration.md (or None)."""
    if docs_text is None and DOCS.is_file():
        docs_text = DOCS.read_text(encoding="utf-8")
    docs = docs_tables(docs_text or "")
    options = option_tables(docs_text or "")
    lines = [HEADER.format(name="LPD-RELAY.TOML", section=5, version=__version__,
                           manual="File Formats"),
             ".SH NAME", "lpd\\-relay.toml \\- configuration file of lpd\\-relay",
             ".SH SYNOPSIS", _italic("/etc/lpd-relay/relay.toml"),
             ".SH DESCRIPTION",
             roff("One TOML file, read by lpd-relay serve -c FILE and checked by "
                  "lpd-relay check-config -c FILE, which names every bad key with its path "
                  "and what is expected. Unknown keys are errors. A key left out has the "
                  "default shown."),
             ".SH UNITS",
             roff('Durations are strings of a number and a unit, ms, s, m, h or d, added up: '
                  '"250ms", "30s", "1h30m". Sizes are strings with a binary unit (KiB, MiB, '
                  'GiB, TiB), a decimal one (KB, MB, GB, TB), B, or none (bytes): "64KiB", '
                  '"4GiB"; a TOML integer is a number of bytes.')]
    for name, schema in sections().items():
        # A per-queue override table reads the meanings of the section it overrides.
        doc = docs.get(name.removeprefix("queues.NAME."), {})
        lines += [f".SH [{roff(name)}]", *_key_entries(schema, doc)]
    lines += [".SH DESTINATION URIS",
              roff("Forms: lpd://host[:port]/queue[?options], socket://host[:port], "
                   "usb:///dev/usb/lp0, dir:///folder, cmd:PROGRAM ARG... Options:")]
    for option, rows in uri._OPTIONS.items():
        schemes = set().union(*(row[0] for row in rows))
        lines += [".TP", f"{_bold(option)} ({roff(', '.join(sorted(schemes)))})",
                  roff(options.get(option, ""))]
    lines += [".SH SEE ALSO", "\\fBlpd-relay\\fR(8)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    out = Path(args[0] if args else "build/man")
    out.mkdir(parents=True, exist_ok=True)
    (out / "lpd-relay.8").write_text(command_page(), encoding="utf-8")
    (out / "lpd-relay.toml.5").write_text(config_page(), encoding="utf-8")
    print(f"wrote {out / 'lpd-relay.8'} and {out / 'lpd-relay.toml.5'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
