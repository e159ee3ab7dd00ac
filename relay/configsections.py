"""The configuration's key tables and the checks of each section (SPEC §3.2).

Each section is a table mapping key -> (converter, default), next to the
converters written for its keys alone (``relay.configschema`` has the
general ones and walks a table); ``BOUNDS`` names each bounded key's range.
The checks that span a section's keys build its record: the queues (names
and aliases unique across them), ``[tls]`` and ``[audit]``.  A new key is a
line in its table here and a field in its record (``relay.configrecords``);
``relay.config`` runs the sections in order, ``relay.manpage`` documents
them from these tables.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from relay.configrecords import (
    AuditConfig,
    Listen,
    QueueConfig,
    RetentionConfig,
    RetryConfig,
    TlsConfig,
)
from relay.configschema import (
    CATCH_ALL,
    UNSET,
    Bounds,
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
)
from relay.spoolpgconfig import SPOOL_BOUNDS, SPOOL_SCHEMA
from relay.uri import parse_hostport

# ---- the key tables; defaults are raw TOML values ----

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


SERVER: Schema = {
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
TLS: Schema = {
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


AUDIT: Schema = {   # SPEC §11; the table's presence turns the audit log on
    "path": (_file, ""),
    "rotate_size": (to_positive_size, "64MiB"),
    "rotate_keep": (to_count, 10),
    "syslog": (_syslog_uri, ""),
    "syslog_ca": (_file, ""),
    "syslog_cert": (_file, ""),
    "syslog_key": (_file, ""),
}
METRICS: Schema = {"listen": (_metrics_listen, "127.0.0.1:9515")}
LOG: Schema = {
    "format": (one_of("json", "text"), "json"),
    "level": (one_of("debug", "info", "warning", "error"), "info"),
}
ORIGIN_PORTS: Schema = {
    "range": (to_port_range, "721-731"),
    "reuse_addr": (to_bool, True),
    "linger": (to_duration, "5s"),
}
RETRY: Schema = {
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
    _KEEP_JOBS.check(count)   # here, not in BOUNDS: an unset value has no range
    return count


RETENTION: Schema = {"keep": (_keep, UNSET), "keep_jobs": (_keep_jobs, UNSET)}
PRIVACY: Schema = {
    "job_names": (one_of("keep", "hash", "drop"), "keep"),
    "strip_downstream": (to_bool, False),
}
QUEUE: Schema = {
    "aliases": (list_of(to_alias, "queue names"), []),
    "destinations": (list_of(to_destination, "destination URIs", min_items=1),
                     Required('expected an array of destination URIs such as '
                              '["lpd://host/queue"]')),
    "concurrency": (to_count, 1),
    "failover_after": (to_count, 3),
    "failback_after": (to_duration, "30s"),   # lpd-relay extension (docs/delivery.md)
    "retry": (to_table, {}),  # per-queue overrides of [retry], read with RETRY below
    "retention": (to_table, {}),  # per-queue overrides of [retention] (RETENTION)
}
# The range of each bounded key (after conversion: seconds, bytes, counts).
# Every converter has a ceiling of its own (relay.configschema.MAX_*); these
# are tighter where a value beyond would be a mistake or break something.
_DAY = 86400.0
BOUNDS: dict[str, Bounds] = {
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

SECTIONS: dict[str, Schema] = {
    "server": SERVER, "metrics": METRICS, "log": LOG,
    "origin_ports": ORIGIN_PORTS, "retry": RETRY, "tls": TLS, "queues": {},
    "retention": RETENTION, "privacy": PRIVACY, "audit": AUDIT, "spool": SPOOL_SCHEMA,
}


# ---- the checks that span a section's keys ----

def read_queues(raw: object, defaults: Mapping[str, Mapping[str, Any]],
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
        values = section(body, path, QUEUE, problems, bounds=BOUNDS["queue"])
        names[name] = values.get("aliases", ())
        if name == CATCH_ALL and names[name]:
            problems.append((f"{path}.aliases", 'the catch-all queue "*" cannot have aliases'))
        overrides = section(values.pop("retry", {}), f"{path}.retry", RETRY, problems,
                            defaults["retry"], bounds=BOUNDS["retry"])
        kept = section(values.pop("retention", {}), f"{path}.retention", RETENTION, problems,
                       defaults["retention"])
        if (len(values) == len(QUEUE) - 2 and len(overrides) == len(RETRY)
                and len(kept) == len(RETENTION)):
            queues[name] = QueueConfig(name=name, retry=RetryConfig(**overrides),
                                       retention=RetentionConfig(**kept), **values)
    return queues, names


def check_unique(names: Mapping[str, tuple[str, ...]], case_insensitive: bool,
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


def read_tls(values: Mapping[str, Any], wanted: bool, base: Path,
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


def read_audit(values: Mapping[str, Any], base: Path, spool_dir: Path) -> AuditConfig:
    def path(key: str) -> Path | None:
        return base / values[key] if values[key] else None
    return AuditConfig(path=path("path") or spool_dir / "audit" / "audit.log",
                       rotate_size=values["rotate_size"], rotate_keep=values["rotate_keep"],
                       syslog=values["syslog"], syslog_ca=path("syslog_ca"),
                       syslog_cert=path("syslog_cert"), syslog_key=path("syslog_key"))
