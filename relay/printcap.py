"""``lpd-relay import-printcap``: an LPRng or BSD printcap as a relay configuration.

An admin replacing an lpd already has every queue written down in
``/etc/printcap``; this reads it the way lpd would (termcap syntax: ``\\``
continuation lines, ``#`` comments, ``name|alias|...`` entries, ``:key=str:``,
``:key#num:``, ``:key:`` true and ``:key@:`` false fields; LPRng's lines that
start with ``:`` or ``|`` continue the entry, ``.name`` entries are only
included with ``tc=``, ``:client:`` entries are for lpr, not lpd) and prints
one ``[queues.NAME]`` per printer with its aliases and a destination URI:

- ``lp=queue@host[%port]`` (LPRng) and ``rm=host`` + ``rp=queue`` (BSD) ->
  ``lpd://``; ``lp=host%port`` -> ``socket://``; ``lp=/dev/...`` ->
  ``usb://``; ``lp=|program`` -> ``cmd:``; ``lp=/dev/null`` -> a hot folder.

Whatever cannot be carried over (filters, accounting, banners, per-queue
spool directories...) is named on stderr, one ``warning: PRINTER: field X
not carried over (why)`` a line.  Each queue is validated with the relay's
own config loader before it is printed, so the output passes ``check-config``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from relay.config import InvalidConfig, config_from_dict

FieldValue = str | int | bool
HOT_FOLDER = "/var/lib/lpd-relay/out"
SPOOL_DIR = "/var/lib/lpd-relay/spool"

# Fields whose meaning the relay covers without a key: destinations (lp, rm,
# rp), includes (tc), the entry kind (server), and banner suppression (sh:
# the relay never prints banner pages, so every queue already behaves so).
_CARRIED = frozenset({"lp", "rm", "rp", "tc", "server", "sh", "mx"})
# Why the fields an admin is most likely to miss cannot come along.
_WHY = {
    "sd": "the relay keeps every queue's jobs under server.spool_dir",
    "if": "the relay forwards the job's bytes; it runs no filters",
    "of": "the relay forwards the job's bytes; it runs no filters",
    "filter": "the relay forwards the job's bytes; it runs no filters",
    "lf": "the relay logs to stderr / the journal",
    "af": "no accounting file; the relay logs every job and counts it in metrics",
    "sf": "the relay sends no form feeds of its own",
    "sb": "the relay prints no banner pages",
    "hl": "the relay prints no banner pages",
    "ah": "jobs are delivered, not held on arrival",
    "sv": "a load-balanced queue: list its servers' destinations as this queue's destinations",
    "ss": "a queue served by another: point clients at that queue or alias it",
    "bq": "a bounce queue: the relay already forwards without filtering",
    "all": "a list of printers, not a printer",
}


@dataclass(slots=True)
class Entry:
    """One printcap entry: its names in order, and its fields (later ones win)."""

    names: list[str]
    fields: dict[str, FieldValue] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.names[0]


# ---- reading: physical lines -> entries ----

def logical_entries(text: str) -> Iterator[str]:
    """Each entry as one string, continuation lines joined."""
    current: list[str] = []
    continued = False
    for raw in text.splitlines():
        line = raw.strip()
        if not continued and (not line or line.startswith("#")):
            continue
        starts_new = not continued and not line.startswith((":", "|"))
        if starts_new and current:
            yield "".join(current)
            current = []
        continued = line.endswith("\\") and not line.endswith("\\\\")
        current.append(line[:-1] if continued else line)
    if current:
        yield "".join(current)


def _split_fields(text: str) -> list[str]:
    """Split on ``:`` not escaped by a backslash; ``\\:`` and ``\\\\`` unescaped."""
    parts: list[str] = []
    buf: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            buf.append(nxt if nxt in (":", "\\") else ch + nxt)
        elif ch == ":":
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return parts


def parse_field(text: str) -> tuple[str, FieldValue] | None:
    """``key=str``, ``key#num``, ``key`` (true) or ``key@`` (false); None for blanks."""
    text = text.strip()
    if not text:
        return None
    match = re.match(r"([^=#@\s]+)\s*([=#@]?)(.*)", text, re.S)
    if match is None:
        return None
    key, sign, value = match.group(1), match.group(2), match.group(3).strip()
    if sign == "=":
        return key, value
    if sign == "#":
        try:
            return key, int(value, 0)
        except ValueError:
            return key, value
    return key, sign != "@"


def parse_printcap(text: str) -> list[Entry]:
    """Every entry of a printcap, in file order (same names not merged yet)."""
    entries = []
    for logical in logical_entries(text):
        # LPRng lets continuation lines start with "|": more names.
        head, *rest = _split_fields(logical)
        names = [n.strip() for n in head.split("|") if n.strip()]
        if not names:
            continue
        entry = Entry(names=names)
        for part in rest:
            parsed = parse_field(part)
            if parsed is not None:
                entry.fields[parsed[0]] = parsed[1]
        entries.append(entry)
    return entries


# ---- lpd's view: templates, client entries, includes ----

Warn = Callable[[str, str], None]


def _resolve_tc(entry: Entry, by_name: dict[str, Entry], warn: Warn,
                seen: frozenset[str] = frozenset()) -> dict[str, FieldValue]:
    """The entry's fields with ``tc=a,b`` included first (its own fields win)."""
    fields: dict[str, FieldValue] = {}
    includes = entry.fields.get("tc")
    for name in str(includes).split(",") if isinstance(includes, str) else ():
        name = name.strip()
        target = by_name.get(name)
        if target is None or name in seen:
            warn(entry.name, f"tc={name} {'loops back' if target else 'names no entry'}; ignored")
            continue
        fields.update(_resolve_tc(target, by_name, warn, seen | {entry.name}))
    fields.update(entry.fields)
    fields.pop("tc", None)
    return fields


def printers(entries: Iterable[Entry], warn: Warn) -> list[Entry]:
    """The queues lpd serves: client-only entries dropped, same names merged, tc resolved."""
    entries = list(entries)
    templates = {e.name: e for e in entries}
    merged: dict[str, Entry] = {}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.fields.get("client") is True:
            warn(entry.name, "a client-only entry (for lpr, not lpd); skipped")
            continue
        if entry.name in merged:   # LPRng merges entries of one name, later fields win
            merged[entry.name].fields.update(entry.fields)
            merged[entry.name].names += [n for n in entry.names if n not in
                                         merged[entry.name].names]
        else:
            merged[entry.name] = Entry(names=list(entry.names), fields=dict(entry.fields))
    result = []
    for entry in merged.values():
        fields = _resolve_tc(entry, templates, warn)
        fields.pop("client", None)
        result.append(Entry(names=entry.names, fields=fields))
    return result


# ---- printcap entry -> relay queue ----

def _expand(value: str, name: str) -> str:
    # LPRng's %P / %Q stand for the printer / queue name in lp, rm, rp and sd.
    return value.replace("%P", name).replace("%Q", name)


def _hostport(text: str, default: int) -> tuple[str, int] | None:
    host, sep, port = text.partition("%")
    if not host or (sep and not port.isdigit()):
        return None
    return host, int(port) if sep else default


def _lpd_uri(host: str, port: int, queue: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"lpd://{shown}{'' if port == 515 else f':{port}'}/{queue}"


def destination(name: str, fields: dict[str, FieldValue], warn: Warn) -> str | None:
    """The destination URI of one printer, or None (warned) when it has none the relay has."""
    lp = _expand(str(fields["lp"]), name) if isinstance(fields.get("lp"), str) else ""
    if lp.startswith("|"):
        return f"cmd:{lp[1:].strip()}"
    if lp == "/dev/null":
        warn(name, f"lp=/dev/null: jobs are kept in the hot folder {HOT_FOLDER}/{name}/ "
                   "instead of being thrown away")
        return f"dir://{HOT_FOLDER}"
    if lp.startswith("/dev/"):
        return f"usb://{lp}"
    if lp.startswith("/"):
        warn(name, f"field lp not carried over (lp={lp} is a file, not a device; "
                   "use a dir:// hot folder)")
        return None
    if "@" in lp:
        queue, _, where = lp.partition("@")
        hp = _hostport(where, 515)
        if hp and queue:
            return _lpd_uri(hp[0], hp[1], queue)
    elif lp:
        hp = _hostport(lp, 9100)
        if hp and "%" in lp:
            return f"socket://{lp.replace('%', ':')}"
    if lp:
        warn(name, f"field lp not carried over (lp={lp} is not a device, queue@host[%port] "
                   "or host%port)")
        return None
    rm = fields.get("rm")
    if isinstance(rm, str) and rm:
        hp = _hostport(_expand(rm, name), 515)
        rp = fields.get("rp")
        queue = _expand(rp, name) if isinstance(rp, str) and rp else "lp"   # BSD's default
        if hp:
            return _lpd_uri(hp[0], hp[1], queue)
    warn(name, "no destination (neither lp nor rm); skipped")
    return None


def _uncarried(name: str, fields: dict[str, FieldValue], warn: Warn) -> None:
    for key, value in fields.items():
        # A field switched off (key@, or a 0/empty value) asks for nothing the relay does.
        if key in _CARRIED or value is False or value in (0, ""):
            continue
        why = _WHY.get(key, "no lpd-relay equivalent")
        warn(name, f"field {key} not carried over ({why})")


def _max_job_size(entries: list[Entry]) -> int | None:
    """One server.max_job_size: the largest mx when every printer sets one (KiB; 0 = none)."""
    sizes = [e.fields.get("mx") for e in entries]
    limits = [int(s) for s in sizes if isinstance(s, int) or (isinstance(s, str) and s.isdigit())]
    if len(limits) != len(sizes) or not limits or 0 in limits:
        return None
    return max(limits) * 1024


@dataclass(slots=True)
class Imported:
    """The relay configuration built from one printcap, as TOML-ready data."""

    queues: dict[str, dict[str, object]] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)   # queue -> printcap names
    max_job_size: int | None = None

    def data(self) -> dict[str, object]:
        server: dict[str, object] = {"spool_dir": SPOOL_DIR}
        if self.max_job_size is not None:
            server["max_job_size"] = self.max_job_size
        return {"server": server, "queues": self.queues}


def _valid(queue: str, body: dict[str, object]) -> str | None:
    """None when ``queue`` is a valid relay queue, else the problem (names are checked
    for uniqueness as they are taken, so each queue is validated alone: linear time)."""
    try:
        config_from_dict({"queues": {queue: body}}, "<import>")
    except InvalidConfig as exc:
        return "; ".join(f"{p}: {m}" for p, m in exc.problems)
    return None


def _names(entry: Entry, taken: set[str], warn: Warn) -> list[str]:
    """Usable names: no spaces (BSD's last name may be a description), not used before."""
    names: list[str] = []
    for n in entry.names:
        if any(ch.isspace() for ch in n) or not n.isprintable():
            continue
        if any(n.casefold() == mine.casefold() for mine in names):
            continue   # "ps" and "PS": one name to case-insensitive matching
        if n.casefold() in taken:
            warn(entry.name, f"name {n!r} already used by another printer; dropped")
            continue
        taken.add(n.casefold())
        names.append(n)
    return names


def convert(entries: Iterable[Entry], warn: Warn) -> Imported:
    """Printcap entries (as parsed) -> the queues of a relay configuration."""
    imported = Imported()
    served = printers(entries, warn)
    imported.max_job_size = _max_job_size(served)
    taken: set[str] = set()
    for entry in served:
        names = _names(entry, taken, warn)
        uri = destination(entry.name, entry.fields, warn) if names else None
        if uri is None:
            continue
        _uncarried(entry.name, entry.fields, warn)
        mx = entry.fields.get("mx")
        if imported.max_job_size is None and mx not in (None, 0, "0", False):
            warn(entry.name, "field mx not carried over (one limit for all queues: "
                             "server.max_job_size; not every printer sets one)")
        body: dict[str, object] = {"destinations": [uri]}
        if len(names) > 1:
            body["aliases"] = names[1:]
        problem = _valid(names[0], body)
        if problem:
            warn(entry.name, f"skipped: {problem}")
            continue
        imported.queues[names[0]] = body
        imported.origins[names[0]] = "|".join(entry.names)
    return imported


# ---- output ----

def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    return json.dumps(value)


def to_toml(imported: Imported, source: str) -> str:
    """The configuration as a commented TOML file."""
    lines = [f"# Imported from the printcap {source} by lpd-relay import-printcap.",
             "# Review it, then: lpd-relay check-config -c FILE", "", "[server]"]
    data = imported.data()
    server = data["server"]
    assert isinstance(server, dict)
    lines += [f"{k} = {_value(v)}" for k, v in server.items()]
    for name, body in imported.queues.items():
        lines += ["", f"# printcap entry {imported.origins[name]}", f"[queues.{_key(name)}]"]
        lines += [f"{k} = {_value(v)}" for k, v in sorted(body.items())]
    return "\n".join(lines) + "\n"


def main_import(args: argparse.Namespace) -> int:
    path = args.file
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
    except OSError as exc:
        print(f"lpd-relay: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1

    def warn(printer: str, message: str) -> None:
        print(f"warning: {printer}: {message}", file=sys.stderr)

    imported = convert(parse_printcap(text), warn)
    if not imported.queues:
        print(f"lpd-relay: {'stdin' if path == '-' else path}: no printer could be imported",
              file=sys.stderr)
        return 1
    sys.stdout.write(to_toml(imported, "(stdin)" if path == "-" else path))
    return 0
