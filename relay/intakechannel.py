"""The channel between an intake worker process and the main process (docs/architecture.md).

Two unix socketpairs per worker.  The *stream* carries length-prefixed
frames both ways: a worker's commits (a small job's bytes ride in the
message), its one-shot commands, its metric deltas; the main process's
replies, reloads and the stop request (the messages and their frames:
``relay.intakemessages``); frames waiting to be sent go out in one write.
Several requests are in flight at once (one per connection waiting for its
commit), matched by ``rid``.  The
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
import contextlib
import copyreg
import os
import pickle
import socket as pysocket
import struct
import threading
import types
from collections.abc import Callable
from typing import Any

import trio

from relay.intakemessages import (
    Admit,
    Command,
    Commit,
    Control,
    Counts,
    Discard,
    Failure,
    Init,
    Log,
    MakeRoom,
    Open,
    Ready,
    Reload,
    Reloaded,
    Reply,
    Stop,
    Withdrawn,
    decode,
    encode,
    raise_failure,
)

__all__ = ["Admit", "CallClient", "Channel", "Command", "Commit", "Control", "Counts",
           "Discard", "Failure", "Init", "Log", "MakeRoom", "MetricsClient", "Open", "Ready",
           "Reload", "Reloaded", "Reply", "ReplyWaiter", "Stop", "Withdrawn", "call_pair",
           "raise_failure", "serve_metrics", "stream_pair"]

_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 1 << 30          # a small job is <= 64 KiB plus its control file
MAX_CALL = 64 * 1024           # one call-socket datagram
MAX_MESSAGE_METRICS = 4 << 20  # one worker's metric values (a few hundred series)
READ_CHUNK = 256 * 1024        # one read of the stream
YIELD_EVERY = 4                # reads that found bytes before the reader yields anyway
                               # (1 MiB: the main process reads every worker this way)


def _mapping(items: dict[Any, Any]) -> types.MappingProxyType[Any, Any]:
    return types.MappingProxyType(items)


# A Config holds read-only mappings; they travel as dicts and come back read-only.
copyreg.pickle(types.MappingProxyType, lambda m: (_mapping, (dict(m),)))


# -- the stream ---------------------------------------------------------------------

def stream_pair() -> tuple[pysocket.socket, pysocket.socket]:
    return pysocket.socketpair(pysocket.AF_UNIX, pysocket.SOCK_STREAM)


def call_pair() -> tuple[pysocket.socket, pysocket.socket]:
    return pysocket.socketpair(pysocket.AF_UNIX, pysocket.SOCK_SEQPACKET)


class Channel:
    """Length-prefixed frames over a trio stream socket; ``receive`` raises EOFError.

    ``send`` returns once its frame is written: a job's ``Commit`` counts as
    sent only then (``relay.spoolproxy``: the next job may take its id).  A
    send that finds no write under way writes at once, without yielding
    first; frames queued meanwhile go out together in the next write, and
    every sender waiting is woken when a write ends (one wake-up for all).
    In the main process the spool's flush thread writes commit replies too
    (``post``, ``write_posted``), under the same lock as trio's writes; what
    the socket does not take goes back to trio, a frame begun first.
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        # Held around every write of the socket and the state saying whether one
        # is under way: the spool's flush thread writes replies too (``post``).
        self._wlock = threading.Lock()
        self._closed = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._outbox: list[bytes] = []     # posted by the flush thread, not yet written
        self._pending: list[tuple[int, bytes]] = []   # (sequence number, frame)
        self._queued = 0       # frames queued, ever: the last one's number
        self._written = 0      # every frame up to this number is written
        self._writing = False
        self._wrote = trio.Event()   # set, and replaced, when a write ends
        self._buf = bytearray()
        self._pos = 0          # frames before it in _buf are read
        self._chunk = bytearray(READ_CHUNK)
        self._streak = 0       # reads in a row that found bytes (yield every YIELD_EVERY)

    async def send(self, message: object) -> None:
        # A cancelled sender sends nothing (a Commit would be stored, never acked).
        await trio.lowlevel.checkpoint_if_cancelled()
        data = encode(message)
        frame = _LENGTH.pack(len(data)) + data
        self._queued += 1
        number = self._queued
        self._pending.append((number, frame))
        while self._written < number:   # bounded: each pass is a write, or waits for one
            try:
                if not self._writing:
                    await self._write()
                else:
                    await self._wrote.wait()
            except BaseException:
                # Not begun by a write: not sent (a frame cut part-way goes on whole).
                self._pending = [p for p in self._pending if p[1] is not frame]
                raise

    def send_nowait(self, message: object) -> bool:
        """Write ``message`` now, without a task, if no frame is queued or being written;
        False: nothing was sent (``send`` it).  A frame the socket took in part is
        queued whole for the rest: ``flush`` writes it (``pending`` says so)."""
        if self._writing or self._pending:
            return False
        data = encode(message)
        frame = _LENGTH.pack(len(data)) + data
        with self._wlock:
            if self._writing:   # the flush thread is handing a frame back
                return False
            try:
                n = os.write(self.sock.fileno(), frame)
            except BlockingIOError:
                return False
            self._queued += 1
            if n < len(frame):    # the rest goes first with the next write (a frame stays whole)
                self._pending.append((self._queued, frame[n:]))
            else:
                self._written = self._queued
        return True

    @property
    def pending(self) -> bool:
        """Frames queued and not being written (``flush`` them)."""
        return bool(self._pending) and not self._writing

    async def flush(self) -> None:
        """Write what ``send_nowait`` left queued (and whatever queued behind it)."""
        while self._pending:   # bounded: each pass is a write, or waits for one
            if not self._writing:
                await self._write()
            else:
                await self._wrote.wait()

    async def _write(self) -> None:
        with self._wlock:
            if self._writing:   # the flush thread hands a frame back: wait for it
                await_back = True
            else:
                await_back = False
                self._writing = True
        if await_back:
            await self._wrote.wait()
            return
        batch, self._pending = self._pending, []
        view = memoryview(batch[0][1] if len(batch) == 1 else b"".join(f for _, f in batch))
        total = len(view)
        try:
            try:   # the socket takes it now, mostly: then no trio checkpoint (~15 µs)
                with self._wlock:
                    n = os.write(self.sock.fileno(), view)
            except BlockingIOError:
                n = 0
            view = view[n:]
            while view:
                view = view[await self.sock.send(view):]
            self._written = batch[-1][0]
        except BaseException:
            self._requeue(batch, total - len(view))
            raise
        finally:
            with self._wlock:
                self._writing = False
            self._wrote.set()
            self._wrote = trio.Event()

    def _requeue(self, batch: list[tuple[int, bytes]], sent: int) -> None:
        # Cut short (cancelled, or the socket failed) after ``sent`` bytes: frames
        # written whole are done; the one cut part-way goes first at the next
        # write, as its rest, so the stream never holds half a frame; frames not
        # begun go back as they were, so their senders can still withdraw them.
        rest: list[tuple[int, bytes]] = []
        for number, frame in batch:
            if sent >= len(frame) and not rest:
                sent -= len(frame)
                self._written = number
            elif sent and not rest:
                rest.append((number, frame[sent:]))
                sent = 0
            else:
                rest.append((number, frame))
        self._pending[:0] = rest

    async def receive(self) -> object:
        buf = self._buf
        while True:   # bounded: each pass reads, or returns a frame
            message = self.receive_buffered()
            if message is not None:
                return message
            pos = self._pos
            if len(buf) - pos >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buf, pos)
                if length > MAX_MESSAGE:
                    raise EOFError(f"message of {length} bytes")
            if pos:
                del buf[:pos]
                self._pos = 0
            await self._read()

    def receive_buffered(self) -> object | None:
        """The next message if its whole frame was read already, else None (no
        system call, no checkpoint): the frames one read brought, taken together."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(buf, pos)
        end = pos + _LENGTH.size + length
        if length > MAX_MESSAGE or len(buf) < end:
            return None
        with memoryview(buf) as view:
            data = bytes(view[pos + _LENGTH.size:end])
        self._pos = end   # the read frames go at the next read, at once
        message: object = decode(data)
        return message

    async def _read(self) -> None:
        """What the socket has, appended to the buffer; the system call first, as
        relay.fastio does (trio's recv yields even when bytes are there)."""
        chunk = self._chunk
        if self._streak >= YIELD_EVERY:
            self._streak = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                n = os.readv(self.sock.fileno(), (chunk,))   # -1 once closed: EBADF
                break
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_readable(self.sock)
        if not n:
            raise EOFError("channel closed")
        self._streak += 1
        with memoryview(chunk) as view:
            self._buf += view[:n]

    def close(self) -> None:
        with self._wlock:   # no flush thread writes a descriptor number reused after this
            self._closed = True
            self.sock.close()

    # -- replies written by the spool's flush thread ----------------------------------

    def allow_posts(self) -> None:
        """In the trio run that owns the channel: let another thread ``post`` frames."""
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()

    def post(self, message: object) -> Callable[[], None]:
        """From the spool's flush thread: queue ``message`` to be written by the
        function returned (called once a batch, so a batch's replies to one worker
        are one write).  ``allow_posts`` first."""
        data = encode(message)
        self._outbox.append(_LENGTH.pack(len(data)) + data)
        return self.write_posted

    def write_posted(self) -> None:
        """From the flush thread: write the posted frames now if the socket takes them
        and no write of trio's is under way; what it does not take goes back to trio
        (a frame the socket took in part first, ahead of anything trio sends later).
        A closed channel (its worker gone) drops them: the jobs are stored and their
        senders may send them again (at-least-once, SPEC §4.4)."""
        frames, self._outbox = self._outbox, []
        if not frames:
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        partial = False
        with self._wlock:
            if self._closed:
                return
            if not self._writing and not self._pending:
                try:
                    n = os.write(self.sock.fileno(), data)
                except BlockingIOError:
                    n = 0
                except OSError:   # the worker is gone
                    return
                if n == len(data):
                    return
                data, partial = data[n:], n > 0
                # Half a frame is in the stream: nothing of trio's may be written
                # before its rest (``_writing`` holds trio's writes off until then).
                self._writing = partial
            token = self._token
        assert token is not None
        with contextlib.suppress(trio.RunFinishedError):   # the run ended: no one to write to
            token.run_sync_soon(self._take_back, data, partial)

    def _take_back(self, data: bytes, partial: bool) -> None:
        # In trio: what the flush thread could not write, written by a system task;
        # the rest of a frame begun goes first, whole frames after those queued.
        with self._wlock:
            if partial:
                self._writing = False
                self._pending.insert(0, (self._written, data))
            else:
                self._pending.append((self._queued, data))
        if partial:
            self._wrote.set()      # senders that waited for "the write" look again
            self._wrote = trio.Event()
        trio.lowlevel.spawn_system_task(self.flush_quietly)

    async def flush_quietly(self) -> None:
        """``flush`` where nobody waits for its outcome (a system task, a worker's
        commit without a task): the other end gone (OSError), or the channel closed
        while this waited for the socket, ends it quietly.  The replies that never
        come, or the reader's EOF, tell whoever waits for them."""
        with contextlib.suppress(OSError, trio.ClosedResourceError, trio.BrokenResourceError):
            await self.flush()


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


class ReplyWaiter:
    """One request's reply: the requesting task parks on it, the channel's reader hands
    it over (a trio.Event and its parking lot, for the one task that ever waits)."""

    __slots__ = ("reply", "task")

    def __init__(self) -> None:
        self.reply: Reply | None = None
        self.task: trio.lowlevel.Task | None = None

    async def wait(self) -> Reply:
        if self.reply is None:
            self.task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        assert self.reply is not None
        return self.reply

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def give(self, reply: Reply) -> None:
        self.reply = reply
        if (task := self.task) is not None:
            self.task = None
            trio.lowlevel.reschedule(task)
