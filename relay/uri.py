"""Destination URIs, CUPS device-URI style (SPEC §3.3).

``parse_destination`` turns one configured string into a ``Destination``
record the sinks and the scheduler read; it is the only place that knows the
URI grammar, so every sink gets already-validated values and every mistake is
reported once, at config load, with a message precise enough to fix it.

Forms: ``lpd://host[:port]/queue[?options]``, ``socket://host[:port]``,
``usb:///dev/usb/lp0`` or CUPS' ``usb://Make/Model?serial=SN``,
``dir:///absolute/folder[?mode=0640&group=NAME]`` and ``cmd:PROGRAM ARG...``.
A ``group=`` name is looked up now, so a typo is a config error; whether a
``cmd:`` program is installed is not (it may be installed later):
``relay.sinks.config_warnings`` reports that. Host, queue and path parts are
percent-decoded; IPv6 literals go in brackets. Query options are checked
against a table: unknown options are errors, and so are options a scheme does
not use. One option name may mean different things to different schemes
(``mode=`` is the LPD length form for ``lpd://`` and the file mode for
``dir://``), so each row names its schemes and the field it sets. CUPS' own
spellings of its lpd and socket backends' options are accepted with CUPS'
meanings beside the relay's (``order=data,control``, ``mode=standard``,
``timeout=30`` in seconds, ``reserve=any`` = a reserved port 1-1023;
docs/sinks.md has the table). The URI is parsed by hand rather than with
``urllib.parse`` because urlsplit silently accepts much of what we must refuse
(unbracketed IPv6, user info, empty hosts) and its port errors are vague.
"""

from __future__ import annotations

import grp
import ipaddress
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from relay.units import parse_duration

__all__ = ["DEFAULT_PORTS", "SCHEMES", "Destination", "group_label", "parse_destination",
           "parse_hostport"]

SCHEMES = ("lpd", "lpds", "socket", "usb", "cmd", "dir")
DEFAULT_PORTS = {"lpd": 515, "socket": 9100}

_FORMS = ("lpd://host[:port]/queue, socket://host[:port], usb:///dev/..., "
          "dir:///folder or cmd:PROGRAM ARG...")


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    """One place a queue's jobs go.  Fields a scheme does not use keep their defaults."""

    uri: str                      # as configured; also the metric label
    scheme: str                   # "lpd" | "socket" | "usb" | "cmd" | "dir"
    host: str = ""                # lpd/socket; IPv6 without brackets
    port: int = 0                 # lpd (default 515) / socket (default 9100)
    path: str = ""                # lpd: queue name; usb: device; dir: folder
    argv: tuple[str, ...] = ()    # cmd: the program and its arguments
    mode: str = "count"           # lpd: count | stream | windows
    order: str = "control-first"  # lpd: control-first | data-first
    timeout: float = 30.0         # lpd/socket: seconds per read or write
    contimeout: float | None = None  # lpd/socket: seconds to connect; None = timeout
    jobnumbers: int = 3           # lpd: 3 | 6 digits
    reserve: str | None = None    # lpd: none | rfc1179 | privileged | any; None = [origin_ports]
    batch: int = 1                # lpd: jobs per connection
    banner: bool | None = None    # lpd: add (True) / remove (False) L lines; None = as sent
    format: str | None = None     # lpd: the format letter of every data file; None = as sent
    sanitize_title: bool = False  # lpd: J title reduced to letters, digits, spaces and "_"
    waiteof: bool = True          # socket: wait for the printer to close after the data
    make: str = ""                # usb://Make/Model: IEEE 1284 MFG (path is then "")
    model: str = ""               # usb://Make/Model: IEEE 1284 MDL
    serial: str = ""              # usb://Make/Model?serial=: IEEE 1284 SN; "" = any
    file_mode: int = 0o640        # dir: mode of the files (folders: x added where r is)
    group: int | None = None      # dir: gid given to files and folders; None = the daemon's
    tls_ca: str = ""              # lpds: PEM CA file the server is verified against
    tls_cert: str = ""            # lpds: PEM client certificate (mutual TLS)
    tls_key: str = ""             # lpds: its key ("" = in the cert file)
    servername: str = ""          # lpds: name to verify and send as SNI ("" = host)

    @property
    def name(self) -> str:
        """The label metrics and logs use: the URI as configured."""
        return self.uri

    @property
    def connect_timeout(self) -> float:
        """Seconds to resolve and connect: ``contimeout``, else ``timeout``."""
        return self.timeout if self.contimeout is None else self.contimeout


def _choice(*allowed: str, **synonyms: str) -> Callable[[str], str]:
    """A converter taking ``allowed`` words as they are and ``synonyms`` (another
    spelling, e.g. CUPS' ``standard`` for ``count``) as the word they stand for."""
    spellings = {**{word: word for word in allowed}, **synonyms}

    also = f" (also: {', '.join(synonyms)})" if synonyms else ""

    def convert(text: str) -> str:
        if text.lower() not in spellings:
            raise ValueError(f"expected {' or '.join(allowed)}{also}, got {text!r}")
        return spellings[text.lower()]
    return convert


# CUPS' lpd backend spells order "control,data" / "data,control", mode
# "standard" for exact counts, and takes on/yes/true for reserve=rfc1179 and
# any other word for none (backend/lpd.c); both spellings work here.
_ORDER = _choice("control-first", "data-first",
                 **{"control,data": "control-first", "data,control": "data-first"})
_MODE = _choice("count", "stream", "windows", standard="count")
_RESERVE = _choice("none", "rfc1179", "any", "privileged",
                   on="rfc1179", yes="rfc1179", true="rfc1179",
                   off="none", no="none", false="none")
_TRUE = ("on", "yes", "true", "1")
_FALSE = ("off", "no", "false", "0")
# CUPS' format= letters (backend/lpd.c): RFC 1179's print formats.
FORMAT_OPTION_LETTERS = "cdfglnoprtv"


def _timeout(text: str) -> float:
    # A bare whole number is seconds, as in CUPS' backends (timeout=30).
    seconds = float(text) if text.isascii() and text.isdigit() else parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"must be more than 0s, got {text!r}")
    return seconds


def _switch(text: str) -> bool:
    # CUPS' backends read an empty value as "on" too; an empty value is
    # refused here as everywhere (option=... needs a value).
    word = text.lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"expected on/off (or yes/no, true/false), got {text!r}")


def _format(text: str) -> str:
    if len(text) != 1 or text not in FORMAT_OPTION_LETTERS:
        raise ValueError(f"expected one format letter of {FORMAT_OPTION_LETTERS} "
                         f"(l = raw, f = plain text, o = PostScript), got {text!r}")
    return text


def _serial(text: str) -> str:
    if not text or not text.isprintable():
        raise ValueError(f"expected the printer's serial number, got {text!r}")
    return text


def _jobnumbers(text: str) -> int:
    if text not in ("3", "6"):
        raise ValueError(f"expected 3 or 6, got {text!r}")
    return int(text)


def _batch(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise ValueError(f"expected a whole number of jobs, 1 or more, got {text!r}")
    return int(text)


def _file_mode(text: str) -> int:
    # Octal as chmod takes it ("0660" or "660"); special bits make no sense
    # for documents, and a mode the owner cannot read is a mistake.
    if not (text.isascii() and 3 <= len(text) <= 4 and all(c in "01234567" for c in text)):
        raise ValueError(f"expected an octal file mode such as 0640, got {text!r}")
    mode = int(text, 8)
    if mode > 0o777 or not mode & 0o400:
        raise ValueError(f"expected a file mode from 0400 to 0777 that the owner can read, "
                         f"got {text!r}")
    return mode


def _group(text: str) -> int:
    # A gid need not be in the group database (containers, LDAP-less hosts);
    # a name must be, now, so a typo fails at config time.
    if text.isascii() and text.isdigit():
        if int(text) >= 2**32 - 1:
            raise ValueError(f"gid {text} is out of range")
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"no group named {text!r} on this system (a name or a gid)") from None


def group_label(gid: int) -> str:
    """A gid as messages show it: its name when the group database has one, else the number."""
    try:
        return f'"{grp.getgrgid(gid).gr_name}"'
    except KeyError:
        return str(gid)


# Query option -> rows of (schemes that take it, Destination field, converter).
# socket:// takes timeout too: a printer that never closes after the data
# must not hold its queue forever.
_Row = tuple[frozenset[str], str, Callable[[str], Any]]
_LPD = frozenset({"lpd", "lpds"})   # lpds:// takes every lpd:// option (SPEC §9)
_LPDS = frozenset({"lpds"})
_NET = _LPD | {"socket"}
_OPTIONS: dict[str, tuple[_Row, ...]] = {
    "mode": ((_LPD, "mode", _MODE),
             (frozenset({"dir"}), "file_mode", _file_mode)),
    "order": ((_LPD, "order", _ORDER),),
    "timeout": ((_NET, "timeout", _timeout),),
    "contimeout": ((_NET, "contimeout", _timeout),),
    "jobnumbers": ((_LPD, "jobnumbers", _jobnumbers),),
    "reserve": ((_LPD, "reserve", _RESERVE),),
    "batch": ((_LPD, "batch", _batch),),
    "banner": ((_LPD, "banner", _switch),),
    "format": ((_LPD, "format", _format),),
    "sanitize_title": ((_LPD, "sanitize_title", _switch),),
    "waiteof": ((frozenset({"socket"}), "waiteof", _switch),),
    "serial": ((frozenset({"usb"}), "serial", _serial),),
    "group": ((frozenset({"dir"}), "group", _group),),
    "ca": ((_LPDS, "tls_ca", str),),
    "cert": ((_LPDS, "tls_cert", str),),
    "key": ((_LPDS, "tls_key", str),),
    "servername": ((_LPDS, "servername", str),),
}

_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})")


def parse_destination(uri: str) -> Destination:
    """Parse a configured destination URI; ``ValueError`` says exactly what is wrong."""
    if not isinstance(uri, str):
        raise ValueError(f"expected a destination URI string ({_FORMS}), got {uri!r}")
    if not uri.isprintable() or uri != uri.strip():
        raise ValueError(f"{uri!r} contains control characters or surrounding spaces")
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme.lower() not in SCHEMES:
        raise ValueError(f"unknown destination {uri!r}; expected {_FORMS}")
    scheme = scheme.lower()
    if scheme == "cmd":
        return _parse_cmd(uri, rest)
    if not rest.startswith("//"):
        raise ValueError(f"{uri!r}: expected {_example(scheme)}")
    if "#" in rest:
        raise ValueError(f"{uri!r}: '#' is not allowed; write it as %23")
    hier, _, query = rest[2:].partition("?")
    authority, slash, path = hier.partition("/")
    fields = _options(uri, scheme, query) if query else {}
    if scheme == "usb" and authority:
        return _usb_by_id(uri, authority, path, fields)
    if fields.get("serial"):
        raise ValueError(f"{uri!r}: serial= goes with usb://Make/Model, not a device path")
    if scheme in ("usb", "dir"):
        local = _local_path(uri, scheme, authority, slash + path)
        return Destination(uri=uri, scheme=scheme, path=local, **fields)
    host, port = _authority(uri, scheme, authority)
    fields.update(host=host, port=port)
    if scheme == "socket":
        if path:
            raise ValueError(f"{uri!r}: socket:// takes no path, expected {_example(scheme)}")
        return Destination(uri=uri, scheme=scheme, **fields)
    queue = _queue(uri, slash + path, scheme)
    return Destination(uri=uri, scheme=scheme, path=queue, **fields)


def _example(scheme: str) -> str:
    return {
        "lpd": "lpd://host[:port]/queue, e.g. lpd://laptop.vpn/Ward3?mode=count",
        "lpds": "lpds://host:port/queue?ca=PATH, e.g. lpds://central.example.org:6515/ward3"
                "?ca=/etc/lpd-relay/ca.pem",
        "socket": "socket://host[:port], e.g. socket://10.1.2.3:9100",
        "usb": "usb:///dev/usb/lp0 (three slashes, then the absolute device path) or "
               "usb://Make/Model?serial=...",
        "dir": "dir:///var/spool/lpd-relay-out (three slashes, then an absolute folder; "
               "relative folders are not accepted)",
    }[scheme]


def _parse_cmd(uri: str, rest: str) -> Destination:
    # Split like a shell would, but the program runs without one (SPEC §3.3),
    # so quoting only groups arguments; nothing is expanded.
    if rest.startswith("//"):
        raise ValueError(f"{uri!r}: cmd: takes a command line, e.g. cmd:lp -d ward3 -o raw")
    try:
        argv = tuple(shlex.split(rest))
    except ValueError as exc:
        raise ValueError(f"{uri!r}: cannot split the command line: {exc}") from None
    if not argv or not argv[0]:
        raise ValueError(f"{uri!r}: cmd: needs a program, e.g. cmd:lp -d ward3 -o raw")
    return Destination(uri=uri, scheme="cmd", argv=argv)


def _usb_by_id(uri: str, authority: str, path: str, fields: dict[str, Any]) -> Destination:
    # CUPS' usb backend form: usb://MFG/MDL[?serial=SN], the IEEE 1284 device
    # ID's fields, percent-encoded; resolved to a /dev/usb/lpN at delivery.
    make, model = unquote(authority), unquote(path)
    if not make.isprintable() or not model or not model.isprintable() or "/" in model:
        raise ValueError(f"{uri!r}: expected {_example('usb')} as CUPS' lpinfo -v shows it")
    return Destination(uri=uri, scheme="usb", make=make, model=model, **fields)


def _local_path(uri: str, scheme: str, authority: str, raw_path: str) -> str:
    # usb:///dev/usb/lp0 splits into an empty authority and the path; anything
    # between the "//" and the third "/" would be a host, which a local
    # device or folder cannot have.
    if authority:
        raise ValueError(f"{uri!r}: expected {_example(scheme)}")
    path = unquote(raw_path)
    if path in ("", "/") or "\0" in path:
        raise ValueError(f"{uri!r}: expected {_example(scheme)}")
    return path


def _authority(uri: str, scheme: str, authority: str) -> tuple[str, int]:
    if "@" in authority:
        raise ValueError(f"{uri!r}: user information ('user@') is not supported")
    try:
        # lpds:// has no registered port: it must be written (docs/tls.md).
        return parse_hostport(authority, default_port=DEFAULT_PORTS.get(scheme))
    except ValueError as exc:
        raise ValueError(f"{uri!r}: {exc}, expected {_example(scheme)}") from None


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets: the inverse of ``parse_hostport``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(text: str, *, default_port: int | None = None,
                   min_port: int = 1) -> tuple[str, int]:
    """Split ``host``, ``host:port``, ``[ipv6]`` or ``[ipv6]:port`` into (host, port).

    IPv6 literals must be bracketed and come back without brackets, in
    canonical form.  Without ``default_port`` the port is required; ports
    run from ``min_port`` (0 for listen addresses) to 65535.  The config's
    listen addresses use this too, so there is one host:port grammar.
    """
    if text.startswith("["):
        inner, bracket, after = text[1:].partition("]")
        try:
            host = str(ipaddress.IPv6Address(inner)) if bracket else ""
        except ValueError:
            host = ""
        if not host:
            raise ValueError(f"{text!r} is not a bracketed IPv6 address")
        if after and not after.startswith(":"):
            raise ValueError(f"unexpected {after!r} after the IPv6 address")
        port_text = after[1:] if after else None
    else:
        host, colon, rest = text.partition(":")
        if ":" in rest:
            raise ValueError("IPv6 addresses must be in brackets, e.g. [2001:db8::1]")
        if not host:
            raise ValueError("missing host")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{host!r} is not a valid host name or IPv4 address")
        port_text = rest if colon else None
    if port_text is None:
        if default_port is None:
            raise ValueError("missing port")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit() and min_port <= int(port_text) <= 65535):
        raise ValueError(f"port must be {min_port}..65535, got {port_text!r}")
    return host, int(port_text)


def _queue(uri: str, path: str, scheme: str = "lpd") -> str:
    # The queue travels in an RFC 1179 command line ("02queue LF", operands
    # separated by spaces), so whitespace or control characters would break it.
    queue = unquote(path[1:]) if path.startswith("/") else ""
    if not queue:
        raise ValueError(f"{uri!r}: missing queue name, expected {_example(scheme)}")
    if not queue.isprintable() or any(ch.isspace() for ch in queue):
        raise ValueError(f"{uri!r}: queue name {queue!r} contains spaces or control characters")
    return queue


def _options(uri: str, scheme: str, query: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for item in query.split("&"):
        key, eq, raw = item.partition("=")
        key = unquote(key)
        if not eq:
            raise ValueError(f"{uri!r}: option {key!r} needs a value ({key}=...)")
        if key not in _OPTIONS:
            valid = ", ".join(sorted(k for k, rows in _OPTIONS.items()
                                     if any(scheme in r[0] for r in rows)))
            raise ValueError(f"{uri!r}: unknown option {key!r}"
                             + (f" (valid for {scheme}://: {valid})" if valid else ""))
        field, convert = _row(uri, scheme, key)
        if field in fields:
            raise ValueError(f"{uri!r}: option {key!r} is given twice")
        try:
            fields[field] = convert(unquote(raw))
        except ValueError as exc:
            raise ValueError(f"{uri!r}: option {key}: {exc}") from None
    return fields


def _row(uri: str, scheme: str, key: str) -> tuple[str, Callable[[str], Any]]:
    """(Destination field, converter) of option ``key`` for ``scheme``."""
    rows = _OPTIONS[key]
    for schemes, field, convert in rows:
        if scheme in schemes:
            return field, convert
    takers: set[str] = set().union(*(r[0] for r in rows))
    if "lpd" in takers:   # every lpd:// option is an lpds:// one: name lpd:// only
        takers.discard("lpds")
    where = " and ".join(f"{s}://" for s in sorted(takers))
    raise ValueError(f"{uri!r}: option {key!r} is only valid for {where} destinations")
