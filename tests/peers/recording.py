"""RecordingLpdServer: a scriptable LPD receiver in pure Python.

It records every byte of every connection and answers as an LpdScript says.
It runs in its own threads with blocking sockets, so both plain and trio
tests use it as is; every wait in it is bounded by ``stop`` or a timeout.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import trio

from tests.peers.process import LOOPBACK, Service
from tests.peers.received import ReceivedFile, ReceivedJob
from tests.peers.script import LpdScript, RecordedConnection, lprng_error

# Job-file lengths meaning "data runs until the sender closes" (SPEC §4.2).
_STREAM_LENGTH_MIN = 2**31 - 1
_T = TypeVar("_T")


@dataclass(slots=True, kw_only=True)
class _WireFile:
    kind: str                # "control" | "data"
    name: str
    declared: int
    data: bytes
    acked: bool


class _SessionEnd(Exception):
    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class _Session:
    """One connection to the RecordingLpdServer (blocking socket, own thread)."""

    def __init__(self, server: RecordingLpdServer, sock: socket.socket,
                 record: RecordedConnection) -> None:
        self.server, self.sock, self.rec = server, sock, record
        self.script = server.script
        self.buf = bytearray()

    def _fill(self) -> bool:
        """Receive more bytes; False at EOF. Bounded by stop and idle timeout."""
        deadline = time.monotonic() + self.server.idle_timeout
        while not self.server.stopping.is_set():
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise _SessionEnd("idle") from None
                continue
            except OSError as exc:
                raise _SessionEnd("reset") from exc
            if chunk:
                self.buf += chunk
                with self.server.lock:
                    self.rec.data += chunk
            return bool(chunk)
        raise _SessionEnd("stopped")

    def read_line(self) -> str | None:
        """One command line without LF (and CR); None at EOF."""
        while b"\n" not in self.buf:
            if not self._fill():
                return None
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        return line.rstrip(b"\r").decode("latin-1")

    def read_exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        data, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return data

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        data, self.buf = bytes(self.buf), bytearray()
        return data

    def send(self, data: bytes) -> None:
        # The short receive timeout (to notice stop) must not cut a send short.
        self.sock.settimeout(self.server.idle_timeout)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.settimeout(0.1)

    def answer(self, step: str) -> bool:
        """Reply at ``step`` as scripted; True if the reply was an ack (0x00)."""
        if step == self.script.close_at:
            raise _SessionEnd("closed")
        if step == self.script.silent_at:
            self.read_to_eof()  # keep recording until the peer gives up
            raise _SessionEnd("eof")
        reply = self.script.reply(step, self.rec.index)
        if self.server.stopping.wait(self.script.delay):
            raise _SessionEnd("stopped")
        if reply:
            self.send(reply + self.script.trailing)
            with self.server.lock:
                self.rec.replies.append((step, reply))
        if reply[:1] not in (b"", b"\x00") and self.script.close_after_refusal:
            raise _SessionEnd("closed")
        return reply[:1] == b"\x00"

    def run(self) -> None:
        line = self.read_line()
        if not line:
            raise _SessionEnd("eof")
        self.rec.command, self.rec.queue = ord(line[0]), line[1:].split(" ")[0]
        if self.rec.command == 2:
            self.receive_job()
        elif self.rec.command in (3, 4):
            self.send(self.script.status_text)
        elif self.rec.command == 5:
            self.send(self.script.remove_text)
        raise _SessionEnd("closed")

    def receive_job(self) -> None:
        files: list[_WireFile] = []
        try:
            if self.script.queues is not None and self.rec.queue not in self.script.queues:
                self.send(lprng_error(1, f"queue {self.rec.queue} does not exist"))
                return
            if self.answer("job"):
                self._receive_files(files)
        finally:
            if delays := self.script.take_delay:
                self.server.stopping.wait(delays[min(self.rec.index, len(delays) - 1)])
            self.server.add_jobs(self.rec.queue, files)

    def _receive_files(self, files: list[_WireFile]) -> None:
        while (line := self.read_line()) is not None:
            if line[:1] == "\x01":     # abort: forget this session's files
                files.clear()
                continue
            if line[:1] not in ("\x02", "\x03"):
                raise _SessionEnd(f"error: unexpected subcommand {line[:20]!r}")
            kind = "control" if line[0] == "\x02" else "data"
            length_text, _, name = line[1:].partition(" ")
            length = int(length_text)
            if not self.answer(f"{kind}_header"):
                continue
            data = self._read_file(length)
            if data is None:
                raise _SessionEnd("eof")  # truncated: the job never completes
            acked = self.answer(f"{kind}_file")
            files.append(_WireFile(kind=kind, name=name, declared=length, data=data,
                                   acked=acked))

    def _read_file(self, length: int) -> bytes | None:
        """A file's bytes; a 0 or huge length means "until the sender closes"."""
        if length == 0 or length >= _STREAM_LENGTH_MIN:
            return self.read_to_eof()  # kept raw, a final NUL (if sent) included
        data = self.read_exact(length)
        if data is None:
            return None
        end = self.read_exact(1)   # the NUL; LPRng-style senders may close instead
        if end not in (None, b"\x00"):
            self.buf[:0] = end
        return data


def _parse_control(raw: bytes) -> tuple[dict[str, str], list[tuple[str, str]], list[str]]:
    """Upper-case letters, (format, data file) pairs and N titles of a control file."""
    control: dict[str, str] = {}
    printed: list[tuple[str, str]] = []
    titles: list[str] = []
    for line in raw.rstrip(b"\x00").decode("latin-1").splitlines():
        line = line.rstrip("\r")
        if not line:
            continue
        letter, value = line[0], line[1:]
        if letter == "N":
            titles.append(value)
        elif letter.isupper():
            control.setdefault(letter, value)
        elif letter.islower() and value not in (name for _, name in printed):
            printed.append((letter, value))
    return control, printed, titles


def _assemble_jobs(queue: str, files: Sequence[_WireFile]) -> list[ReceivedJob]:
    """Group acknowledged files into jobs: each control file with the data it names."""
    controls = [f for f in files if f.kind == "control" and f.acked]
    data = {f.name: f for f in files if f.kind == "data" and f.acked}
    jobs = []
    for cf in controls:
        control, printed, titles = _parse_control(cf.data)
        if not all(name in data for _, name in printed):
            continue  # a named data file never arrived: not a complete job
        got = tuple(ReceivedFile(name=name, format=fmt, data=data[name].data,
                                 title=titles[i] if i < len(titles) else "",
                                 declared_length=data[name].declared)
                    for i, (fmt, name) in enumerate(printed))
        jobs.append(ReceivedJob(queue=queue, control=control, files=got,
                                raw_control=cf.data, control_name=cf.name))
    return jobs


class RecordingLpdServer(Service):
    """A pure-Python LPD receiver on a free loopback port, for misbehaving peers.

    It records every byte of every connection (``connections``, ``received``)
    and the jobs it acknowledged completely (``jobs``), answering as ``script``
    says (see LpdScript). It runs in its own threads, so trio tests use it as is
    and wait with ``await wait_jobs_async(n)``. ``script`` may be replaced
    between connections.
    """

    def __init__(self, script: LpdScript | None = None, *, host: str = LOOPBACK,
                 port: int = 0, idle_timeout: float = 30.0) -> None:
        self.script = script or LpdScript()
        self.host = host
        self.port = port
        self.idle_timeout = idle_timeout
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._connections: list[RecordedConnection] = []
        self._jobs: list[ReceivedJob] = []
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        # A fixed port may be reused right after an earlier server closed it.
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self.host, self.port))
        self._listener.listen(128)
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._spawn(self._accept_loop, self._listener)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self.lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                rec = RecordedConnection(index=len(self._connections), peer=peer[:2])
                self._connections.append(rec)
            self._spawn(self._serve, conn, rec)

    def _serve(self, conn: socket.socket, rec: RecordedConnection) -> None:
        conn.settimeout(0.1)
        try:
            _Session(self, conn, rec).run()
        except _SessionEnd as end:
            how = end.how
        except (OSError, ValueError, IndexError) as exc:
            how = f"error {exc!r}"
        finally:
            conn.close()
        with self.lock:
            rec.ended = how

    def add_jobs(self, queue: str, files: Sequence[_WireFile]) -> None:
        jobs = _assemble_jobs(queue, files)
        with self.lock:
            self._jobs += jobs

    def stop(self) -> None:
        """Close the listener and every connection thread (bounded joins)."""
        self.stopping.set()
        if self._listener is not None:
            self._listener.close()
        for thread in list(self._threads):
            thread.join(timeout=2)

    @property
    def connections(self) -> list[RecordedConnection]:
        with self.lock:
            return list(self._connections)

    @property
    def jobs(self) -> list[ReceivedJob]:
        with self.lock:
            return list(self._jobs)

    @property
    def received(self) -> bytes:
        """Every byte received, connection after connection."""
        with self.lock:
            return b"".join(bytes(c.data) for c in self._connections)

    def wait_jobs(self, n: int, timeout: float = 10.0) -> list[ReceivedJob]:
        """Block until ``n`` complete jobs were acknowledged; return them all."""
        return self._wait(lambda: self.jobs, n, timeout, "jobs")

    def wait_connections(self, n: int, timeout: float = 10.0) -> list[RecordedConnection]:
        """Block until ``n`` connections have ended; return them all."""
        return self._wait(lambda: [c for c in self.connections if c.ended], n, timeout,
                          "ended connections")

    def _wait(self, get: Callable[[], list[_T]], n: int, timeout: float,
              what: str) -> list[_T]:
        deadline = time.monotonic() + timeout
        while len(items := get()) < n:
            if time.monotonic() >= deadline or self.stopping.is_set():
                raise TimeoutError(f"{len(items)} of {n} {what} after {timeout}s; "
                                   f"received {self.received[:300]!r}")
            time.sleep(0.01)
        return items

    async def wait_jobs_async(self, n: int) -> list[ReceivedJob]:
        """``wait_jobs`` for trio tests; bound it with ``trio.fail_after``.

        The waiting happens in a worker thread that trio abandons on
        cancellation; that thread ends by itself within 60 s or at ``stop``.
        """
        return await trio.to_thread.run_sync(self.wait_jobs, n, 60.0, abandon_on_cancel=True)
