"""Configuration: one TOML file read into frozen records, validated before anything starts.

SPEC §3.  Each section is a table mapping key -> (converter, default), so the
loader is data, not a chain of ifs: unknown keys are found by set difference,
defaults go through the same converter as user values (a default can never be
of the wrong type), and a converter's ``ValueError`` becomes one
``(key path, expectation)`` problem.  Every problem in the file is collected
and raised together as ``InvalidConfig``, because an admin fixing a config
over SSH should not have to run ``check-config`` once per typo.

Entry points: ``load_config`` (a file), ``config_from_toml`` (text),
``config_from_dict`` (already-parsed data) and ``embedded_default`` (SPEC
§3.1, used when ``serve`` gets no ``-c``).  ``docs/configuration.md`` lists
every key.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import quote

from relay.errors import ConfigError
from relay.units import parse_duration, parse_size
from relay.uri import Destination, parse_destination, parse_hostport

__all__ = [
    "Config", "InvalidConfig", "Listen", "LogConfig", "MetricsConfig", "OriginPortsConfig",
    "QueueConfig", "RetryConfig", "ServerConfig", "choose_default_port", "config_from_dict",
    "config_from_toml", "embedded_default", "load_config",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
CATCH_ALL = "*"
_N = TypeVar("_N", int, float)


class InvalidConfig(ConfigError):
    """Every problem found in one configuration; the message is one "path: problem" a line."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("", "\n".join(f"{path}: {msg}" if path else msg
                                       for path, msg in problems))
        self.path = problems[0][0] if problems else ""
        self.problems = problems


@dataclass(frozen=True, slots=True, kw_only=True)
class Listen:
    """An address to listen on; ``port`` 0 lets the OS choose (tests)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class OriginPortsConfig:
    """Source ports for outbound LPD; ``low``/``high`` None = ephemeral ("any")."""

    low: int | None
    high: int | None
    reuse_addr: bool
    linger: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConfig:
    """Backoff bounds in seconds; after ``give_up_after`` a job is held, never deleted."""

    initial: float
    max: float
    give_up_after: float


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueConfig:
    """One configured queue ("*" is the catch-all) and where its jobs go, in failover order."""

    name: str
    aliases: tuple[str, ...]
    destinations: tuple[Destination, ...]
    concurrency: int
    failover_after: int
    retry: RetryConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """The inbound side: listeners, spool, limits and the source ACL."""

    listen: tuple[Listen, ...]
    spool_dir: Path
    max_connections: int
    max_connections_per_host: int
    idle_timeout: float
    max_job_size: int
    max_control_size: int
    min_free_disk: int
    fsync: bool
    allow: tuple[Network, ...]
    require_reserved_port: bool
    queue_names: str
    graceful_timeout: float


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    """Where ``/metrics`` and ``/healthz`` are served; None = disabled."""

    listen: Listen | None


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    format: str  # "json" | "text"
    level: str   # "debug" | "info" | "warning" | "error"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated configuration; ``source`` is the file or "<embedded default>"."""

    server: ServerConfig
    metrics: MetricsConfig
    log: LogConfig
    origin_ports: OriginPortsConfig
    retry: RetryConfig
    queues: Mapping[str, QueueConfig]
    source: str


# ---- converters: raw TOML value -> typed value, or ValueError(expectation) ----

class _Nested(Exception):
    """Problems inside a list, as (path suffix such as "[2]", message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(problems)
        self.problems = problems


_TOML_TYPES = {bool: "boolean", int: "integer", float: "float", str: "string",
               list: "array", dict: "table"}


def _show(value: object) -> str:
    kind = _TOML_TYPES.get(type(value), type(value).__name__)
    shown = json.dumps(value) if kind in ("string", "integer", "float") else repr(value)
    # Bounded: a problem line quotes the value, and the value may be huge.
    return f"{kind} {shown if len(shown) <= 60 else shown[:57] + '...'}"


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected {what}, got {_show(value)}")
    return value


def _duration(value: object) -> float:
    return parse_duration(_string(value, 'a duration string such as "30s"'))


def _size(value: object) -> int:
    # A bare integer of bytes is unambiguous, so TOML integers are accepted too.
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    return parse_size(_string(value, 'a size string such as "4GiB"'))


def _above_zero(convert: Callable[[object], _N], zero: str) -> Callable[[object], _N]:
    def checked(value: object) -> _N:
        result = convert(value)
        if result <= 0:
            raise ValueError(f"must be more than {zero}, got {_show(value)}")
        return result
    return checked


_positive_duration = _above_zero(_duration, "0s")
_positive_size = _above_zero(_size, "0 bytes")


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"expected a whole number, 1 or more, got {_show(value)}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _enum(*choices: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in choices:
            raise ValueError(f"expected {' or '.join(json.dumps(c) for c in choices)}, "
                             f"got {_show(value)}")
        return str(value)
    return convert


def _fsync(value: object) -> bool:
    return _enum("always", "never")(value) == "always"


def _path(value: object) -> Path:
    text = _string(value, "a directory path")
    if not text or "\0" in text:
        raise ValueError(f"expected a directory path, got {_show(value)}")
    return Path(text)


def _listen(value: object) -> Listen:
    text = _string(value, 'an address such as "0.0.0.0:515" or "[::]:515"')
    try:
        host, port = parse_hostport(text, min_port=0)
    except ValueError as exc:
        raise ValueError(f'expected "host:port" or "[ipv6]:port", got "{text}": {exc}') from None
    return Listen(host=host, port=port)


def _metrics_listen(value: object) -> Listen | None:
    return None if value == "" else _listen(value)


def _network(value: object) -> Network:
    text = _string(value, 'a network such as "10.0.0.0/8"')
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f'expected a network such as "10.0.0.0/8" or an address, '
                         f'got "{text}"') from None


def _port_range(value: object) -> tuple[int | None, int | None]:
    text = _string(value, '"721-731", "512-1023" or "any"')
    if text == "any":
        return None, None
    low, dash, high = text.partition("-")
    if dash and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= 65535:
        return int(low), int(high)
    raise ValueError(f'expected "any" or "LOW-HIGH" within 1..65535 such as "721-731", '
                     f'got "{text}"')


def _queue_name(value: object) -> str:
    # Names travel in RFC 1179 command lines ("02queue LF"; operands split on
    # spaces), so a name with whitespace or control characters can never match.
    text = _string(value, "a queue name")
    if not text or not text.isprintable() or any(ch.isspace() for ch in text):
        raise ValueError(f"a queue name must be non-empty without spaces or control "
                         f"characters, got {_show(value)}")
    return text


def _alias(value: object) -> str:
    name = _queue_name(value)
    if name == CATCH_ALL:
        raise ValueError('"*" is the catch-all queue and cannot be an alias')
    return name


def _list_of(convert: Callable[[object], Any], what: str,
             *, min_items: int = 0, lone: bool = False) -> Callable[[object], tuple[Any, ...]]:
    def convert_list(value: object) -> tuple[Any, ...]:
        if lone and isinstance(value, str):
            value = [value]  # a single string is unambiguous; take it as a one-item list
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected an array of {what}, got {_show(value)}")
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


def _destination(value: object) -> Destination:
    return parse_destination(_string(value, "a destination URI string"))


def _table(value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a table, got {_show(value)}")
    return dict(value)


# ---- the key tables (SPEC §3.2); defaults are raw TOML values ----

class _Required:
    def __init__(self, expectation: str) -> None:
        self.expectation = expectation


_Schema = dict[str, tuple[Callable[[object], Any], object]]

_SERVER: _Schema = {
    "listen": (_list_of(_listen, '"host:port" addresses', min_items=1, lone=True),
               ["0.0.0.0:515"]),
    "spool_dir": (_path, "/var/spool/lpd-relay"),
    "max_connections": (_count, 10000),
    "max_connections_per_host": (_count, 200),
    "idle_timeout": (_positive_duration, "60s"),
    "max_job_size": (_positive_size, "4GiB"),
    "max_control_size": (_positive_size, "64KiB"),   # lpd-relay extension
    "min_free_disk": (_size, "512MiB"),
    "fsync": (_fsync, "always"),
    "allow": (_list_of(_network, "networks"), []),
    "require_reserved_port": (_bool, False),
    "queue_names": (_enum("case-insensitive", "exact"), "case-insensitive"),
    "graceful_timeout": (_duration, "10s"),           # lpd-relay extension
}
_METRICS: _Schema = {"listen": (_metrics_listen, "127.0.0.1:9515")}
_LOG: _Schema = {
    "format": (_enum("json", "text"), "json"),
    "level": (_enum("debug", "info", "warning", "error"), "info"),
}
_ORIGIN_PORTS: _Schema = {
    "range": (_port_range, "721-731"),
    "reuse_addr": (_bool, True),
    "linger": (_duration, "5s"),
}
_RETRY: _Schema = {
    "initial": (_positive_duration, "1s"),
    "max": (_positive_duration, "5m"),
    "give_up_after": (_duration, "24h"),
}
_QUEUE: _Schema = {
    "aliases": (_list_of(_alias, "queue names"), []),
    "destinations": (_list_of(_destination, "destination URIs", min_items=1),
                     _Required('expected an array of destination URIs such as '
                               '["lpd://host/queue"]')),
    "concurrency": (_count, 1),
    "failover_after": (_count, 3),
    "retry": (_table, {}),  # per-queue overrides of [retry], read with _RETRY below
}
_SECTIONS: dict[str, _Schema] = {
    "server": _SERVER, "metrics": _METRICS, "log": _LOG,
    "origin_ports": _ORIGIN_PORTS, "retry": _RETRY, "queues": {},
}


# ---- the loader ----

def _key_path(parent: str, key: str) -> str:
    # TOML spelling, so the path can be searched for in the file: queues."*".
    shown = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
    return f"{parent}.{shown}" if parent else shown


def _unknown(key: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(known)}"
    return f"unknown key ({hint})"


def _section(raw: object, path: str, schema: _Schema, problems: list[tuple[str, str]],
             inherited: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Convert one table by its schema; problems are appended, good values returned."""
    if not isinstance(raw, Mapping):
        problems.append((path, f"expected a table, got {_show(raw)}"))
        return {}
    problems.extend((_key_path(path, k), _unknown(k, schema)) for k in raw if k not in schema)
    values: dict[str, Any] = {}
    for key, (convert, default) in schema.items():
        key_path = _key_path(path, key)
        if key not in raw and inherited is not None and key in inherited:
            values[key] = inherited[key]
        elif key not in raw and isinstance(default, _Required):
            problems.append((key_path, f"missing; {default.expectation}"))
        else:
            try:
                values[key] = convert(raw.get(key, default))
            except _Nested as nested:
                problems.extend((key_path + suffix, msg) for suffix, msg in nested.problems)
            except ValueError as exc:
                problems.append((key_path, str(exc)))
    return values


def _queues(raw: object, retry: Mapping[str, Any], problems: list[tuple[str, str]]
            ) -> tuple[dict[str, QueueConfig], dict[str, tuple[str, ...]]]:
    """Valid queues, and every queue's aliases (valid or not) for the uniqueness check."""
    if not isinstance(raw, Mapping):
        problems.append(("queues", f"expected a table of queues, got {_show(raw)}"))
        return {}, {}
    queues: dict[str, QueueConfig] = {}
    names: dict[str, tuple[str, ...]] = {}
    for name, body in raw.items():
        path = _key_path("queues", name)
        try:
            _queue_name(name)
        except ValueError as exc:
            problems.append((path, str(exc)))
        values = _section(body, path, _QUEUE, problems)
        names[name] = values.get("aliases", ())
        if name == CATCH_ALL and names[name]:
            problems.append((f"{path}.aliases", 'the catch-all queue "*" cannot have aliases'))
        overrides = _section(values.pop("retry", {}), f"{path}.retry", _RETRY, problems, retry)
        if len(values) == len(_QUEUE) - 1 and len(overrides) == len(_RETRY):
            queues[name] = QueueConfig(name=name, retry=RetryConfig(**overrides), **values)
    return queues, names


def _check_unique(names: Mapping[str, tuple[str, ...]], case_insensitive: bool,
                  problems: list[tuple[str, str]]) -> None:
    """Names and aliases must be unique across queues (case-folded when matching is)."""
    owner: dict[str, str] = {}
    for queue, aliases in names.items():
        base = _key_path("queues", queue)
        spots = [(queue, base)] + [(a, f"{base}.aliases[{i}]") for i, a in enumerate(aliases)]
        for name, path in spots:
            other = owner.setdefault(name.casefold() if case_insensitive else name, queue)
            if other != queue:  # a name repeated within its own queue is harmless
                note = " (queue names are case-insensitive)" if case_insensitive else ""
                problems.append((path, f"{name!r} is already used by queue {other!r}{note}"))


def config_from_dict(data: Mapping[str, object], source: str,
                     *, base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Validate parsed TOML data; raise ``InvalidConfig`` listing every problem.

    A relative ``spool_dir`` is taken relative to ``base_dir`` (the config
    file's folder for ``load_config``; the current directory when None).
    """
    problems: list[tuple[str, str]] = []
    problems.extend((_key_path("", k), _unknown(k, _SECTIONS)) for k in data if k not in _SECTIONS)
    sections = {name: _section(data.get(name, {}), name, schema, problems)
                for name, schema in _SECTIONS.items() if name != "queues"}
    queues, names = _queues(data.get("queues", {}), sections["retry"], problems)
    _check_unique(names, sections["server"].get("queue_names") != "exact", problems)
    if problems:
        raise InvalidConfig(problems)
    server = dict(sections["server"])
    server["spool_dir"] = Path(base_dir or Path.cwd()).joinpath(server["spool_dir"]).absolute()
    low, high = sections["origin_ports"].pop("range")
    return Config(
        server=ServerConfig(**server),
        metrics=MetricsConfig(**sections["metrics"]),
        log=LogConfig(**sections["log"]),
        origin_ports=OriginPortsConfig(low=low, high=high, **sections["origin_ports"]),
        retry=RetryConfig(**sections["retry"]),
        queues=MappingProxyType(queues),
        source=source,
    )


def config_from_toml(text: str, source: str = "<string>",
                     *, base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Parse and validate TOML text; a syntax error is an ``InvalidConfig`` with its line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidConfig([(source, f"TOML syntax error: {exc}")]) from None
    return config_from_dict(data, source, base_dir=base_dir)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a configuration file; raise ``InvalidConfig`` on any problem."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidConfig([(source, f"cannot read the file: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise InvalidConfig([(source, f"not UTF-8 text: {exc}")]) from None
    return config_from_toml(text, source, base_dir=Path(source).absolute().parent)


def embedded_default(*, port: int) -> Config:
    """The configuration ``serve`` uses without ``-c`` (SPEC §3.1).

    Any queue name is accepted (catch-all "*") and delivered into the hot
    folder ./lpd-relay-out/<queue>/; the spool is ./lpd-relay-spool.  Both
    are resolved against the current directory now, so a later chdir cannot
    move them.  Logs are text: whoever runs it without a config is most
    likely reading a terminal, not feeding a log pipeline.
    """
    out_dir = quote(str(Path("lpd-relay-out").absolute()), safe="/")
    data: dict[str, object] = {
        "server": {"listen": [f"0.0.0.0:{port}"],
                   "spool_dir": str(Path("lpd-relay-spool").absolute())},
        "metrics": {"listen": "127.0.0.1:9515"},
        "log": {"format": "text", "level": "info"},
        "queues": {CATCH_ALL: {"destinations": [f"dir://{out_dir}"]}},
    }
    return config_from_dict(data, "<embedded default>")


def choose_default_port() -> int:
    """515 if this process may bind it now (root or CAP_NET_BIND_SERVICE, port free), else 5515."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # The server sets SO_REUSEADDR too, so old TIME_WAIT sockets on 515
        # must not make us fall back when the real bind would succeed.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", 515))
        except OSError:
            return 5515
    return 515
