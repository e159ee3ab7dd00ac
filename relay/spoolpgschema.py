"""The PostgreSQL spool's schema: versioned DDL, created and migrated by ``spool init-db``.

One row in ``lpd_schema`` records the version; ``init_db`` applies every
migration above it, each in the same transaction as the version bump, under
an advisory lock so two relays running ``init-db`` at once cannot interleave.
Running it again is a no-op.  The daemon never changes the schema itself: it
checks the version at start and refuses a database that is not initialised
or newer than it knows (docs/spool.md, "PostgreSQL").

Tables:

- ``lpd_jobs``: one row per acknowledged job — the facts of ``JobMeta``, the
  raw control file (``control``, small) and the delivery state, plus the node
  that accepted it.  Ids are fixed-width digit strings, so text order is
  arrival order.
- ``lpd_chunks``: the data files, ``chunk_size`` bytes per ``bytea`` row,
  deleted with their job (``ON DELETE CASCADE``); stored uncompressed
  (``STORAGE EXTERNAL``): print data is mostly compressed already.
- ``lpd_leases``: one row per queue: the node delivering it and until when.
- ``lpd_nodes``: each node's last heartbeat, so the live nodes share the queues.
- ``lpd_node_slot``: a sequence giving each starting relay the 3 digits that
  make its job ids unique in the cluster.
"""

from __future__ import annotations

from typing import Any

from relay.errors import SpoolError

SCHEMA_VERSION = 1
NOTIFY_CHANNEL = "lpd_relay_jobs"
_LOCK_KEY = 0x4C5044  # "LPD": pg_advisory_xact_lock key for migrations

_V1 = (
    "CREATE TABLE IF NOT EXISTS lpd_jobs ("
    " id text PRIMARY KEY, queue text NOT NULL, wire_queue text NOT NULL,"
    " peer text NOT NULL, received double precision NOT NULL,"
    " control_name text NOT NULL, number text NOT NULL, user_name text NOT NULL,"
    " host text NOT NULL, title text NOT NULL, job_name text NOT NULL,"
    " tls_peer text NOT NULL DEFAULT '', control bytea NOT NULL,"
    " control_bytes integer NOT NULL, files jsonb NOT NULL, node text NOT NULL,"
    " state text NOT NULL DEFAULT 'queued', attempts integer NOT NULL DEFAULT 0,"
    " failures integer NOT NULL DEFAULT 0, destination integer NOT NULL DEFAULT 0,"
    " next_attempt double precision NOT NULL DEFAULT 0, last_error text NOT NULL DEFAULT '')",
    "CREATE INDEX IF NOT EXISTS lpd_jobs_queue ON lpd_jobs (queue, id)",
    "CREATE TABLE IF NOT EXISTS lpd_chunks ("
    " job_id text NOT NULL REFERENCES lpd_jobs (id) ON DELETE CASCADE,"
    " file integer NOT NULL, seq integer NOT NULL, data bytea NOT NULL,"
    " PRIMARY KEY (job_id, file, seq))",
    "ALTER TABLE lpd_chunks ALTER COLUMN data SET STORAGE EXTERNAL",
    "CREATE TABLE IF NOT EXISTS lpd_leases ("
    " queue text PRIMARY KEY, node text NOT NULL, expires timestamptz NOT NULL)",
    "CREATE TABLE IF NOT EXISTS lpd_nodes ("
    " node text PRIMARY KEY, seen timestamptz NOT NULL)",
    "CREATE SEQUENCE IF NOT EXISTS lpd_node_slot MAXVALUE 999 CYCLE",
)
# version -> the statements that bring the schema from version-1 to it
MIGRATIONS: dict[int, tuple[str, ...]] = {1: _V1}


def _version(conn: Any) -> int:
    row = conn.execute("SELECT to_regclass('lpd_schema') IS NOT NULL").fetchone()
    if not row[0]:
        return 0
    found = conn.execute("SELECT max(version) FROM lpd_schema").fetchone()
    return int(found[0] or 0)


def init_db(conn: Any) -> tuple[int, int]:
    """Create or migrate the schema on ``conn`` (a psycopg connection); (before, after)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute("CREATE TABLE IF NOT EXISTS lpd_schema (version integer NOT NULL)")
        before = _version(conn)
        if before > SCHEMA_VERSION:
            raise SpoolError(f"database schema version {before} is newer than this "
                             f"lpd-relay's {SCHEMA_VERSION}")
        for version in range(before + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("DELETE FROM lpd_schema")
            conn.execute("INSERT INTO lpd_schema (version) VALUES (%s)", (version,))
    return before, SCHEMA_VERSION


def check_schema(conn: Any) -> None:
    """Raise ``SpoolError`` unless the database holds this relay's schema version."""
    found = _version(conn)
    if found == SCHEMA_VERSION:
        return
    if found == 0:
        raise SpoolError("the database has no lpd-relay schema: run "
                         "`lpd-relay spool init-db -c FILE` first")
    if found < SCHEMA_VERSION:
        raise SpoolError(f"database schema version {found} is older than {SCHEMA_VERSION}: "
                         "run `lpd-relay spool init-db -c FILE` to migrate it")
    raise SpoolError(f"database schema version {found} is newer than this lpd-relay's "
                     f"{SCHEMA_VERSION}")
