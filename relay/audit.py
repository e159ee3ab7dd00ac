"""The audit log: one hash-chained JSON record per job state change (SPEC §11).

``AuditLog`` is the ``JobEvents`` subscriber (``relay.jobevents``).  ``record``
runs on the event loop and only builds a dict; a worker thread seals the
pending records into the chain (``relay.auditchain``), appends them in one
``write`` and makes them durable with one ``fdatasync`` for the whole batch —
the same group commit the spool uses (``relay.groupcommit.GroupCommit``), so
many concurrent jobs share one flush and no job pays a second fsync of its
own.  Intake awaits ``durable()`` before a job's final ack; every other
record is written by ``run()`` at most ``LAZY_FLUSH`` seconds later.

More than one process appends (the daemon, and ``lpd-relay spool``/``ctl``
while it is stopped): each append holds an ``flock`` on ``FILE.lock`` and
first checks whether the file grew or was rotated under it, so the chain
stays one chain.  Sizes past ``rotate_size`` rotate ``FILE`` to ``FILE.1``
(``FILE.N`` dropped past ``rotate_keep``); the next record's ``prev`` is the
last hash of the old file.  A write the disk refuses keeps its records in
memory for the next flush and never stops the relay (docs/audit.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import trio

from relay import log
from relay.auditchain import ZERO_HASH, chain_tail, seal, tail_of
from relay.config import AuditConfig, Config
from relay.durablefiles import create, fsync_directory, make_dir, write_all
from relay.errors import SpoolError
from relay.groupcommit import GroupCommit
from relay.jobevents import ACTOR, NO_EVENTS, acting
from relay.spoolformat import JobMeta

if TYPE_CHECKING:
    from relay.spool import Spool

__all__ = ["LAZY_FLUSH", "RECORD_KEYS", "AuditLog", "cli_events", "config_sha256"]

# Records nobody awaits (delivery, lpc, config) are on disk at most this late.
LAZY_FLUSH = 0.2
# The record keys of SPEC §11, and which of them a caller may pass as fields.
RECORD_KEYS = ("seq", "ts", "event", "job", "queue", "wire_queue", "job_number", "user",
               "host", "peer", "tls_peer", "files", "destination", "result", "reason", "by",
               "original", "config_sha256", "prev", "hash")
_FIELDS = frozenset({"job", "queue", "user", "destination", "result", "reason", "by",
                     "original", "config_sha256", "files"})
# Events caused by someone: ``by`` is taken from ``jobevents.acting`` when not given.
_CAUSED = frozenset({"held", "released", "removed", "reprinted"})
_APPEND = os.O_WRONLY | os.O_APPEND


def job_fields(meta: JobMeta) -> dict[str, Any]:
    """The facts of a job every job record carries (``tls_peer`` only when there is one)."""
    rec: dict[str, Any] = {"job": meta.id, "queue": meta.queue, "wire_queue": meta.wire_queue,
                           "job_number": meta.number, "user": meta.user, "host": meta.host,
                           "peer": meta.peer}
    if meta.tls_peer:
        rec["tls_peer"] = meta.tls_peer
    return rec


def file_fields(meta: JobMeta, digests: object) -> list[dict[str, Any]]:
    """``files`` of a ``received`` record: name, format, bytes and SHA-256 of each."""
    known = digests if isinstance(digests, dict) else {}
    return [{"name": f.name, "format": f.format, "bytes": f.bytes,
             "sha256": known.get(f.name, "")} for f in meta.files]


class AuditLog:
    """Appends records to ``[audit] path``; see the module docstring."""

    def __init__(self, config: AuditConfig, *, fsync: bool = True) -> None:
        self.path = os.fspath(config.path)
        self.rotate_size = config.rotate_size
        self.rotate_keep = config.rotate_keep
        self.fsync = fsync
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()          # _pending, between the loop and the flush
        self._group: GroupCommit[None] = GroupCommit(self._flush)
        self._fd = -1
        self._lock_fd = -1
        self._known = (-1, -1)                 # (inode, size) of FILE after our last write
        self._seq, self._hash = 0, ZERO_HASH
        self.failures = 0                      # flushes the disk refused
        self.written = trio.Event()            # set (and replaced) after each write
        self.on_written: Callable[[], None] | None = None   # the syslog shipper's wake-up

    # -- opening and closing -------------------------------------------------------------

    def open(self) -> None:
        """Create the folder, cut a line a crash tore, and learn where the chain ends."""
        directory = os.path.dirname(self.path)
        make_dir(directory)
        self._lock_fd = create(self.path + ".lock", os.O_RDWR)
        with self._locked():
            tail = tail_of(self.path)
            if tail is not None and tail.torn:
                # Only a write cut by a crash leaves bytes after the last newline;
                # they were never acknowledged as durable (docs/audit.md).
                os.truncate(self.path, tail.good_bytes)
                log.event("warning", "audit_torn_line_truncated", path=self.path,
                          kept_bytes=tail.good_bytes)
            self._seq, self._hash = chain_tail(self.path)

    def close(self) -> None:
        """Write what is pending (synchronously) and close the files."""
        self._flush([None])
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock_fd = -1

    @contextlib.contextmanager
    def _locked(self) -> Any:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- the JobEvents face --------------------------------------------------------------

    def record(self, event: str, meta: JobMeta | None = None, **fields: object) -> None:
        """Queue one record; it is written by the next flush (``durable`` or ``run``)."""
        rec: dict[str, Any] = {"ts": log.format_ts(time.time()), "event": event}
        if meta is not None:
            rec.update(job_fields(meta))
            if event == "received":
                rec["files"] = file_fields(meta, fields.get("digests"))
        rec.update((k, v) for k, v in fields.items() if k in _FIELDS and v not in (None, ""))
        if event in _CAUSED and "by" not in rec and (by := ACTOR.get()):
            rec["by"] = by
        with self._lock:
            self._pending.append(rec)

    async def durable(self) -> None:
        """Return once every record so far is written (and fdatasync'd under fsync)."""
        await self._group.submit(None)
        self._wake()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write records nobody waits for, at most ``LAZY_FLUSH`` seconds late."""
        task_status.started()
        while True:
            await trio.sleep(LAZY_FLUSH)
            if self._pending:
                await self.durable()

    def _wake(self) -> None:
        self.written.set()
        self.written = trio.Event()
        if self.on_written is not None:
            self.on_written()

    @property
    def last_seq(self) -> int:
        """The seq of the last record written by this process or seen on disk."""
        return self._seq

    # -- writing (a worker thread, one at a time; or the CLI's own thread) ---------------

    def _flush(self, items: list[None]) -> list[Exception | None]:
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            try:
                with self._locked():
                    self._append(batch)
            except OSError as exc:
                with self._lock:    # kept for the next flush, in order
                    self._pending[:0] = batch
                self.failures += 1
                log.event("error", "audit_write_failed", path=self.path, records=len(batch),
                          error=exc.strerror or str(exc))
        return [None for _ in items]

    def _append(self, batch: list[dict[str, Any]]) -> None:
        fd, size = self._follow()
        seq, digest = self._seq, self._hash
        lines = []
        for rec in batch:
            seq += 1
            line, digest = seal(rec, seq=seq, prev=digest)
            lines.append(line)
        data = b"".join(lines)
        try:
            write_all(fd, data)
            if self.fsync:
                os.fdatasync(fd)
        except OSError:
            with contextlib.suppress(OSError):  # no torn record left for the retry
                os.ftruncate(fd, size)
            raise
        self._seq, self._hash = seq, digest
        self._known = (self._known[0], size + len(data))
        if size + len(data) >= self.rotate_size:
            self._rotate()

    def _follow(self) -> tuple[int, int]:
        """The open FILE and its size, re-read when another process wrote or rotated it."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is None or self._fd < 0 or st.st_ino != self._known[0]:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._fd = self._create() if st is None else os.open(self.path,
                                                                 _APPEND | os.O_CLOEXEC)
            st = os.fstat(self._fd)
        if (st.st_ino, st.st_size) != self._known:
            self._seq, self._hash = chain_tail(self.path)   # someone else appended
            self._known = (st.st_ino, st.st_size)
        return self._fd, st.st_size

    def _create(self) -> int:
        fd = create(self.path, _APPEND)
        if os.geteuid() == 0:
            # The CLI run as root may start a file the daemon's user must append to.
            st = os.stat(os.path.dirname(self.path))
            with contextlib.suppress(OSError):
                os.fchown(fd, st.st_uid, st.st_gid)
        if self.fsync:
            fsync_directory(os.path.dirname(self.path))
        return fd

    def _rotate(self) -> None:
        """FILE -> FILE.1 -> FILE.2 …; FILE.<rotate_keep> is dropped."""
        os.close(self._fd)
        self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.path}.{self.rotate_keep}")
        for n in range(self.rotate_keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{self.path}.{n}", f"{self.path}.{n + 1}")
        os.rename(self.path, f"{self.path}.1")
        if self.fsync:
            fsync_directory(os.path.dirname(self.path))
        self._known = (-1, -1)
        log.event("info", "audit_rotated", path=self.path, seq=self._seq)


def config_sha256(source: str) -> str:
    """SHA-256 of the configuration file as read now ("" for the embedded default)."""
    try:
        with open(source, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return ""


@contextlib.contextmanager
def cli_events(config: Config, spool: Spool, changes: bool = True) -> Iterator[None]:
    """For a CLI command that changes jobs itself: its records, ``by = cli``, written at exit.

    An audit log that cannot be opened refuses the command (SpoolError): a
    change nobody can audit is not made.  ``changes`` False (``list``,
    ``status``): nothing to record, the log is not even opened.
    """
    if config.audit is None or not changes:
        yield
        return
    audit = AuditLog(config.audit, fsync=config.server.fsync)
    try:
        audit.open()
    except OSError as exc:
        raise SpoolError(f"audit log {audit.path}: {exc.strerror or exc}") from exc
    spool.events = audit
    try:
        with acting("cli"):
            yield
    finally:
        spool.events = NO_EVENTS
        audit.close()
