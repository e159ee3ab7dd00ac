"""The segment file format: record layout, checksums, scanning, folding (docs/spool.md).

Pure functions over bytes (and ``read_only``, which only reads files), shared
by the appending log (``relay.spoolsegment``), the spool's segment jobs
(``relay.spoolsegjobs``) and readers beside the daemon (``lpd-relay spool``).
Each record carries its length and a CRC-32 seeded with its segment's number,
so a scan stops at the first record that is short, torn or left over from a
recycled file's previous life.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

MAGIC = b"LPDRSEG1"
HEADER = struct.Struct("<8sQ")      # magic, segment number
RECORD = struct.Struct("<IIBQ")     # body length, crc32, type, job number
SEED = struct.Struct("<Q")          # the segment number, as the CRC's first bytes
LENGTH = struct.Struct("<I")        # a JOB body's metadata length
JOB, STATE, DONE = 1, 2, 3          # record types
TYPES = frozenset({JOB, STATE, DONE})
SEGMENT_SIZE = 4 << 20              # bytes preallocated per segment
SPARES = 1                          # emptied segments kept for reuse
MAX_BODY = SEGMENT_SIZE - HEADER.size - 2 * RECORD.size - 4096  # a JOB record's body, at most
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



@dataclass(frozen=True, slots=True)
class LiveJob:
    """A job the segments still hold: its newest JOB record and STATE body (b"": none)."""

    record: Record
    state: bytes


def fold(records: Sequence[Record]) -> dict[int, LiveJob]:
    """The jobs ``records`` leave alive, by job number (replay order = append order).

    A newer JOB record (a job moved forward) keeps the state known so far; a
    STATE before any JOB record of its job (a job committed held: the state
    goes first, in the same write) applies once the JOB record follows.
    """
    live: dict[int, LiveJob] = {}
    early: dict[int, bytes] = {}
    for r in records:
        if r.type == JOB:
            known = live[r.job].state if r.job in live else b""
            live[r.job] = LiveJob(r, early.pop(r.job, known))
        elif r.type == STATE and r.job in live:
            live[r.job] = LiveJob(live[r.job].record, r.body)
        elif r.type == STATE:
            early[r.job] = r.body
        elif r.type == DONE:
            live.pop(r.job, None)
            early.pop(r.job, None)
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

