"""Small jobs kept as segment records: the spool's side of ``relay.spoolsegment``.

A job of at most ``segment_threshold`` bytes (control file and data) is one
JOB record in a segment file, so committing it creates no file: the
group-commit thread appends it and one ``fdatasync`` of the segment makes the
batch durable.  Its delivery state and its removal are STATE and DONE
records.  This module turns those records into the spool's ``JobMeta`` and
back, and tells delivery where a body lies.

A segment job's paths name no file but a stable *body name* in the segment
folder (``segments/<id>.cf``, ``segments/<id>.d<n>``): the record moves when
a long-held job is copied forward, the name does not.  ``locate`` resolves a
name to (segment file, offset, length) for ``relay.spoolbackend``.

Only the daemon (the spool lock holder) appends while it runs; ``lpd-relay
spool`` reads a consistent prefix with ``read_only`` and, with the daemon
stopped, takes the lock before it appends (docs/spool.md).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable

from relay.spoolbackend import register_locator
from relay.spoolformat import ID_WIDTH, JobMeta, decode_job, encode_job, encode_state, with_state
from relay.spoolsegment import (
    DONE,
    JOB,
    LENGTH,
    MAX_BODY,
    SEGMENT_SIZE,
    STATE,
    Record,
    SegmentLog,
    fold,
    job_body,
    job_meta,
    read_only,
)

SEGMENT_THRESHOLD = 64 << 10   # jobs up to this size (control + data) become records
MOVE_AFTER = 4                 # live segments behind a job before its record moves forward
BODY_RE = re.compile(rf"(\d{{{ID_WIDTH},20}})\.(cf|d\d{{1,4}})")


def _record_bound(meta: JobMeta) -> int:
    """At least ``len(encode_job(meta))``: a character is at most 6 bytes of JSON (an
    escape), the keys, numbers and punctuation under 400 bytes, a file's under 100."""
    text = (len(meta.id) + len(meta.queue) + len(meta.wire_queue) + len(meta.peer)
            + len(meta.control_name) + len(meta.number) + len(meta.user) + len(meta.host)
            + len(meta.title) + len(meta.job_name) + len(meta.tls_peer)
            + sum(len(f.name) + len(f.format) + len(f.path) for f in meta.files))
    return 6 * text + 400 + 100 * len(meta.files)


class SegmentJobs:
    """The segment jobs of one spool: their log, their records, where their bodies are.

    In the daemon (after ``recover``) ``jobs`` holds every live segment job
    with its current state and ``log`` appends; elsewhere ``view`` reads the
    segments each time.
    """

    def __init__(self, directory: str, *, fsync: bool) -> None:
        self.folder = os.path.join(directory, "segments")
        self.fsync = fsync
        self.segment_size = SEGMENT_SIZE
        self.log: SegmentLog | None = None
        self.jobs: dict[str, JobMeta] = {}
        # id -> (segment, offset of the JOB body, offset of the control file in it)
        self._where: dict[str, tuple[int, int, int]] = {}

    # -- the daemon ------------------------------------------------------------------

    def recover(self, count_discard: Callable[[int], None]) -> tuple[list[JobMeta], int]:
        """Replay the segments: the live jobs (id order) and the highest job number seen."""
        self.log = SegmentLog(self.folder, fsync=self.fsync, segment_size=self.segment_size)
        records = self.log.replay()
        for number, live in sorted(fold(records).items()):
            try:
                self._remember(self._decode(live.record, live.state), live.record)
            except ValueError:  # a record that checks but does not decode: debris
                count_discard(len(live.record.body))
                self.log.done(number)
        register_locator(self.folder, self.locate)
        return sorted(self.jobs.values(), key=lambda m: int(m.id)), max(
            (r.job for r in records), default=0)

    def _decode(self, record: Record, state: bytes) -> JobMeta:
        job_id = f"{record.job:0{ID_WIDTH}d}"
        raw, _ = job_meta(record.body)
        base = decode_job(raw, job_id, self.folder)
        if len(record.body) != LENGTH.size + len(raw) + base.control_bytes + base.total_bytes:
            raise ValueError("record length does not match its metadata")
        return with_state(base, state or None)

    def _remember(self, meta: JobMeta, record: Record) -> None:
        self.jobs[meta.id] = meta
        self._where[meta.id] = (record.segment, record.offset, job_meta(record.body)[1])

    def fits(self, meta: JobMeta) -> bool:
        """Whether the job's record fits in a segment (a huge control file may not)."""
        room = min(MAX_BODY, self.segment_size // 2) - meta.control_bytes - meta.total_bytes
        # On the event loop, per job: the record's bound first, encoded only near the limit.
        return (_record_bound(meta) + LENGTH.size <= room
                or len(encode_job(meta)) + LENGTH.size <= room)


    def append_job(self, meta: JobMeta, control: bytes, data: list[bytes],
                   state: bytes | None) -> None:
        """In the flush thread: the job's JOB record, after its STATE when committed held."""
        assert self.log is not None
        record = encode_job(meta)
        number = int(meta.id)
        records: list[tuple[int, int, list[bytes]]] = []
        if state is not None:  # first, in the same write: no crash leaves it queued
            records.append((STATE, number, [state]))
        records.append((JOB, number, job_body(record, control, data)))
        placed = self.log.append_many(records)[-1]
        self._where[meta.id] = (placed.segment, placed.offset, LENGTH.size + len(record))

    def committed(self, meta: JobMeta) -> None:
        """On the event loop, once durable: the job is served from memory from now on."""
        self.jobs[meta.id] = meta

    def forget(self, job_id: str) -> None:
        """A commit that failed: its record (if any) is not a job; a DONE lets it go."""
        if self._where.pop(job_id, None) is not None and self.log is not None:
            # A broken disk: the record stays, a restart replays it (never acknowledged).
            with contextlib.suppress(OSError):
                self.log.done(int(job_id))

    def write_state(self, meta: JobMeta, *, durable: bool) -> None:
        """Append ``meta``'s delivery state (OSError when refused); nothing if removed."""
        assert self.log is not None
        if meta.id not in self.jobs:
            return
        self.log.append(STATE, int(meta.id), [encode_state(meta)])
        if durable and self.fsync:
            self.log.sync()

    def remove(self, job_id: str) -> Callable[[], None]:
        """Forget a job; returns the write that records it (its DONE record)."""
        self.jobs.pop(job_id, None)
        self._where.pop(job_id, None)
        log = self.log
        assert log is not None

        def done() -> None:
            if log.live(int(job_id)) is not None:
                log.done(int(job_id))
        return done

    def remove_many(self, job_ids: list[str]) -> Callable[[], None]:
        """``remove`` of several jobs: the write records them all (one ``pwritev``)."""
        for job_id in job_ids:
            self.jobs.pop(job_id, None)
            self._where.pop(job_id, None)
        log = self.log
        assert log is not None
        numbers = [int(job_id) for job_id in job_ids]

        def done() -> None:
            log.done_many(numbers)
        return done

    def upkeep(self) -> None:
        """After a sync: move the record of a job that pins ``MOVE_AFTER`` segments forward."""
        log = self.log
        if log is None or len(log.segments()) <= MOVE_AFTER:
            return
        number = log.pinned_by()
        job_id = f"{number:0{ID_WIDTH}d}" if number is not None else ""
        old = self._where.get(job_id)
        if number is None or old is None:
            return
        moved = log.move_forward(number)
        if moved is not None and job_id in self.jobs:
            self._where[job_id] = (moved.segment, moved.offset, old[2])

    def locate(self, name: str) -> tuple[str, int, int] | None:
        """(segment file, offset, length) of a body name, None when not a live one.

        Called by ``relay.spoolbackend`` for paths in the segment folder, from
        any thread (a sink may read in a worker thread): reads only.
        """
        m = BODY_RE.fullmatch(name)
        meta = self.jobs.get(m.group(1)) if m else None
        where = self._where.get(meta.id) if meta is not None else None
        if meta is None or where is None or self.log is None:
            return None
        segment, body, delta = where
        pos = body + delta
        if name.endswith(".cf"):
            return self.log.path(segment), pos, meta.control_bytes
        pos += meta.control_bytes
        for f in meta.files:
            if os.path.basename(f.path) == name:
                return self.log.path(segment), pos, f.bytes
            pos += f.bytes
        return None

    def close(self) -> None:
        if self.log is not None:  # only the daemon registered (a reader's close must not)
            register_locator(self.folder, None)
            self.log.close()
            self.log = None

    # -- readers beside the daemon, and the CLI with the daemon stopped ------------------

    def view(self) -> dict[str, JobMeta]:
        """The live segment jobs as the files show them now (no log, no lock)."""
        found: dict[str, JobMeta] = {}
        for live in fold(read_only(self.folder)).values():
            try:
                meta = self._decode(live.record, live.state)
            except ValueError:
                continue
            found[meta.id] = meta
        return found

    def change_offline(self, job_id: str, state: JobMeta | None) -> None:
        """With the spool lock held (daemon stopped): append a STATE, or a DONE (None)."""
        log = SegmentLog(self.folder, fsync=self.fsync, segment_size=self.segment_size)
        try:
            log.replay()
            if log.live(int(job_id)) is None:
                return
            if state is None:
                log.append(DONE, int(job_id))
            else:
                log.append(STATE, int(job_id), [encode_state(state)])
            log.sync()
        finally:
            log.close()
