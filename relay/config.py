"""Configuration: one TOML file read into frozen records, validated before anything starts.

SPEC §3.  Each section is a table mapping key -> (converter, default), so the
loader is data, not a chain of ifs: unknown keys are found by set difference,
defaults go through the same converter as user values (a default can never be
of the wrong type), and a converter's ``ValueError`` becomes one
``(key path, expectation)`` problem.  Every problem in the file is collected
and raised together as ``InvalidConfig``, because an admin fixing a config
over SSH should not have to run ``check-config`` once per typo.

This module holds the records, the key tables (each next to the record it
fills, so a new key is one edit here) and the entry points; the converters
and the table walker live in ``relay.configschema``, which knows no key.

Entry points: ``load_config`` (a file), ``config_from_toml`` (text),
``config_from_dict`` (already-parsed data) and ``embedded_default`` (SPEC
§3.1, used when ``serve`` gets no ``-c``).  ``docs/configuration.md`` lists
every key.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

from relay.configschema import (
    CATCH_ALL,
    UNSET,
    Bounds,
    Network,
    Range,
    Required,
    Schema,
    check_host,
    key_path,
    list_of,
    one_of,
    section,
    show,
    to_alias,
    to_bool,
    to_count,
    to_destination,
    to_duration,
    to_fsync,
    to_network,
    to_path,
    to_port_range,
    to_positive_duration,
    to_positive_size,
    to_queue_name,
    to_size,
    to_string,
    to_table,
    to_workers,
    unknown_key,
)
from relay.errors import ConfigError
from relay.spoolpgconfig import SPOOL_BOUNDS, SPOOL_SCHEMA, SpoolConfig, check_spool
from relay.uri import Destination, format_hostport, parse_hostport

__all__ = [
    "CATCH_ALL", "AuditConfig", "Config", "InvalidConfig", "Listen", "LogConfig",
    "MetricsConfig", "Network", "OriginPortsConfig", "PrivacyConfig", "QueueConfig",
    "RetentionConfig", "RetryConfig", "ServerConfig", "TlsConfig",
    "choose_default_port", "config_from_dict", "config_from_toml", "embedded_default",
    "load_config",
]


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
        return format_hostport(self.host, self.port)


@dataclass(frozen=True, slots=True, kw_only=True)
class OriginPortsConfig:
    """Source ports for outbound LPD; ``low``/``high`` None = ephemeral ("none").

    ``range_text`` is the range as written (``"any"``, ``"721-731"``), so
    ``check-config`` can point at a word whose meaning changed."""

    low: int | None
    high: int | None
    reuse_addr: bool
    linger: float
    range_text: str = "721-731"


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConfig:
    """Backoff bounds in seconds; after ``give_up_after`` a job is held, never deleted."""

    initial: float
    max: float
    give_up_after: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionConfig:
    """How long delivered jobs stay in the spool (``relay.retention``); None = no limit set.

    A queue keeps delivered jobs when at least one limit is set and none is 0;
    a kept job expires once either limit passes (docs/spool.md, "Retention").
    """

    keep: float | None = None          # seconds after delivery
    keep_jobs: int | None = None       # newest delivered jobs kept per queue

    @property
    def enabled(self) -> bool:
        limits = (self.keep, self.keep_jobs)
        return any(v is not None for v in limits) and all(v != 0 for v in limits)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyConfig:
    """``[privacy]``: how J/N/T values leave the job (``relay.privacy``, docs/privacy.md)."""

    job_names: str = "keep"            # "keep" | "hash" | "drop"
    strip_downstream: bool = False     # rewrite J/N/T in control files sent downstream


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueConfig:
    """One configured queue ("*" is the catch-all) and where its jobs go, in failover order."""

    name: str
    aliases: tuple[str, ...]
    destinations: tuple[Destination, ...]
    concurrency: int
    failover_after: int
    failback_after: float         # seconds between trials of the first destination; 0 = never
    retry: RetryConfig
    retention: RetentionConfig = RetentionConfig()


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
    admin_allow: tuple[Network, ...]
    command_timeout: float
    min_transfer_rate: int
    max_catch_all_queues: int
    listen_tls: tuple[Listen, ...] = ()
    tls: TlsConfig | None = None           # the [tls] section when listen_tls is set
    proxy_protocol: bool = False           # SPEC §9: PROXY headers from proxy_trusted
    proxy_trusted: tuple[Network, ...] = ()
    segment_threshold: int = 64 * 1024     # jobs up to this size are segment records
    workers: int = 1                       # intake processes; a file's default: "auto"


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    """``[tls]``: the listeners' certificate, the client CA, queues per peer (SPEC §9)."""

    cert: Path
    key: Path
    client_ca: Path | None                 # None: no client certificate asked for
    peers: Mapping[str, frozenset[str]]    # certificate name -> queues ("*" = any)


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    """Where ``/metrics`` and ``/healthz`` are served; None = disabled."""

    listen: Listen | None


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    format: str  # "json" | "text"
    level: str   # "debug" | "info" | "warning" | "error"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditConfig:
    """``[audit]`` (SPEC §11, docs/audit.md): the log file, its rotation, syslog shipping."""

    path: Path                   # default <spool_dir>/audit/audit.log
    rotate_size: int
    rotate_keep: int
    syslog: str                  # "" | "tcp://host:port" | "tls://host:port"
    syslog_ca: Path | None
    syslog_cert: Path | None
    syslog_key: Path | None


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
    retention: RetentionConfig = RetentionConfig()   # the [retention] defaults
    privacy: PrivacyConfig = PrivacyConfig()
    audit: AuditConfig | None = None     # None: no [audit] table, no audit log
    spool: SpoolConfig = field(default_factory=SpoolConfig)   # [spool] (SPEC §10)


# ---- the key tables (SPEC §3.2); defaults are raw TOML values ----

def _listen(value: object) -> Listen:
    text = to_string(value, 'an address such as "0.0.0.0:515" or "[::]:515"')
    try:
        host, port = parse_hostport(text, min_port=0)
    except ValueError as exc:
        raise ValueError(f'expected "host:port" or "[ipv6]:port", got "{text}": {exc}') from None
    check_host(host)
    return Listen(host=host, port=port)


def _file(value: object) -> str:
    return to_string(value, "a file path")


def _metrics_listen(value: object) -> Listen | None:
    return None if value == "" else _listen(value)


_SERVER: Schema = {
    "listen": (list_of(_listen, '"host:port" addresses', min_items=1, lone=True),
               ["0.0.0.0:515"]),
    "spool_dir": (to_path, "/var/spool/lpd-relay"),
    "max_connections": (to_count, 10000),
    "max_connections_per_host": (to_count, 200),
    "idle_timeout": (to_positive_duration, "60s"),
    "max_job_size": (to_positive_size, "4GiB"),
    "max_control_size": (to_positive_size, "64KiB"),   # lpd-relay extension
    "min_free_disk": (to_size, "512MiB"),
    "segment_threshold": (to_size, "64KiB"),            # docs/spool.md, "Segment files"
    "fsync": (to_fsync, "always"),
    "allow": (list_of(to_network, "networks"), []),
    "require_reserved_port": (to_bool, False),
    "queue_names": (one_of("case-insensitive", "exact"), "case-insensitive"),
    "graceful_timeout": (to_duration, "10s"),           # lpd-relay extension
    "admin_allow": (list_of(to_network, "networks"), ["127.0.0.0/8", "::1"]),  # SPEC §12
    "command_timeout": (to_positive_duration, "30s"),   # lpd-relay extension
    "min_transfer_rate": (to_size, "1KiB"),             # per second; lpd-relay extension
    "max_catch_all_queues": (to_count, 1000),           # lpd-relay extension
    "listen_tls": (list_of(_listen, '"host:port" addresses', lone=True), []),  # SPEC §9
    "proxy_protocol": (to_bool, False),                                         # SPEC §9
    "proxy_trusted": (list_of(to_network, "networks"), []),                     # SPEC §9
    "workers": (to_workers, "auto"),   # SPEC §12: the number of cores
}
_TLS: Schema = {
    "cert": (_file, ""),
    "key": (_file, ""),
    "client_ca": (_file, ""),
    "peers": (to_table, {}),
}
def _syslog_uri(value: object) -> str:
    text = to_string(value, '"tcp://host:port" or "tls://host:port"')
    if text and not re.fullmatch(r"(tcp|tls)://[^/?#]+:\d{1,5}", text):
        raise ValueError(f'expected "tcp://host:port" or "tls://host:port", got "{text}"')
    return text


_AUDIT: Schema = {   # SPEC §11; the table's presence turns the audit log on
    "path": (_file, ""),
    "rotate_size": (to_positive_size, "64MiB"),
    "rotate_keep": (to_count, 10),
    "syslog": (_syslog_uri, ""),
    "syslog_ca": (_file, ""),
    "syslog_cert": (_file, ""),
    "syslog_key": (_file, ""),
}
_METRICS: Schema = {"listen": (_metrics_listen, "127.0.0.1:9515")}
_LOG: Schema = {
    "format": (one_of("json", "text"), "json"),
    "level": (one_of("debug", "info", "warning", "error"), "info"),
}
_ORIGIN_PORTS: Schema = {
    "range": (to_port_range, "721-731"),
    "reuse_addr": (to_bool, True),
    "linger": (to_duration, "5s"),
}
_RETRY: Schema = {
    "initial": (to_positive_duration, "1s"),
    "max": (to_positive_duration, "5m"),
    "give_up_after": (to_duration, "24h"),
}
# [retention] keys are unset unless given: a queue without limits keeps nothing.
_KEEP_JOBS = Range(0, 1_000_000)


def _keep(value: object) -> float | None:
    return None if value is UNSET else to_duration(value)


def _keep_jobs(value: object) -> int | None:
    if value is UNSET:
        return None
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a whole number, 0 or more, got {show(value)}")
    count: int = value
    _KEEP_JOBS.check(count)   # here, not in _BOUNDS: an unset value has no range
    return count


_RETENTION: Schema = {"keep": (_keep, UNSET), "keep_jobs": (_keep_jobs, UNSET)}
_PRIVACY: Schema = {
    "job_names": (one_of("keep", "hash", "drop"), "keep"),
    "strip_downstream": (to_bool, False),
}
_QUEUE: Schema = {
    "aliases": (list_of(to_alias, "queue names"), []),
    "destinations": (list_of(to_destination, "destination URIs", min_items=1),
                     Required('expected an array of destination URIs such as '
                              '["lpd://host/queue"]')),
    "concurrency": (to_count, 1),
    "failover_after": (to_count, 3),
    "failback_after": (to_duration, "30s"),   # lpd-relay extension (docs/delivery.md)
    "retry": (to_table, {}),  # per-queue overrides of [retry], read with _RETRY below
    "retention": (to_table, {}),  # per-queue overrides of [retention] (_RETENTION)
}
# The range of each bounded key (after conversion: seconds, bytes, counts).
# Every converter has a ceiling of its own (relay.configschema.MAX_*); these
# are tighter where a value beyond would be a mistake or break something.
_DAY = 86400.0
_BOUNDS: dict[str, Bounds] = {
    "server": {
        "max_connections": Range(1, 1_000_000),
        "max_connections_per_host": Range(1, 1_000_000),
        "idle_timeout": Range(0.001, _DAY, "duration"),
        "max_job_size": Range(1, 2**44, "size"),          # 16 TiB, ext4's file limit
        "max_control_size": Range(1, 16 * 2**20, "size"),
        "segment_threshold": Range(0, 2**20, "size"),     # a record fits in a 4 MiB segment
        "graceful_timeout": Range(0, 3600, "duration"),
        "workers": Range(1, 256),
    },
    "origin_ports": {"linger": Range(0, 3600, "duration")},
    "retry": {
        "initial": Range(0.001, _DAY, "duration"),
        "max": Range(0.001, 7 * _DAY, "duration"),
        "give_up_after": Range(0, 365 * _DAY, "duration"),
    },
    "queue": {"concurrency": Range(1, 10_000), "failover_after": Range(1, 1000)},
    "audit": {"rotate_size": Range(4096, 2**40, "size"), "rotate_keep": Range(1, 10_000)},
    "spool": SPOOL_BOUNDS,
}

_SECTIONS: dict[str, Schema] = {
    "server": _SERVER, "metrics": _METRICS, "log": _LOG,
    "origin_ports": _ORIGIN_PORTS, "retry": _RETRY, "tls": _TLS, "queues": {},
    "retention": _RETENTION, "privacy": _PRIVACY, "audit": _AUDIT, "spool": SPOOL_SCHEMA,
}


# ---- the loader ----

def _queues(raw: object, defaults: Mapping[str, Mapping[str, Any]],
            problems: list[tuple[str, str]]
            ) -> tuple[dict[str, QueueConfig], dict[str, tuple[str, ...]]]:
    """Valid queues, and every queue's aliases (valid or not) for the uniqueness check."""
    if not isinstance(raw, Mapping):
        problems.append(("queues", f"expected a table of queues, got {show(raw)}"))
        return {}, {}
    queues: dict[str, QueueConfig] = {}
    names: dict[str, tuple[str, ...]] = {}
    for name, body in raw.items():
        path = key_path("queues", name)
        try:
            to_queue_name(name)
        except ValueError as exc:
            problems.append((path, str(exc)))
        values = section(body, path, _QUEUE, problems, bounds=_BOUNDS["queue"])
        names[name] = values.get("aliases", ())
        if name == CATCH_ALL and names[name]:
            problems.append((f"{path}.aliases", 'the catch-all queue "*" cannot have aliases'))
        overrides = section(values.pop("retry", {}), f"{path}.retry", _RETRY, problems,
                            defaults["retry"], bounds=_BOUNDS["retry"])
        kept = section(values.pop("retention", {}), f"{path}.retention", _RETENTION, problems,
                       defaults["retention"])
        if (len(values) == len(_QUEUE) - 2 and len(overrides) == len(_RETRY)
                and len(kept) == len(_RETENTION)):
            queues[name] = QueueConfig(name=name, retry=RetryConfig(**overrides),
                                       retention=RetentionConfig(**kept), **values)
    return queues, names


def _check_unique(names: Mapping[str, tuple[str, ...]], case_insensitive: bool,
                  problems: list[tuple[str, str]]) -> None:
    """Names and aliases must be unique across queues (case-folded when matching is)."""
    owner: dict[str, str] = {}
    for queue, aliases in names.items():
        base = key_path("queues", queue)
        spots = [(queue, base)] + [(a, f"{base}.aliases[{i}]") for i, a in enumerate(aliases)]
        for name, path in spots:
            other = owner.setdefault(name.casefold() if case_insensitive else name, queue)
            if other != queue:  # a name repeated within its own queue is harmless
                note = " (queue names are case-insensitive)" if case_insensitive else ""
                problems.append((path, f"{name!r} is already used by queue {other!r}{note}"))


def _tls(values: Mapping[str, Any], wanted: bool, base: Path,
         problems: list[tuple[str, str]]) -> TlsConfig | None:
    """The [tls] record; cert and key are needed once ``server.listen_tls`` is set."""
    if not wanted:
        return None
    for key in ("cert", "key"):
        if values.get(key) == "":
            problems.append((f"tls.{key}", "missing; server.listen_tls needs a PEM file"))
    peers: dict[str, frozenset[str]] = {}
    for name, queues in values.get("peers", {}).items():
        if not (isinstance(queues, list) and queues and all(isinstance(q, str) for q in queues)):
            problems.append((key_path("tls.peers", name),
                             f'expected an array of queue names or ["*"], got {show(queues)}'))
            continue
        peers[name] = frozenset(q.casefold() for q in queues)
    if peers and not values.get("client_ca"):
        problems.append(("tls.peers", "needs tls.client_ca: peers are named by their "
                                      "client certificates"))
    ca = values.get("client_ca", "")
    return TlsConfig(cert=base / values.get("cert", ""), key=base / values.get("key", ""),
                     client_ca=base / ca if ca else None, peers=MappingProxyType(peers))


def _audit(values: Mapping[str, Any], base: Path, spool_dir: Path) -> AuditConfig:
    def path(key: str) -> Path | None:
        return base / values[key] if values[key] else None
    return AuditConfig(path=path("path") or spool_dir / "audit" / "audit.log",
                       rotate_size=values["rotate_size"], rotate_keep=values["rotate_keep"],
                       syslog=values["syslog"], syslog_ca=path("syslog_ca"),
                       syslog_cert=path("syslog_cert"), syslog_key=path("syslog_key"))


def config_from_dict(data: Mapping[str, object], source: str,
                     *, base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Validate parsed TOML data; raise ``InvalidConfig`` listing every problem.

    A relative ``spool_dir`` is taken relative to ``base_dir`` (the config
    file's folder for ``load_config``; the current directory when None).
    """
    problems: list[tuple[str, str]] = []
    problems.extend((key_path("", k), unknown_key(k, _SECTIONS))
                    for k in data if k not in _SECTIONS)
    sections = {name: section(data.get(name, {}), name, schema, problems,
                              bounds=_BOUNDS.get(name))
                for name, schema in _SECTIONS.items() if name != "queues"}
    queues, names = _queues(data.get("queues", {}), sections, problems)
    _check_unique(names, sections["server"].get("queue_names") != "exact", problems)
    base = Path(base_dir or Path.cwd())
    tls = _tls(sections["tls"], bool(sections["server"].get("listen_tls")), base, problems)
    if sections["server"].get("proxy_protocol") and not sections["server"].get("proxy_trusted"):
        problems.append(("server.proxy_trusted", "missing; proxy_protocol needs the "
                                                 "balancers' networks"))
    spool = check_spool(sections["spool"], problems)
    if problems:
        raise InvalidConfig(problems)
    server = dict(sections["server"], tls=tls)
    server["spool_dir"] = base.joinpath(server["spool_dir"]).absolute()
    low, high = sections["origin_ports"].pop("range")
    raw_ports = data.get("origin_ports", {})
    range_text = str(raw_ports.get("range", "721-731")) if isinstance(raw_ports, dict) \
        else "721-731"
    return Config(
        server=ServerConfig(**server),
        metrics=MetricsConfig(**sections["metrics"]),
        log=LogConfig(**sections["log"]),
        origin_ports=OriginPortsConfig(low=low, high=high, range_text=range_text,
                                       **sections["origin_ports"]),
        retry=RetryConfig(**sections["retry"]),
        queues=MappingProxyType(queues),
        source=source,
        retention=RetentionConfig(**sections["retention"]),
        privacy=PrivacyConfig(**sections["privacy"]),
        audit=_audit(sections["audit"], base, server["spool_dir"]) if "audit" in data else None,
        spool=spool,
    )


def config_from_toml(text: str, source: str = "<string>",
                     *, base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Parse and validate TOML text; a syntax error is an ``InvalidConfig`` with its line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidConfig([(source, f"TOML syntax error: {exc}")]) from None
    except RecursionError:
        # tomllib recurses per nesting level; a file nested this deep is no config.
        raise InvalidConfig([(source, "TOML error: arrays or tables nested too deeply")]
                            ) from None
    except ValueError:  # int()'s guard against integers of 4300+ digits
        raise InvalidConfig([(source, f"TOML error: {_long_number(text)} has more than "
                                      "4300 digits")]) from None
    return config_from_dict(data, source, base_dir=base_dir)


def _long_number(text: str) -> str:
    """Where the first over-long run of digits is, as "line L, column C"."""
    match = re.search(r"[0-9_]{4300,}", text)
    if match is None:
        return "a number"
    line = text.count("\n", 0, match.start()) + 1
    column = match.start() - (text.rfind("\n", 0, match.start()) + 1) + 1
    return f"number at line {line}, column {column}"


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
