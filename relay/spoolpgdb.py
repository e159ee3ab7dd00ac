"""The PostgreSQL spool's statements: blocking calls on one psycopg connection.

Everything here runs in a worker thread (``relay.spoolpg`` hands it a pooled
connection through ``trio.to_thread``), never on the event loop, and streams:
a data file goes into ``lpd_chunks`` by binary ``COPY`` in ``chunk_size``
pieces read from the local file, and comes back one row at a time into a
local file, so no job is ever held whole in memory.  Rows become the same
``JobMeta`` records the local spool uses; their ``path``s name this node's
body cache (``<cache>/<id>.d<n>``, ``<cache>/<id>.cf``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from relay.durablefiles import create, unlink_quiet
from relay.spoolformat import FileMeta, JobMeta
from relay.spoolpgschema import NOTIFY_CHANNEL

_FACTS = ("id", "queue", "wire_queue", "peer", "received", "control_name", "number",
          "user_name", "host", "title", "job_name", "tls_peer", "control_bytes", "files",
          "node", "state", "attempts", "failures", "destination", "next_attempt", "last_error")
_SELECT = f"SELECT {', '.join(_FACTS)} FROM lpd_jobs"
LEASES_FREED = ""   # the NOTIFY payload of a lease given back (a job's is its queue)
_STATE = ("state", "attempts", "failures", "destination", "next_attempt", "last_error")


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to insert: its record, raw control file, and data files by number.

    ``data``: a small job's data files, in ``meta.files`` order, when intake
    kept it in memory (``PgSpool.segment_threshold``); ``None``: they are the
    local files ``meta.files`` names, streamed by ``COPY``.
    """

    meta: JobMeta
    control: bytes
    node: str
    data: tuple[bytes, ...] | None = None


def file_number(path: str) -> int:
    """The ``n`` of a cache file ``<id>.d<n>`` (the data file's row key)."""
    return int(path.rsplit(".d", 1)[1])


# Every job's row, the in-memory jobs' chunks and one NOTIFY per queue, in ONE
# statement: each column is one array parameter, so a group of any size is a
# single round trip, parsed and planned once (prepared after a few groups),
# and in autocommit its own transaction: one commit for the group.  Binary
# parameters (``%b``): psycopg's text arrays quote each element with a regular
# expression in Python, 80 us of the relay's CPU per job; binary ones, 8.
_INSERT = (
    "WITH j AS (INSERT INTO lpd_jobs (id, queue, wire_queue, peer, received, control_name,"
    " number, user_name, host, title, job_name, tls_peer, control, control_bytes, files,"
    " node, state, last_error) SELECT * FROM unnest(%b::text[], %b::text[], %b::text[],"
    " %b::text[], %b::float8[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],"
    " %b::text[], %b::text[], %b::bytea[], %b::int[], %b::jsonb[], %b::text[], %b::text[],"
    " %b::text[])), c AS (INSERT INTO lpd_chunks (job_id, file, seq, data)"
    " SELECT * FROM unnest(%b::text[], %b::int[], %b::int[], %b::bytea[]))"
    " SELECT pg_notify(%b, q) FROM unnest(%b::text[]) AS q")


def _insert_args(jobs: Sequence[NewJob], chunk_size: int) -> list[Any]:
    columns: list[list[Any]] = [[] for _ in range(18)]
    chunks: list[list[Any]] = [[], [], [], []]
    for job in jobs:
        m = job.meta
        files = [{"name": f.name, "format": f.format, "bytes": f.bytes,
                  "n": file_number(f.path)} for f in m.files]
        row = (m.id, m.queue, m.wire_queue, m.peer, m.received, m.control_name, m.number,
               m.user, m.host, m.title, m.job_name, m.tls_peer, job.control,
               m.control_bytes, orjson.dumps(files).decode(), job.node, m.state,
               m.last_error)
        for column, value in zip(columns, row, strict=True):
            column.append(value)
        if job.data is None:   # its files: by COPY
            continue
        for f, data in zip(m.files, job.data, strict=True):
            number = file_number(f.path)
            for seq, at in enumerate(range(0, len(data), chunk_size)):
                for column, value in zip(chunks, (m.id, number, seq,
                                                  data[at:at + chunk_size]), strict=True):
                    column.append(value)
    return [*columns, *chunks, NOTIFY_CHANNEL, sorted({j.meta.queue for j in jobs})]


def insert_jobs(conn: Any, jobs: Sequence[NewJob], chunk_size: int) -> None:
    """One commit for the batch: every row and every in-memory chunk in one statement
    (one round trip when no job has files), then the other jobs' files by ``COPY``
    inside the same transaction."""
    args = _insert_args(jobs, chunk_size)
    on_disk = [j.meta for j in jobs if j.data is None and any(f.bytes for f in j.meta.files)]
    if not on_disk:
        conn.execute(_INSERT, args)
        return
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(_INSERT, args)
        _copy_files(cur, on_disk, chunk_size)


def _copy_files(cur: Any, metas: Sequence[JobMeta], chunk_size: int) -> None:
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    with cur.copy("COPY lpd_chunks (job_id, file, seq, data) FROM STDIN (FORMAT BINARY)"
                  ) as copy:
        copy.set_types(["text", "int4", "int4", "bytea"])
        for meta in metas:
            for f in meta.files:
                number = file_number(f.path)
                fd = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    seq = 0
                    while got := os.readv(fd, [view]):
                        copy.write_row((meta.id, number, seq, view[:got]))
                        seq += 1
                finally:
                    os.close(fd)


def row_meta(row: Sequence[Any], cache: str) -> JobMeta:
    """A ``lpd_jobs`` row (``_FACTS`` order) as a ``JobMeta`` with cache paths."""
    d = dict(zip(_FACTS, row, strict=True))
    job_id = d["id"]
    files = tuple(FileMeta(name=f["name"], format=f["format"], bytes=int(f["bytes"]),
                           path=os.path.join(cache, f"{job_id}.d{int(f['n'])}"))
                  for f in d["files"])
    return JobMeta(
        id=job_id, queue=d["queue"], wire_queue=d["wire_queue"], peer=d["peer"],
        received=float(d["received"]), control_name=d["control_name"],
        control_path=os.path.join(cache, f"{job_id}.cf"), number=d["number"],
        user=d["user_name"], host=d["host"], title=d["title"], job_name=d["job_name"],
        files=files, control_bytes=int(d["control_bytes"]), tls_peer=d["tls_peer"],
        state=d["state"], attempts=d["attempts"], failures=d["failures"],
        destination=d["destination"], next_attempt=float(d["next_attempt"]),
        last_error=d["last_error"])


def load_jobs(conn: Any, cache: str, *, queues: Sequence[str] | None = None,
              ids: Sequence[str] | None = None) -> list[tuple[JobMeta, str]]:
    """Jobs (of ``queues`` / with ``ids``, else all) in id order, with their accepting node."""
    where, args = [], []
    if queues is not None:
        where.append("queue = ANY(%s)")
        args.append(list(queues))
    if ids is not None:
        where.append("id = ANY(%s)")
        args.append(list(ids))
    sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
    rows = conn.execute(sql, args).fetchall()
    node_at = _FACTS.index("node")
    return [(row_meta(r, cache), r[node_at]) for r in rows]


def load_changed(conn: Any, cache: str, seen: Mapping[str, tuple[str, str]]
                 ) -> tuple[dict[str, tuple[str, str]], list[JobMeta]]:
    """Every job's (queue, state), and in full only those not as in ``seen``.

    The gauges' recount each tick: a deep spool costs a narrow row per job,
    not a whole ``JobMeta`` each time.
    """
    rows = conn.execute("SELECT id, queue, state FROM lpd_jobs").fetchall()
    now: dict[str, tuple[str, str]] = {r[0]: (r[1], r[2]) for r in rows}
    changed = [i for i, key in now.items() if seen.get(i) != key]
    metas = [m for m, _ in load_jobs(conn, cache, ids=changed)] if changed else []
    for m in metas:
        now[m.id] = (m.queue, m.state)
    return now, metas


def load_window(conn: Any, cache: str, limits: Mapping[str, int]) -> list[JobMeta]:
    """Per queue its first ``limits[queue]`` queued jobs and every held one, in id order.

    What a queue's holder needs each round: the jobs next in line (a deep
    queue is never read whole) and the held ones lpq and ``spool retry`` act on.
    """
    if not limits:
        return []
    queues = sorted(limits)
    facts = ", ".join(f"j.{f}" for f in _FACTS)
    rows = conn.execute(
        f"SELECT {facts} FROM unnest(%s::text[], %s::int[]) AS w(q, n) CROSS JOIN LATERAL"
        f" (SELECT * FROM lpd_jobs WHERE queue = w.q AND state = 'queued' ORDER BY id"
        f" LIMIT w.n) AS j UNION ALL {_SELECT} j WHERE queue = ANY(%s) AND state = 'held'",
        (queues, [limits[q] for q in queues], queues)).fetchall()
    return sorted((row_meta(r, cache) for r in rows), key=lambda m: m.id)


def fetch_bodies(conn: Any, meta: JobMeta) -> None:
    """Write ``meta``'s control file and data files from the database into its cache paths.

    Each file goes to a dot-temp first and is renamed into place complete,
    so a cache file that exists is whole.  ``KeyError`` when the job is gone.
    """
    row = conn.execute("SELECT control FROM lpd_jobs WHERE id = %s", (meta.id,)).fetchone()
    if row is None:
        raise KeyError(meta.id)
    _write_whole(meta.control_path, [bytes(row[0])])
    for f in meta.files:
        if os.path.exists(f.path):
            continue
        with conn.cursor(name=None) as cur:
            cur.execute("SELECT data FROM lpd_chunks WHERE job_id = %s AND file = %s "
                        "ORDER BY seq", (meta.id, file_number(f.path)))
            _write_whole(f.path, (bytes(r[0]) for r in cur))  # row by row, see stream()


def fetch_small_bodies(conn: Any, metas: Sequence[JobMeta], batch: str
                       ) -> dict[str, tuple[int, int]]:
    """``fetch_bodies`` for several small jobs in two queries, into ONE local file.

    Every body of the jobs still there goes into ``batch``, one after the
    other, as the local spool's segments hold small jobs: one file created
    per batch, not two per job (a file's creation costs more than its
    bytes).  Returns each body's path (as ``JobMeta`` names it) -> (offset,
    length) in ``batch``; the caller resolves the paths (``register_locator``).
    """
    by_id = {m.id: m for m in metas}
    controls = dict(conn.execute("SELECT id, control FROM lpd_jobs WHERE id = ANY(%s)",
                                 (sorted(by_id),)).fetchall())
    if not controls:
        return {}
    parts: dict[tuple[str, int], list[bytes]] = {}
    for job_id, number, data in conn.execute(
            "SELECT job_id, file, data FROM lpd_chunks WHERE job_id = ANY(%s)"
            " ORDER BY job_id, file, seq", (sorted(controls),)):
        parts.setdefault((job_id, number), []).append(bytes(data))
    bodies: list[tuple[str, bytes]] = []
    for job_id in sorted(controls):
        bodies.append((by_id[job_id].control_path, bytes(controls[job_id])))
        bodies += [(f.path, b"".join(parts.get((job_id, file_number(f.path)), [])))
                   for f in by_id[job_id].files]
    return write_batch(batch, bodies)


def write_batch(batch: str, bodies: Sequence[tuple[str, bytes]]) -> dict[str, tuple[int, int]]:
    """Write ``bodies`` one after the other into the file ``batch``; each path -> (offset,
    length) in it."""
    where: dict[str, tuple[int, int]] = {}
    offset = 0
    for path, data in bodies:
        where[path] = (offset, len(data))
        offset += len(data)
    _write_whole(batch, (data for _, data in bodies))
    return where


def _write_whole(path: str, parts: Iterable[bytes]) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    fd = create(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        for part in parts:
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        unlink_quiet(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)


# A delivery's sync: its removals (``relay.spoolpgloop`` prepares it, one text[] parameter).
REMOVE_SQL = "DELETE FROM lpd_jobs WHERE id = ANY($1::text[])"


def text_array(values: Sequence[str]) -> bytes:
    """A text[] literal of ``values`` (each quoted, so any text is safe)."""
    quoted = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return ("{" + ",".join(quoted) + "}").encode()


def apply_writes(conn: Any, updates: Sequence[JobMeta], removals: Sequence[str]) -> None:
    """Delivery-state changes and removals, atomically, in ONE statement (one round
    trip in autocommit: no BEGIN/COMMIT of their own, which cost a delivery as much
    as the DELETE).  A delivery's usual sync, removals alone, does not come here: it
    is ``REMOVE_SQL`` on the event loop's own session (``relay.spoolpgloop``)."""
    if not updates and not removals:
        return
    args: list[Any] = [list(removals), [m.id for m in updates],
                       *([getattr(m, k) for m in updates] for k in _STATE)]
    conn.execute(
        "WITH gone AS (DELETE FROM lpd_jobs WHERE id = ANY(%s::text[])),"
        " changed AS (UPDATE lpd_jobs AS j SET state = u.state, attempts = u.attempts,"
        " failures = u.failures, destination = u.destination,"
        " next_attempt = u.next_attempt, last_error = u.last_error"
        " FROM unnest(%s::text[], %s::text[], %s::int[], %s::int[], %s::int[],"
        " %s::float8[], %s::text[]) AS u(id, state, attempts, failures, destination,"
        " next_attempt, last_error) WHERE j.id = u.id)"
        " SELECT 1", args)


def delete_jobs(conn: Any, ids: Sequence[str]) -> list[str]:
    """Remove jobs now (lprm, purge); the ids that were there."""
    with conn.transaction():
        rows = conn.execute("DELETE FROM lpd_jobs WHERE id = ANY(%s) RETURNING id",
                            (list(ids),)).fetchall()
    return sorted(r[0] for r in rows)


def heartbeat(conn: Any, node: str) -> None:
    """Count this node among the live ones (``claim_leases`` does it each tick too)."""
    conn.execute("INSERT INTO lpd_nodes (node, seen) VALUES (%s, now())"
                 " ON CONFLICT (node) DO UPDATE SET seen = now()", (node,))


def claim_leases(conn: Any, queues: Sequence[str], node: str, lease_time: float
                 ) -> tuple[set[str], int]:
    """Renew this node's queue leases and take free or expired ones up to its share.

    The share is the queues divided among the nodes seen within
    ``lease_time`` (``lpd_nodes``), so two nodes deliver different queues.
    Returns the queues held and the share; a node holding more than its share
    gives the surplus back itself once idle (``release_leases``).
    """
    if not queues:
        return set(), 0
    with conn.transaction():
        heartbeat(conn, node)
        live = conn.execute("SELECT count(*) FROM lpd_nodes WHERE seen >"
                            " now() - make_interval(secs => %s)", (lease_time,)).fetchone()[0]
        share = -(-len(queues) // max(1, int(live)))
        mine = {r[0] for r in conn.execute(
            "UPDATE lpd_leases SET expires = now() + make_interval(secs => %s)"
            " WHERE node = %s AND queue = ANY(%s) RETURNING queue",
            (lease_time, node, list(queues))).fetchall()}
        free = [r[0] for r in conn.execute(
            "SELECT q FROM unnest(%s::text[]) AS q LEFT JOIN lpd_leases l ON l.queue = q"
            " WHERE l.queue IS NULL OR l.expires < now() ORDER BY random()",
            (list(queues),)).fetchall()]
        for queue in free[:max(0, share - len(mine))]:
            taken = conn.execute(
                "INSERT INTO lpd_leases (queue, node, expires)"
                " VALUES (%s, %s, now() + make_interval(secs => %s)) ON CONFLICT (queue)"
                " DO UPDATE SET node = EXCLUDED.node, expires = EXCLUDED.expires"
                " WHERE lpd_leases.expires < now() RETURNING queue",
                (queue, node, lease_time)).fetchone()
            if taken:
                mine.add(taken[0])
    return mine, share


def release_leases(conn: Any, node: str, queues: Sequence[str] | None = None) -> None:
    """Give this node's queues (all, at a clean stop) to the others at once."""
    with conn.transaction():
        if queues is None:
            conn.execute("DELETE FROM lpd_leases WHERE node = %s", (node,))
            conn.execute("DELETE FROM lpd_nodes WHERE node = %s", (node,))
        else:
            conn.execute("DELETE FROM lpd_leases WHERE node = %s AND queue = ANY(%s)",
                         (node, list(queues)))
        # The others claim at once rather than at their next tick.
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, LEASES_FREED))


def lease_holders(conn: Any) -> dict[str, str]:
    rows = conn.execute("SELECT queue, node FROM lpd_leases WHERE expires >= now()").fetchall()
    return {q: n for q, n in rows}


def writable(conn: Any) -> str:
    """"" when this session can write, else why not (a hot standby, read-only default)."""
    row = conn.execute("SELECT pg_is_in_recovery(), current_setting('transaction_read_only'),"
                       " current_setting('default_transaction_read_only')").fetchone()
    if row[0]:
        return "is a hot standby (read-only)"
    if row[1] == "on" or row[2] == "on":
        return "is read-only (default_transaction_read_only)"
    return ""
