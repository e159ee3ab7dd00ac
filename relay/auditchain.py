"""The audit log's record format and hash chain, with no I/O beyond reading files.

One record is one line of JSON (SPEC §11).  Its ``hash`` is the SHA-256 of
the record's canonical JSON *without* the ``hash`` key: orjson with
``OPT_SORT_KEYS`` (keys sorted, no spaces, UTF-8); ``prev`` is the ``hash``
of the record before it, 64 zeros for the first record ever, and ``seq``
counts 1, 2, 3 … across rotated files.  Editing a record breaks its hash;
deleting, inserting or reordering records breaks ``seq`` and ``prev``.  The
construction is written out in docs/audit.md so anyone can check a log with
a few lines of their own.

The writer (``relay.audit``) seals records here and ``verify`` walks the
rotated files oldest first (``FILE.N`` … ``FILE.1``, ``FILE``) as one chain.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

ZERO_HASH = "0" * 64
# Where a chain ends is read from this much of a file's end at first (more if needed).
TAIL_BYTES = 1 << 16


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes the hash covers: sorted-key compact JSON of every key but ``hash``."""
    return orjson.dumps({k: v for k, v in record.items() if k != "hash"},
                        option=orjson.OPT_SORT_KEYS)


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


def seal(fields: Mapping[str, Any], *, seq: int, prev: str) -> tuple[bytes, str]:
    """The line (with its newline) for ``fields`` as record ``seq`` after ``prev``; its hash."""
    record = {**fields, "seq": seq, "prev": prev}
    digest = hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()
    record["hash"] = digest
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE), digest


def rotated(path: str) -> list[str]:
    """The chain's files oldest first: ``FILE.N`` … ``FILE.1``, then ``FILE`` if present."""
    head, tail = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(tail) + r"\.(\d+)")
    try:
        names = os.listdir(head)
    except FileNotFoundError:
        return []
    numbers = sorted((int(m.group(1)) for n in names if (m := pattern.fullmatch(n))),
                     reverse=True)
    files = [os.path.join(head, f"{tail}.{n}") for n in numbers]
    return files + ([path] if tail in names else [])


@dataclass(frozen=True, slots=True, kw_only=True)
class Tail:
    """Where a chain ends: the last whole record's seq and hash, and the file's good length."""

    seq: int
    hash: str
    good_bytes: int      # the file up to and including its last newline
    torn: bool           # bytes after the last newline (a write a crash cut)


def _tail_bytes(path: str) -> tuple[int, bytes]:
    """The end of ``path`` holding at least one whole line (a record may exceed TAIL_BYTES)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        window = TAIL_BYTES
        while True:   # bounded: the window doubles until it covers the file
            start = max(0, size - window)
            f.seek(start)
            data = f.read()
            if start == 0 or data.count(b"\n") >= 2:
                return start, data
            window *= 2


def tail_of(path: str) -> Tail | None:
    """The last whole record of ``path``; None when the file has none (absent or empty)."""
    try:
        start, data = _tail_bytes(path)
    except FileNotFoundError:
        return None
    end = data.rfind(b"\n")
    torn = end + 1 < len(data)
    lines = data[:end].split(b"\n") if end >= 0 else []
    for line in reversed(lines[1:] if start else lines):  # the first may be cut by start
        try:
            record = orjson.loads(line)
            return Tail(seq=int(record["seq"]), hash=str(record["hash"]),
                        good_bytes=start + end + 1, torn=torn)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            break
    return Tail(seq=0, hash="", good_bytes=start + end + 1, torn=torn) if torn else None


def chain_tail(path: str) -> tuple[int, str]:
    """The (seq, hash) a new record follows: the newest file's last record, else a new chain."""
    for file in reversed(rotated(path)):
        tail = tail_of(file)
        if tail is not None and tail.seq:
            return tail.seq, tail.hash
    return 0, ZERO_HASH


@dataclass(frozen=True, slots=True, kw_only=True)
class BadRecord:
    """The first record ``verify`` rejects, and why."""

    file: str
    line: int
    seq: int | None
    reason: str

    def __str__(self) -> str:
        seq = "?" if self.seq is None else str(self.seq)
        return f"first bad record: {self.file} line {self.line} (seq {seq}): {self.reason}"


def records(path: str) -> Iterator[tuple[str, int, bytes]]:
    """Every line of the chain's files, oldest first: (file, line number, raw line)."""
    for file in rotated(path):
        with open(file, "rb") as f:
            for number, line in enumerate(f, 1):
                yield file, number, line


def _check(record: Any, line: bytes, last: tuple[int, str] | None) -> str:
    """Why the decoded ``record`` does not follow ``last`` (seq, hash); "" when it does."""
    if not isinstance(record, dict) or not isinstance(record.get("seq"), int) \
            or not isinstance(record.get("prev"), str) or not isinstance(record.get("hash"), str):
        return "not an audit record (seq, prev and hash are needed)"
    if record_hash(record) != record["hash"]:
        return "hash does not match the record (edited)"
    seq, prev = record["seq"], record["prev"]
    if last is None:
        if seq == 1 and prev != ZERO_HASH:
            return "the first record's prev is not 64 zeros"
        return ""
    if seq != last[0] + 1:
        return f"seq {seq} follows seq {last[0]} (a record deleted, inserted or reordered)"
    if prev != last[1]:
        return "prev is not the hash of the record before (a record replaced)"
    return ""


def verify(path: str) -> BadRecord | None:
    """Check the whole chain (rotated files included); None when it is whole.

    The oldest kept file may start after files ``rotate_keep`` dropped: its
    first record's ``prev`` is taken as given (it cannot be checked).
    """
    last: tuple[int, str] | None = None
    files = rotated(path)
    if not files:
        return BadRecord(file=path, line=0, seq=None, reason="no audit log here")
    for file, number, line in records(path):
        if not line.endswith(b"\n"):
            torn = file == files[-1]
            why = ("torn final line: a write a crash cut short (the daemon truncates it "
                   "at its next start)" if torn else "a line without its newline")
            return BadRecord(file=file, line=number, seq=None, reason=why)
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            seq = None if last is None else last[0] + 1
            return BadRecord(file=file, line=number, seq=seq, reason="not JSON")
        reason = _check(record, line, last)
        if reason:
            seq = record.get("seq") if isinstance(record, dict) else None
            return BadRecord(file=file, line=number, seq=seq if isinstance(seq, int) else None,
                             reason=reason)
        last = record["seq"], record["hash"]
    return None
