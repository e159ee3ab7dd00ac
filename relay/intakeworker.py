"""One intake worker process: the LPD server with a spool that lives in the main process.

Started by ``relay.workers`` as ``python -m relay.intakeworker`` with four descriptors
(docs/architecture.md, "Processes").  It runs the unchanged
``relay.server.LpdServer`` and ``relay.connection.Connection`` on its own
``SO_REUSEPORT`` listeners; what they ask of the spool is answered by
``SpoolProxy``:

* a small job is kept in memory (``_MemoryFile``) and sent whole in one
  ``Commit``; the main process stores it in its spool (its group commit
  batches jobs from every worker) and replies once the job is durable, and
  only then does the connection send the final ack (SPEC §4.4);
* a data file that outgrows ``IN_MEMORY_MAX`` is moved, at that moment, into
  a spool file the main process opened for it (``Open`` returns its
  descriptor), and the rest streams straight into it: no copy through the
  channel;
* the one-shot commands go to the main process (``Command``), which answers
  for the whole daemon (lpq, lprm, lpc), and the bytes come back here.

The main process reads this worker's metric values whenever its own
registry is read (a scrape, a test), over the metrics socket answered by a
thread here, so /metrics is exact; they are also pushed every
``COUNTS_INTERVAL`` so a worker that dies loses at most that much.  The
worker exits when its channel closes (the main process is gone) and stops
gracefully on ``Stop`` or SIGTERM.
"""

from __future__ import annotations

import builtins
import dataclasses
import itertools
import os
import signal
import socket as pysocket
import sys
import threading
import time
from collections.abc import Mapping
from typing import TextIO, cast

import trio
from prometheus_client import CollectorRegistry

from relay import _core, log
from relay.config import CATCH_ALL, Config
from relay.connectioncounts import SharedCounts
from relay.errors import DiskFull, SpoolError
from relay.groupcommit import disk_error, start_writeback, write_all
from relay.intakechannel import (
    Admit,
    CallClient,
    Channel,
    Command,
    Commit,
    Control,
    Counts,
    Discard,
    Init,
    Log,
    Open,
    Ready,
    Reload,
    Reply,
    Stop,
    raise_failure,
    serve_metrics,
)
from relay.metrics import Metrics
from relay.queues import QueueRouter
from relay.queuestate import QueueStates
from relay.server import LpdServer
from relay.spool import JobMeta, Spool
from relay.status import QueueState

# Data kept in memory per job before a data file goes to a spool file of its own.
IN_MEMORY_MAX = 64 * 1024
WRITEBACK_CHUNK = 8 << 20      # as relay.spooljob: start writeback every 8 MiB under fsync
FREE_SPACE_TTL = 0.5           # as relay.spool: a free-space reading is good this long
COUNTS_INTERVAL = 1.0
# Counted by the main process as it commits (exact at the moment of the ack).
MAIN_COUNTS = frozenset({"lpdrelay_jobs_received", "lpdrelay_bytes_received"})


class _MemoryFile:
    """A data file held in memory until it outgrows ``IN_MEMORY_MAX`` (then: a spool file)."""

    __slots__ = ("_fd", "_job", "_mark", "_size", "buf", "name", "promoted")

    def __init__(self, job: IncomingProxy, name: str) -> None:
        self._job, self.name = job, name
        self.buf = bytearray()
        self._fd = -1
        self._size = 0
        self._mark = 0
        self.promoted = False   # in a spool file of the main process's, not in memory

    def fileno(self) -> int:
        return -1     # the connection writes through write()

    def add(self, n: int) -> None:
        raise SpoolError("an intake worker's data file takes write() only")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if self._fd < 0:
            if self._job.in_memory + n <= IN_MEMORY_MAX:
                self.buf += data
                self._job.in_memory += n
                self._size += n
                self._job.bytes += n
                return
            self._fd = self._job.promote(self)
            self.promoted = True
            self._job.in_memory -= len(self.buf)
            self._write(self.buf)
            self.buf = bytearray()
        self._write(data)
        self._size += n
        self._job.bytes += n

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            write_all(self._fd, data)
        except OSError as exc:
            raise disk_error(exc, f"job {self._job.id} data file") from exc
        if self._job.fsync and self._size - self._mark >= WRITEBACK_CHUNK:
            start_writeback(self._fd, self._mark, self._size - self._mark)
            self._mark = self._size

    def close(self) -> int:
        self.abandon()
        self._job.closed(self)
        return self._size

    def abandon(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -2


class IncomingProxy:
    """A job being received in a worker (the ``relay.spoolbackend.Incoming`` face)."""

    def __init__(self, spool: SpoolProxy, token: str, *, queue: str, wire_queue: str,
                 peer: str) -> None:
        self.spool, self.token = spool, token
        self.queue, self.wire_queue, self.peer = queue, wire_queue, peer
        self.fsync = spool.fsync
        self.bytes = 0
        self.in_memory = 0
        self.tls_peer = ""
        self.control: Control | None = None
        self.files: dict[str, bytes] = {}      # wire name -> in-memory body, arrival order
        self.promoted = False                  # the main process holds a part of it
        self._open: _MemoryFile | None = None
        self.gone = False

    @property
    def id(self) -> str:
        return self.token

    def set_control(self, name: str, raw: builtins.bytes, *, number: str, user: str, host: str,
                    title: str, job_name: str, formats: Mapping[str, str]) -> None:
        self.bytes += len(raw) - (len(self.control.raw) if self.control else 0)
        self.control = Control(name=name, raw=bytes(raw), number=number, user=user, host=host,
                               title=title, job_name=job_name, formats=dict(formats))

    def set_tls_peer(self, name: str) -> None:
        self.tls_peer = name

    def open_data(self, name: str) -> _MemoryFile:
        if self._open is not None:
            raise SpoolError(f"job {self.token}: a data file is already open")
        if (old := self.files.pop(name, None)) is not None:  # a re-sent file supersedes
            self.bytes -= len(old)
            self.in_memory -= len(old)
        self._open = _MemoryFile(self, name)
        return self._open

    def promote(self, file: _MemoryFile) -> int:
        """A spool file for ``file`` from the main process; its descriptor."""
        self.promoted = True
        return self.spool.open_file(self, file.name)

    def closed(self, file: _MemoryFile) -> None:
        # A promoted file is complete in its spool file; the main process
        # closes its end before the next Open or at the Commit.
        self._open = None
        if not file.promoted:
            self.files[file.name] = bytes(file.buf)

    def discard(self) -> None:
        if self.gone:
            return
        self.gone = True
        if self._open is not None:
            self._open.abandon()
            self._open = None
        self.files.clear()
        if self.promoted:   # answered once its spool file is gone: the space is free
            self.spool.call(Discard(self.token))

    def commit_message(self, rid: int, hold: str) -> Commit:
        if self._open is not None:
            raise SpoolError(f"job {self.token}: data file {self._open.name!r} still open")
        return Commit(rid=rid, token=self.token, queue=self.queue, wire_queue=self.wire_queue,
                      peer=self.peer, tls_peer=self.tls_peer, control=self.control,
                      files=tuple(self.files.items()), promoted=self.promoted, hold=hold)


class SpoolProxy:
    """What intake needs of the spool, answered by the main process (module docstring)."""

    def __init__(self, config: Config, channel: Channel, calls: CallClient) -> None:
        self.directory = os.fspath(config.server.spool_dir)
        self.min_free_disk = config.server.min_free_disk
        self.fsync = config.server.fsync
        self.channel, self.calls = channel, calls
        self._tokens = itertools.count(1)
        self._rids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[Reply]]] = {}
        self._reading: tuple[int, float] | None = None
        self.catch_all_names: tuple[str, ...] = ()

    # -- space, as relay.spool.Spool.check_space: a refusal is based on a fresh reading --

    def check_space(self, need: int = 0) -> None:
        now = time.monotonic()
        if self._reading is None or now - self._reading[1] > FREE_SPACE_TTL:
            self._reading = (self._free(), now)
        free = self._reading[0]
        if free <= 0 or free - need < self.min_free_disk:
            self._reading = (free := self._free(), now)
            if free <= 0 or free - need < self.min_free_disk:
                raise DiskFull(f"spool {self.directory}: free space below min_free_disk")

    def _free(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def jobs(self, queue: str | None = None) -> list[JobMeta]:
        return []   # only the catch-all seeding asks; Init brings those names

    def begin(self, *, queue: str, wire_queue: str, peer: str) -> IncomingProxy:
        self.check_space()
        return IncomingProxy(self, f"{os.getpid()}-{next(self._tokens)}", queue=queue,
                             wire_queue=wire_queue, peer=peer)

    def call(self, message: Open | Discard | Admit) -> list[int]:
        """A call to the main process; its descriptors, or the error it sent raised."""
        try:
            reply, fds = self.calls.call(message)
        except OSError as exc:
            raise SpoolError(f"no answer from the main process: {exc}") from exc
        if reply.failure is not None:
            for fd in fds:
                os.close(fd)
            raise_failure(reply.failure)
        return fds

    def open_file(self, job: IncomingProxy, name: str) -> int:
        fds = self.call(Open(token=job.token, queue=job.queue, wire_queue=job.wire_queue,
                             peer=job.peer, tls_peer=job.tls_peer, name=name))
        if len(fds) != 1:
            raise SpoolError(f"job {job.token}: the main process sent no descriptor")
        return fds[0]

    async def commit(self, job: IncomingProxy, *, hold: str = "") -> JobMeta:
        rid = next(self._rids)
        message = job.commit_message(rid, hold)
        job.gone = True    # from here the main process owns the job (it discards on failure)
        value = await self.request(message)
        assert isinstance(value, JobMeta)
        return value

    async def answer(self, ctx: object, ev: _core.Command, host: str, port: int) -> bytes:
        """A one-shot command, answered by the main process for the whole daemon."""
        value = await self.request(Command(rid=next(self._rids), event=ev, host=host,
                                           port=port))
        assert isinstance(value, bytes)
        return value

    async def request(self, message: Commit | Command) -> object:
        event, box = trio.Event(), cast(list[Reply], [])
        self._waiting[message.rid] = (event, box)
        try:
            await self.channel.send(message)
            await event.wait()
        finally:
            self._waiting.pop(message.rid, None)
        reply = box[0]
        if reply.failure is not None:
            raise_failure(reply.failure)
        return reply.value

    def replied(self, reply: Reply) -> None:
        if (waiting := self._waiting.get(reply.rid)) is not None:
            waiting[1].append(reply)
            waiting[0].set()


class _Router(QueueRouter):
    """Routing in a worker: a name new to the catch-all is admitted by the main process,
    which counts every worker's names against ``max_catch_all_queues``."""

    def __init__(self, config: Config, states: QueueStates, spool: SpoolProxy) -> None:
        super().__init__(config, states)
        self._spool = spool
        self._known: set[str] = set()

    def _admit_catch_all(self, wire_name: str) -> None:
        if wire_name in self._known:
            return
        self._spool.call(Admit(wire_name))   # ProtocolError when beyond the bound
        if len(self._known) < 100_000:       # a cache: forgetting costs one call
            self._known.add(wire_name)


class _LogToMain:
    """The worker's log stream: lines go to the main process, which writes them."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.lines: list[str] = []
        self.wake = trio.Event()

    def write(self, text: str) -> int:
        self.lines.append(text.rstrip("\n"))
        if threading.current_thread() is threading.main_thread():
            self.wake.set()
        return len(text)

    def flush(self) -> None:
        pass

    async def run(self) -> None:
        while True:
            with trio.move_on_after(0.5):   # lines from other threads wait at most this
                await self.wake.wait()
            self.wake = trio.Event()
            if self.lines:
                lines, self.lines = tuple(self.lines), []
                await self.channel.send(Log(lines))


class _NoDelivery:
    """The worker delivers nothing: the main process submits what it committed."""

    def submit(self, job: JobMeta) -> None:
        pass

    def wake(self, queue: str, job_ids: object = ()) -> None:
        raise AssertionError("commands are answered by the main process")

    def queue_state(self, queue: str) -> QueueState:
        raise AssertionError("commands are answered by the main process")

    def remove(self, queue: str, job_ids: object) -> list[str]:
        raise AssertionError("commands are answered by the main process")


def metric_values(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                          float]:
    """Every counter and gauge sample of ``registry`` by (family, labels)."""
    values = {}
    for family in registry.collect():
        if family.type not in ("counter", "gauge") or family.name in MAIN_COUNTS:
            continue
        wanted = family.name + "_total" if family.type == "counter" else family.name
        for sample in family.samples:
            if sample.name == wanted:
                values[(family.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def _push_counts(channel: Channel, registry: CollectorRegistry) -> None:
    """Every ``COUNTS_INTERVAL``, the values: what a worker that dies had counted stays."""
    last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    while True:
        await trio.sleep(COUNTS_INTERVAL)
        if (now := metric_values(registry)) != last:
            await channel.send(Counts(now))
            last = now


class Worker:
    """The worker's parts: its server, its spool proxy, its routing."""

    def __init__(self, init: Init, channel: Channel, calls: CallClient) -> None:
        config = init.config
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry, queues=list(config.queues),
                               destinations=[d.uri for q in config.queues.values()
                                             for d in q.destinations])
        self.spool = SpoolProxy(config, channel, calls)
        self.channel = channel
        self.catch_all_names = init.catch_all_names
        self.server = LpdServer(config.server, spool=cast(Spool, self.spool),
                                router=self._router(config), delivery=_NoDelivery(),
                                metrics=self.metrics)
        self.server.reuse_port = True
        self.server.context = dataclasses.replace(self.server.context, answer=self.spool.answer)
        self.config = config
        self.orphaned = False
        self._nursery: trio.Nursery | None = None
        self.logs: _LogToMain | None = None

    def _router(self, config: Config) -> QueueRouter:
        router = _Router(config, QueueStates(config.server.spool_dir), self.spool)
        if CATCH_ALL in config.queues:
            router.seed_catch_all(self.catch_all_names)
        return router

    def reload(self, config: Config) -> None:
        """New routing (and listeners, TLS material) for new connections."""
        try:
            self.server.reload_tls(config.server)
            opened = self.server.open_listeners(config.server.listen)
        except Exception as exc:   # the main process checked it; log and keep running
            log.event("error", "worker_reload_failed", error=str(exc))
            return
        self.metrics.add_labels(config.queues, [d.uri for q in config.queues.values()
                                                for d in q.destinations])
        self.server.reconfigure(config.server, self._router(config), opened)
        self.config = config

    async def read_channel(self, stopping: trio.Event) -> None:
        while True:
            try:
                message = await self.channel.receive()
            except (EOFError, OSError):
                # The main process is gone (or cancelled us): nothing can be
                # committed any more, so stop now; its restart recovers the spool.
                log.event("warning", "worker_orphaned", pid=os.getpid(),
                          error="the main process closed the channel")
                self.orphaned = True
                if self._nursery is not None:
                    self._nursery.cancel_scope.cancel()
                return
            if isinstance(message, Reply):
                self.spool.replied(message)
            elif isinstance(message, Reload):
                self.reload(message.config)
            elif isinstance(message, Stop):
                stopping.set()

    async def run(self) -> None:
        stopping = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.read_channel, stopping)
            nursery.start_soon(_push_counts, self.channel, self.registry)
            if self.logs is not None:
                nursery.start_soon(self.logs.run)
            nursery.start_soon(_watch_term, stopping)
            await nursery.start(self._serve, stopping)
            await self.channel.send(Ready())
            await stopping.wait()
            self.server.stop_accepting()
            await self.server.closed.wait()
            await self.channel.send(Counts(metric_values(self.registry)))  # the last values
            if self.logs is not None and self.logs.lines:
                await self.channel.send(Log(tuple(self.logs.lines)))
            nursery.cancel_scope.cancel()

    async def _serve(self, stopping: trio.Event,
                     task_status: trio.TaskStatus[list[tuple[str, int]]]
                     = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.server.serve(task_status=task_status)
        finally:
            stopping.set()


async def _watch_term(stopping: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            stopping.set()
            return


async def _main(stream_fd: int, call_fd: int, metrics_fd: int, table_fd: int) -> int:
    stream = trio.socket.from_stdlib_socket(pysocket.socket(fileno=stream_fd))
    channel = Channel(stream)
    calls = CallClient(pysocket.socket(fileno=call_fd))
    try:
        init = await channel.receive()
    except (EOFError, OSError):
        return 1
    assert isinstance(init, Init)
    logs = _LogToMain(channel)
    log.configure(fmt=init.config.log.format, level=init.config.log.level,
                  stream=cast(TextIO, logs))
    worker = Worker(init, channel, calls)
    worker.logs = logs
    worker.server.others = SharedCounts(table_fd, init.index)
    registry = worker.registry
    threading.Thread(target=serve_metrics, daemon=True, name="metrics",
                     args=(pysocket.socket(fileno=metrics_fd),
                           lambda: Counts(metric_values(registry)))).start()
    await worker.run()
    return 1 if worker.orphaned else 0


def main(argv: list[str]) -> int:
    """The worker process (internal entry point; the main process starts it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a terminal's ^C: the main process decides
    stream_fd, call_fd, metrics_fd, table_fd = map(int, argv[:4])
    return trio.run(_main, stream_fd, call_fd, metrics_fd, table_fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
