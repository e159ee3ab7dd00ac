"""The configuration's records: frozen, keyword-only values, one per section (SPEC §3).

What the rest of the relay reads; ``relay.config`` fills them from a file
(and re-exports them: import them from there), ``relay.configsections`` holds
the key tables and checks behind each.  The ``[spool]`` record is
``relay.spoolpgconfig.SpoolConfig``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from relay.configschema import Network
from relay.spoolpgconfig import SpoolConfig
from relay.uri import Destination, format_hostport


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
