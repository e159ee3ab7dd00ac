"""`lpd-relay audit verify|show`: check the audit log's hash chain, read it as a human.

``verify [FILE]`` walks ``FILE.N`` … ``FILE.1``, ``FILE`` as one chain
(``relay.auditchain.verify``) and exits 0 when it is whole, else 1 with
``first bad record: FILE line N (seq S): REASON``.  ``show`` prints one line
per record, oldest first, filtered by ``--job``, ``--user`` and ``--since``
(an ISO-8601 time, or a duration such as ``24h`` meaning "that long ago").
Without FILE the log is ``[audit] path`` of ``-c CONFIG`` (or its default).
Both only read, so they work while the daemon runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from collections.abc import Iterator
from typing import Any

import orjson

from relay.auditchain import records, rotated, verify
from relay.configschema import to_duration

# Shown first, in this order; the rest follow as key=value.
_HEAD = ("ts", "seq", "event", "job", "queue", "user")
_SKIP = frozenset({"prev", "hash"})


def _log_path(args: argparse.Namespace) -> str | None:
    if args.file:
        return str(args.file)
    from relay.spoolcli import cli_config  # the CLI side only

    config = cli_config(args)
    if config is None:
        return None
    if config.audit is not None:
        return os.fspath(config.audit.path)
    return os.path.join(config.server.spool_dir, "audit", "audit.log")


def since_epoch(text: str, now: float) -> float:
    """``--since``: an ISO-8601 time (UTC when it names no zone) or a duration ago."""
    try:
        return now - to_duration(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since: expected an ISO-8601 time or a duration such as 24h, "
                         f"got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _epoch(ts: object) -> float:
    try:
        return dt.datetime.fromisoformat(str(ts)).timestamp()
    except ValueError:
        return 0.0


def _chosen(path: str, args: argparse.Namespace, since: float | None) -> Iterator[dict[str, Any]]:
    for _file, _line, raw in records(path):
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue   # verify names it; show shows what can be read
        if not isinstance(rec, dict):
            continue
        if args.job and rec.get("job") not in (args.job, args.job.zfill(12)):
            continue
        if args.user and rec.get("user") != args.user:
            continue
        if since is not None and _epoch(rec.get("ts")) < since:
            continue
        yield rec


def format_record(rec: dict[str, Any]) -> str:
    """One record as one line: the common keys first, then key=value."""
    head = [str(rec[k]) for k in _HEAD if k in rec]
    rest = []
    for key, value in rec.items():
        if key in _HEAD or key in _SKIP:
            continue
        if key == "files" and isinstance(value, list):
            value = ",".join(f"{f.get('name')}({f.get('format')},{f.get('bytes')}B,"
                             f"sha256:{str(f.get('sha256'))[:16]})"
                             for f in value if isinstance(f, dict))
        rest.append(f"{key}={value}")
    return " ".join(head + rest).replace("\n", " ")


def _show(path: str, args: argparse.Namespace) -> int:
    try:
        since = since_epoch(args.since, dt.datetime.now(dt.UTC).timestamp()) \
            if args.since else None
    except ValueError as exc:
        print(f"lpd-relay: {exc}", file=sys.stderr)
        return 2
    for rec in _chosen(path, args, since):
        sys.stdout.write(format_record(rec) + "\n")
    return 0


def _verify(path: str) -> int:
    bad = verify(path)
    if bad is not None:
        print(bad)
        return 1
    count = sum(1 for _ in records(path))
    files = len(rotated(path))
    print(f"{path}: chain whole, {count} record(s) in {files} file(s)")
    return 0


def main_audit(args: argparse.Namespace) -> int:
    path = _log_path(args)
    if path is None:
        return 2
    if not rotated(path):
        print(f"lpd-relay: no audit log at {path}", file=sys.stderr)
        return 1
    try:
        return _verify(path) if args.action == "verify" else _show(path, args)
    except OSError as exc:
        print(f"lpd-relay: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
