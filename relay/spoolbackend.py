"""The spool's backend interface: what the relay needs of wherever jobs are kept.

The local file spool (``relay.spool.Spool``) is the embedded default; a
database-backed spool is meant to implement the same interface.  So nothing
here assumes files: a job is known by its id and its ``JobMeta`` record
(``relay.spoolformat``), and its bodies — the control file and each data
file — are read through the backend as a ``Body``: a readable descriptor, an
offset and a length.  For the local backend that is the job's own file (a
large job, offset 0) or the segment file holding a small job's record
(``relay.spoolsegment``); another backend may hand out a pipe or a memory
file it filled.  Sinks read ``Body`` ranges only (``relay.sinks.base``), so
they never learn where a body lives.

Intake is ``check_space`` / ``begin`` / ``commit``: ``commit`` returns only once
the job is durable (SPEC §4.4) and a commit that raises leaves no job.  The
bookkeeping calls (``update``, ``remove``, ``sync``) never need free space in
the daemon (docs/spool.md, "A full disk").
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TypeVar

from relay.errors import SpoolFileMissing

if TYPE_CHECKING:
    from relay.spoolformat import FileMeta, JobMeta, Recovery, SpoolStatistics, SpoolUsage
    from relay.spoolindex import SpoolIndex


@dataclass(frozen=True, slots=True)
class Body:
    """``length`` bytes at ``offset`` of the readable descriptor ``fd`` (owned: ``close``)."""

    fd: int
    offset: int
    length: int

    def close(self) -> None:
        os.close(self.fd)

    def read(self) -> bytes:
        """The whole body, for small ones (a control file); large ones are streamed."""
        data = os.pread(self.fd, self.length, self.offset)
        if len(data) != self.length:
            raise SpoolFileMissing(f"descriptor {self.fd}", OSError(5, "body is short"))
        return data

    def __enter__(self) -> Body:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# A small job's bodies live inside a segment file (relay.spoolsegment), which
# moves when the job's record is moved forward; so its ``FileMeta.path`` names
# no file but a stable *body name*, ``<spool>/segments/<id>.cf`` or ``.d<n>``,
# that the spool which holds the job resolves to (segment file, offset,
# length) at open time.  Spools register their resolver per folder here.
Locator = Callable[[str], "tuple[str, int, int] | None"]
_LOCATORS: dict[str, Locator] = {}


def register_locator(folder: str, locate: Locator | None) -> None:
    """Let ``open_file_body`` resolve body names under ``folder`` (None: stop)."""
    if locate is None:
        _LOCATORS.pop(folder, None)
    else:
        _LOCATORS[folder] = locate


def locate_body(path: str) -> tuple[str, int, int] | None:
    """(file, offset, length) of a segment body name; None for an ordinary file."""
    folder, name = os.path.split(path)
    locate = _LOCATORS.get(folder)
    return locate(name) if locate is not None else None


def _open_read(path: str) -> int:
    """A read-only descriptor of the spool file ``path``; ``SpoolFileMissing`` if gone."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SpoolFileMissing(path, exc) from exc


def open_file_body(path: str, offset: int = 0, length: int = -1) -> Body:
    """A body held in a local file (``length`` -1: to its end); ``SpoolFileMissing`` if gone.

    A segment body name (see ``register_locator``) opens the segment file at
    the body's range; ``offset`` and ``length`` are then within the body.
    """
    if (where := locate_body(path)) is not None:
        file, start, size = where
        body = open_file_body(file, start + offset, size - offset if length < 0 else length)
        return body
    fd = _open_read(path)
    if length < 0:
        try:
            length = os.fstat(fd).st_size - offset
        except OSError as exc:
            os.close(fd)
            raise SpoolFileMissing(path, exc) from exc
    return Body(fd, offset, length)


class BodyFiles:
    """Bodies read in one pass over many jobs, each file opened once (``close`` ends it).

    A segment holds many small jobs' bodies: opening it per body was an
    ``openat`` and a ``close`` a job for a batch of deliveries.  ``open`` is
    ``open_file_body(path, 0, length)`` except that the descriptor stays this
    object's: do not close the ``Body`` it returns.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def open(self, path: str, length: int) -> Body:
        """``length`` bytes of the body ``path`` names; ``SpoolFileMissing`` if gone."""
        file, offset = path, 0
        if (where := locate_body(path)) is not None:
            file, offset, _ = where
        return self.range(file, offset, length)

    def range(self, file: str, offset: int, length: int) -> Body:
        """``length`` bytes at ``offset`` of the spool file ``file`` (a located body)."""
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = _open_read(file)
        return Body(fd, offset, length)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def open_flat(path: str) -> int:
    """A descriptor whose bytes from 0 to its end are exactly the body ``path`` names.

    For readers that take a whole file (``relay.streams.open_spool_file``): an
    ordinary spool file is opened as is; a segment body (at most a small
    job's size) is copied into an anonymous memory file, so nothing past the
    body's end can be read.  ``SpoolFileMissing`` when it cannot be.
    """
    if locate_body(path) is None:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SpoolFileMissing(path, exc) from exc
    with open_file_body(path) as body:
        data = body.read()
    fd = os.memfd_create("lpd-relay-body", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:  # bounded: each pass writes at least one byte or raises
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError as exc:
        os.close(fd)
        raise SpoolFileMissing(path, exc) from exc
    return fd


class Session:
    """One connection as the spool sees it: handed to ``begin`` for each of its jobs.

    Opaque to the connection, which makes one and drops it when it ends; a
    backend may keep what it must know of the connection's jobs on it (an
    intake worker's proxy: the job before, and whether a commit failed), so
    that memory ends with the connection and never reaches a later connection
    from the same source port.  The local and database spools ignore it.
    """

    __slots__ = ("failed", "last")

    def __init__(self) -> None:
        self.last: object = None     # the backend's latest unanswered job of this connection
        self.failed = False          # a commit of this connection failed


class DataSink(Protocol):
    """One data file being received (``relay.spooljob.DataWriter``)."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def fileno(self) -> int:
        """A descriptor to ``splice`` into (then ``add``); -1: use ``write`` only."""

    def add(self, n: int) -> None: ...

    def close(self) -> int: ...


class Incoming(Protocol):
    """A job being received (``relay.spooljob.IncomingJob``)."""

    @property
    def id(self) -> str: ...

    @property
    def bytes(self) -> int: ...

    def set_control(self, name: str, raw: builtins.bytes, *, number: str, user: str, host: str,
                    title: str, job_name: str, formats: Mapping[str, str]) -> None: ...

    def open_data(self, name: str) -> DataSink: ...

    def discard(self) -> None: ...


J = TypeVar("J", bound=Incoming)


class BodySource(Protocol):
    """How delivery reads a job's bodies (what ``relay.sinks.base`` needs of a spool)."""

    def open_body(self, file: FileMeta) -> Body:
        """One data file of a job; ``SpoolFileMissing`` when the spool no longer has it."""

    def open_control(self, job: JobMeta) -> Body:
        """The raw control file of a job; ``SpoolFileMissing`` likewise."""


class SpoolBackend(BodySource, Protocol[J]):
    """Everything the daemon, the scheduler and ``lpd-relay spool`` use of a spool.

    ``J`` is the backend's own incoming-job type: ``commit`` takes only what
    its ``begin`` handed out.
    """

    def recover(self) -> Recovery:
        """Once, at start: take ownership, drop partial jobs, return the jobs in id order."""

    def check_space(self, need: int = 0) -> None:
        """Raise ``DiskFull`` (0x02 to the sender) when ``need`` more bytes do not fit."""

    def begin(self, *, queue: str, wire_queue: str, peer: str,
              session: Session | None = None) -> J:
        """Start a job and give it the next id (ids sort in arrival order); ``session``:
        its connection's (``Session``), None for a job of no connection."""

    async def commit(self, job: J) -> JobMeta:
        """Return once the job is durable; if it raises, no trace of the job stays."""

    def get(self, job_id: str) -> JobMeta:
        """The job with its delivery state; ``KeyError`` when not there."""

    def jobs(self, queue: str | None = None) -> list[JobMeta]:
        """All jobs (or those of ``queue``), in id order."""

    def update(self, meta: JobMeta, *, durable: bool = False) -> None:
        """Store the delivery-state fields of ``meta``; ``KeyError`` when removed."""

    def remove(self, job_id: str) -> None:
        """Forget a job (delivered or purged); idempotent."""

    async def sync(self) -> None:
        """Make earlier ``update``/``remove`` calls durable."""

    def save_unsaved(self) -> int:
        """Retry what the store refused before; returns how many changes still wait."""

    @property
    def index(self) -> SpoolIndex | None:
        """The daemon's live bookkeeping (gauges), None before ``recover``."""

    def usage(self) -> SpoolUsage: ...

    def statistics(self) -> SpoolStatistics: ...

    async def aclose(self) -> None: ...
