"""``[spool]``: which backend keeps the jobs, and the PostgreSQL backend's settings.

SPEC §10.  ``backend = "local"`` (the default) is the file spool under
``server.spool_dir``; ``"postgresql"`` shares one database between any number
of relays (``relay.spoolpg``).  The key table and its ranges live here, next
to the record they fill, and ``relay.configsections`` adds them as one more section.

The database password never enters the configuration: a ``dsn`` that carries
one (``user:secret@`` or ``password=``) is refused, so it cannot reach a log,
``check-config`` output, a metric or an lpq answer.  libpq's own means take it
instead: ``passfile=`` in the dsn or ``PGPASSFILE`` in the environment.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from relay.configschema import Bounds, Range, Schema, one_of, to_count, to_duration, to_size
from relay.configschema import to_string as _to_string

__all__ = ["SPOOL_BOUNDS", "SPOOL_SCHEMA", "SpoolConfig", "check_spool", "redact_dsn"]

BACKENDS = ("local", "postgresql")


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolConfig:
    """Where jobs are kept; the PostgreSQL keys matter only for that backend."""

    backend: str = "local"        # "local" | "postgresql"
    dsn: str = ""                 # libpq URI or key=value string, never with a password
    lease_time: float = 30.0      # a node's claim on a queue survives this long unrenewed
    node: str = ""                # this relay's name in the cluster; "" = host:pid
    pool_size: int = 8            # database sessions (and worker threads) of this relay
    chunk_size: int = 1 << 20     # bytes per stored body row
    db_timeout: float = 5.0       # connect / statement / pool wait bound: then 0x02

    def node_name(self) -> str:
        """The configured node name, or ``host:pid`` (unique per running relay)."""
        return self.node or f"{socket.gethostname()}:{os.getpid()}"


def _dsn(value: object) -> str:
    text = _to_string(value, 'a libpq connection string such as '
                             '"postgresql://relay@db.example.org:5432/lpdrelay"')
    if not text:
        return text
    try:
        from psycopg.conninfo import conninfo_to_dict
        params = conninfo_to_dict(text)
    except ImportError as exc:   # pragma: no cover - psycopg is a dependency
        raise ValueError("the postgresql backend needs psycopg (pip install psycopg)") from exc
    except Exception:
        # libpq's message would quote the string back, password included.
        raise ValueError("expected a libpq connection string (URI or key=value), "
                         "which this is not") from None
    if params.get("password"):
        raise ValueError("a password must not be in the configuration: give it with "
                         "passfile= in the dsn or PGPASSFILE (libpq's password file)")
    return text


def _node(value: object) -> str:
    text = _to_string(value, "a node name")
    if len(text) > 200 or any(not c.isprintable() for c in text):
        raise ValueError("expected a printable node name of at most 200 characters")
    return text


SPOOL_SCHEMA: Schema = {
    "backend": (one_of(*BACKENDS), "local"),
    "dsn": (_dsn, ""),
    "lease_time": (to_duration, "30s"),
    "node": (_node, ""),
    "pool_size": (to_count, 8),
    "chunk_size": (to_size, "1MiB"),
    "db_timeout": (to_duration, "5s"),
}
SPOOL_BOUNDS: Bounds = {
    "lease_time": Range(1, 3600, "duration"),
    "pool_size": Range(2, 100),
    "chunk_size": Range(4096, 64 << 20, "size"),
    "db_timeout": Range(0.1, 300, "duration"),
}


def check_spool(values: dict[str, Any], problems: list[tuple[str, str]]) -> SpoolConfig:
    """The ``[spool]`` record from its converted keys; a postgresql backend needs a dsn."""
    dsn_refused = any(path == "spool.dsn" for path, _ in problems)
    if values.get("backend") == "postgresql" and not values.get("dsn") and not dsn_refused:
        problems.append(("spool.dsn", 'missing; backend = "postgresql" needs a dsn such as '
                                      '"postgresql://relay@db.example.org/lpdrelay"'))
    return SpoolConfig(**values)


def redact_dsn(dsn: str) -> str:
    """``dsn`` safe to show: host, port, database and user only (never a secret)."""
    try:
        from psycopg.conninfo import conninfo_to_dict
        params = conninfo_to_dict(dsn)
    except Exception:
        return "<unparsable dsn>"
    host = str(params.get("host", "") or "local socket")
    port = f":{params['port']}" if params.get("port") else ""
    user = f"{params['user']}@" if params.get("user") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname', '')}"
