"""A trivial LPD receiver that acknowledges everything: a sink faster than any relay.

It runs in its own forked process (one epoll loop), reads each job's
subcommands and counts, answers 0x00 to every line and every file, keeps
nothing, and counts the jobs and the data bytes it took, so the load
generator's own cost can be measured without a relay in the way.  Used by
the load generator's tests and benchmarks.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import select
import socket
from types import TracebackType

_NEED_LINE = -1


class _Peer:
    __slots__ = ("buf", "files", "need")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = _NEED_LINE     # bytes of a file (+ its NUL) still to come, or a line
        self.files = 0


def _consume(peer: _Peer, data: bytes) -> tuple[int, int, int]:
    """Feed ``data``; (acks to send, jobs completed, data bytes) it gives."""
    peer.buf += data
    acks = jobs = taken = 0
    while peer.buf:
        if peer.need == _NEED_LINE:
            nl = peer.buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(peer.buf[:nl])
            del peer.buf[:nl + 1]
            acks += 1
            if line[:1] in (b"\x02", b"\x03") and b" " in line:
                count = int(line[1:line.index(b" ")])
                peer.need = count + 1
                if line[:1] == b"\x03":
                    taken += count
        else:
            n = min(peer.need, len(peer.buf))
            del peer.buf[:n]
            peer.need -= n
            if peer.need == 0:
                peer.need = _NEED_LINE
                acks += 1
                peer.files += 1
                if peer.files == 2:           # control file + one data file: a job
                    jobs += 1
                    peer.files = 0
    return acks, jobs, taken


def _serve(listener: socket.socket, counts: multiprocessing.connection.Connection) -> None:
    poll = select.epoll()
    poll.register(listener.fileno(), select.EPOLLIN)
    peers: dict[int, tuple[socket.socket, _Peer]] = {}
    jobs = taken = 0
    control = counts.fileno()
    poll.register(control, select.EPOLLIN)
    while True:
        for fd, _ in poll.poll(1.0):
            if fd == listener.fileno():
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    continue
                sock.setblocking(False)
                peers[sock.fileno()] = (sock, _Peer())
                poll.register(sock.fileno(), select.EPOLLIN)
            elif fd == control:
                counts.recv()
                counts.send((jobs, taken))
            else:
                sock, peer = peers[fd]
                try:
                    data = sock.recv(1 << 20)
                except (BlockingIOError, ConnectionError):
                    data = b""
                if not data:
                    del peers[fd]
                    sock.close()
                    continue
                acks, done, size = _consume(peer, data)
                jobs += done
                taken += size
                if acks:
                    sock.send(b"\x00" * acks)


class Acker:
    """``with Acker() as a:`` a receiver on ``a.port``; ``a.counts()`` = (jobs, data bytes)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        ours, theirs = multiprocessing.get_context("fork").Pipe()
        self._pipe = ours
        self.proc = multiprocessing.get_context("fork").Process(
            target=_serve, args=(self.listener, theirs), daemon=True)

    def counts(self) -> tuple[int, int]:
        self._pipe.send("counts")
        if not self._pipe.poll(10):
            raise AssertionError("the acker did not answer")
        jobs, taken = self._pipe.recv()
        return int(jobs), int(taken)

    def __enter__(self) -> Acker:
        self.proc.start()
        self.listener.close()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.proc.terminate()     # our own child, by its handle
        self.proc.join(5)
