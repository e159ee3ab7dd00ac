"""The load generator's fast path: plain jobs in C, TLS jobs in one Python epoll loop.

``lpd-relay loadgen`` must not be what limits a measurement near a few
thousand jobs a second.  The trio path (``relay.loadgen.run_load``) costs
about 0.5-1 ms of CPU per 1 KiB job in scheduling, cancel scopes and the
client's objects.  Here every byte string of a job is built before it
connects (``JobSteps``, with the client's own builders; the payload is shared),
each step is one send and each reply one ``recv``, and nothing else runs per
job.  The exchange is the one real senders make — one job per connection,
every acknowledgement awaited before the next subcommand — so rates and
latencies mean the same as before.

Plain ``lpd://`` runs in ``relay._loadgen.EpollLoad``: the per-job loop in C
without the GIL, jobs handed over in batches, latencies and failures counted
in C arrays and read back at the end.  Per job it makes 14 system calls:
``socket`` (created non-blocking), ``connect``, one ``epoll_ctl``
(edge-triggered for both directions, so the mask never changes), 5
``send``, 5 ``recv`` and ``close``; step 0 goes out as ``connect`` returns
(on loopback the handshake is done by then), so no wake-up waits for it.
Its CPU is the loop's thread's own (``time.thread_time``): the loop runs in
the caller's thread, and another thread of the same process (a test
runner's, a relay run in-process) is not the load generator's cost.

``lpds://`` goes through ``FastLoad``, the same exchange in Python over
``select.epoll`` with a non-blocking ``ssl`` socket (a full handshake per
connection, the context of ``relay.tls.client_context``), level-triggered: a
TLS record read may leave decrypted bytes in the ``ssl`` object that no new
edge would announce.  ``FastLoad`` also runs plain sockets (edge-triggered),
the readable reference the tests hold the compiled loop to.
"""

from __future__ import annotations

import errno
import resource
import select
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay import _core, _loadgen
from relay.client import short_hostname

if TYPE_CHECKING:
    from relay.loadgen import LoadResult
    from relay.uri import Destination

_OK = b"\x00"
_CHUNK = 256 * 1024          # bytes per send over TLS (a retried write repeats it)
_JOIN = 64 * 1024           # data up to this size goes out with its NUL in one send
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_BOTH_EDGE = select.EPOLLIN | select.EPOLLOUT | select.EPOLLET
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
_BATCH = 256                # jobs built and handed to the compiled loop at a time


class JobSteps:
    """``steps(n)``: job ``n``'s exchange, per step the byte strings to send, then one reply.

    The control file is what ``relay.client.build_job`` writes for one
    document named "loadgen", user "loadgen", title ``load <n>``.  In
    ``stream``/``windows`` mode the last step's data runs to our half-close.
    What all jobs of a load share (the 0x02 line, the data, the file names
    of each of the 1,000 job numbers) is built once, with the client's
    builders; per job only the control file and its header are.
    """

    def __init__(self, *, queue: str, host: str, data: bytes, mode: str = "count",
                 order: str = "control-first") -> None:
        self.host, self.data, self.mode = host, data, mode
        self.receive = [_core.receive_job(queue)]
        self.streamed = mode != "count"
        self.body = [data] if self.streamed else [data + _OK] if len(data) <= _JOIN \
            else [data, _OK]
        self.data_first = order != "control-first" and not self.streamed
        self.head = f"H{host}\nPloadgen\nJload ".encode()
        self.names: dict[int, tuple[str, bytes, list[bytes]]] = {}

    def _names(self, number: int) -> tuple[str, bytes, list[bytes]]:
        """Job number ``number``'s control file name, its control file's tail, data header."""
        job = f"{number:03d}{self.host}"
        cf, df = f"cfA{job}", f"dfA{job}"
        tail = f"\nLloadgen\nl{df}\nNloadgen\nU{df}\n".encode()
        names = cf, tail, [_core.data_header(df, len(self.data), self.mode)]
        self.names[number] = names
        return names

    def __call__(self, n: int) -> list[list[bytes]]:
        cf, tail, data_header = self.names.get(n % 1000) or self._names(n % 1000)
        control = b"%b%d%b" % (self.head, n, tail)
        ctl = [[_core.control_header(cf, len(control))], [control + _OK]]
        dat = [data_header, self.body]
        return [self.receive, *dat, *ctl] if self.data_first else [self.receive, *ctl, *dat]


def job_steps(n: int, *, queue: str, host: str, data: bytes, mode: str = "count",
              order: str = "control-first") -> list[list[bytes]]:
    """Job ``n``'s steps (``JobSteps``), for one job."""
    return JobSteps(queue=queue, host=host, data=data, mode=mode, order=order)(n)


class _Conn:
    __slots__ = ("deadline", "mask", "n", "out", "parser", "sock", "start", "state", "steps")

    def __init__(self, sock: socket.socket, n: int, steps: list[list[bytes]],
                 deadline: float) -> None:
        self.sock = sock
        self.n = n
        self.steps = steps
        self.state = -2            # -2 connecting, -1 TLS handshake, >= 0 step awaiting reply
        self.mask = _OUT           # the events epoll waits for on it
        self.out: list[bytes | memoryview] = []
        self.parser: _core.ReplyParser | None = None
        self.start = time.perf_counter()
        self.deadline = deadline


class FastLoad:
    """Run ``jobs`` jobs over at most ``concurrency`` connections; ``result()`` after."""

    def __init__(self, dest: Destination, *, jobs: int, concurrency: int, data: bytes,
                 mode: str = "count", io_timeout: float = 30.0, first: int = 0,
                 ctx: ssl.SSLContext | None = None,
                 done: Callable[[], object] | None = None) -> None:
        self.dest, self.jobs, self.concurrency = dest, jobs, concurrency
        self.data, self.mode, self.timeout, self.first = data, mode, io_timeout, first
        self.ctx, self.done = ctx, done
        self.addr = socket.getaddrinfo(dest.host, dest.port, type=socket.SOCK_STREAM)[0]
        self.steps = JobSteps(queue=dest.path, host=short_hostname(), data=data, mode=mode,
                              order=dest.order)
        self.poll = select.epoll()
        self.edge = ctx is None          # plain sockets: edge-triggered, one epoll_ctl a job
        self.conns: dict[int, _Conn] = {}
        self.next = first
        self.latencies: list[float] = []
        self.failures: Counter[str] = Counter()

    def run(self) -> float:
        """Send every job; the wall seconds it took."""
        started = time.perf_counter()
        try:
            self._loop()
        finally:
            for conn in list(self.conns.values()):
                self._fail(conn, "error")
            self.poll.close()
        return time.perf_counter() - started

    def _loop(self) -> None:
        end = self.first + self.jobs
        sweep = time.monotonic() + 0.5
        while self.next < end or self.conns:
            while self.next < end and len(self.conns) < self.concurrency:
                self._open(self.next)
                self.next += 1
            for fd, events in self.poll.poll(0.5):
                conn = self.conns.get(fd)
                if conn is not None:
                    self._event(conn, events)
            if time.monotonic() >= sweep:
                sweep = self._sweep()

    def _sweep(self) -> float:
        now = time.monotonic()
        for conn in [c for c in self.conns.values() if c.deadline < now]:
            self._fail(conn, "timeout")
        return now + 0.5

    def _open(self, n: int) -> None:
        family, type_, proto, _, addr = self.addr
        sock = socket.socket(family, type_ | _NONBLOCK, proto)
        if not _NONBLOCK:
            sock.setblocking(False)
        if len(self.data) > _JOIN:      # the NUL after the data is a send of its own
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        steps = self.steps(n)
        conn = _Conn(sock, n, steps, time.monotonic() + self.timeout)
        self.conns[sock.fileno()] = conn
        if sock.connect_ex(addr) not in (0, errno.EINPROGRESS):
            self._fail(conn, "refused")
            return
        if self.edge:
            conn.mask = _BOTH_EDGE
        self.poll.register(sock.fileno(), conn.mask)

    def _event(self, conn: _Conn, events: int) -> None:
        conn.deadline = time.monotonic() + self.timeout
        try:
            if conn.state == -2:
                self._connected(conn, events)
            elif conn.state == -1:
                self._handshake(conn)
            elif conn.out:
                self._flush(conn)
            else:
                self._readable(conn)
        except ssl.SSLError:
            self._fail(conn, "tls")
        except OSError as exc:
            self._fail(conn, "refused" if conn.state == -2 else "closed"
                       if exc.errno in (errno.ECONNRESET, errno.EPIPE) else "error")

    def _connected(self, conn: _Conn, events: int) -> None:
        if events & (select.EPOLLERR | select.EPOLLHUP):   # the connect failed
            self._fail(conn, "refused")
            return
        if self.ctx is None:
            self._begin(conn, 0)
            return
        conn.sock = self.ctx.wrap_socket(conn.sock, do_handshake_on_connect=False,
                                         server_hostname=self.dest.servername or self.dest.host)
        conn.state = -1
        self._want(conn, _IN | _OUT)
        self._handshake(conn)

    def _want(self, conn: _Conn, mask: int) -> None:
        if conn.mask != mask and not self.edge:   # one epoll_ctl only when it changes
            self.poll.modify(conn.sock.fileno(), mask)
            conn.mask = mask

    def _handshake(self, conn: _Conn) -> None:
        assert isinstance(conn.sock, ssl.SSLSocket)
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(conn, _IN)
            return
        except ssl.SSLWantWriteError:
            self._want(conn, _OUT)
            return
        self._begin(conn, 0)

    def _begin(self, conn: _Conn, step: int) -> None:
        """Send step ``step``'s bytes; then its reply is awaited."""
        conn.state = step
        conn.out = list(conn.steps[step])
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        sock, out = conn.sock, conn.out
        tls = self.ctx is not None
        while out:
            head = out[0]
            try:
                sent = sock.send(head[:_CHUNK] if tls else head)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                self._want(conn, _OUT)
                return
            if sent == len(head):
                out.pop(0)
            else:
                out[0] = memoryview(head)[sent:]
        if conn.state == len(conn.steps) - 1 and self.mode != "count":
            sock.shutdown(socket.SHUT_WR)     # stream/windows: the data ends here
        self._want(conn, _IN)

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        if data == _OK and conn.parser is None:
            self._acked(conn)
            return
        if conn.parser is None:
            conn.parser = _core.ReplyParser()
        conn.parser.feed(data)
        if self.edge and data:
            self._drain(conn)
        while conn.sock.fileno() >= 0 and (reply := conn.parser.next_reply()) \
                is not _core.NEED_DATA:
            assert isinstance(reply, _core.Reply)
            if reply.code == 0:
                self._acked(conn)
            elif reply.code == -1 and conn.state == len(conn.steps) - 1 and \
                    self.mode != "count":
                self._acked(conn)     # a stream receiver may just close at the end
            else:
                self._fail(conn, "closed" if reply.code == -1 else f"0x{reply.code:02x}")

    def _drain(self, conn: _Conn) -> None:
        # Edge-triggered: what is already here (a reply's message, the peer's
        # EOF after a refusal) brings no new event, so a reply other than the
        # plain 0x00 is read up to EAGAIN; the parser gets the EOF too.
        assert conn.parser is not None
        while True:
            try:
                chunk = conn.sock.recv(4096)
            except BlockingIOError:
                return
            conn.parser.feed(chunk)
            if not chunk:
                return

    def _acked(self, conn: _Conn) -> None:
        if conn.state + 1 < len(conn.steps):
            self._begin(conn, conn.state + 1)
            return
        self.latencies.append(time.perf_counter() - conn.start)
        self._close(conn)

    def _fail(self, conn: _Conn, key: str) -> None:
        self.failures[key] += 1
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if self.conns.pop(fd, None) is None:
            return
        conn.sock.close()       # closing removes it from the epoll set
        if self.done is not None:
            self.done()

    def result(self, seconds: float, cpu: tuple[float, float] = (0.0, 0.0)) -> LoadResult:
        """The run's result; ``cpu`` = (CPU seconds, of which in the kernel)."""
        return _result(self.jobs, self.data, seconds, cpu, self.latencies,
                       dict(self.failures))


def _result(jobs: int, data: bytes, seconds: float, cpu: tuple[float, float],
            latencies: list[float], failures: dict[str, int]) -> LoadResult:
    from relay.loadgen import LoadResult
    return LoadResult(jobs=jobs, ok=len(latencies), seconds=seconds,
                      bytes=len(latencies) * len(data), latencies=tuple(sorted(latencies)),
                      failures=failures, cpu_seconds=cpu[0], cpu_system_seconds=cpu[1])


def _thread_cpu() -> tuple[float, float]:
    """This thread's CPU seconds so far, and the system (kernel) part of them."""
    return time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD).ru_stime


def _since(start: tuple[float, float]) -> tuple[float, float]:
    now = _thread_cpu()
    return now[0] - start[0], now[1] - start[1]


def _epoll_load(dest: Destination, *, concurrency: int, data: bytes, mode: str,
                io_timeout: float) -> _loadgen.EpollLoad:
    """An ``EpollLoad`` to ``dest`` (plain lpd://), no job queued yet."""
    family, _, _, _, addr = socket.getaddrinfo(dest.host, dest.port,
                                               type=socket.SOCK_STREAM)[0]
    flow, scope = (int(addr[2]), int(addr[3])) if len(addr) == 4 else (0, 0)
    return _loadgen.EpollLoad(
        family, str(addr[0]).partition("%")[0], int(addr[1]), concurrency=concurrency,
        io_timeout=io_timeout, half_close=mode != "count", nodelay=len(data) > _JOIN,
        flowinfo=flow, scope_id=scope)


def _run_compiled(dest: Destination, *, jobs: int, concurrency: int, data: bytes,
                  mode: str, io_timeout: float, first: int,
                  done: Callable[[], object] | None) -> tuple[float, _loadgen.EpollLoad]:
    """Every job through ``EpollLoad``, ``_BATCH`` built at a time; the wall seconds."""
    load = _epoll_load(dest, concurrency=concurrency, data=data, mode=mode,
                       io_timeout=io_timeout)
    steps = JobSteps(queue=dest.path, host=short_hostname(), data=data, mode=mode,
                     order=dest.order)
    batch = max(_BATCH, concurrency)
    n, end = first, first + jobs
    started = time.perf_counter()
    try:
        while n < end or load.open or load.queued:
            if n < end and not load.queued:
                count = min(batch, end - n)
                load.add([steps(k) for k in range(n, n + count)])
                n += count
            finished = load.run(n < end)
            if done is not None:
                for _ in range(finished):
                    done()
    finally:
        load.close()
    return time.perf_counter() - started, load


def run_fast(dest: Destination, *, jobs: int, concurrency: int, data: bytes,
             mode: str = "count", io_timeout: float = 30.0, first: int = 0,
             ctx: ssl.SSLContext | None = None,
             done: Callable[[], object] | None = None) -> LoadResult:
    """Every job, with this thread's CPU over the run: plain in C, TLS in ``FastLoad``."""
    cpu = _thread_cpu()
    if ctx is None:
        seconds, compiled = _run_compiled(dest, jobs=jobs, concurrency=concurrency, data=data,
                                          mode=mode, io_timeout=io_timeout, first=first,
                                          done=done)
        return _result(jobs, data, seconds, _since(cpu), compiled.latencies(),
                       compiled.failures())
    load = FastLoad(dest, jobs=jobs, concurrency=concurrency, data=data, mode=mode,
                    io_timeout=io_timeout, first=first, ctx=ctx, done=done)
    seconds = load.run()
    return load.result(seconds, _since(cpu))
