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
state record) never outlives the job record it refers to.  Not thread-safe:
one caller at a time (the group-commit thread, or code that holds a lock).
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.groupcommit import create, fsync_directory, make_dir, unlink_quiet

MAGIC = b"LPDRSEG1"
HEADER = struct.Struct("<8sQ")      # magic, segment number
RECORD = struct.Struct("<IIBQ")     # body length, crc32, type, job number
SEED = struct.Struct("<Q")          # the segment number, as the CRC's first bytes
LENGTH = struct.Struct("<I")        # a JOB body's metadata length
JOB, STATE, DONE = 1, 2, 3          # record types
TYPES = frozenset({JOB, STATE, DONE})
SEGMENT_SIZE = 4 << 20              # bytes preallocated per segment
SPARES = 1                          # emptied segments kept for reuse
NAME_RE = re.compile(r"(\d{12})\.seg")


def segment_name(number: int) -> str:
    return f"{number:012d}.seg"


def record_crc(segment: int, rtype: int, job: int, parts: Sequence[bytes]) -> int:
    """CRC-32 over the segment number, type, job number and body, in that order."""
    crc = zlib.crc32(SEED.pack(segment))
    crc = zlib.crc32(bytes((rtype,)) + SEED.pack(job), crc)
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


@dataclass(frozen=True, slots=True)
class Record:
    """One record found by replay: where its body lies, and the body itself."""

    segment: int
    offset: int          # of the body in the segment file
    type: int
    job: int
    body: bytes


@dataclass(slots=True)
class Scan:
    """What one segment file holds: its valid records and where they end."""

    number: int
    records: list[Record] = field(default_factory=list)
    end: int = HEADER.size   # first byte after the last valid record (0: no header)


def scan(data: bytes, number: int) -> Scan:
    """The valid records of a segment's bytes; stops at the first bad one."""
    result = Scan(number)
    magic, stored = HEADER.unpack_from(data, 0) if len(data) >= HEADER.size else (b"", -1)
    if magic != MAGIC or stored != number:
        result.end = 0
        return result
    pos = HEADER.size
    while pos + RECORD.size <= len(data):
        length, crc, rtype, job = RECORD.unpack_from(data, pos)
        start = pos + RECORD.size
        if rtype not in TYPES or length > len(data) - start:
            break
        body = data[start:start + length]
        if record_crc(number, rtype, job, (body,)) != crc:
            break
        result.records.append(Record(number, start, rtype, job, body))
        pos = start + length
    result.end = pos
    return result


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

    def append(self, rtype: int, job: int, parts: Sequence[bytes]) -> int:
        """Write one record at the tail; returns its body's offset.  Seals on error."""
        length = sum(len(p) for p in parts)
        head = RECORD.pack(length, record_crc(self.number, rtype, job, parts), rtype, job)
        try:
            written = os.pwritev(self.fd, [head, *parts], self.tail)
            if written != len(head) + length:
                raise OSError(5, "short write to a segment")
        except OSError:
            self.sealed = True  # bytes after the tail may be torn: never append after them
            raise
        offset = self.tail + len(head)
        self.tail = offset + length
        return offset

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
        self._current: Segment | None = None
        self._next = 1
        self._order: list[int] = []               # live segments, oldest first
        self._jobs: dict[int, set[int]] = {}      # segment -> jobs whose record is there
        self._where: dict[int, int] = {}          # job -> segment of its newest JOB record
        self._readers: dict[int, int] = {}        # segment -> read-only fd
        self._unsynced: list[Segment] = []        # rotated away from, not yet fdatasynced
        self._dir_dirty = False                   # a segment name changed since the last sync
        self.stats = {"created": 0, "recycled": 0, "removed": 0, "syncs": 0}

    # -- start-up ------------------------------------------------------------------------

    def replay(self) -> list[Record]:
        """Every valid record of every segment, in append order; then the log is open."""
        if self._order or self._current is not None:
            raise RuntimeError("replay() runs once, first")
        make_dir(self.directory)
        records: list[Record] = []
        numbers = sorted(int(m.group(1)) for n in os.listdir(self.directory)
                         if (m := NAME_RE.fullmatch(n)))
        for number in numbers:
            with open(self._path(number), "rb") as f:
                found = scan(f.read(), number)
            self._order.append(number)
            self._jobs[number] = set()
            for record in found.records:
                self._track(record)
            records += found.records
        self._next = (numbers[-1] + 1) if numbers else 1
        return records

    def _track(self, record: Record) -> None:
        if record.type == JOB:
            self._forget(record.job)
            self._where[record.job] = record.segment
            self._jobs[record.segment].add(record.job)
        elif record.type == DONE:
            self._forget(record.job)

    def _forget(self, job: int) -> None:
        old = self._where.pop(job, None)
        if old is not None:
            self._jobs[old].discard(job)

    # -- appending -----------------------------------------------------------------------

    def append(self, rtype: int, job: int, parts: Sequence[bytes] = ()) -> Record:
        """Append one record; returns where its body lies (``body`` left empty)."""
        length = sum(len(p) for p in parts)
        if length > self.segment_size - HEADER.size - RECORD.size:
            raise ValueError(f"record of {length} bytes does not fit in a segment")
        segment = self._current
        if segment is None or not segment.room(length):
            segment = self._rotate()
        offset = segment.append(rtype, job, parts)
        record = Record(segment.number, offset, rtype, job, b"")
        self._track(record)
        return record

    def _rotate(self) -> Segment:
        old = self._current
        if old is not None:
            self._unsynced.append(old)
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
        try:
            os.posix_fallocate(fd, 0, self.segment_size)
            os.pwrite(fd, HEADER.pack(MAGIC, number), 0)
        except OSError:
            os.close(fd)
            unlink_quiet(path)
            raise
        self._next = number + 1
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

    def sync(self) -> int:
        """Make every record appended so far durable; returns the sync calls made."""
        if not self.fsync:
            self._close_unsynced()
            return 0
        calls = 0
        for segment in [*self._unsynced, self._current]:
            if segment is not None and segment.fd >= 0:
                os.fdatasync(segment.fd)
                calls += 1
        if self._dir_dirty:
            fsync_directory(self.directory)
            self._dir_dirty = False
            calls += 1
        self._close_unsynced()
        self.stats["syncs"] += calls
        return calls

    def _close_unsynced(self) -> None:
        for segment in self._unsynced:
            segment.close()
        self._unsynced.clear()

    # -- delivery and removal ------------------------------------------------------------

    def reader(self, segment: int) -> int:
        """A read-only descriptor of ``segment`` (kept open while it lives)."""
        fd = self._readers.get(segment)
        if fd is None:
            fd = os.open(self._path(segment), os.O_RDONLY | os.O_CLOEXEC)
            self._readers[segment] = fd
        return fd

    def done(self, job: int) -> Record:
        """Append the DONE record of ``job``: its records are no longer needed."""
        return self.append(DONE, job)

    def live(self, job: int) -> int | None:
        """The segment holding the newest record of ``job``, or None when done/unknown."""
        return self._where.get(job)

    def pinned_by(self) -> int | None:
        """The oldest segment's oldest live job: what keeps segments from being recycled."""
        for number in self._order:
            if self._jobs[number]:
                return min(self._jobs[number])
        return None

    def collect(self) -> int:
        """Recycle or remove the oldest segments no live job needs; returns how many.

        Only a prefix goes, and only once the DONE records that emptied it are
        durable (call after ``sync``): a later segment's DONE and state records
        refer to jobs of earlier ones, so those must be gone first.
        """
        current = self._current.number if self._current is not None else -1
        gone = 0
        while self._order and self._order[0] != current and not self._jobs[self._order[0]]:
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
        return list(self._order)

    def close(self) -> None:
        self._close_unsynced()
        if self._current is not None:
            self._current.close()
            self._current = None
        for fd in self._readers.values():
            os.close(fd)
        self._readers.clear()

    def _path(self, number: int) -> str:
        return os.path.join(self.directory, segment_name(number))


@dataclass(frozen=True, slots=True)
class LiveJob:
    """A job the segments still hold: its newest JOB record and STATE body (b"": none)."""

    record: Record
    state: bytes


def fold(records: Sequence[Record]) -> dict[int, LiveJob]:
    """The jobs ``records`` leave alive, by job number (replay order = append order)."""
    live: dict[int, LiveJob] = {}
    for r in records:
        if r.type == JOB:
            live[r.job] = LiveJob(r, b"")
        elif r.type == STATE and r.job in live:
            live[r.job] = LiveJob(live[r.job].record, r.body)
        elif r.type == DONE:
            live.pop(r.job, None)
    return live


def read_only(directory: str) -> list[Record]:
    """Every valid record, for a reader beside the running daemon (``lpd-relay spool``).

    Creates, seals and changes nothing.  A record being appended meanwhile is
    either whole (its CRC checks) or ends that segment's scan, so the reader
    sees a consistent prefix of what was appended; a segment recycled between
    listing and reading fails its header check and is skipped.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    records: list[Record] = []
    for number in sorted(int(m.group(1)) for n in names if (m := NAME_RE.fullmatch(n))):
        try:
            with open(os.path.join(directory, segment_name(number)), "rb") as f:
                records += scan(f.read(), number).records
        except FileNotFoundError:
            continue  # collected meanwhile: all its jobs were done
    return records


def job_body(meta: bytes, control: bytes, data: Sequence[bytes]) -> list[bytes]:
    """The parts of a JOB record's body: metadata length, metadata, control file, data."""
    return [LENGTH.pack(len(meta)), meta, control, *data]


def job_meta(body: bytes) -> tuple[bytes, int]:
    """A JOB body's metadata and the offset (in the body) where the control file starts."""
    (length,) = LENGTH.unpack_from(body, 0)
    start = LENGTH.size
    if length > len(body) - start:
        raise ValueError("metadata longer than the record")
    return body[start:start + length], start + length

