"""The channel between an intake worker process and the main process (docs/architecture.md).

Two unix socketpairs per worker.  The *stream* carries length-prefixed
pickles both ways: a worker's commits (a small job's bytes ride in the
message), its one-shot commands, its metric deltas; the main process's
replies, reloads and the stop request.  Several requests are in flight at
once (one per connection waiting for its commit), matched by ``rid``.  The
*call* socket (SOCK_SEQPACKET) is for the two things intake must learn
without awaiting, because the connection code asks for them in plain
function calls: a spool file for a data file too large to keep in memory
(its descriptor comes back with SCM_RIGHTS), "discard that job", "may the
catch-all take this name", "make room" (retention expires kept jobs
before a refusal for space) and, rarely, "remove these committed jobs".  The
*metrics* socket (SOCK_SEQPACKET) lets the main process read a worker's
metric values at the moment its registry is read (``MetricsClient``).
Pickle is safe here: both ends are this program, started by itself.
"""

from __future__ import annotations

import array
import copyreg
import pickle
import socket as pysocket
import struct
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from relay.config import Config
from relay.errors import DiskFull, ProtocolError, SpoolError

__all__ = ["Admit", "CallClient", "Channel", "Command", "Commit", "Control", "Counts",
           "Discard", "Failure", "Init", "Log", "MakeRoom", "MetricsClient", "Open", "Ready",
           "Reload", "Reply", "Stop", "Withdrawn", "call_pair", "raise_failure",
           "serve_metrics", "stream_pair"]

_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 1 << 30          # a small job is <= 64 KiB plus its control file
MAX_CALL = 64 * 1024           # one call-socket datagram
MAX_MESSAGE_METRICS = 4 << 20  # one worker's metric values (a few hundred series)


def _mapping(items: dict[Any, Any]) -> types.MappingProxyType[Any, Any]:
    return types.MappingProxyType(items)


# A Config holds read-only mappings; they travel as dicts and come back read-only.
copyreg.pickle(types.MappingProxyType, lambda m: (_mapping, (dict(m),)))


# -- messages: worker -> main ----------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Control:
    """``Incoming.set_control``'s arguments."""

    name: str
    raw: bytes
    number: str
    user: str
    host: str
    title: str
    job_name: str
    formats: dict[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Commit:
    """Commit a job: ``files`` kept in memory (wire name, bytes), in arrival order.

    ``token`` names the job's main-side half when a data file of it went
    straight to a spool file (``Open``).  ``digests`` are the data files'
    SHA-256s taken as the bytes passed, when an audit log is configured (the
    main process writes the job's ``received`` record with them).  ``previous``
    is the token of the job before it on its connection when that job's reply
    had not come yet: the main process acknowledges this one only if that one
    was committed (a session's jobs after a failed commit are never acked).
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


# -- messages: main -> worker ----------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Init:
    """The worker's configuration; ``config.server.listen`` are the bound addresses."""

    config: Config
    catch_all_names: tuple[str, ...]
    index: int


@dataclass(frozen=True, slots=True)
class Reload:
    """A new configuration (SIGHUP) or new queue states (lpc): rebuild routing."""

    config: Config


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


# -- the stream ---------------------------------------------------------------------

def stream_pair() -> tuple[pysocket.socket, pysocket.socket]:
    return pysocket.socketpair(pysocket.AF_UNIX, pysocket.SOCK_STREAM)


def call_pair() -> tuple[pysocket.socket, pysocket.socket]:
    return pysocket.socketpair(pysocket.AF_UNIX, pysocket.SOCK_SEQPACKET)


class Channel:
    """Length-prefixed pickles over a trio stream socket; ``receive`` raises EOFError."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._send_lock = trio.Lock()
        self._buf = bytearray()

    async def send(self, message: object) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        frame = _LENGTH.pack(len(data)) + data
        async with self._send_lock:
            view = memoryview(frame)
            while view:
                n = await self.sock.send(view)
                view = view[n:]

    async def receive(self) -> object:
        while True:
            if len(self._buf) >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(self._buf)
                if length > MAX_MESSAGE:
                    raise EOFError(f"message of {length} bytes")
                if len(self._buf) >= _LENGTH.size + length:
                    data = bytes(self._buf[_LENGTH.size:_LENGTH.size + length])
                    del self._buf[:_LENGTH.size + length]
                    return pickle.loads(data)
            chunk = await self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("channel closed")
            self._buf += chunk

    def close(self) -> None:
        self.sock.close()


# -- the call socket ----------------------------------------------------------------

class CallClient:
    """The worker's blocking side of the call socket (answers take well under 1 ms)."""

    def __init__(self, sock: pysocket.socket, timeout: float = 30.0) -> None:
        sock.settimeout(timeout)
        self.sock = sock

    def call(self, message: Open | Discard | Admit | MakeRoom | Withdrawn
             ) -> tuple[Reply, list[int]]:
        """Send ``message`` and wait for the reply and its descriptors (OSError: main gone)."""
        self.sock.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        data, fds, _, _ = pysocket.recv_fds(self.sock, MAX_CALL, 4)
        if not data:
            raise OSError("the main process closed the channel")
        reply = pickle.loads(data)
        assert isinstance(reply, Reply)
        return reply, fds


class MetricsClient:
    """The main process's blocking side of a worker's metrics socket (any thread)."""

    def __init__(self, sock: pysocket.socket, timeout: float = 1.0) -> None:
        sock.settimeout(timeout)
        self.sock = sock
        self._lock = threading.Lock()

    def values(self) -> Counts | None:
        """The worker's values now; None when it does not answer."""
        with self._lock:
            try:
                self.sock.send(b"?")
                data = self.sock.recv(MAX_MESSAGE_METRICS)
            except OSError:
                return None
        if not data:
            return None
        counts = pickle.loads(data)
        return counts if isinstance(counts, Counts) else None

    def close(self) -> None:
        with self._lock:
            self.sock.close()


def serve_metrics(sock: pysocket.socket, read: Callable[[], Counts]) -> None:
    """The worker's side, in a thread of its own: answer each request with ``read()``."""
    with sock:
        while sock.recv(16):
            sock.send(pickle.dumps(read(), protocol=pickle.HIGHEST_PROTOCOL))


async def receive_call(sock: trio.socket.SocketType) -> object:
    """The main side: the next call or tell (EOFError when the worker is gone)."""
    data = await sock.recv(MAX_CALL)
    if not data:
        raise EOFError("call socket closed")
    return pickle.loads(data)


async def answer_call(sock: trio.socket.SocketType, reply: Reply, fds: list[int]) -> None:
    data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    ancillary = ([(pysocket.SOL_SOCKET, pysocket.SCM_RIGHTS, array.array("i", fds))]
                 if fds else [])
    await sock.sendmsg([data], ancillary)
