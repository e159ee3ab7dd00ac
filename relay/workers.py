"""Intake in several processes: the main process's side (docs/architecture.md, "Processes").

With ``[server] workers = N`` above 1 the main process keeps the one spool,
the delivery scheduler, lpq/lprm/lpc state and the metrics, and ``N``
worker processes (``relay.intakeworker``) accept and receive.  The main
process binds every listening address first (so a bad address fails the
start as before, and port 0 becomes a real port) with ``SO_REUSEPORT`` and
without listening: it holds the port, the kernel gives it no connection.
Each worker binds the same addresses with ``SO_REUSEPORT`` and the kernel
spreads new connections over them.

``WorkerPool`` stands where ``relay.server.LpdServer`` stands in a
single-process daemon (the same ``serve`` / ``stop_accepting`` / reload
surface), starts and supervises the workers — one that dies is replaced and
the jobs it had begun are discarded — and serves their channels
(``relay.intakechannel``): commits into the spool, spool files for large
data files, commands answered with the daemon's own state, metric deltas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from collections.abc import Callable

import trio
from prometheus_client import CollectorRegistry

from relay import commands, log
from relay.buffers import BufferPool
from relay.config import CATCH_ALL, Config, Listen, ServerConfig
from relay.connectioncounts import FreeBoard, clear_row, create_table
from relay.context import ConnectionContext, Delivery
from relay.errors import ProtocolError, SpoolError
from relay.forkserver import fork_worker
from relay.intakechannel import (
    Admit,
    Channel,
    Command,
    Commit,
    Counts,
    Discard,
    Failure,
    Init,
    Log,
    MakeRoom,
    MetricsClient,
    Open,
    Ready,
    Reload,
    Reloaded,
    Reply,
    Stop,
    Withdrawn,
    answer_call,
    call_pair,
    receive_call,
    stream_pair,
)
from relay.metrics import Metrics
from relay.privacy import KEEP, Redactor
from relay.queues import QueueRouter, hot_folder_names
from relay.server import open_listener, open_new_listeners
from relay.spool import Spool
from relay.tls import InboundTls
from relay.workerjobs import Prepared, WorkerJobs
from relay.workermetrics import Key, WorkerCounts

__all__ = ["WorkerPool"]

START_TIMEOUT = 30.0      # a worker must be listening this soon after it is started
RESTART_DELAY = 0.5       # between a worker's death and its replacement
SETTLE_TIMEOUT = 2.0      # a command's longest wait for jobs in the hop back to trio
RELOAD_WAIT = 5.0         # longest a reload waits for the workers to apply it
# The worker's own job_received lines: the main process logs the event itself.
_WORKER_JOB_RECEIVED = ('"event":"job_received"', " job_received ")



@dataclasses.dataclass(slots=True)
class _Handle:
    """One running worker process, as the main process knows it."""

    index: int
    ready: trio.Event = dataclasses.field(default_factory=trio.Event)
    channel: Channel | None = None
    pid: int = 0
    jobs: WorkerJobs | None = None     # its jobs' main-side half
    values: dict[Key, float] = dataclasses.field(default_factory=dict)   # as last applied
    metrics: MetricsClient | None = None
    reloaded: int = 0                  # the last Reload seq it applied


class WorkerPool:
    """Intake worker processes sharing the listening ports (SPEC §12, ``workers``)."""

    def __init__(self, config: Config, *, spool: Spool, router: QueueRouter,
                 delivery: Delivery, metrics: Metrics, registry: CollectorRegistry,
                 make_room: Callable[[int], bool] | None = None,
                 privacy: Redactor = KEEP) -> None:
        self.full_config = config
        self.config = config.server
        self.spool, self.router, self.metrics, self.delivery = spool, router, metrics, delivery
        self.make_room = make_room   # retention's: a worker asks before refusing for space
        self.context = ConnectionContext(config=config.server, spool=spool, router=router,
                                         delivery=delivery, metrics=metrics,
                                         buffers=BufferPool(), privacy=privacy)
        self.listeners: list[trio.socket.SocketType] = []
        self._plain: dict[Listen, trio.socket.SocketType] = {}
        self._tls: list[trio.socket.SocketType] = []
        self._handles: dict[int, _Handle] = {}
        self._reload_seq = 0
        self._reload_acked = trio.Event()
        self._table = create_table(config.server.workers)   # relay.connectioncounts
        # The spool's free-space readings, for the workers' checks (relay.spoolspace).
        spool.publish_free = FreeBoard(self._table).publish
        self.reload_tls(config.server)   # a bad certificate stops the start here (ConfigError)
        self.counts = WorkerCounts(metrics, registry, self.pull)
        self._stopping = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.closed = trio.Event()

    # -- the LpdServer surface -------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[list[tuple[str, int]]]
                    = trio.TASK_STATUS_IGNORED) -> None:
        """Start the workers; serve until stop_accepting() and every worker has exited."""
        opened = self.open_listeners(self.config.listen)
        self._plain.update(opened)
        try:
            for i, listen in enumerate(self.config.listen_tls):
                self._tls.append(open_listener(listen, key=f"server.listen_tls[{i}]",
                                               reuse_port=True, accept=False))
            self._relist()
            self._catch_all = tuple(j.wire_queue for j in self.spool.jobs(CATCH_ALL))
            self._seed_catch_all()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                handles = [_Handle(i) for i in range(self.config.workers)]
                for handle in handles:
                    nursery.start_soon(self._supervise, handle)
                with trio.fail_after(START_TIMEOUT):
                    for handle in handles:
                        await handle.ready.wait()
                task_status.started(self.bound())
                await self._stopping.wait()
                await self._broadcast(Stop())
                nursery.cancel_scope.deadline = (trio.current_time()
                                                 + self.config.graceful_timeout + 5.0)
        finally:
            for sock in self.listeners:
                sock.close()
            os.close(self._table)
            self.closed.set()

    def stop_accepting(self) -> None:
        """Workers stop accepting; their connections in flight get graceful_timeout."""
        self._stopping.set()

    def bound(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for sock in self.listeners]

    def open_listeners(self, listen: tuple[Listen, ...]) -> dict[Listen, trio.socket.SocketType]:
        """Hold the addresses of ``listen`` not held yet (all or none: BindError)."""
        return open_new_listeners(listen, self._plain, reuse_port=True, accept=False)

    def reload_tls(self, config: ServerConfig) -> None:
        """Check the new TLS material here (ConfigError: refused); workers load it on Reload."""
        if self.config.listen_tls and config.tls is not None:
            InboundTls(config, Metrics(CollectorRegistry(), queues=(), destinations=()))

    def reconfigure(self, config: ServerConfig, router: QueueRouter,
                    opened: dict[Listen, trio.socket.SocketType]) -> None:
        """New config for the commands answered here; ``reloaded`` then tells the workers."""
        self.config, self.router = config, router
        self.context = dataclasses.replace(self.context, config=config, router=router)
        self._seed_catch_all()
        for address in [a for a in self._plain if a not in config.listen]:
            self._plain.pop(address).close()
            log.event("info", "listener_closed", listen=str(address))
        self._plain.update(opened)
        self._relist()

    async def reloaded(self, config: Config) -> None:
        """After a reload: every worker rebuilds its routing and listeners from ``config``.

        Returns once every running worker answered that it applied it (its
        listeners open), or after RELOAD_WAIT: a reload is reported done only
        when a client can reach the addresses it added.
        """
        self.full_config = config
        if self._nursery is None:
            return
        self._reload_seq += 1
        seq = self._reload_seq
        # Sent from a task of its own: a worker that reads nothing must not
        # hold up the signal loop (a SIGTERM after it) beyond RELOAD_WAIT.
        self._nursery.start_soon(self._broadcast, Reload(self._worker_config(), seq))
        with trio.move_on_after(RELOAD_WAIT):
            while any(h.channel is not None and h.reloaded < seq
                      for h in self._handles.values()):
                await self._reload_acked.wait()
                self._reload_acked = trio.Event()

    def workers_down(self) -> int:
        """Workers not running now (between a crash and the replacement): /healthz says so."""
        return self.config.workers - len(self._handles)

    # -- workers -----------------------------------------------------------------------

    def _seed_catch_all(self) -> None:
        # As LpdServer: the catch-all's spooled names and hot-folder subfolders
        # count against max_catch_all_queues (the workers ask this router).
        if (queue := self.router.catch_all) is not None:
            self.router.seed_catch_all(j.wire_queue for j in self.spool.jobs(CATCH_ALL))
            self.router.seed_catch_all(hot_folder_names(queue))

    def _relist(self) -> None:
        self.listeners = [*self._plain.values(), *self._tls]

    def _worker_config(self) -> Config:
        """The config a worker runs: the listen addresses as bound (port 0 resolved)."""
        def actual(sock: trio.socket.SocketType) -> Listen:
            host, port = sock.getsockname()[:2]
            return Listen(host=host, port=port)
        server = dataclasses.replace(self.config,
                                     listen=tuple(actual(s) for s in self._plain.values()),
                                     listen_tls=tuple(actual(s) for s in self._tls))
        return dataclasses.replace(self.full_config, server=server)

    async def _broadcast(self, message: Reload | Stop) -> None:
        for handle in list(self._handles.values()):
            if handle.channel is not None:
                with contextlib.suppress(OSError):   # dying: its supervisor sees to it
                    await handle.channel.send(message)

    async def _supervise(self, handle: _Handle) -> None:
        first = True
        while True:
            await self._run_worker(handle)
            if self._stopping.is_set():
                return
            if first and not handle.ready.is_set():
                raise SpoolError(f"intake worker {handle.index} exited at start")
            first = False
            log.event("error", "worker_exited", worker=handle.index, pid=handle.pid,
                      error="its channel closed; partial jobs discarded, restarting")
            await trio.sleep(RESTART_DELAY)
            handle = _Handle(handle.index, ready=handle.ready)

    async def _run_worker(self, handle: _Handle) -> None:
        """One worker's life, until its channel closes (it exited or was killed)."""
        stream, stream_child = stream_pair()
        calls, calls_child = call_pair()
        pulls, pulls_child = call_pair()
        clear_row(self._table, handle.index)
        fds = (stream_child.fileno(), calls_child.fileno(), pulls_child.fileno(), self._table)
        try:
            handle.pid = await trio.to_thread.run_sync(fork_worker, fds)
        finally:
            stream_child.close()
            calls_child.close()
            pulls_child.close()
        handle.metrics = MetricsClient(pulls)
        handle.jobs = WorkerJobs(self.spool, self.delivery, self.metrics)
        log.event("info", "worker_started", worker=handle.index, pid=handle.pid)
        handle.channel = Channel(trio.socket.from_stdlib_socket(stream))
        handle.channel.allow_posts()   # the spool's flush thread writes commits' replies
        call_sock = trio.socket.from_stdlib_socket(calls)
        self._handles[handle.index] = handle
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_calls, handle, call_sock)
                await handle.channel.send(Init(config=self._worker_config(),
                                               catch_all_names=self._catch_all,
                                               index=handle.index))
                await self._read_stream(handle, nursery)
                nursery.cancel_scope.cancel()
        finally:
            handle.channel.close()   # a worker whose channel closes exits (relay.intakeworker)
            call_sock.close()
            handle.metrics.close()
            self._forget(handle)
            with trio.CancelScope(shield=True):
                await _reap(handle.pid)

    def _forget(self, handle: _Handle) -> None:
        """A worker is gone: its partial jobs go, its connections no longer count."""
        self._handles.pop(handle.index, None)
        if handle.jobs is not None:
            handle.jobs.forget()
        self.counts.forget(handle.values)

    # -- the channel -------------------------------------------------------------------

    async def _read_stream(self, handle: _Handle, nursery: trio.Nursery) -> None:
        assert handle.channel is not None and handle.jobs is not None
        while True:
            try:
                message = await handle.channel.receive()
            except (EOFError, OSError):
                return
            batch: list[tuple[Commit, Prepared]] = []
            while message is not None:   # bounded: the frames read already
                if isinstance(message, Commit):   # prepared here: ids in the order they came
                    batch.append((message, handle.jobs.prepare(message)))
                else:
                    self._start_commits(handle, nursery, batch)
                    batch = []
                    self._dispatch(handle, nursery, message)
                try:
                    message = handle.channel.receive_buffered()
                except (EOFError, OSError):   # a bad frame: the worker is gone, as above
                    self._start_commits(handle, nursery, batch)   # its cancel unstages them
                    return
            self._start_commits(handle, nursery, batch)

    def _start_commits(self, handle: _Handle, nursery: trio.Nursery,
                       batch: list[tuple[Commit, Prepared]]) -> None:
        """The commits read together: those ``commit_many`` takes in one task, the rest
        (a job before it to wait for, audit records) in a task each."""
        assert handle.jobs is not None
        many = [c for c in batch if handle.jobs.batchable(*c)]
        if len(many) > 1:
            nursery.start_soon(self._commit_many, handle, many)
        for message, prepared in batch:
            if len(many) <= 1 or not handle.jobs.batchable(message, prepared):
                nursery.start_soon(self._commit, handle, message, prepared)

    def _dispatch(self, handle: _Handle, nursery: trio.Nursery, message: object) -> None:
        if isinstance(message, Command):
            nursery.start_soon(self._command, handle, message)
        elif isinstance(message, Counts):
            self._count(handle, message)
        elif isinstance(message, Ready):
            handle.ready.set()
        elif isinstance(message, Reloaded):
            handle.reloaded = message.seq
            self._reload_acked.set()
        elif isinstance(message, Log):
            for line in message.lines:
                if not any(mark in line for mark in _WORKER_JOB_RECEIVED):
                    log.write_line(line)

    async def _read_calls(self, handle: _Handle, sock: trio.socket.SocketType) -> None:
        while True:
            try:
                message = await receive_call(sock)
            except (EOFError, OSError):
                return
            if isinstance(message, Open):
                assert handle.jobs is not None
                reply, fds = handle.jobs.open(message)
                try:
                    await answer_call(sock, reply, fds)
                except OSError:
                    return
            elif isinstance(message, Discard | Admit | MakeRoom | Withdrawn):
                if isinstance(message, Withdrawn):
                    await self._settle()   # the jobs may be in the hop back to trio
                try:
                    await answer_call(sock, self._small_call(handle, message), [])
                except OSError:
                    return

    def _small_call(self, handle: _Handle,
                    message: Discard | Admit | MakeRoom | Withdrawn) -> Reply:
        if isinstance(message, Withdrawn):
            assert handle.jobs is not None
            handle.jobs.withdraw(message)
            return Reply(0)
        if isinstance(message, Discard):
            assert handle.jobs is not None
            handle.jobs.discard(message.token)
            return Reply(0)
        if isinstance(message, MakeRoom):
            return Reply(0, value=self.make_room is not None and self.make_room(message.need))
        try:   # the catch-all's bound counts the names of every worker (here)
            self.router.route(message.queue, new_job=True)
        except ProtocolError as exc:
            return Reply(0, failure=Failure.of(exc))
        return Reply(0)

    async def _commit(self, handle: _Handle, message: Commit, prepared: Prepared) -> None:
        assert handle.channel is not None and handle.jobs is not None
        reply = await handle.jobs.commit(message, prepared, handle.channel)
        # A worker that died meanwhile: the job is stored, its sender was not
        # told, and may send it again (at-least-once, SPEC §4.4).
        if reply is not None:   # None: the flush thread wrote it
            with contextlib.suppress(OSError):
                await handle.channel.send(reply)

    async def _commit_many(self, handle: _Handle, batch: list[tuple[Commit, Prepared]]) -> None:
        assert handle.channel is not None and handle.jobs is not None
        replies = await handle.jobs.commit_many(batch, handle.channel)
        with contextlib.suppress(OSError):   # a worker gone: as in _commit
            for reply in replies:
                await handle.channel.send(reply)

    async def _settle(self) -> None:
        """Wait until the jobs the flush thread had answered when this was called are
        with delivery (trio hands each over right after): an lpq, lprm or withdrawal
        after an ack finds it.  Jobs answered meanwhile are not waited for, so a busy
        spool does not hold a command up."""
        hop = [(h.jobs, job) for h in list(self._handles.values())
               if h.jobs is not None for job in h.jobs.in_hop.copy()]   # atomic copy
        with trio.move_on_after(SETTLE_TIMEOUT):   # the hop takes ~1 ms
            for jobs, job in hop:
                while job in jobs.in_hop:
                    await jobs.handed.wait()

    async def _command(self, handle: _Handle, message: Command) -> None:
        """0x01, 0x03-0x06 for a worker's client, answered with the whole daemon's state."""
        assert handle.channel is not None
        # No round to the other workers: a job acked anywhere was handed to
        # delivery before its Commit's reply (relay.workerjobs), or is in the
        # hop from the flush thread that wrote the reply to trio (_settle).
        await self._settle()
        try:
            reply = Reply(message.rid, value=commands.answer(self.context, message.event,
                                                             message.host, message.port))
        except ProtocolError as exc:
            reply = Reply(message.rid, failure=Failure.of(exc))
        if message.event.code == 0x06:   # lpc may have changed queue states: routing
            await self._broadcast(Reload(self._worker_config()))
        with contextlib.suppress(OSError):
            await handle.channel.send(reply)

    def pull(self) -> None:
        """Read every worker's values now (any thread; a silent worker keeps its last)."""
        for handle in list(self._handles.values()):
            if handle.metrics is not None and (counts := handle.metrics.values()) is not None:
                self._count(handle, counts)

    def _count(self, handle: _Handle, counts: Counts) -> None:
        self.counts.apply(handle.values, counts.values,
                          lambda: self._handles.get(handle.index) is handle)


async def _reap(pid: int, seconds: float = 2.0) -> None:
    """Give an ending worker ``seconds`` to go, then SIGKILL it (its fork server reaps it)."""
    for _ in range(int(seconds / 0.02)):   # not our child: no wait(), so poll
        if not _exists(pid):
            return
        await trio.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
