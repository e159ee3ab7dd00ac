"""The durable spool: where a job lives from its last acknowledged byte to delivery.

SPEC §4.4 promises that an acknowledged job survives ``kill -9`` and power loss
and that a partial one is discarded at restart.  The layout (docs/spool.md) is
one flat directory ``jobs/`` of files named only by spool id — wire file names
are metadata, never paths:

    <id>.d<n>   data files, written straight from the receive buffer
    <id>.cf     the raw control file
    <id>.json   immutable job metadata, written last (dot-temp + rename)
    <id>.state  delivery state, replaced atomically by the scheduler and CLI

A job exists iff its ``.json`` parses and every file it lists has the recorded
size; anything else is debris, removed and counted by ``recover()``.  Under
``fsync`` the ``.json`` publications of concurrent jobs share one flush
(``relay.groupcommit``), so durability does not cost one fsync per job.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import trio

from relay.errors import DiskFull, SpoolError
from relay.groupcommit import (
    FILE_MODE,
    GroupCommit,
    Syncer,
    disk_error,
    read_file,
    start_writeback,
    unlink_quiet,
    write_all,
    write_atomic,
    write_file,
)

ID_WIDTH = 12
ID_BLOCK = 1000              # ids reserved per durable write of the ``next-id`` file
MAX_FILES_PER_JOB = 1024     # RFC 1179 names allow 52 data files; bound hostile senders
WRITEBACK_CHUNK = 8 << 20    # start writeback of large files every 8 MiB under fsync
STATES = ("queued", "held")

_ID = rf"\d{{{ID_WIDTH},20}}"
_ID_RE = re.compile(_ID)
_LIVE_RE = re.compile(rf"({_ID})\.(json|cf|state|d\d{{1,4}})")
_TEMP_RE = re.compile(rf"\.{_ID}\..*\.tmp")
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


class SpoolBusy(SpoolError):
    """Another process holds the spool lock: a daemon is running on it."""


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
    # delivery state (from <id>.state; defaults when absent)
    state: str = "queued"    # "queued" | "held"
    attempts: int = 0
    failures: int = 0        # consecutive failures at the current destination
    destination: int = 0     # index into the queue's destinations
    next_attempt: float = 0.0
    last_error: str = ""

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


# --- on-disk encoding ------------------------------------------------------------------

_STATE_DEFAULTS: dict[str, Any] = {
    "state": "queued", "attempts": 0, "failures": 0, "destination": 0,
    "next_attempt": 0.0, "last_error": ""}


def _text(value: str) -> str:
    # Wire text decoded with surrogateescape cannot be stored in JSON; the raw
    # control file keeps the exact bytes, the metadata keeps a readable copy.
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")


def _encode_job(meta: JobMeta) -> bytes:
    files = [{"name": f.name, "format": f.format, "bytes": f.bytes,
              "file": os.path.basename(f.path)} for f in meta.files]
    return orjson.dumps({
        "v": 1, "id": meta.id, "queue": meta.queue, "wire_queue": meta.wire_queue,
        "peer": meta.peer, "received": meta.received, "control_name": meta.control_name,
        "control_bytes": meta.control_bytes, "number": meta.number, "user": meta.user,
        "host": meta.host, "title": meta.title, "job_name": meta.job_name, "files": files})


def _field(d: Mapping[str, Any], key: str, kind: type) -> Any:
    value = d.get(key)
    if type(value) is not kind:  # exact: bool is not an int here
        raise ValueError(f"{key}: expected {kind.__name__}")
    return value


def _decode_job(raw: bytes, job_id: str, jobs_dir: str) -> JobMeta:
    """Parse ``<id>.json``; ValueError on anything unexpected (the job is then debris)."""
    d = orjson.loads(raw)
    if not isinstance(d, dict) or d.get("v") != 1 or d.get("id") != job_id:
        raise ValueError("not a job record of this id")
    files = []
    for f in _field(d, "files", list):
        name = _field(f, "file", str)
        # Paths come only from our own pattern, so a tampered record cannot
        # make the relay read or delete outside the spool.
        if not (name.startswith(job_id + ".d") and _LIVE_RE.fullmatch(name)):
            raise ValueError(f"bad data file name {name!r}")
        files.append(FileMeta(name=_field(f, "name", str), format=_field(f, "format", str),
                              bytes=_field(f, "bytes", int), path=os.path.join(jobs_dir, name)))
    received: Any = d.get("received")
    if type(received) not in (float, int):
        raise ValueError("received: expected a number")
    s = {k: _field(d, k, str) for k in ("queue", "wire_queue", "peer", "control_name",
                                        "number", "user", "host", "title", "job_name")}
    return JobMeta(id=job_id, received=float(received), files=tuple(files),
                   control_path=os.path.join(jobs_dir, f"{job_id}.cf"),
                   control_bytes=_field(d, "control_bytes", int), **s)


def _encode_state(meta: JobMeta) -> bytes:
    return orjson.dumps({k: getattr(meta, k) for k in _STATE_DEFAULTS})


def _with_state(base: JobMeta, raw: bytes | None) -> JobMeta:
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


# --- a job being received -----------------------------------------------------------------

class DataWriter:
    """One data file being received; ``write`` goes straight to the file, no copies."""

    __slots__ = ("_counted", "_fd", "_job", "_mark", "_size", "name")

    def __init__(self, job: IncomingJob, fd: int, name: str) -> None:
        self._job = job
        self._fd = fd
        self.name = name
        self._counted = 0   # bytes reported by write()/add()
        self._mark = 0      # end of the range already handed to writeback
        self._size = -1     # final size once closed

    def fileno(self) -> int:
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.add(write_all(self._fd, data))
        except OSError as exc:
            raise disk_error(exc, f"job {self._job.id} data file") from exc

    def add(self, n: int) -> None:
        """Account for ``n`` bytes the caller wrote to ``fileno()`` itself (splice)."""
        self._counted += n
        self._job.bytes += n
        if self._job.spool_fsync and self._counted - self._mark >= WRITEBACK_CHUNK:
            start_writeback(self._fd, self._mark, self._counted - self._mark)
            self._mark = self._counted

    def abandon(self) -> None:
        # The job is being discarded: close quietly; a later close() is a no-op.
        if self._size < 0:
            self._size = self._counted
            os.close(self._fd)

    def close(self) -> int:
        """Close the file and return its size (from the file, not the counters)."""
        if self._size < 0:
            try:
                self._size = os.fstat(self._fd).st_size
            finally:
                os.close(self._fd)
            self._job.data_closed(self, self._size, self._counted)
        return self._size


class IncomingJob:
    """A job under construction; becomes a ``JobMeta`` by ``Spool.commit``."""

    def __init__(self, spool: Spool, job_id: str, *, queue: str, wire_queue: str,
                 peer: str) -> None:
        self.id = job_id
        self.bytes = 0                                     # data + control so far
        self.spool_fsync = spool.fsync
        self._spool = spool
        self._fields = {"queue": _text(queue), "wire_queue": _text(wire_queue),
                        "peer": _text(peer)}
        self._control: dict[str, str] | None = None
        self.control_raw = b""  # written by the flush, off the event loop
        self._formats: dict[str, str] = {}
        self._files: dict[str, tuple[str, int]] = {}     # wire name -> (file, size)
        self._writer: DataWriter | None = None
        self._index = 0
        self._status = "open"                              # open | committing | committed | gone

    def _path(self, name: str) -> str:
        return os.path.join(self._spool.jobs_dir, name)

    def _check_open(self) -> None:
        if self._status != "open":
            raise SpoolError(f"job {self.id} is {self._status}")

    def set_control(self, name: str, raw: bytes, *, number: str, user: str, host: str,
                    title: str, job_name: str, formats: Mapping[str, str]) -> None:
        """Keep the raw control file (a re-sent one replaces it) and its facts.

        The bytes reach ``<id>.cf`` at commit, in the group-commit thread: one
        file creation less on the event loop per job.
        """
        self._check_open()
        self.bytes += len(raw) - len(self.control_raw)
        self.control_raw = bytes(raw)
        self._control = {"control_name": _text(name), "number": _text(number),
                         "user": _text(user), "host": _text(host), "title": _text(title),
                         "job_name": _text(job_name)}
        self._formats = {_text(k): _text(v) for k, v in formats.items()}

    def open_data(self, name: str) -> DataWriter:
        """Start a data file; ``name`` is the wire name, kept only as metadata."""
        self._check_open()
        if self._writer is not None:
            raise SpoolError(f"job {self.id}: a data file is already open")
        if self._index >= MAX_FILES_PER_JOB:  # counts re-sent files too
            raise SpoolError(f"job {self.id}: more than {MAX_FILES_PER_JOB} data files")
        self._index += 1
        file = f"{self.id}.d{self._index}"
        try:
            fd = os.open(self._path(file), _NEW, FILE_MODE)
        except OSError as exc:
            raise disk_error(exc, f"job {self.id} data file") from exc
        name = _text(name)
        if name in self._files:  # a re-sent file supersedes the earlier copy
            old, size = self._files.pop(name)
            unlink_quiet(self._path(old))
            self.bytes -= size
        self._files[name] = (file, -1)
        self._writer = DataWriter(self, fd, name)
        return self._writer

    def data_closed(self, writer: DataWriter, size: int, counted: int) -> None:
        # Called by DataWriter.close(): the file's real size wins over the counters.
        self._writer = None
        self.bytes += size - counted
        if self._files.get(writer.name, ("", 0))[1] == -1:
            self._files[writer.name] = (self._files[writer.name][0], size)

    def discard(self) -> None:
        """Remove everything written for this job; idempotent, no-op once committed."""
        if self._status not in ("open",):
            return
        self._status = "gone"
        if self._writer is not None:
            self._writer.abandon()
            self._writer = None
        unlink_quiet(self._path(f"{self.id}.json"))  # the job is gone first, then its parts
        unlink_quiet(self._path(f".{self.id}.json.tmp"))
        unlink_quiet(self._path(f"{self.id}.cf"))
        for file, _ in self._files.values():
            unlink_quiet(self._path(file))
        self._spool.count_discard(self.bytes)

    def seal(self) -> JobMeta:
        """Check the job is complete and describe it (used by ``Spool.commit``)."""
        self._check_open()
        if self._writer is not None:
            raise SpoolError(f"job {self.id}: data file {self._writer.name!r} still open")
        if self._control is None:
            raise SpoolError(f"job {self.id}: no control file")
        # Files in control-file order (the order to print), then any the control
        # file does not name, in arrival order.
        order = [n for n in self._formats if n in self._files]
        order += [n for n in self._files if n not in self._formats]
        files = tuple(FileMeta(name=n, format=self._formats.get(n, ""),
                               bytes=self._files[n][1], path=self._path(self._files[n][0]))
                      for n in order)
        text: dict[str, Any] = {**self._fields, **self._control}
        return JobMeta(id=self.id, received=time.time(), files=files,
                       control_path=self._path(f"{self.id}.cf"),
                       control_bytes=len(self.control_raw), **text)

    def mark(self, status: str) -> None:
        """Internal: ``Spool.commit`` moves the job through committing/committed."""
        self._status = status


# --- the spool ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Publish:
    """One job's ``.json`` to publish in a group commit (None: only sync)."""

    job_id: str
    record: bytes | None
    control: bytes
    paths: tuple[str, ...]


class Spool:
    """The spool directory: receive (``begin``/``commit``), read, update, remove jobs.

    ``recover()`` must run first in the daemon (it takes the spool lock and
    sweeps debris).  Readers such as the CLI may use ``jobs``/``get``/
    ``update``/``remove`` without it, also while the daemon runs.  ``commit``
    needs no background task: concurrent callers share flushes by themselves.
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True,
                 min_free_disk: int = 0, sync_method: str = "auto") -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.jobs_dir = os.path.join(self.directory, "jobs")
        self.fsync = fsync
        self.min_free_disk = min_free_disk
        self._sync_method = sync_method
        self._syncer: Syncer | None = None
        self._group: GroupCommit[_Publish] = GroupCommit(self._flush)
        self._lock_fd = -1
        self._next = 0          # next id to hand out; 0 = not recovered
        self._limit = 0         # ids below this may have been used (next-id file)
        self._cache: dict[str, JobMeta] = {}   # immutable parts of known jobs
        self._closed = False
        self._stats = Counter[str]()

    # -- start-up ----------------------------------------------------------------------

    def recover(self) -> Recovery:
        """Create the layout, lock it, sweep partial jobs; return the jobs in arrival order."""
        if self._next:
            raise SpoolError("recover() runs once, at start")
        try:
            os.makedirs(self.jobs_dir, mode=0o750, exist_ok=True)
            self._take_lock()
            for name in os.listdir(self.directory):
                if name.startswith(".next-id."):  # a torn id reservation
                    unlink_quiet(os.path.join(self.directory, name))
            jobs, highest = self._sweep(os.listdir(self.jobs_dir))
            if self.fsync:
                self._syncer = Syncer(self.jobs_dir, self._sync_method)
                self._syncer.sync([])  # the sweep's unlinks are durable before new ids
            stored = read_file(os.path.join(self.directory, "next-id")) or b"0"
            self._next = max(highest + 1, int(stored) if stored.strip().isdigit() else 0, 1)
            self._reserve()
        except OSError as exc:
            self._release_lock()  # a later attempt must not find its own lock taken
            raise disk_error(exc, f"spool {self.directory}") from exc
        self._stats["recovered"] = len(jobs)
        return Recovery(jobs=jobs, discarded=self._stats["discarded"],
                        discarded_bytes=self._stats["discarded_bytes"])

    def _take_lock(self) -> None:
        fd = os.open(os.path.join(self.directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(f"spool {self.directory} is in use by another process") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _sweep(self, names: list[str]) -> tuple[list[JobMeta], int]:
        groups: dict[str, list[str]] = {}
        for name in names:
            if _TEMP_RE.fullmatch(name):
                unlink_quiet(os.path.join(self.jobs_dir, name))  # torn write of some job
            elif m := _LIVE_RE.fullmatch(name):
                groups.setdefault(m.group(1), []).append(name)
        jobs = []
        for job_id in sorted(groups, key=int):
            meta = self._check(job_id, groups[job_id])
            if meta is not None:
                jobs.append(meta)
        return jobs, max(map(int, groups), default=0)

    def _check(self, job_id: str, names: list[str]) -> JobMeta | None:
        sizes = {}
        for name in names:
            st = os.lstat(os.path.join(self.jobs_dir, name))
            sizes[name] = st.st_size if stat.S_ISREG(st.st_mode) else -1
        try:
            meta = _decode_job(read_file(os.path.join(self.jobs_dir, f"{job_id}.json")) or b"",
                               job_id, self.jobs_dir)
            want = {f"{job_id}.cf": meta.control_bytes}
            want.update((os.path.basename(f.path), f.bytes) for f in meta.files)
            if any(sizes.get(name) != size for name, size in want.items()):
                raise ValueError("a file is missing or short")
        except ValueError:  # orjson.JSONDecodeError is a ValueError
            if names != [f"{job_id}.state"]:  # a lone .state is a removal's leftover
                self._stats["discarded"] += 1
                self._stats["discarded_bytes"] += sum(
                    max(size, 0) for name, size in sizes.items()
                    if not name.endswith((".json", ".state")))  # job bytes, as discard() counts
            for name in names:
                unlink_quiet(os.path.join(self.jobs_dir, name))
            return None
        for name in set(names) - set(want) - {f"{job_id}.json", f"{job_id}.state"}:
            unlink_quiet(os.path.join(self.jobs_dir, name))
        self._cache[job_id] = meta
        state = f"{job_id}.state"
        return _with_state(meta, read_file(os.path.join(self.jobs_dir, state)) if state in sizes
                           else None)

    def _reserve(self) -> None:
        # Ids stay unique across restarts even after every job was removed: the
        # next-id file is moved ahead in blocks, durably, before ids are used.
        self._limit = self._next + ID_BLOCK
        write_atomic(os.path.join(self.directory, "next-id"), b"%d\n" % self._limit,
                      fsync=self.fsync)

    # -- space -------------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Bytes available to this process on the spool's filesystem."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def check_space(self, need: int = 0) -> None:
        """Raise DiskFull when storing ``need`` more bytes would go below ``min_free_disk``."""
        if self.free_bytes() - need < self.min_free_disk:
            raise DiskFull(f"spool {self.directory}: free space below min_free_disk")

    # -- receiving -----------------------------------------------------------------------

    def begin(self, *, queue: str, wire_queue: str, peer: str) -> IncomingJob:
        """Start a job: check free space and hand out the next id (arrival order)."""
        if self._closed or not self._next:
            raise SpoolError("spool is closed" if self._closed else "recover() first")
        self.check_space()
        if self._next >= self._limit:
            try:
                self._reserve()
            except OSError as exc:
                raise disk_error(exc, "next-id") from exc
        job_id = f"{self._next:0{ID_WIDTH}d}"
        self._next += 1
        return IncomingJob(self, job_id, queue=queue, wire_queue=wire_queue, peer=peer)

    async def commit(self, job: IncomingJob) -> JobMeta:
        """Publish the job; return once it is durable (shared flush under fsync).

        Raises SpoolError (DiskFull on ENOSPC); a commit that raises — cancelled
        included — leaves no job behind, so the caller must not acknowledge.
        """
        job._check_open()  # a second commit must not discard the first one's job
        try:
            meta = job.seal()
            job.mark("committing")
            record = _encode_job(meta)
            paths = (meta.control_path, *(f.path for f in meta.files),
                     os.path.join(self.jobs_dir, f"{meta.id}.json"))
            if self.fsync:
                await self._group.submit(_Publish(meta.id, record, job.control_raw, paths))
            else:
                await trio.lowlevel.checkpoint()
                self._publish(_Publish(meta.id, record, job.control_raw, paths))
        except BaseException:
            job.mark("open")
            job.discard()  # nothing the sender was not told about may stay
            raise
        job.mark("committed")
        self._cache[meta.id] = meta
        self._stats["commits"] += 1
        return meta

    async def sync(self) -> None:
        """Make earlier ``update``/``remove`` calls durable (joins the next group commit)."""
        if self.fsync and self._syncer is not None:
            await self._group.submit(_Publish("", None, b"", ()))
        else:
            await trio.lowlevel.checkpoint()

    def _publish(self, item: _Publish) -> None:
        if item.record is None:
            return
        tmp = os.path.join(self.jobs_dir, f".{item.job_id}.json.tmp")
        try:
            write_file(os.path.join(self.jobs_dir, f"{item.job_id}.cf"), item.control)
            write_file(tmp, item.record)
            os.rename(tmp, os.path.join(self.jobs_dir, f"{item.job_id}.json"))
        except OSError as exc:
            raise disk_error(exc, f"job {item.job_id} control file/metadata") from exc

    def _flush(self, items: list[_Publish]) -> list[Exception | None]:
        # Runs in a worker thread, one at a time: publish every record, then one
        # sync makes the whole batch (and all earlier writes) durable.
        errors: list[Exception | None] = []
        for item in items:
            try:
                self._publish(item)
                errors.append(None)
            except SpoolError as exc:
                errors.append(exc)
        assert self._syncer is not None
        try:
            paths = [p for item, e in zip(items, errors, strict=True) if e is None
                     for p in item.paths]
            self._stats["sync_calls"] += self._syncer.sync(paths)
        except OSError as exc:
            return [e or disk_error(exc, "spool sync") for e in errors]
        return errors

    def count_discard(self, nbytes: int) -> None:
        """Internal: ``IncomingJob.discard`` reports a partial job removed."""
        self._stats["discarded"] += 1
        self._stats["discarded_bytes"] += nbytes

    # -- reading and changing jobs (also from the CLI, daemon running or not) ---------

    def _base(self, job_id: str) -> JobMeta | None:
        meta = self._cache.get(job_id)
        if meta is None:
            try:
                meta = _decode_job(read_file(os.path.join(self.jobs_dir, f"{job_id}.json"))
                                   or b"", job_id, self.jobs_dir)
            except ValueError:  # absent, or not (yet) a job: a reader skips it
                return None
            self._cache[job_id] = meta
        return meta

    def _load(self, job_id: str, has_state: bool = True, listed: bool = False) -> JobMeta | None:
        base = self._base(job_id)
        # A cached record may belong to a job another process removed since.
        if base is None or not (listed or os.path.exists(
                os.path.join(self.jobs_dir, f"{job_id}.json"))):
            self._cache.pop(job_id, None)  # removed, perhaps by another process
            return None
        state = os.path.join(self.jobs_dir, f"{job_id}.state")
        return _with_state(base, read_file(state) if has_state else None)

    def get(self, job_id: str) -> JobMeta:
        """The job with its current delivery state; KeyError when not there."""
        meta = self._load(job_id) if _ID_RE.fullmatch(job_id) else None
        if meta is None:
            raise KeyError(job_id)
        return meta

    def jobs(self, queue: str | None = None) -> list[JobMeta]:
        """Jobs on disk, arrival order, optionally only those of ``queue``."""
        try:
            names = set(os.listdir(self.jobs_dir))
        except FileNotFoundError:
            return []
        ids = sorted((n[:-5] for n in names if n.endswith(".json") and _ID_RE.fullmatch(n[:-5])),
                     key=int)
        for gone in self._cache.keys() - set(ids):
            self._cache.pop(gone, None)  # usage() may run in a worker thread
        found = (self._load(i, f"{i}.state" in names, listed=True) for i in ids)
        return [m for m in found if m is not None and (queue is None or m.queue == queue)]

    def update(self, meta: JobMeta, *, durable: bool = False) -> None:
        """Persist the delivery-state fields of ``meta`` atomically; KeyError if removed.

        ``durable=True`` fsyncs before returning (blocks for one flush): use it
        for transitions that must not be lost, such as holding a job.
        """
        if meta.state not in STATES:
            raise ValueError(f"state must be one of {STATES}, not {meta.state!r}")
        if not (_ID_RE.fullmatch(meta.id)
                and os.path.exists(os.path.join(self.jobs_dir, f"{meta.id}.json"))):
            raise KeyError(meta.id)
        try:
            write_atomic(os.path.join(self.jobs_dir, f"{meta.id}.state"), _encode_state(meta),
                         fsync=durable and self.fsync)
        except OSError as exc:
            raise disk_error(exc, f"job {meta.id} state") from exc

    def remove(self, job_id: str) -> None:
        """Remove a job (after delivery, or purge); idempotent.  See also ``sync()``."""
        if not _ID_RE.fullmatch(job_id):
            return
        base = self._base(job_id)
        # The .json goes first: from then on the job does not exist, whatever
        # a crash leaves of the rest (recovery sweeps it).
        for name in ("json", "state", "cf"):
            unlink_quiet(os.path.join(self.jobs_dir, f"{job_id}.{name}"))
        for f in base.files if base is not None else ():
            unlink_quiet(f.path)
        self._cache.pop(job_id, None)

    def usage(self) -> SpoolUsage:
        """Jobs and bytes held, free space, and job counts by (queue, state)."""
        jobs = self.jobs()
        return SpoolUsage(jobs=len(jobs), bytes=sum(j.total_bytes + j.control_bytes for j in jobs),
                          free_bytes=self.free_bytes(),
                          by_queue_state=dict(Counter((j.queue, j.state) for j in jobs)))

    def statistics(self) -> SpoolStatistics:
        group = self._group.statistics()
        method = self._syncer.method if self._syncer is not None else "none"
        return SpoolStatistics(
            commits=self._stats["commits"], batches=group.batches,
            sync_calls=self._stats["sync_calls"], largest_batch=group.largest_batch,
            discarded=self._stats["discarded"], discarded_bytes=self._stats["discarded_bytes"],
            recovered=self._stats["recovered"], sync_method=method)

    async def aclose(self) -> None:
        """Wait for a running flush, record the next id, release the lock; idempotent."""
        await self._group.wait_idle()
        if self._closed:
            return
        self._closed = True
        # A clean stop continues the id sequence exactly where it was; if that
        # write fails the reserved block still keeps ids unique.
        with contextlib.suppress(OSError):
            if self._next:
                write_atomic(os.path.join(self.directory, "next-id"), b"%d\n" % self._next,
                             fsync=self.fsync)
        if self._syncer is not None:
            self._syncer.close()
            self._syncer = None
        self._release_lock()
