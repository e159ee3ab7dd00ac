"""Receiving one job: its data files streamed to disk, its control file kept aside.

The server drives an ``IncomingJob`` from the first byte of a job to its end;
only then does ``Spool.commit`` (``relay.spool``) publish it.  This code runs
on the event loop for every received chunk, so it does little.  A small job
(control file and data within the spool's ``segment_threshold``) stays in
memory: the group-commit thread appends it to a segment as one record, so it
costs no file creation at all.  Once a job grows past the threshold it
*spills*: what it holds is written to ``<id>.d<n>`` files and from then on data
goes from the receive buffer straight to its file (``DataWriter``), as for
every job when the threshold is 0.  The raw control file waits in memory for
the group-commit thread either way, and a job that ends any way but committed
removes what it wrote (``discard``).  A job needs only a few things of its
spool (``JobOwner``), so this module does not import it.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from typing import Any, Protocol

from relay.durablefiles import create, disk_error, unlink_quiet, write_all
from relay.errors import DiskFull, SpoolError
from relay.groupcommit import start_writeback
from relay.spoolformat import FileMeta, JobMeta, json_text

MAX_FILES_PER_JOB = 1024     # RFC 1179 names allow 52 data files; bound hostile senders
WRITEBACK_CHUNK = 8 << 20    # start writeback of large files every 8 MiB under fsync

_NEW = os.O_WRONLY | os.O_EXCL  # create() adds O_CREAT, O_CLOEXEC and the mode


class JobOwner(Protocol):
    """What a job being received needs of its spool (``relay.spool.Spool``)."""

    jobs_dir: str
    fsync: bool
    written: int     # bytes written, for the free-space estimate
    segment_threshold: int  # jobs up to this size (control + data) stay in memory


    def count_discard(self, nbytes: int) -> None: ...


class DataWriter:
    """One data file being received; ``write`` goes straight to the file, no copies."""

    __slots__ = ("_buf", "_counted", "_fd", "_job", "_mark", "_sha", "_size", "name")

    def __init__(self, job: IncomingJob, fd: int, name: str) -> None:
        self._job = job
        self._fd = fd       # -1 while the job is kept in memory (then ``_buf``)
        self._buf: bytearray | None = bytearray() if fd < 0 else None
        self.name = name
        self._counted = 0   # bytes reported by write()/add()
        self._mark = 0      # end of the range already handed to writeback
        self._size = -1     # final size once closed
        # The audit log's SHA-256, taken from the receive buffer as it passes (no re-read).
        self._sha = hashlib.sha256() if job.digests is not None else None

    def fileno(self) -> int:
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._sha is not None:
            self._sha.update(data)
        if self._buf is not None:
            if self._job.bytes + len(data) <= self._job.owner.segment_threshold:
                self._buf += data
                self.add(len(data))
                return
            self._job.spill()  # too big for a segment: to files, this one included
        try:
            self.add(write_all(self._fd, data))
        except OSError as exc:
            error = disk_error(exc, f"job {self._job.id} data file")
            if isinstance(error, DiskFull):
                # Give the space back now, not after the sender was told (a
                # refusal may drain the sender for seconds): the next job fits.
                self._job.discard()
            raise error from exc

    def add(self, n: int) -> None:
        """Account for ``n`` bytes the caller wrote to ``fileno()`` itself (splice)."""
        self._counted += n
        self._job.bytes += n
        self._job.owner.written += n
        if (self._fd >= 0 and self._job.spool_fsync
                and self._counted - self._mark >= WRITEBACK_CHUNK):
            start_writeback(self._fd, self._mark, self._counted - self._mark)
            self._mark = self._counted

    def to_file(self, fd: int) -> None:
        """Internal: the job spilled; what was buffered goes to ``fd``, and so will the rest."""
        assert self._buf is not None
        self._fd = fd
        buf, self._buf = self._buf, None
        try:
            write_all(fd, buf)
        except OSError as exc:
            raise disk_error(exc, f"job {self._job.id} data file") from exc

    def abandon(self) -> None:
        # The job is being discarded: close quietly; a later close() is a no-op.
        if self._size < 0:
            self._size = self._counted
            if self._fd >= 0:
                os.close(self._fd)

    def close(self) -> int:
        """Close the file and return its size (from the file, not the counters)."""
        if self._size < 0 and self._buf is not None:
            self._size = len(self._buf)
            self._job.data_closed(self, self._size, self._counted, self._buf)
        elif self._size < 0:
            try:
                self._size = os.fstat(self._fd).st_size
            finally:
                os.close(self._fd)
            self._job.data_closed(self, self._size, self._counted)
        if self._sha is not None and self._job.digests is not None:
            self._job.digests[self.name] = self._sha.hexdigest()
        return self._size


class IncomingJob:
    """A job under construction; becomes a ``JobMeta`` by ``Spool.commit``."""

    def __init__(self, spool: JobOwner, job_id: str, *, queue: str, wire_queue: str,
                 peer: str) -> None:
        self.id = job_id
        self.bytes = 0                                     # data + control so far
        self.spool_fsync = spool.fsync
        self.owner = spool
        self._fields = {"queue": json_text(queue), "wire_queue": json_text(wire_queue),
                        "peer": json_text(peer)}
        self._control: dict[str, str] | None = None
        self.control_raw = b""  # written by the flush, off the event loop
        self._formats: dict[str, str] = {}
        self._files: dict[str, tuple[str, int]] = {}     # wire name -> (file, size)
        self._writer: DataWriter | None = None
        # file -> bytes of the data files held in memory; None once spilled to files
        self._memory: dict[str, bytearray] | None = {} if spool.segment_threshold > 0 else None
        self._index = 0
        # open | committing | committed | discarding (an unlink failed) | gone
        self._status = "open"
        self.digests: dict[str, str] | None = None   # a dict: hash data files (the audit log)

    def _path(self, name: str) -> str:
        return os.path.join(self.owner.jobs_dir, name)

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
        self._control = {"control_name": json_text(name), "number": json_text(number),
                         "user": json_text(user), "host": json_text(host),
                         "title": json_text(title), "job_name": json_text(job_name)}
        self._formats = {json_text(k): json_text(v) for k, v in formats.items()}

    def set_tls_peer(self, name: str) -> None:
        """The client certificate's mapped name (SPEC §9), kept as ``tls_peer``."""
        self._fields["tls_peer"] = json_text(name)

    def open_data(self, name: str) -> DataWriter:
        """Start a data file; ``name`` is the wire name, kept only as metadata."""
        self._check_open()
        if self._writer is not None:
            raise SpoolError(f"job {self.id}: a data file is already open")
        if self._index >= MAX_FILES_PER_JOB:  # counts re-sent files too
            raise SpoolError(f"job {self.id}: more than {MAX_FILES_PER_JOB} data files")
        self._index += 1
        file = f"{self.id}.d{self._index}"
        fd = -1 if self._memory is not None else self._create(file)
        name = json_text(name)
        if name in self._files:  # a re-sent file supersedes the earlier copy
            old, size = self._files.pop(name)
            if self._memory is None or self._memory.pop(old, None) is None:
                unlink_quiet(self._path(old))
            self.bytes -= size
        self._files[name] = (file, -1)
        self._writer = DataWriter(self, fd, name)
        return self._writer

    def _create(self, file: str) -> int:
        try:
            return create(self._path(file), _NEW)
        except OSError as exc:
            raise disk_error(exc, f"job {self.id} data file") from exc

    @property
    def in_memory(self) -> bool:
        """True while the whole job is held in memory (it will be a segment record)."""
        return self._memory is not None

    def spill(self) -> None:
        """Write what the job holds in memory to its own files; from now on it has files.

        On the event loop, once per job that outgrows the threshold: a large
        job streams to its file as every job did before segments.
        """
        memory, self._memory = self._memory, None
        if memory is None:
            return
        try:
            for file, data in memory.items():
                fd = self._create(file)
                try:
                    write_all(fd, data)
                finally:
                    os.close(fd)
            if self._writer is not None:  # the file being received goes on in its file
                self._writer.to_file(self._create(self._files[self._writer.name][0]))
        except OSError as exc:
            raise disk_error(exc, f"job {self.id} data file") from exc

    def data_parts(self, files: tuple[FileMeta, ...]) -> list[bytes]:
        """The bytes of an in-memory job's data files, in ``files`` order."""
        assert self._memory is not None
        return [bytes(self._memory[os.path.basename(f.path)]) for f in files]

    def data_closed(self, writer: DataWriter, size: int, counted: int,
                    data: bytearray | None = None) -> None:
        # Called by DataWriter.close(): the file's real size wins over the counters.
        self._writer = None
        if data is not None and self._memory is not None:
            self._memory[self._files[writer.name][0]] = data
        self.bytes += size - counted
        if self._files.get(writer.name, ("", 0))[1] == -1:
            self._files[writer.name] = (self._files[writer.name][0], size)

    def discard(self) -> None:
        """Remove everything written for this job; idempotent, no-op once committed.

        An unlink that fails (a spool gone read-only) raises OSError; calling
        again later finishes the job's removal.
        """
        if self._status not in ("open", "discarding"):
            return
        self._status = "discarding"
        if self._writer is not None:
            self._writer.abandon()
            self._writer = None
        if self._memory is None:  # an in-memory job wrote nothing to unlink
            unlink_quiet(self._path(f"{self.id}.json"))  # the job is gone first, then its parts
            unlink_quiet(self._path(f".{self.id}.json.tmp"))
            unlink_quiet(self._path(f"{self.id}.cf"))
            for file, _ in self._files.values():
                unlink_quiet(self._path(file))
        self._memory = None
        self._status = "gone"
        self.owner.count_discard(self.bytes)

    def seal(self, folder: str | None = None) -> JobMeta:
        """Check the job is complete and describe it (used by ``Spool.commit``).

        ``folder``: where its paths point instead of the jobs folder (a segment
        job's body names, ``relay.spoolsegjobs``), so no copy is made later.
        """
        self._check_open()
        if self._writer is not None:
            raise SpoolError(f"job {self.id}: data file {self._writer.name!r} still open")
        if self._control is None:
            raise SpoolError(f"job {self.id}: no control file")
        # Files in control-file order (the order to print), then any the control
        # file does not name, in arrival order.
        order = [n for n in self._formats if n in self._files]
        order += [n for n in self._files if n not in self._formats]
        base = self.owner.jobs_dir if folder is None else folder
        files = tuple(FileMeta(name=n, format=self._formats.get(n, ""),
                               bytes=self._files[n][1], path=f"{base}/{self._files[n][0]}")
                      for n in order)
        text: dict[str, Any] = {**self._fields, **self._control}
        return JobMeta(id=self.id, received=time.time(), files=files,
                       control_path=f"{base}/{self.id}.cf",
                       control_bytes=len(self.control_raw), **text)

    def mark(self, status: str) -> None:
        """Internal: ``Spool.commit`` moves the job through committing/committed."""
        self._status = status
