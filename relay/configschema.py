"""Config value checking: converters from raw TOML values, and the table walker.

SPEC §3.  A converter turns one raw TOML value into a typed value or raises
``ValueError`` whose text says what was expected; ``section`` walks one TOML
table against a schema (key -> (converter, default)) and turns every unknown
key and failed conversion into a ``(key path, problem)`` pair, so the loader in
``relay.config`` can report all problems at once.  Nothing here knows a
particular key or a config record: ``relay.configsections`` holds the key
tables, ``relay.configrecords`` the records they fill, and this module imports
nothing from either (no cycle).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from relay.units import format_duration, format_size, parse_duration, parse_size
from relay.uri import Destination, parse_destination

__all__ = [
    "CATCH_ALL", "UNSET", "Bounds", "Network", "Range", "Required", "Schema", "Unset",
    "check_host", "key_path",
    "list_of", "one_of", "section",
    "show", "to_alias", "to_bool", "to_count", "to_destination", "to_duration", "to_fsync",
    "to_network", "to_path", "to_port_range", "to_positive_duration", "to_positive_size",
    "to_queue_name", "to_size", "to_string", "to_table", "unknown_key",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
CATCH_ALL = "*"
_N = TypeVar("_N", int, float)


# ---- converters: raw TOML value -> typed value, or ValueError(expectation) ----

class _Nested(Exception):
    """Problems inside a list, as (path suffix such as "[2]", message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(problems)
        self.problems = problems


_TOML_TYPES = {bool: "boolean", int: "integer", float: "float", str: "string",
               list: "array", dict: "table"}


def show(value: object) -> str:
    """A raw value as a problem line quotes it: its TOML type, then the value, bounded."""
    kind = _TOML_TYPES.get(type(value), type(value).__name__)
    shown = json.dumps(value) if kind in ("string", "integer", "float") else repr(value)
    # Bounded: a problem line quotes the value, and the value may be huge.
    return f"{kind} {shown if len(shown) <= 60 else shown[:57] + '...'}"


def to_string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected {what}, got {show(value)}")
    return value


# Ceilings every value of a kind obeys, whatever its key: a typo of a few
# extra digits (or a hostile file) must not become a huge number that some
# later system call or deadline overflows on.  Keys that need less have their
# own Range in relay.configsections.BOUNDS.
MAX_COUNT = 2**63 - 1        # int64: what any system call or C field can take
MAX_SIZE = 2**50             # 1 PiB; the protocol core needs sizes below 2**60
MAX_DURATION = 10 * 365 * 86400.0


def to_duration(value: object) -> float:
    seconds = parse_duration(to_string(value, 'a duration string such as "30s"'))
    if seconds > MAX_DURATION:
        raise ValueError(f"expected a duration of at most 10 years, got {show(value)}")
    return seconds


def to_size(value: object) -> int:
    # A bare integer of bytes is unambiguous, so TOML integers are accepted too.
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        size = value
    else:
        size = parse_size(to_string(value, 'a size string such as "4GiB"'))
    if size > MAX_SIZE:
        raise ValueError(f"expected a size of at most 1PiB, got {show(value)}")
    return size


def _above_zero(convert: Callable[[object], _N], zero: str) -> Callable[[object], _N]:
    def checked(value: object) -> _N:
        result = convert(value)
        if result <= 0:
            raise ValueError(f"must be more than {zero}, got {show(value)}")
        return result
    return checked


to_positive_duration = _above_zero(to_duration, "0s")
to_positive_size = _above_zero(to_size, "0 bytes")


def to_count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_COUNT:
        raise ValueError(f"expected a whole number below 2**63, got {show(value)}")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"expected a whole number, 1 or more, got {show(value)}")
    return value


@dataclass(frozen=True, slots=True)
class Range:
    """The values one key may take, checked after its converter (``kind`` picks the units)."""

    low: float
    high: float
    kind: str = "count"   # "count" | "size" | "duration"

    def _fmt(self, value: float) -> str:
        if self.kind == "size":
            return format_size(int(value))
        if self.kind == "duration":
            return format_duration(value)
        return f"{int(value)}"

    def check(self, value: float) -> None:
        if not self.low <= value <= self.high:
            raise ValueError(f"expected {self._fmt(self.low)} to {self._fmt(self.high)}, "
                             f"got {self._fmt(value)}")


Bounds = Mapping[str, Range]


def check_host(host: str) -> None:
    """A listen host must be an IP address, or a name that resolves now.

    A dotted-digits host that is no IPv4 address ("999.1.1.1") is refused
    without a lookup (a resolver might treat it as a name); any other name is
    resolved at load time, so ``check-config`` finds what ``serve`` would
    fail on at bind time.
    """
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host):
        raise ValueError(f'"{host}" is not an IPv4 address (four numbers 0-255)')
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f'"{host}" is neither an IP address nor a name that resolves '
                         f"({reason})") from None


def to_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {show(value)}")
    return value


def one_of(*choices: str) -> Callable[[object], str]:
    """A converter accepting exactly the strings ``choices``."""
    def convert(value: object) -> str:
        if value not in choices:
            raise ValueError(f"expected {' or '.join(json.dumps(c) for c in choices)}, "
                             f"got {show(value)}")
        return str(value)
    return convert


def to_fsync(value: object) -> bool:
    return one_of("always", "never")(value) == "always"


def to_workers(value: object) -> int:
    """``[server] workers``: a count, or "auto" for the number of cores (docs/architecture.md)."""
    if value == "auto":
        return min(os.cpu_count() or 1, 256)   # the key's bound
    if isinstance(value, str):
        raise ValueError(f'expected a whole number, 1 or more, or "auto", got {show(value)}')
    return to_count(value)


def to_path(value: object) -> Path:
    text = to_string(value, "a directory path")
    if not text or "\0" in text:
        raise ValueError(f"expected a directory path, got {show(value)}")
    return Path(text)


def to_network(value: object) -> Network:
    text = to_string(value, 'a network such as "10.0.0.0/8"')
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f'expected a network such as "10.0.0.0/8" or an address, '
                         f'got "{text}"') from None


# [origin_ports] range words, as reserve= spells them (CUPS' meanings).
_RANGE_WORDS: dict[str, tuple[int | None, int | None]] = {
    "none": (None, None), "rfc1179": (721, 731), "privileged": (512, 1023), "any": (1, 1023)}


def to_port_range(value: object) -> tuple[int | None, int | None]:
    """``"none"`` (ephemeral), ``"rfc1179"``, ``"privileged"``, ``"any"`` (1-1023), or
    ``"LOW-HIGH"``."""
    text = to_string(value, '"721-731", "512-1023", "none", "rfc1179" or "any"')
    if text.lower() in _RANGE_WORDS:
        return _RANGE_WORDS[text.lower()]
    low, dash, high = text.partition("-")
    if dash and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= 65535:
        return int(low), int(high)
    raise ValueError(f'expected "none" (ephemeral ports), "rfc1179" (721-731), "any" '
                     f'(any reserved port, 1-1023) or "LOW-HIGH" within 1..65535 such as '
                     f'"512-1023", got "{text}"')


def to_queue_name(value: object) -> str:
    # Names travel in RFC 1179 command lines ("02queue LF"; operands split on
    # spaces), so a name with whitespace or control characters can never match.
    text = to_string(value, "a queue name")
    if not text or not text.isprintable() or any(ch.isspace() for ch in text):
        raise ValueError(f"a queue name must be non-empty without spaces or control "
                         f"characters, got {show(value)}")
    return text


def to_alias(value: object) -> str:
    name = to_queue_name(value)
    if name == CATCH_ALL:
        raise ValueError('"*" is the catch-all queue and cannot be an alias')
    return name


def list_of(convert: Callable[[object], Any], what: str,
            *, min_items: int = 0, lone: bool = False) -> Callable[[object], tuple[Any, ...]]:
    """A converter for an array of ``what``; each bad item is its own "[i]" problem."""
    def convert_list(value: object) -> tuple[Any, ...]:
        if lone and isinstance(value, str):
            value = [value]  # a single string is unambiguous; take it as a one-item list
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected an array of {what}, got {show(value)}")
        if len(value) < min_items:
            raise ValueError(f"expected at least {min_items} of {what}, got an empty array")
        items: list[Any] = []
        problems: list[tuple[str, str]] = []
        for index, item in enumerate(value):
            try:
                items.append(convert(item))
            except ValueError as exc:
                problems.append((f"[{index}]", str(exc)))
        if problems:
            raise _Nested(problems)
        return tuple(items)
    return convert_list


# Destination options the URI grammar leaves open-ended, bounded here.
_DEST_TIMEOUT = Range(0.001, 86400, "duration")
_DEST_BATCH = Range(1, 1000)


def to_destination(value: object) -> Destination:
    dest = parse_destination(to_string(value, "a destination URI string"))
    for option, limits, got in (("timeout", _DEST_TIMEOUT, dest.timeout),
                                ("batch", _DEST_BATCH, dest.batch)):
        try:
            limits.check(got)
        except ValueError as exc:
            raise ValueError(f"{dest.uri!r}: option {option}: {exc}") from None
    return dest


def to_table(value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a table, got {show(value)}")
    return dict(value)


# ---- the table walker; defaults in a schema are raw TOML values ----

class Required:
    """The default of a key that must be given; ``expectation`` follows "missing; "."""

    def __init__(self, expectation: str) -> None:
        self.expectation = expectation


class Unset:
    """The default of a key that is off unless given (its converter maps it to None)."""

    def __repr__(self) -> str:
        return "not set"


UNSET = Unset()

Schema = dict[str, tuple[Callable[[object], Any], object]]


def key_path(parent: str, key: str) -> str:
    """``parent.key`` in TOML spelling, so the path can be searched for in the file."""
    # e.g. queues."*": a key that is not a bare TOML key is quoted.
    shown = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
    return f"{parent}.{shown}" if parent else shown


def unknown_key(key: str, known: Mapping[str, object]) -> str:
    """The problem for a key not in ``known``, with the closest known key as a hint."""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(known)}"
    return f"unknown key ({hint})"


def section(raw: object, path: str, schema: Schema, problems: list[tuple[str, str]],
            inherited: Mapping[str, Any] | None = None,
            bounds: Bounds | None = None) -> dict[str, Any]:
    """Convert one table by its schema; problems are appended, good values returned.

    ``bounds`` maps keys to the ``Range`` their converted value must lie in.
    """
    if not isinstance(raw, Mapping):
        problems.append((path, f"expected a table, got {show(raw)}"))
        return {}
    problems.extend((key_path(path, k), unknown_key(k, schema)) for k in raw if k not in schema)
    values: dict[str, Any] = {}
    for key, (convert, default) in schema.items():
        at = key_path(path, key)
        if key not in raw and inherited is not None and key in inherited:
            values[key] = inherited[key]
        elif key not in raw and isinstance(default, Required):
            problems.append((at, f"missing; {default.expectation}"))
        else:
            limits = bounds.get(key) if bounds is not None else None
            try:
                given = raw.get(key, default)
                if limits is not None and type(given) is int and given > limits.high:
                    limits.check(given)  # say the key's range, not the converter's ceiling
                value = convert(given)
                if limits is not None:
                    limits.check(value)
                values[key] = value
            except _Nested as nested:
                problems.extend((at + suffix, msg) for suffix, msg in nested.problems)
            except ValueError as exc:
                problems.append((at, str(exc)))
    return values
