"""What a spooled job is on disk: its records, its file names, their JSON codec.

``JobMeta`` is the content of ``<id>.json`` (immutable facts) merged with
``<id>.state`` (delivery state).  Both the receiving side (``relay.spooljob``)
and the spool itself (``relay.spool``) build and read these records, so they
and the codec live here, below both, with no I/O of their own: encoding and
decoding are pure functions from bytes to values, and a record that does not
decode is debris for recovery to sweep.  The file layout is in docs/spool.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson

ID_WIDTH = 12
STATES = ("queued", "held", "delivered")   # delivered: kept by [retention]

_ID = rf"\d{{{ID_WIDTH},20}}"
ID_RE = re.compile(_ID)                                        # a spool id
LIVE_RE = re.compile(rf"({_ID})\.(json|cf|state|d\d{{1,4}})")  # a file of a job
TEMP_RE = re.compile(rf"\.{_ID}\..*\.tmp")                     # a dot-temp being written


@dataclass(frozen=True, slots=True, kw_only=True)
class FileMeta:
    name: str        # wire name (dfA123host) - never a path
    format: str      # format letter from the control file ("l", "f", ...), "" when unknown
    bytes: int
    path: str        # absolute path of the spool file holding the data


@dataclass(frozen=True, slots=True, kw_only=True)
class JobMeta:
    """One acknowledged job: immutable facts from ``.json`` plus delivery state."""

    id: str                  # spool id, arrival order
    queue: str               # configured queue name ("*" for the catch-all)
    wire_queue: str          # queue name as the sender wrote it
    peer: str                # "ip:port" of the sender
    received: float          # epoch seconds when the job was complete (committed)
    control_name: str        # wire name of the control file (cfA123host)
    control_path: str        # absolute path of the raw control file in the spool
    number: str              # job number from the control-file name ("123")
    user: str
    host: str
    title: str
    job_name: str
    files: tuple[FileMeta, ...]
    control_bytes: int = 0
    tls_peer: str = ""       # the sender's mapped client-certificate name (SPEC §9)
    # delivery state (from <id>.state; defaults when absent)
    state: str = "queued"    # "queued" | "held" | "delivered" (kept, relay.retention)
    attempts: int = 0
    failures: int = 0        # consecutive failures at the current destination
    destination: int = 0     # index into the queue's destinations
    next_attempt: float = 0.0
    last_error: str = ""
    delivered_at: float = 0.0  # epoch seconds of the delivery of a kept ("delivered") job

    @property
    def total_bytes(self) -> int:
        """Bytes of all data files (what lpq shows as the job's size)."""
        return sum(f.bytes for f in self.files)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovery:
    jobs: list[JobMeta]      # acknowledged jobs, arrival order
    discarded: int           # partial jobs removed
    discarded_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolUsage:
    jobs: int
    bytes: int               # data + control files of all jobs
    free_bytes: int
    by_queue_state: dict[tuple[str, str], int]


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolStatistics:
    commits: int             # jobs made durable by commit()
    batches: int             # group commits (flushes) run
    sync_calls: int          # syncfs / fdatasync / fsync calls those made
    largest_batch: int
    discarded: int           # partial jobs removed, at recovery and at run time
    discarded_bytes: int
    recovered: int           # jobs found by recover()
    sync_method: str         # "syncfs" | "fdatasync" | "none"
    free_space_reads: int = 0  # statvfs calls made by check_space


_STATE_DEFAULTS: dict[str, Any] = {
    "state": "queued", "attempts": 0, "failures": 0, "destination": 0,
    "next_attempt": 0.0, "last_error": "", "delivered_at": 0.0}


def json_text(value: str) -> str:
    """``value`` as text JSON can hold (undecodable wire bytes replaced)."""
    # Wire text decoded with surrogateescape cannot be stored in JSON; the raw
    # control file keeps the exact bytes, the metadata keeps a readable copy.
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")


def encode_job(meta: JobMeta) -> bytes:
    """The ``<id>.json`` record of ``meta`` (its immutable facts)."""
    files = [{"name": f.name, "format": f.format, "bytes": f.bytes,
              "file": os.path.basename(f.path)} for f in meta.files]
    return orjson.dumps({
        "v": 1, "id": meta.id, "queue": meta.queue, "wire_queue": meta.wire_queue,
        "peer": meta.peer, "received": meta.received, "control_name": meta.control_name,
        "control_bytes": meta.control_bytes, "number": meta.number, "user": meta.user,
        "host": meta.host, "title": meta.title, "job_name": meta.job_name, "files": files,
        **({"tls_peer": meta.tls_peer} if meta.tls_peer else {})})


def in_folder(meta: JobMeta, folder: str) -> JobMeta:
    """``meta`` with its control and data paths moved to ``folder`` (same file names)."""
    files = tuple(replace(f, path=os.path.join(folder, os.path.basename(f.path)))
                  for f in meta.files)
    return replace(meta, control_path=os.path.join(folder, f"{meta.id}.cf"), files=files)


def _field(d: Mapping[str, Any], key: str, kind: type) -> Any:
    value = d.get(key)
    if type(value) is not kind:  # exact: bool is not an int here
        raise ValueError(f"{key}: expected {kind.__name__}")
    return value


def decode_job(raw: bytes, job_id: str, jobs_dir: str) -> JobMeta:
    """Parse ``<id>.json``; ValueError on anything unexpected (the job is then debris)."""
    d = orjson.loads(raw)
    if not isinstance(d, dict) or d.get("v") != 1 or d.get("id") != job_id:
        raise ValueError("not a job record of this id")
    files = []
    for f in _field(d, "files", list):
        name = _field(f, "file", str)
        # Paths come only from our own pattern, so a tampered record cannot
        # make the relay read or delete outside the spool.
        if not (name.startswith(job_id + ".d") and LIVE_RE.fullmatch(name)):
            raise ValueError(f"bad data file name {name!r}")
        files.append(FileMeta(name=_field(f, "name", str), format=_field(f, "format", str),
                              bytes=_field(f, "bytes", int), path=os.path.join(jobs_dir, name)))
    received: Any = d.get("received")
    if type(received) not in (float, int):
        raise ValueError("received: expected a number")
    s = {k: _field(d, k, str) for k in ("queue", "wire_queue", "peer", "control_name",
                                        "number", "user", "host", "title", "job_name")}
    if "tls_peer" in d:   # optional: records written before SPEC §9 have none
        s["tls_peer"] = _field(d, "tls_peer", str)
    return JobMeta(id=job_id, received=float(received), files=tuple(files),
                   control_path=os.path.join(jobs_dir, f"{job_id}.cf"),
                   control_bytes=_field(d, "control_bytes", int), **s)


def encode_state(meta: JobMeta) -> bytes:
    """The ``<id>.state`` record of ``meta`` (its delivery-state fields)."""
    return orjson.dumps({k: getattr(meta, k) for k in _STATE_DEFAULTS})


def state_of(base: JobMeta, meta: JobMeta) -> JobMeta:
    """``base`` (the stored job) with the delivery-state fields of ``meta``."""
    return replace(base, **{k: getattr(meta, k) for k in _STATE_DEFAULTS})


def with_state(base: JobMeta, raw: bytes | None) -> JobMeta:
    """``base`` with the delivery state of a ``<id>.state`` record (None: absent)."""
    # Lenient: a torn or odd state file only costs a retry, never the job.
    try:
        d = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        d = {}
    if not isinstance(d, dict) or not d:
        return base
    fields = {}
    for key, default in _STATE_DEFAULTS.items():
        value = d.get(key, default)
        if isinstance(default, float) and type(value) is int:
            value = float(value)
        fields[key] = value if type(value) is type(default) else default
    if fields["state"] not in STATES:
        fields["state"] = "queued"
    return JobMeta(**{**_asdict(base), **fields})


def _asdict(meta: JobMeta) -> dict[str, Any]:
    # dataclasses.asdict would deep-copy the FileMeta records into dicts.
    return {name: getattr(meta, name) for name in JobMeta.__dataclass_fields__}
