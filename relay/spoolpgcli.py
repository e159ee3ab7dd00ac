"""``lpd-relay spool init-db`` and the ``spool`` actions on a shared PostgreSQL spool.

``init-db -c FILE`` creates or migrates the schema (``relay.spoolpgschema``;
idempotent).  With ``[spool] backend = "postgresql"`` the other actions work
on the database directly, from any node, daemons running or not: ``list``
shows every node's jobs with the node that accepted each; ``retry`` marks a
held job queued (the node delivering its queue releases it within a second,
woken by ``pg_notify``); ``purge`` deletes the job and its bodies.  A job
being delivered while it is purged may still print once (docs/delivery.md).
The dsn is shown only redacted (``relay.spoolpgconfig.redact_dsn``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import tempfile
from typing import Any

import orjson

from relay.config import Config
from relay.errors import SpoolError
from relay.spoolpgconfig import redact_dsn
from relay.spoolpgdb import apply_writes, delete_jobs, load_jobs
from relay.spoolpgschema import NOTIFY_CHANNEL, check_schema, init_db

# The CLI reads no bodies: the cache paths in its records are never opened.
_NO_CACHE = tempfile.gettempdir()


def _connect(config: Config) -> Any:
    import psycopg
    return psycopg.connect(config.spool.dsn, autocommit=True, application_name="lpd-relay cli",
                           connect_timeout=max(1, round(config.spool.db_timeout)),
                           options="-c synchronous_commit=on")


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _init(conn: Any, config: Config, args: argparse.Namespace) -> int:
    before, after = init_db(conn)
    where = redact_dsn(config.spool.dsn)
    if before == after:
        print(f"{where}: schema version {after}, up to date")
    else:
        print(f"{where}: schema version {before} -> {after}")
    return 0


def _list(conn: Any, config: Config, args: argparse.Namespace) -> int:
    jobs = load_jobs(conn, _NO_CACHE)
    print(f"{'JOB':<20}{'QUEUE':<12}{'STATE':<8}{'USER':<10}{'TITLE':<20}{'NODE':<24}"
          f"{'BYTES':>10}  {'RECEIVED (UTC)':<20}LAST ERROR")
    for j, node in jobs:
        print(f"{j.id:<20}{j.queue[:11]:<12}{j.state:<8}{j.user[:9]:<10}{j.title[:19]:<20}"
              f"{node[:23]:<24}{j.total_bytes:>10}  {_when(j.received):<20}{j.last_error[:60]}")
    print(f"{len(jobs)} job(s)")
    return 0


def _get(conn: Any, job_id: str | None) -> tuple[Any, str]:
    if not job_id:
        raise LookupError("this action needs a JOB (see `lpd-relay spool list`)")
    found = load_jobs(conn, _NO_CACHE, ids=[job_id])
    if not found:
        raise LookupError(f"no job {job_id} in the spool")
    return found[0]


def _show(conn: Any, config: Config, args: argparse.Namespace) -> int:
    job, node = _get(conn, args.job)
    record = dataclasses.asdict(job)
    for key in ("control_path",):
        record.pop(key)
    for f in record["files"]:
        f.pop("path")
    record.update(received_utc=_when(job.received), node=node)
    sys.stdout.write(orjson.dumps(record, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _retry(conn: Any, config: Config, args: argparse.Namespace) -> int:
    job, _ = _get(conn, args.job)
    apply_writes(conn, [dataclasses.replace(job, state="queued", failures=0,
                                            next_attempt=0.0)], [])
    conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, job.queue))
    print(f"job {job.id} released; the node delivering queue {job.queue} sends it now")
    return 0


def _purge(conn: Any, config: Config, args: argparse.Namespace) -> int:
    code = 0
    for job_id in args.jobs:
        job, _ = _get(conn, job_id)
        if delete_jobs(conn, [job.id]):
            print(f"{job.control_name} dequeued (job {job.id})")
        else:
            code = 1
    return code


ACTIONS = {"init-db": _init, "list": _list, "show": _show, "retry": _retry, "purge": _purge}


def main_pg_spool(config: Config, args: argparse.Namespace) -> int:
    """``lpd-relay spool ACTION`` on the configured database; exit 0, 1 or 2."""
    if config.spool.backend != "postgresql" or not config.spool.dsn:
        print('lpd-relay: init-db needs [spool] backend = "postgresql" and a dsn',
              file=sys.stderr)
        return 2
    args.jobs = [args.job] if isinstance(args.job, str) else list(args.job or [None])
    args.job = args.jobs[0]
    if len(args.jobs) > 1 and args.action != "purge":
        print(f"lpd-relay: {args.action} takes one JOB", file=sys.stderr)
        return 2
    try:
        with _connect(config) as conn:
            if args.action != "init-db":
                check_schema(conn)
            return ACTIONS[args.action](conn, config, args)
    except LookupError as exc:
        print(f"lpd-relay: {exc.args[0]}", file=sys.stderr)
        return 2 if "JOB" in str(exc) else 1
    except SpoolError as exc:
        print(f"lpd-relay: {redact_dsn(config.spool.dsn)}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:   # psycopg's errors: one line, never a traceback
        text = " ".join(str(exc).split())[:300]
        print(f"lpd-relay: database {redact_dsn(config.spool.dsn)}: {text}", file=sys.stderr)
        return 1
