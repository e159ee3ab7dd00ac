"""One intake worker process: the LPD server with a spool that lives in the main process.

Started by ``relay.workers`` as ``python -m relay.intakeworker`` with four descriptors
(docs/architecture.md, "Processes").  It runs the unchanged
``relay.server.LpdServer`` and ``relay.connection.Connection`` on its own
``SO_REUSEPORT`` listeners; what they ask of the spool is answered by
``SpoolProxy``:

* a small job is kept in memory (``relay.memoryfile``) and sent whole in one
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

import contextlib
import dataclasses
import os
import signal
import socket as pysocket
import sys
import threading
from typing import TextIO, cast

import trio
from prometheus_client import CollectorRegistry

from relay import log
from relay.config import CATCH_ALL, Config
from relay.connectioncounts import SharedCounts
from relay.intakechannel import (
    Admit,
    CallClient,
    Channel,
    Counts,
    Init,
    Log,
    Ready,
    Reload,
    Reloaded,
    Reply,
    Stop,
    serve_metrics,
)
from relay.metrics import Metrics
from relay.queues import QueueRouter
from relay.queuestate import QueueStates
from relay.server import LpdServer
from relay.spool import JobMeta, Spool
from relay.spoolproxy import SpoolProxy
from relay.status import QueueState

COUNTS_INTERVAL = 1.0
# Counted by the main process as it hands a job to delivery, before the ack.
MAIN_COUNTS = frozenset({"lpdrelay_jobs_received", "lpdrelay_bytes_received"})


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


class _WorkerMetrics(Metrics):
    """A worker's metrics: jobs and bytes received are the main process's to count
    (``MAIN_COUNTS``, as it hands each job to delivery), so not counted here too."""

    def count_received(self, queue: str, nbytes: int) -> None:
        return None


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


class _DeliveryInMain:
    """The worker delivers nothing: the main process handed each job to its
    scheduler before it replied to the job's ``Commit``."""

    def submit(self, job: JobMeta) -> None:
        return None

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
        self.metrics = _WorkerMetrics(self.registry, queues=list(config.queues),
                               destinations=[d.uri for q in config.queues.values()
                                             for d in q.destinations])
        self.spool = SpoolProxy(config, channel, calls)
        self.channel = channel
        self.catch_all_names = init.catch_all_names
        self.server = LpdServer(config.server, spool=cast(Spool, self.spool),
                                router=self._router(config), delivery=_DeliveryInMain(),
                                metrics=self.metrics, make_room=self.spool.make_room)
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
                if message.seq:   # applied (or its failure logged): the main process may report
                    with contextlib.suppress(OSError):
                        await self.channel.send(Reloaded(message.seq))
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
    worker.spool.share(worker.server.others)
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
