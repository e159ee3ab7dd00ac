"""The messages between an intake worker and the main process, and their frames.

The message types of ``relay.intakechannel`` (which re-exports them): what a
worker sends (its commits, commands, calls, counts, log lines) and what the
main process answers.  Every small job crosses twice, as its ``Commit`` and
the ``Reply`` with its ``JobMeta``; pickling those dataclasses runs Python
per field on both ends (about 45 µs a job in all), so ``encode`` writes
those two as ``marshal`` tuples of their fields — built and read in C, exact
for the plain values they hold — and pickles the rest, which is rare.  A
frame's first byte says which.  Pickle and marshal are safe here: both ends
are this program, the same interpreter, started by itself.
"""

from __future__ import annotations

import dataclasses
import marshal
import operator
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from relay.config import Config
from relay.errors import DiskFull, ProtocolError, SpoolError
from relay.spoolformat import FileMeta, JobMeta

__all__ = ["Admit", "Command", "Commit", "Control", "Counts", "Discard", "Failure", "Init",
           "Log", "MakeRoom", "Open", "Ready", "Reload", "Reloaded", "Reply", "Stop", "Withdrawn",
           "decode", "encode", "raise_failure"]

T = TypeVar("T")


# -- messages: worker -> main ----------------------------------------------------

class Control(NamedTuple):
    """``Incoming.set_control``'s arguments (a tuple: it crosses the channel as one)."""

    name: str
    raw: bytes
    number: str
    user: str
    host: str
    title: str
    job_name: str
    formats: dict[str, str]


class Commit(NamedTuple):
    """Commit a job: ``files`` kept in memory (wire name, bytes), in arrival order.

    ``token`` names the job's main-side half when a data file of it went
    straight to a spool file (``Open``).  ``digests`` are the data files'
    SHA-256s taken as the bytes passed, when an audit log is configured (the
    main process writes the job's ``received`` record with them).  ``previous``
    is the token of the job before it on its connection when that job's reply
    had not come yet: the main process acknowledges this one only if that one
    was committed (a session's jobs after a failed commit are never acked).
    A tuple, built and read with keywords: it crosses the channel as a
    ``marshal`` tuple of its fields (``encode``).
    """

    rid: int
    token: str
    queue: str
    wire_queue: str
    peer: str
    tls_peer: str
    control: Control | None
    files: tuple[tuple[str, bytes], ...]
    promoted: bool
    hold: str
    digests: dict[str, str] | None = None   # SHA-256 per data file, for the audit log
    previous: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """A one-shot command (0x01, 0x03-0x06) for the main process to answer."""

    rid: int
    event: Any          # relay._core.Command (it pickles)
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Withdrawn:
    """Committed jobs the worker's connection did not acknowledge after all (a
    commit before them on their connection failed): the main process removes them."""

    job_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Counts:
    """The worker's counter and gauge values: (family, labels) -> value."""

    values: dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker listens on every address."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Open:
    """Call: a spool file for data file ``name`` of job ``token`` (descriptor back)."""

    token: str
    queue: str
    wire_queue: str
    peer: str
    tls_peer: str
    name: str


@dataclass(frozen=True, slots=True)
class Discard:
    """Call: remove job ``token``'s main-side half (answered once its space is free)."""

    token: str


@dataclass(frozen=True, slots=True)
class Admit:
    """Call: may the catch-all take jobs for the new wire name ``queue`` (SPEC §3.2)?"""

    queue: str


@dataclass(frozen=True, slots=True)
class MakeRoom:
    """Call: expire kept jobs until ``need`` bytes fit (retention); the value: whether they do."""

    need: int


@dataclass(frozen=True, slots=True)
class Log:
    """Log lines the worker wrote, for the main process's log stream."""

    lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Reloaded:
    """The worker applied the ``Reload`` of that ``seq``: its listeners are open."""

    seq: int


# -- messages: main -> worker ----------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Init:
    """The worker's configuration; ``config.server.listen`` are the bound addresses."""

    config: Config
    catch_all_names: tuple[str, ...]
    index: int


@dataclass(frozen=True, slots=True)
class Reload:
    """A new configuration (SIGHUP) or new queue states (lpc): rebuild routing.

    ``seq`` > 0: answer ``Reloaded(seq)`` once applied (a SIGHUP's reload is
    reported done only after every worker listens where the file says).
    """

    config: Config
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Stop:
    """Graceful stop: no new connections, in-flight ones get ``graceful_timeout``."""


@dataclass(frozen=True, slots=True)
class Failure:
    """An exception to raise on the other side: kind, message, reply, reason."""

    kind: str
    message: str
    reply: int | None = None
    reason: str = ""

    @classmethod
    def of(cls, exc: Exception) -> Failure:
        if isinstance(exc, ProtocolError):
            return cls("protocol", str(exc), exc.reply, exc.reason)
        return cls("disk_full" if isinstance(exc, DiskFull) else "spool", str(exc))


@dataclass(frozen=True, slots=True)
class Reply:
    rid: int
    value: Any = None
    failure: Failure | None = field(default=None)


def raise_failure(failure: Failure) -> None:
    """Raise what ``Failure.of`` described, as the class the connection code expects."""
    if failure.kind == "protocol":
        raise ProtocolError(failure.message, reply=failure.reply, reason=failure.reason)
    if failure.kind == "disk_full":
        raise DiskFull(failure.message)
    raise SpoolError(failure.message)


# -- frames -------------------------------------------------------------------------

_PICKLE, _COMMIT, _COMMITTED = b"P", b"C", b"J"   # a frame's first byte
_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(JobMeta))
_FILE_FIELDS = tuple(f.name for f in dataclasses.fields(FileMeta))
_job_values = operator.attrgetter(*_JOB_FIELDS)
_file_values = operator.attrgetter(*_FILE_FIELDS)
_FILES = _JOB_FIELDS.index("files")
# Each field's slot, set directly: the frozen dataclasses' __init__ runs Python per
# field and keyword (about 10 µs a JobMeta), which a job paid on every reply.
_JOB_SLOTS = tuple(getattr(JobMeta, name).__set__ for name in _JOB_FIELDS)
_FILE_SLOTS = tuple(getattr(FileMeta, name).__set__ for name in _FILE_FIELDS)


def _build(cls: type[T], slots: tuple[Callable[[Any, Any], None], ...],
           values: Sequence[Any]) -> T:
    """A ``cls`` (a frozen slotted dataclass) with every field set from ``values``."""
    if len(values) != len(slots):
        raise EOFError(f"a {cls.__name__} of {len(values)} fields")
    obj = object.__new__(cls)
    for put, value in zip(slots, values, strict=True):
        put(obj, value)
    return obj


def encode(message: object) -> bytes:
    """One frame's body: a ``Commit``, and a ``Reply`` carrying a ``JobMeta``, as a
    ``marshal`` tuple of their fields (C on both ends, exact for the plain values
    they hold); anything else, or a value marshal refuses, pickled."""
    try:
        if type(message) is Commit:
            c = message.control
            return _COMMIT + marshal.dumps((*message[:6], None if c is None else tuple(c),
                                         *message[7:]))
        if (type(message) is Reply and type(message.value) is JobMeta
                and message.failure is None):
            values = list(_job_values(message.value))
            values[_FILES] = tuple(map(_file_values, values[_FILES]))
            return _COMMITTED + marshal.dumps((message.rid, tuple(values)))
    except ValueError:   # e.g. a str subclass: marshal takes exact types only
        pass
    return _PICKLE + pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> Any:
    """The message of one frame's body (``encode``'s inverse)."""
    kind = data[:1]
    if kind == _COMMIT:
        v = list(marshal.loads(memoryview(data)[1:]))
        if v[6] is not None:
            v[6] = Control._make(v[6])
        return Commit._make(v)
    if kind == _COMMITTED:
        rid, values = marshal.loads(memoryview(data)[1:])
        values = list(values)
        values[_FILES] = tuple(_build(FileMeta, _FILE_SLOTS, f) for f in values[_FILES])
        return Reply(rid, value=_build(JobMeta, _JOB_SLOTS, values))
    if kind != _PICKLE:
        raise EOFError(f"a frame of unknown kind {kind!r}")
    return pickle.loads(memoryview(data)[1:])
