"""Reprint: a kept delivered job becomes a new job (``lpd-relay spool reprint``, SPEC §11).

A job kept by ``[retention]`` (state ``delivered``) still has its control
file and data files in the spool.  A reprint copies them into a new job —
a new spool id, arrival now, queued on the job's queue or another one — and
links the two with a ``reprinted`` event (``original`` = the kept job's id,
``by`` = ``cli``).  The kept job stays kept until it expires.

The copy goes through the spool's public intake (``begin``, the incoming
job's ``set_control``/``open_data``, ``commit``), so the new job is as
durable as any received one before anyone is told about it.  Data moves
with ``os.copy_file_range`` (in the kernel, a reflink where the file system
has them), in a worker thread.

Two ways in: with the daemon running, ``spool reprint`` sends the daemon an
lpc request (``\\6QUEUE root reprint JOB``, admins only, ``relay.lpc``); the
daemon's ``Reprinter`` hands out the new id at once, answers with it, then
copies and commits in the background (the CLI waits until the id is in the
spool).  With the daemon stopped, the CLI does the same on the spool
itself (``reprint_offline``), holding the spool lock.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import trio

from relay import log
from relay.errors import SpoolError, SpoolFileMissing
from relay.spool import IncomingJob, JobMeta, Spool
from relay.spoolbackend import Body, DataSink

__all__ = ["ReprintRefused", "Reprinter", "check_kept", "copy_job", "reprint_offline"]

_CHUNK = 1 << 20     # pread/write fallback and copy_file_range request size


class ReprintRefused(ValueError):
    """The job cannot be reprinted (not kept, unknown); the text says why."""


def check_kept(job: JobMeta) -> None:
    """Only kept delivered jobs are reprinted: queued and held ones still print anyway."""
    if job.state != "delivered":
        raise ReprintRefused(f"job {job.id} is {job.state}, not a kept delivered job "
                             "(see `lpd-relay spool list --delivered`)")


def copy_job(spool: Spool, job: JobMeta, incoming: IncomingJob) -> None:
    """Copy ``job``'s control and data files into ``incoming`` (blocking: a worker thread)."""
    with spool.open_control(job) as body:
        raw = body.read()
    incoming.set_control(job.control_name, raw, number=job.number, user=job.user,
                         host=job.host, title=job.title, job_name=job.job_name,
                         formats={f.name: f.format for f in job.files if f.format})
    if job.tls_peer:
        incoming.set_tls_peer(job.tls_peer)
    for file in job.files:
        writer = incoming.open_data(file.name)
        with spool.open_body(file) as body:
            _copy(body, writer)
        writer.close()


def _copy(body: Body, writer: DataSink) -> None:
    offset, left, out = body.offset, body.length, writer.fileno()
    while left > 0:
        if out < 0:        # a small job kept in memory for the segment log: write()
            n = _copy_buffered(body.fd, writer, offset, min(left, _CHUNK))
            out = writer.fileno()      # it may have spilled to a file of its own
            if n == 0:
                raise SpoolFileMissing(f"descriptor {body.fd}",
                                       OSError(errno.EIO, "file is short"))
            offset += n
            left -= n
            continue
        try:
            n = os.copy_file_range(body.fd, out, min(left, _CHUNK), offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = _copy_buffered(body.fd, writer, offset, min(left, _CHUNK))
        else:
            writer.add(n)
        if n == 0:
            raise SpoolFileMissing(f"descriptor {body.fd}", OSError(errno.EIO, "file is short"))
        offset += n
        left -= n


def _copy_buffered(fd: int, writer: DataSink, offset: int, size: int) -> int:
    data = os.pread(fd, size, offset)
    writer.write(data)
    return len(data)


class Reprinter:
    """The daemon's reprints: a new id now, copy and commit in the background."""

    def __init__(self, spool: Spool, submit: Callable[[JobMeta], None]) -> None:
        self.spool = spool
        self.submit = submit          # the scheduler's: the new job is queued like any
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await trio.sleep_forever()

    def start(self, job_id: str, *, queue: str, wire_queue: str) -> str:
        """Begin reprinting kept job ``job_id`` on ``queue``; the new job's id.

        ``ReprintRefused`` when the job is not there or not kept; ``SpoolError``
        (``DiskFull``) when the spool cannot take a new job now.
        """
        try:
            job = self.spool.get(job_id)
        except KeyError:
            raise ReprintRefused(f"no job {job_id} in the spool") from None
        check_kept(job)
        if self._nursery is None:
            raise ReprintRefused("the daemon is starting; try again")
        incoming = self.spool.begin(queue=queue, wire_queue=wire_queue, peer=job.peer)
        self._nursery.start_soon(self._finish, job, incoming)
        return incoming.id

    async def _finish(self, job: JobMeta, incoming: IncomingJob) -> None:
        try:
            await trio.to_thread.run_sync(copy_job, self.spool, job, incoming)
            meta = await self.spool.commit(incoming)
        except (OSError, SpoolError) as exc:
            incoming.discard()
            log.event("error", "reprint_failed", job=incoming.id, queue=job.queue,
                      original=job.id, error=str(exc))
            return
        except BaseException:         # cancelled (daemon stopping): nothing half-made stays
            incoming.discard()
            raise
        self.spool.events.record("reprinted", meta, original=job.id, by="cli")
        log.event("info", "job_reprinted", job=meta.id, queue=meta.queue, original=job.id)
        self.submit(meta)


async def reprint_offline(spool: Spool, job: JobMeta, *, queue: str, wire_queue: str) -> JobMeta:
    """With no daemon: the reprint on the spool itself (``spool`` is recovered here,
    so this process holds the spool lock until it returns)."""
    check_kept(job)
    spool.recover()
    try:
        incoming = spool.begin(queue=queue, wire_queue=wire_queue, peer=job.peer)
        try:
            await trio.to_thread.run_sync(copy_job, spool, job, incoming)
        except BaseException:
            incoming.discard()
            raise
        meta = await spool.commit(incoming)
    finally:
        with trio.CancelScope(shield=True):
            await spool.aclose()
    spool.events.record("reprinted", meta, original=job.id, by="cli")
    return meta
