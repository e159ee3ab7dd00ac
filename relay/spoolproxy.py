"""The spool as an intake worker sees it: what ``Connection`` asks, answered by the main process.

``SpoolProxy`` implements the part of ``relay.spoolbackend`` intake uses —
``check_space``, ``begin``, and on the job ``set_control`` / ``open_data`` /
``discard``, then ``commit`` (docs/architecture.md, "Processes").  A job's data
files stay in memory (``MemoryFile``) while they total ``IN_MEMORY_MAX``; the
job then travels whole in one ``Commit`` and the reply comes once the main
process made it durable (SPEC §4.4).  A data file that outgrows that is moved
into a spool file the main process opens for it (``Open``: its descriptor by
SCM_RIGHTS) and the rest is written straight there.  ``open_data`` and
``write`` are plain calls in the connection code, so ``Open``, ``Discard`` and
``Admit`` are blocking calls on their own socket (``relay.intakechannel``).
"""

from __future__ import annotations

import builtins
import itertools
import os
from collections import Counter
from collections.abc import Callable, Mapping
from typing import cast

import trio

from relay import _core
from relay.config import Config
from relay.connectioncounts import NO_OTHERS, NoOthers, Received
from relay.errors import SpoolError
from relay.intakechannel import (
    Admit,
    CallClient,
    Channel,
    Command,
    Commit,
    Control,
    Discard,
    MakeRoom,
    Open,
    Reply,
    ReplyWaiter,
    Withdrawn,
    raise_failure,
)
from relay.jobevents import NO_EVENTS, JobEvents, NoEvents
from relay.memoryfile import MemoryFile
from relay.spool import JobMeta
from relay.spoolbackend import Session
from relay.spoolspace import FreeSpace

__all__ = ["IncomingProxy", "SpoolProxy"]


class IncomingProxy:
    """A job being received in a worker (the ``relay.spoolbackend.Incoming`` face)."""

    def __init__(self, spool: SpoolProxy, token: str, *, queue: str, wire_queue: str,
                 peer: str, session: Session | None) -> None:
        self.spool, self.token, self.session = spool, token, session
        self.queue, self.wire_queue, self.peer = queue, wire_queue, peer
        self.fsync = spool.fsync
        self.bytes = 0
        self.in_memory = 0
        self.tls_peer = ""
        self.digests: dict[str, str] | None = None   # a dict: hash data files (the audit log)
        self.control: Control | None = None
        self.files: dict[str, bytes] = {}      # wire name -> in-memory body, arrival order
        self.promoted = False                  # the main process holds a part of it
        self._open: MemoryFile | None = None
        self.gone = False
        self.sent = trio.Event()   # set once this job sent its Commit (or was discarded)
        # The session's job before it, unanswered at begin(); dropped once this one is
        # answered, so a long session holds only its jobs in flight.
        self.previous: IncomingProxy | None = None
        self.answered = False      # its commit's reply came (or it failed here, or went)
        self.failed = False        # its commit failed: the session's later jobs fail too
        self.skipped = False       # discarded before its commit: the next looks past it
        self.failed_before = False  # a commit of its connection failed before it began
        # Its connection's memory (relay.spoolbackend.Session): ``last`` names this
        # job until it is answered (that breaks the cycle), ``failed`` for good.

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

    def open_data(self, name: str) -> MemoryFile:
        if self._open is not None:
            raise SpoolError(f"job {self.token}: a data file is already open")
        if (old := self.files.pop(name, None)) is not None:  # a re-sent file supersedes
            self.bytes -= len(old)
            self.in_memory -= len(old)
        self._open = MemoryFile(self, name)
        return self._open

    def promote(self, file: MemoryFile) -> int:
        """A spool file for ``file`` from the main process; its descriptor."""
        self.promoted = True
        return self.spool.open_file(self, file.name)

    def closed(self, file: MemoryFile) -> None:
        # A promoted file is complete in its spool file; the main process
        # closes its end before the next Open or at the Commit.
        self._open = None
        if not file.promoted:
            self.files[file.name] = bytes(file.buf)

    def before(self) -> IncomingProxy | None:
        """The job before this one in its session that commits (discarded ones skipped)."""
        job = self.previous
        while job is not None and job.skipped:
            job = job.previous
        return job

    def its_turn(self) -> bool:
        """The job before it sent its Commit: this one may take its id now."""
        before = self.before()
        return before is None or before.sent.is_set()

    async def wait_turn(self) -> None:
        while (before := self.before()) is not None and not before.sent.is_set():
            await before.sent.wait()

    def discard(self) -> None:
        if not self.answered:
            self.skipped = True
            self.spool.answered(self, failed=False)
        self.spool.sent(self)
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
        before = self.before()
        if self.failed_before or (before is not None and before.failed):
            raise SpoolError("a job before it on this connection was not committed")
        # Not answered yet: the main process decides after that job (Commit.previous).
        previous = before.token if before is not None and not before.answered else ""
        return Commit(rid=rid, token=self.token, queue=self.queue, wire_queue=self.wire_queue,
                      peer=self.peer, tls_peer=self.tls_peer, control=self.control,
                      files=tuple(self.files.items()), promoted=self.promoted, hold=hold,
                      digests=self.digests, previous=previous)


class _Callback:
    """A ``commit_soon``'s reply, handed to a function by the channel's reader."""

    __slots__ = ("done", "job", "rid", "spool")

    def __init__(self, spool: SpoolProxy, job: IncomingProxy, rid: int,
                 done: Callable[[Reply], None]) -> None:
        self.spool, self.job, self.rid, self.done = spool, job, rid, done

    def give(self, reply: Reply) -> None:
        self.spool.forget(self.rid, self.job, failed=reply.failure is not None)
        self.done(reply)


class _RecordedInMain(NoEvents):
    """A worker's events: recorded by the main process as it commits the job (``Commit``).

    It drops them as ``NO_EVENTS`` does, but is not it: the connection takes
    each file's SHA-256 only for a subscriber other than ``NO_EVENTS``.
    """


RECORDED_IN_MAIN: JobEvents = _RecordedInMain()


class SpoolProxy(FreeSpace):
    """What intake needs of the spool, answered by the main process (module docstring).

    ``check_space`` is the spool's own (``relay.spoolspace``): a reading of the
    spool's file system less what every worker received since, heeding the
    main process's last reading; a refusal always on a fresh reading.
    """

    def __init__(self, config: Config, channel: Channel, calls: CallClient) -> None:
        self.directory = os.fspath(config.server.spool_dir)
        self.min_free_disk = config.server.min_free_disk
        self.fsync = config.server.fsync
        self.channel, self.calls = channel, calls
        self._pid = os.getpid()
        self._tokens = itertools.count(1)
        self._rids = itertools.count(1)
        self._waiting: dict[int, ReplyWaiter | _Callback] = {}
        self._reading: tuple[int, float, int] | None = None
        self.own_written = 0        # bytes this worker received into jobs, ever
        self.shared: NoOthers = NO_OTHERS          # the workers' table (connectioncounts)
        self._others = Received(NO_OTHERS)
        self._stats: Counter[str] = Counter()
        self.catch_all_names: tuple[str, ...] = ()
        # The main process records a worker's job events (received, acknowledged,
        # held) with the job's commit, durably before it replies; here only the
        # connection's cue that the audit log wants the data files' SHA-256s.
        self.events: JobEvents = RECORDED_IN_MAIN if config.audit is not None else NO_EVENTS

    @property
    def written(self) -> int:   # type: ignore[override]
        """Bytes every worker received into jobs since this one started (FreeSpace's)."""
        return self.own_written + self._others.now()

    def main_free(self) -> int | None:
        return self.shared.main_free()

    def share(self, table: NoOthers) -> None:
        """Publish this worker's bytes in ``table`` and count the others'."""
        self.shared, self._others = table, Received(table)

    def add_written(self, n: int) -> None:
        self.own_written += n
        self.shared.received(self.own_written)

    def make_room(self, need: int = 0) -> bool:
        """Retention in the main process expires kept jobs until ``need`` fits (docs/spool.md).

        ``Connection`` asks this when ``check_space`` refused; False: nothing
        kept could make room (the job is refused with 0x02).
        """
        try:
            reply, _ = self.calls.call(MakeRoom(need))
        except OSError:
            return False
        self._reading = None   # the next check reads the space afresh
        return bool(reply.value)

    def jobs(self, queue: str | None = None) -> list[JobMeta]:
        return []   # only the catch-all seeding asks; Init brings those names

    def begin(self, *, queue: str, wire_queue: str, peer: str,
              session: Session | None = None) -> IncomingProxy:
        # No check_space here: Connection checked it just before (with make_room).
        job = IncomingProxy(self, f"{self._pid}-{next(self._tokens)}", queue=queue,
                            wire_queue=wire_queue, peer=peer, session=session)
        # A session's jobs commit in tasks of their own (relay.ackqueue), whose
        # order trio does not keep: each Commit waits for the one before it, and
        # is acknowledged only if that one was committed (as relay.ackqueue does).
        # What is known of the connection is kept on its ``session``: a later
        # connection from the same host and port starts afresh.
        if session is not None:
            if session.last is not None:
                job.previous = cast(IncomingProxy, session.last)
            elif session.failed:
                job.failed_before = True
            session.last = job
        return job

    def sent(self, job: IncomingProxy) -> None:
        job.sent.set()

    def answered(self, job: IncomingProxy, *, failed: bool) -> None:
        """The job's commit is decided (or it went): later jobs need not wait for its word."""
        job.answered, job.failed = True, failed
        before = job.before()
        if not job.skipped:   # decided: what came before it no longer matters
            job.previous = None
            job.files.clear()
        if (session := job.session) is None:
            return
        if failed:
            session.failed = True
        if session.last is job:   # a discarded job: the one before stays latest
            if job.skipped and before is not None and not before.answered:
                session.last = before
            else:
                session.last = None

    def call(self, message: Open | Discard | Admit | Withdrawn) -> list[int]:
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
        """Commit in the main process; it hands the job to delivery before it replies,
        so the job is in every lpq once this returns (the connection acks then)."""
        failed = True
        try:
            await job.wait_turn()
            message = job.commit_message(next(self._rids), hold)
            job.gone = True    # from here the main process owns the job (it discards on failure)
            value = await self.request(message, job)
            failed = False
        finally:
            self.answered(job, failed=failed)   # before ``sent``: the next job looks
            self.sent(job)
        assert isinstance(value, JobMeta)
        return value

    def commit_soon(self, job: IncomingProxy, done: Callable[[Reply], None]) -> int:
        """``commit`` without a task: the Commit written now, ``done(reply)`` called by the
        channel's reader (the reply's failure is the caller's to raise).  Its request id;
        0 when nothing was done (``commit`` it).  ``forget`` it to stop waiting."""
        if not job.its_turn():
            return 0
        rid = next(self._rids)
        try:
            message = job.commit_message(rid, "")
        except BaseException:
            self.answered(job, failed=True)   # as commit() ends
            self.sent(job)
            raise
        if not self.channel.send_nowait(message):
            return 0
        job.gone = True    # from here the main process owns the job (it discards on failure)
        self.sent(job)
        self._waiting[rid] = _Callback(self, job, rid, done)
        return rid

    def forget(self, rid: int, job: IncomingProxy, *, failed: bool = True) -> None:
        """A ``commit_soon`` answered, or given up (a timeout, a stop): as ``commit`` ends."""
        self._waiting.pop(rid, None)
        self.answered(job, failed=failed)
        self.sent(job)

    async def answer(self, ctx: object, ev: _core.Command, host: str, port: int) -> bytes:
        """A one-shot command, answered by the main process for the whole daemon."""
        value = await self.request(Command(rid=next(self._rids), event=ev, host=host,
                                           port=port))
        assert isinstance(value, bytes)
        return value

    # -- committed jobs: delivery is the main process's -------------------------------

    def remove(self, job_id: str) -> None:
        """A committed job its connection did not acknowledge (``relay.ackqueue``).

        Not expected: the main process refuses a session's jobs after a failed
        commit itself (``Commit.previous``); should one slip through, it goes.
        """
        self.call(Withdrawn((job_id,)))

    async def request(self, message: Commit | Command,
                      job: IncomingProxy | None = None) -> object:
        waiter = self._waiting[message.rid] = ReplyWaiter()
        try:
            await self.channel.send(message)
            if job is not None:
                self.sent(job)
            reply = await waiter.wait()
        finally:
            self._waiting.pop(message.rid, None)
        if reply.failure is not None:
            raise_failure(reply.failure)
        return reply.value

    def replied(self, reply: Reply) -> None:
        if (waiter := self._waiting.get(reply.rid)) is not None:
            waiter.give(reply)
