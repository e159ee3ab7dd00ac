"""A receive-job session's steps that decide without waiting: checks, routing, assembly.

Each LPD step of a 0x02 session (the receive-job line, a file header, a
data chunk, a file's end) is decided here synchronously, before any reply:
the queue's routing and the TLS peer's mapping, the free-space and size
checks, which files make the job (``relay.jobassembly``), the writes into
the spool's ``Incoming``.  ``relay.connection.Connection`` awaits its reply
after each step; ``relay.fastsession``'s epoll loop makes the same calls on the
same object (``relay._fastloop`` writes the reply itself), so either path decides a session
with the one copy of these rules.  A refusal is raised (``ProtocolError``,
``DiskFull``); the caller answers it.
"""

from __future__ import annotations

import trio

from relay import _core, controlfile, log
from relay.context import ConnectionContext
from relay.errors import REPLY_BAD_JOB, DiskFull, ProtocolError, SpoolError
from relay.jobassembly import JobAssembly
from relay.jobevents import NO_EVENTS
from relay.queues import sanitize_name
from relay.readdeadline import ReadDeadline
from relay.spool import MAX_FILES_PER_JOB, DataWriter, IncomingJob
from relay.spoolbackend import Session
from relay.tls import TlsPeer

__all__ = ["LEFTOVERS_MAX", "SPACE_CHECK_EVERY", "JobSteps"]

# While a data file of unknown length streams in, look at free space this often.
SPACE_CHECK_EVERY = 64 * 1024 * 1024
# Partial jobs whose removal failed, kept for another try (each is a few names).
LEFTOVERS_MAX = 1000


class JobSteps:
    """The synchronous half of a connection's 0x02 session (module docstring)."""

    ctx: ConnectionContext
    tls_peer: TlsPeer | None
    peer: str
    session: Session
    queue: str | None
    wire_queue: str
    job: JobAssembly | None
    writer: DataWriter | None
    deadline: ReadDeadline

    def take_receive_job(self, ev: _core.ReceiveJob) -> None:
        if self.queue is None:
            queue = self.ctx.router.route(ev.queue, new_job=True)
            self._check_tls_peer(queue.name, ev.queue)
            self._check_space()
            self.queue, self.wire_queue = queue.name, ev.queue

    def _check_space(self, need: int = 0) -> None:
        """``Spool.check_space``; kept delivered jobs give way before a refusal (docs/spool.md)."""
        try:
            self.ctx.spool.check_space(need)
        except DiskFull:
            if self.ctx.make_room is None or not self.ctx.make_room(need):
                raise

    def _job(self) -> JobAssembly:
        if self.job is None:
            assert self.queue is not None, "parser emits files only inside 0x02"
            if self.ctx.leftovers:
                self._retry_leftovers()
            self._check_space()
            incoming = self.ctx.spool.begin(queue=self.queue, wire_queue=self.wire_queue,
                                            peer=self.peer, session=self.session)
            if self.tls_peer is not None and self.tls_peer.name:
                incoming.set_tls_peer(self.tls_peer.name)
            if self.ctx.spool.events is not NO_EVENTS:   # the audit log wants SHA-256s
                incoming.digests = {}
            self.job = JobAssembly(incoming)
        return self.job

    def take_control_start(self, ev: _core.ControlFileStart) -> None:
        job = self._job()
        self._check_size(job.incoming.bytes + ev.length)

    def take_control_end(self, ev: _core.ControlFileEnd) -> None:
        job = self._job()
        if job.control is not None:
            raise ProtocolError("second control file before the data files of the first",
                                reply=REPLY_BAD_JOB, reason="malformed")
        cf = controlfile.parse_control_file(ev.data)
        job.set_control(cf)
        if len(job.wanted) > MAX_FILES_PER_JOB:
            raise ProtocolError(f"control file names more than {MAX_FILES_PER_JOB} data files",
                                reply=REPLY_BAD_JOB, reason="too_large")
        if job.opened and (missing := job.missing()):
            # Data files came first, so this control file is the job's last
            # step: a file it names that did not come never will.
            raise ProtocolError(f"control file names {sanitize_name(missing[0])}, "
                                "which was not sent", reply=REPLY_BAD_JOB, reason="malformed")
        name = controlfile.split_job_name(ev.name)
        job.incoming.set_control(
            ev.name, ev.data, number=name.number, user=cf.user or "", host=cf.host or "",
            title=cf.title or cf.job_name or "", job_name=cf.job_name or "",
            formats={f.name: f.format for f in cf.print_files})

    def take_data_start(self, ev: _core.DataFileStart) -> None:
        job = self._job()
        if job.control is not None and ev.name not in job.wanted:
            raise ProtocolError(f"data file {sanitize_name(ev.name)} is not named by the "
                                "control file", reply=REPLY_BAD_JOB, reason="malformed")
        if job.opened >= MAX_FILES_PER_JOB:   # re-sent files count too
            raise ProtocolError(f"more than {MAX_FILES_PER_JOB} data files in one job",
                                reply=REPLY_BAD_JOB, reason="too_large")
        if ev.length is not None:
            self._check_size(job.incoming.bytes + ev.length)
        if ev.length:
            # A declared size must fit above min_free_disk before a byte is
            # written; the job itself passed the plain check at 0x02, and a
            # streamed file is checked as it grows (on_data_chunk).
            self._check_space(ev.length)
        job.opened += 1
        self.writer = job.incoming.open_data(ev.name)
        job.streamed = 0
        self.deadline.body_since, self.deadline.body_bytes = trio.current_time(), 0

    def on_data_chunk(self, ev: _core.DataChunk) -> None:
        assert self.writer is not None and self.job is not None
        data = ev.data
        self.writer.write(data)
        job = self.job
        job.streamed += len(data)
        self.deadline.body_bytes += len(data)
        if job.streamed >= SPACE_CHECK_EVERY:
            job.streamed = 0
            self._check_size(job.incoming.bytes)
            self._check_space()

    def take_data_end(self, ev: _core.DataFileEnd) -> None:
        assert self.writer is not None and self.job is not None
        self.writer.close()
        self.writer = None
        self._check_size(self.job.incoming.bytes)
        self.job.received.add(ev.name)

    def _check_size(self, total: int) -> None:
        limit = self.ctx.config.max_job_size
        if total > limit:
            raise ProtocolError(f"job larger than max_job_size ({limit} bytes)",
                                reply=REPLY_BAD_JOB, reason="too_large")

    def _check_tls_peer(self, queue: str, wire_queue: str) -> None:
        """[tls.peers]: a TLS client uses only the queues its certificate is mapped to."""
        peer = self.tls_peer
        if peer is None or peer.permits(queue, wire_queue):
            return
        who = sanitize_name(peer.name) or "a certificate without a name"
        why = "is not mapped in tls.peers" if not peer.mapped else (
            f"may not use queue {sanitize_name(wire_queue)}")
        raise ProtocolError(f"TLS peer {who} {why}", reply=0x01, reason="acl")

    def _drop(self, incoming: IncomingJob) -> None:
        try:
            incoming.discard()
        except (OSError, SpoolError) as exc:  # a spool gone read-only, a worker's main
            # process gone: retried at the next job (a worker's is swept at the next start)
            log.event("error", "discard_failed", peer=self.peer, job=incoming.id, error=str(exc))
            if len(self.ctx.leftovers) < LEFTOVERS_MAX:  # beyond: the next start sweeps them
                self.ctx.leftovers.append(incoming)

    def _retry_leftovers(self) -> None:
        leftovers = self.ctx.leftovers[:]
        self.ctx.leftovers.clear()
        for incoming in leftovers:
            self._drop(incoming)
