"""Segment files: a write-ahead log for small jobs and state changes (docs/spool.md).

A file per small job costs a file creation, a rename and a directory entry
in one crowded directory; most of the relay's CPU on a busy spool went there.
A segment is one preallocated file that records are appended to — a small
job (metadata, control file and data in one record), a state change, a
removal — and made durable by one ``fdatasync`` of that file per batch.

Each record carries its length and a CRC-32 seeded with the segment's
number, so replay stops at the first record that is short, torn or left over
from the file's previous life (segments are recycled, not unlinked): what
follows a bad record was never made durable, since records are only ever
appended and a batch is acknowledged only after its ``fdatasync``.  A
segment that saw a failed write, or was found at start, is sealed: nothing
is ever appended after bytes that may be torn.

The log knows jobs only by number: a JOB record keeps its segment alive
until a DONE record for that job; segments go oldest first, so a DONE (or a
state record) never outlives the job record it refers to.  Thread-safe:
the event loop appends STATE and DONE records while the group-commit thread
appends JOB records and syncs, so appends and the bookkeeping share one lock,
and a sync holds it only to take a ``SyncTicket`` (what to flush, what may
then be collected), never during the ``fdatasync`` itself.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from relay.durablefiles import create, fsync_directory, make_dir, unlink_quiet

# The format lives in relay.spoolsegformat; its names are this module's too.
from relay.spoolsegformat import (
    DONE,
    HEADER,
    JOB,
    LENGTH,
    MAGIC,
    MAX_BODY,
    NAME_RE,
    RECORD,
    SEED,
    SEGMENT_SIZE,
    SPARES,
    STATE,
    TYPES,
    LiveJob,
    Record,
    Scan,
    fold,
    job_body,
    job_meta,
    read_only,
    record_crc,
    scan,
    segment_name,
)

__all__ = [
    "DONE", "HEADER", "JOB", "LENGTH", "MAGIC", "MAX_BODY", "NAME_RE", "RECORD", "SEED",
    "SEGMENT_SIZE", "SPARES", "STATE", "TYPES", "LiveJob", "Record", "Scan", "Segment",
    "SegmentLog", "SyncTicket", "fold", "job_body", "job_meta", "read_only", "record_crc", "scan",
    "segment_name",
]


@dataclass(frozen=True, slots=True)
class SyncTicket:
    """One sync's share of the log, taken under the lock: what to flush, then collect."""

    fds: tuple[int, ...]            # segments holding records not yet fdatasynced
    closing: tuple[Segment, ...]    # rotated away from: closed once synced
    directory: bool                 # a segment name changed: fsync the directory
    empty: tuple[int, ...]          # the oldest segments no live job needed at the start



class Segment:
    """One segment file open for appending at ``tail``."""

    def __init__(self, path: str, number: int, fd: int, size: int) -> None:
        self.path = path
        self.number = number
        self.fd = fd
        self.size = size
        self.tail = HEADER.size
        self.sealed = False

    def room(self, body: int) -> bool:
        return not self.sealed and self.tail + RECORD.size + body <= self.size

    def append_many(self, records: Sequence[tuple[int, int, Sequence[bytes]]]) -> list[int]:
        """Write records at the tail in one ``pwritev``; returns their bodies' offsets.

        Seals the segment on error: bytes after the tail may be torn.
        """
        buffers: list[bytes] = []
        offsets = []
        pos = self.tail
        for rtype, job, parts in records:
            length = sum(len(p) for p in parts)
            buffers.append(RECORD.pack(length, record_crc(self.number, rtype, job, parts),
                                       rtype, job))
            buffers += parts
            offsets.append(pos + RECORD.size)
            pos += RECORD.size + length
        try:
            written = os.pwritev(self.fd, buffers, self.tail)
            if written != pos - self.tail:
                raise OSError(5, "short write to a segment")
        except OSError:
            self.sealed = True  # bytes after the tail may be torn: never append after them
            raise
        self.tail = pos
        return offsets

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SegmentLog:
    """The segment files of one spool directory: append, sync, replay, collect.

    ``replay()`` runs once, first: it reads every segment (all are sealed
    then) and sets the log up to append to a new one.  ``append`` rotates to
    a new (or recycled) segment when the current one is full; ``sync`` makes
    every record appended so far durable; ``done`` marks a job's records
    obsolete and ``collect`` recycles the segments nothing alive needs.
    """

    def __init__(self, directory: str, *, segment_size: int = SEGMENT_SIZE,
                 fsync: bool = True) -> None:
        self.directory = directory
        self.segment_size = segment_size
        self.fsync = fsync
        self._lock = threading.Lock()       # appends and bookkeeping
        self._sync_lock = threading.Lock()  # one sync at a time
        self._current: Segment | None = None
        self._next = 1
        self._order: list[int] = []               # live segments, oldest first
        self._jobs: dict[int, set[int]] = {}      # segment -> jobs whose record is there
        self._where: dict[int, int] = {}          # job -> segment of its newest JOB record
        self._bodies: dict[int, tuple[int, int]] = {}  # job -> (offset, length) of that body
        self._states: dict[int, bytes] = {}       # job -> its newest STATE body
        self._readers: dict[int, int] = {}        # segment -> read-only fd
        self._unsynced: list[Segment] = []        # rotated away from, not yet fdatasynced
        self._dir_dirty = False                   # a segment name changed since the last sync
        self._dirty = False                       # appended to since the last sync began
        self.stats = {"created": 0, "recycled": 0, "removed": 0, "syncs": 0, "moved": 0}

    # -- start-up ------------------------------------------------------------------------

    def replay(self) -> list[Record]:
        """Every valid record of every segment, in append order; then the log is open.

        Under ``fsync`` every segment found is fdatasynced first: records a
        crashed daemon left in the page cache (a DONE, a moved job) must be
        durable before anything is collected on their word.
        """
        if self._order or self._current is not None:
            raise RuntimeError("replay() runs once, first")
        make_dir(self.directory)
        records: list[Record] = []
        numbers = sorted(int(m.group(1)) for n in os.listdir(self.directory)
                         if (m := NAME_RE.fullmatch(n)))
        for number in numbers:
            with open(self._path(number), "rb") as f:
                found = scan(f.read(), number)
                if self.fsync:
                    os.fdatasync(f.fileno())
            self._order.append(number)
            self._jobs[number] = set()
            for record in found.records:
                self._track(record, len(record.body))
            records += found.records
        self._next = (numbers[-1] + 1) if numbers else 1
        return records

    def _track(self, record: Record, length: int) -> None:
        if record.type == JOB:
            self._forget(record.job)
            self._where[record.job] = record.segment
            self._bodies[record.job] = (record.offset, length)
            self._jobs[record.segment].add(record.job)
        elif record.type == STATE:  # also before its JOB record (a job committed held)
            self._states[record.job] = record.body
        elif record.type == DONE:
            self._forget(record.job)
            self._states.pop(record.job, None)

    def _forget(self, job: int) -> None:
        old = self._where.pop(job, None)
        self._bodies.pop(job, None)
        if old is not None:
            self._jobs[old].discard(job)

    # -- appending -----------------------------------------------------------------------

    def append(self, rtype: int, job: int, parts: Sequence[bytes] = ()) -> Record:
        """Append one record; returns where its body lies (``body`` left empty)."""
        return self.append_many([(rtype, job, parts)])[-1]

    def append_many(self, records: Sequence[tuple[int, int, Sequence[bytes]]], *,
                    still_in: tuple[int, int] | None = None) -> list[Record]:
        """Append records together, in one segment and one write (a job and its hold).

        ``still_in`` (job, segment): append only while that job's newest record
        is still there, checked under the same lock (``move_forward``); else [].
        """
        lengths = [sum(len(p) for p in parts) for _, _, parts in records]
        total = sum(lengths) + RECORD.size * (len(records) - 1)
        if total > self.segment_size - HEADER.size - RECORD.size:
            raise ValueError(f"record of {total} bytes does not fit in a segment")
        with self._lock:
            if still_in is not None and self._where.get(still_in[0]) != still_in[1]:
                return []
            segment = self._current
            if segment is None or not segment.room(total):
                segment = self._rotate()
            self._dirty = True
            offsets = segment.append_many([(t, j, p) for t, j, p in records])
            placed = []
            for (rtype, job, parts), offset, length in zip(records, offsets, lengths,
                                                            strict=True):
                body = b"".join(parts) if rtype == STATE else b""
                record = Record(segment.number, offset, rtype, job, body)
                self._track(record, length)
                placed.append(record)
            return placed

    def _rotate(self) -> Segment:
        old = self._current
        if old is not None:
            self._unsynced.append(old)
            self._current = None
        number = self._next
        path = self._path(number)
        spare = self._spare()
        if spare is not None:
            os.rename(spare, path)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            self.stats["recycled"] += 1
        else:
            fd = create(path, os.O_RDWR | os.O_EXCL)
            self.stats["created"] += 1
        self._next = number + 1  # never reused, even when this attempt fails
        try:
            os.posix_fallocate(fd, 0, self.segment_size)
            os.pwrite(fd, HEADER.pack(MAGIC, number), 0)
        except OSError:
            os.close(fd)
            unlink_quiet(path)
            raise
        self._dir_dirty = True
        self._current = Segment(path, number, fd, self.segment_size)
        self._order.append(number)
        self._jobs[number] = set()
        return self._current

    def _spare(self) -> str | None:
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.directory)):
                if name.startswith("spare-"):
                    return os.path.join(self.directory, name)
        return None

    def sync(self, *, collect: bool = False) -> int:
        """Make every record appended so far durable; returns the sync calls made.

        ``collect``: then recycle the segments that were empty when it began.
        Appends go on meanwhile (the lock is not held during ``fdatasync``);
        one sync runs at a time, so no segment is closed under another.
        """
        with self._sync_lock:
            ticket = self.begin_sync()
            ok = False
            try:
                calls = self.flush(ticket)
                ok = True
            finally:
                self.end_sync(ticket, ok=ok)
            if collect:
                self.collect(ticket)
        return calls

    @property
    def dirty(self) -> bool:
        """Records were appended (or a segment renamed) that no finished sync covers yet."""
        with self._lock:
            return self._dirty or self._dir_dirty or bool(self._unsynced)

    def begin_sync(self) -> SyncTicket:
        """Under the lock: the segments to flush and the ones empty now (``collect``)."""
        with self._lock:
            current = self._current
            fds = [s.fd for s in self._unsynced if s.fd >= 0]
            if current is not None and current.fd >= 0 and self._dirty:
                fds.append(current.fd)
            empty = []
            for number in self._order:
                if self._jobs[number] or (current is not None and number == current.number):
                    break
                empty.append(number)
            ticket = SyncTicket(tuple(fds), tuple(self._unsynced), self._dir_dirty,
                                tuple(empty))
            self._dir_dirty = self._dirty = False
            return ticket

    def flush(self, ticket: SyncTicket) -> int:
        """The ``fdatasync`` calls of a ticket, outside the lock; returns how many."""
        if not self.fsync:
            return 0
        for fd in ticket.fds:
            os.fdatasync(fd)
        if ticket.directory:
            fsync_directory(self.directory)
        calls = len(ticket.fds) + ticket.directory
        self.stats["syncs"] += calls
        return calls

    def end_sync(self, ticket: SyncTicket, *, ok: bool) -> None:
        """Close the segments the ticket synced; after a failure, seal the current one.

        A failed ``fdatasync`` leaves the state of dirty pages unknown
        (Linux may drop them), so nothing more is appended to that segment.
        """
        with self._lock:
            if not ok:
                self._dir_dirty = self._dir_dirty or ticket.directory
                self._dirty = True
                if self._current is not None:
                    self._current.sealed = True
                return
            for segment in ticket.closing:
                segment.close()
                self._unsynced.remove(segment)

    def _close_unsynced(self) -> None:
        for segment in self._unsynced:
            segment.close()
        self._unsynced.clear()

    # -- delivery and removal ------------------------------------------------------------

    def reader(self, segment: int) -> int:
        """A read-only descriptor of ``segment`` (kept open while it lives)."""
        with self._lock:
            fd = self._readers.get(segment)
            if fd is None:
                fd = os.open(self._path(segment), os.O_RDONLY | os.O_CLOEXEC)
                self._readers[segment] = fd
            return fd

    def done(self, job: int) -> Record:
        """Append the DONE record of ``job``: its records are no longer needed."""
        return self.append(DONE, job)

    def done_many(self, jobs: Sequence[int]) -> None:
        """The DONE records of the live ones of ``jobs``, in one write per segment's worth."""
        live = [job for job in jobs if self._where.get(job) is not None]
        step = (self.segment_size - HEADER.size) // RECORD.size // 2
        for start in range(0, len(live), step):
            self.append_many([(DONE, job, ()) for job in live[start:start + step]])

    def live(self, job: int) -> int | None:
        """The segment holding the newest record of ``job``, or None when done/unknown."""
        return self._where.get(job)

    def pinned_by(self) -> int | None:
        """The oldest segment's oldest live job: what keeps segments from being recycled."""
        with self._lock:
            for number in self._order:
                if self._jobs[number]:
                    return min(self._jobs[number])
            return None

    def move_forward(self, job: int) -> Record | None:
        """Copy a live job's JOB record (and its newest STATE) to the current segment.

        For a job held for long (docs/spool.md, step 5): its old segment —
        and with it every later one — can then be collected once the copy is
        durable.  Returns the new JOB record, None when the job is not live.
        """
        with self._lock:
            segment = self._where.get(job)
            if segment is None:
                return None
            offset, length = self._bodies[job]
            state = self._states.get(job)
        body = os.pread(self.reader(segment), length, offset)
        if len(body) != length:
            raise OSError(5, "segment shorter than its record")
        records: list[tuple[int, int, Sequence[bytes]]] = [(JOB, job, [body])]
        if state is not None:
            records.append((STATE, job, [state]))
        # Done (or moved) meanwhile: nothing appended, or the copy would revive it.
        placed = self.append_many(records, still_in=(job, segment))
        if not placed:
            return None
        self.stats["moved"] += 1
        return placed[0]

    def collect(self, ticket: SyncTicket | None = None) -> int:
        """Recycle or remove the oldest segments no live job needs; returns how many.

        Only a prefix goes, and only once the DONE records that emptied it are
        durable (call after ``sync``, or pass the ticket of a sync: then only
        the segments empty when it began): a later segment's DONE and state
        records refer to jobs of earlier ones, so those must be gone first.
        """
        with self._lock:
            current = self._current.number if self._current is not None else -1
            allowed = set(ticket.empty) if ticket is not None else None
            gone = 0
            while (self._order and self._order[0] != current and not self._jobs[self._order[0]]
                   and (allowed is None or self._order[0] in allowed)):
                number = self._order.pop(0)
                del self._jobs[number]
                fd = self._readers.pop(number, None)
                if fd is not None:
                    os.close(fd)
                self._retire(number)
                gone += 1
            if gone:
                self._dir_dirty = True
            return gone

    def _retire(self, number: int) -> None:
        spares = [n for n in os.listdir(self.directory) if n.startswith("spare-")]
        if len(spares) < SPARES:
            os.rename(self._path(number), os.path.join(self.directory, f"spare-{number:012d}"))
        else:
            unlink_quiet(self._path(number))
            self.stats["removed"] += 1

    def segments(self) -> list[int]:
        """Live segment numbers, oldest first."""
        with self._lock:
            return list(self._order)

    def path(self, number: int) -> str:
        """The file of segment ``number``."""
        return self._path(number)

    def close(self) -> None:
        with self._lock:
            self._close_unsynced()
            if self._current is not None:
                self._current.close()
                self._current = None
            for fd in self._readers.values():
                os.close(fd)
            self._readers.clear()

    def _path(self, number: int) -> str:
        return os.path.join(self.directory, segment_name(number))


