"""``lpd://host[:port]/queue`` — forward a job with the LPD protocol (SPEC §3.3, §5).

The control file is rewritten for the destination: a new job number from this
sink's own counter (3 or 6 digits, ``jobnumbers``), ``cfA``/``dfA`` names with
this relay's host name, ``H`` kept, ``U`` rewritten, ``S`` dropped; the
original names stay in the spool metadata.  The counter starts at a random
point and wraps, so a receiver like LPRng — which numbers its spool files with
3 digits and refuses a collision (FIELD-NOTES) — sees distinct numbers for up
to 1,000 (or 1,000,000) outstanding jobs from us.

The URI's CUPS options shape the forwarded control file (``banner``,
``format``, ``sanitize_title``: ``relay.controlfile.rewrite``); ``contimeout``
bounds the connect and ``timeout`` each read and write.

Source ports come from the daemon's origin-port pool for the destination's
range (``[origin_ports]`` or its ``reserve=``).  After the final
acknowledgement the connection is closed through the pool, which lingers for
the receiver's close and cools the port for this destination if the
TIME_WAIT is ours (docs/origin-ports.md).  A receiver that takes one job per
connection gets a run of jobs per attempt, one session each, in order: the
next connection is made while a small job is sent, and its session starts
once the receiver closed the one before (a job taken at the close cannot be
overtaken); to LPRng (recognised by its lpq answer) the
run's connections overlap, completing in order (``lpdoverlap``,
docs/delivery.md).
"""

from __future__ import annotations

import itertools
import random
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import parse_qs, urlsplit

import trio

from relay import client, log, status
from relay.client import short_hostname
from relay.errors import SinkError, SinkUnavailable, reason_for_errno
from relay.originports import OriginPortPool, PoolSet
from relay.sinks.base import DeliveryJob, Sink, SinkContext, register
from relay.sinks.lpdoverlap import OVERLAP_RUN, Overlapped
from relay.sinks.lpdoverlap import small_job as _small
from relay.sinks.lpdoverlap import stale_connection as _stale
from relay.sinks.lpdprepare import Prepared, RunBodies, inline, prepare
from relay.uri import Destination

# Relay -> relay: jobs per 0x02 session once the receiver answered lpq as an
# lpd-relay; jobs up to PIPELINE_BYTES go out pipelined (no round trip per step).
AUTO_BATCH = 64
# A receiver that takes one job per connection (LPRng, cups-lpd, any not known
# to take more): one delivery carries up to SESSION_RUN jobs, each in a session
# of its own, in order; the next session waits for the receiver's close of the
# one before (cups-lpd takes a job at that close, a process per connection).
# The next job's TCP connection is made while a small job is sent
# (``_Ahead``), but its session is not opened ahead: LPRng
# does not answer a second session's control file while the first one's
# server process lives (measured: 30 s stalls with 16 queue workers) - its
# per-host fifo lock, which ``lpdoverlap`` works with for LPRng.
SESSION_RUN = 8
# LPRng's answer to a short lpq ("q@host 0 jobs (autohold)") or its long
# layout's "Printer: q@host": a receiver whose jobs may overlap (lpdoverlap).
_LPRNG_ANSWER = re.compile(r"^(Printer: )?[^\s@]+@\S+(\s+\d+ jobs?\b|\s|$)")

__all__ = ["AUTO_BATCH", "SESSION_RUN", "LpdSink", "Prepared", "is_lprng_answer"]


class LpdSink(Sink):
    """Sends jobs to one LPD queue: a batch per 0x02 session, or one job per session."""

    def __init__(self, destination: Destination, context: SinkContext) -> None:
        super().__init__(destination, context)
        self.ssl_context: ssl.SSLContext | None = None   # lpds://: set by LpdsSink
        pools = context.origin_ports
        if isinstance(pools, PoolSet):
            self.pool: OriginPortPool | None = pools.for_reserve(destination.reserve)
        elif destination.reserve is not None:
            # Outside the daemon (tests, tools): a pool of this sink's own.
            self.pool = OriginPortPool.for_reserve(destination.reserve)
        else:
            self.pool = None
        modulus = 10 ** destination.jobnumbers
        start = random.randrange(modulus)
        self._numbers = (n % modulus for n in itertools.count(start))
        self.hostname = short_hostname()
        # Several jobs per session need exact counts: a streamed file ends the
        # connection (SPEC §3.3 batch=N; never point it at cups-lpd, which merges).
        self.batch = destination.batch if destination.mode == "count" else 1
        # Without batch=, ask the receiver's lpq once whether it is an lpd-relay.
        explicit = "batch" in parse_qs(urlsplit(destination.uri).query)
        self._auto = destination.mode == "count" and not explicit
        self.relay_peer: bool | None = None      # None: not known yet
        # One-job connections overlapped, completing in order (lpdoverlap):
        # only to a receiver that answered lpq as LPRng (docs/delivery.md).
        self.overlap = False
        self._detecting = trio.Lock()

    def describe(self) -> str:
        d = self.destination
        return (f"LPD {d.host}:{d.port} queue {d.path} (mode={d.mode}, order={d.order}, "
                f"jobnumbers={d.jobnumbers})")

    async def _connect(self) -> client.Channel:
        d = self.destination
        return await client.connect(d, self.pool, io_timeout=d.timeout,
                                    connect_timeout=d.connect_timeout, ctx=self.ssl_context)

    def _prepare(self, job: DeliveryJob, bodies: RunBodies | None = None) -> Prepared:
        """(control-file name, rewritten control file, data files to send): ``lpdprepare``.

        ``bodies``: the run's reader, its spool files opened once (else one of its own).
        """
        if bodies is None:
            with RunBodies(self.context) as own:
                return self._prepare(job, own)
        return prepare(job, self.destination, self.context, next(self._numbers),
                       self.hostname, bodies)

    async def _detect(self) -> None:
        """Once per destination: does its lpq answer carry ``status.SERVER_LINE``?

        A destination that cannot be reached is asked again at the next
        attempt (which would fail anyway); any answer, even a refusal or an
        empty one, settles it.
        """
        async with self._detecting:
            if self.relay_peer is not None:
                return
            d = self.destination
            try:
                ch = await self._connect()
                try:
                    text = await client.query(ch, d.path, long=False, items=("lpd-relay",))
                finally:
                    await ch.aclose()
            except (SinkError, OSError, trio.TooSlowError) as exc:
                log.event("debug", "peer_detect_failed", destination=d.uri, error=str(exc))
                return
            self.relay_peer = status.is_relay_answer(text)
            if self.relay_peer:
                self.batch = AUTO_BATCH
            else:
                self.overlap = is_lprng_answer(text)
            log.event("info", "peer_detected", destination=d.uri, relay=self.relay_peer,
                      batch=self.batch, overlap=self.overlap)

    def _inline(self, job: DeliveryJob, bodies: RunBodies) -> tuple[str, bytes, int] | None:
        """``job`` as pipelined bytes when it is small, else None (sent step by step)."""
        if not _small(job):
            return None
        return inline(job, self.destination, self.context, next(self._numbers),
                      self.hostname, bodies)

    async def deliver(self, job: DeliveryJob) -> None:
        _, error = await self.deliver_many([job])
        if error is not None:
            raise error

    @property
    def per_attempt(self) -> int:
        """Jobs one ``deliver_many`` takes: a batch, or a run of one-job sessions."""
        if self.batch > 1:
            return self.batch
        return OVERLAP_RUN if self.overlap else SESSION_RUN

    async def deliver_many(self, jobs: Sequence[DeliveryJob]) -> tuple[int, Exception | None]:
        """Send ``jobs`` in order: in one 0x02 session (``batch=N``, or an lpd-relay),
        else each in its own session, overlapped (``SESSION_RUN``).

        Each job is complete at its own final acknowledgement, so a failure
        part-way keeps the jobs before it delivered.
        """
        if self._auto and self.relay_peer is None:
            await self._detect()
        if self.batch == 1 and len(jobs) > 1:
            if self.overlap:
                return await Overlapped(self, jobs).deliver()
            return await self._deliver_sessions(jobs)
        d = self.destination
        try:
            ch = await self._connect()
        except SinkError as exc:
            return 0, exc
        progress = client.Pipelined(jobs=[])
        try:
            with ch.stall_guard():
                await client.open_session(ch, d.path)
                if self.relay_peer:
                    await self._send_pipelined(ch, jobs, progress)
                else:
                    for job in jobs:
                        await self._send_one(ch, job)
                        progress.done += 1
        except (SinkError, OSError, trio.TooSlowError) as exc:
            return progress.done, self._classify(exc)
        finally:
            await ch.aclose()
        return progress.done, None

    def _classify(self, exc: SinkError | OSError | trio.TooSlowError) -> SinkError:
        d = self.destination
        if isinstance(exc, SinkError):
            return exc
        if isinstance(exc, trio.TooSlowError):
            return SinkUnavailable(f"{d.host}:{d.port} timed out after {d.timeout:g}s",
                                   reason="timeout")
        return SinkUnavailable(f"{d.host}:{d.port}: {exc}", reason=reason_for_errno(exc.errno))

    async def _deliver_sessions(self, jobs: Sequence[DeliveryJob]
                                ) -> tuple[int, Exception | None]:
        """One session per job, in order, each closed in the background once its
        job's final acknowledgement came (the close waits for the receiver's).

        While a small job is sent, the next job's connection is made
        (``_Ahead``); its session starts only after this job's final ack and
        the receiver's close of this job's connection: cups-lpd and the like
        take a job at the sender's close, in a process per connection, so a
        next job finished before that close is seen could overtake it.
        """
        done = 0
        ahead: _Ahead | None = None
        previous: trio.Event | None = None   # set once the last job's connection closed
        async with trio.open_nursery() as closing:
            try:
                for i, job in enumerate(jobs):
                    early = await ahead.take() if ahead is not None else None
                    ahead = None
                    try:
                        ch = early if early is not None else await self._connect()
                    except SinkError as exc:
                        return done, exc
                    try:    # the spool is read before the session opens
                        prepared = self._prepare(job)
                    except SinkError as exc:
                        await ch.aclose()
                        return done, exc
                    if i + 1 < len(jobs) and _small(job) and (
                            self.pool is None or self.pool.has_spare()):
                        ahead = _Ahead()
                        closing.start_soon(ahead.connect, self._connect)
                    if previous is not None:
                        await previous.wait()
                    error = await self._session(ch, prepared)
                    if early is not None and _stale(error):
                        # The receiver dropped the connection made ahead before
                        # answering: once more on a fresh one, as without it.
                        try:
                            ch = await self._connect()
                        except SinkError as exc:
                            return done, exc
                        error = await self._session(ch, prepared)
                    if error is not None:
                        return done, error
                    previous = trio.Event()
                    closing.start_soon(_close_then_set, ch, previous)
                    done += 1
            finally:
                if ahead is not None:    # the run ended before the next job
                    await ahead.drop()
        return done, None

    async def _session(self, ch: client.Channel,
                       prepared: Prepared) -> SinkError | None:
        """A ``_prepare``d job in a session of its own on ``ch``; on failure ``ch`` is closed."""
        try:
            with ch.stall_guard():
                await client.open_session(ch, self.destination.path)
                await self._send_prepared(ch, prepared)
        except (SinkError, OSError, trio.TooSlowError) as exc:
            await ch.aclose()
            return self._classify(exc)
        except BaseException:
            await ch.aclose()
            raise
        return None

    async def _send_one(self, ch: client.Channel, job: DeliveryJob,
                        bodies: RunBodies | None = None) -> None:
        await self._send_prepared(ch, self._prepare(job, bodies))

    async def _send_prepared(self, ch: client.Channel,
                             prepared: Prepared) -> None:
        d = self.destination
        cf_name, control, files = prepared
        if files:   # only empty data files: nothing to print, nothing to send
            await client.send_job_files(ch, cf_name=cf_name, control=control,
                                        files=files, mode=d.mode, order=d.order)

    async def _send_pipelined(self, ch: client.Channel, jobs: Sequence[DeliveryJob],
                              progress: client.Pipelined) -> None:
        """Small jobs in runs of one write each; a large one step by step between runs.

        The run's bodies are read with each spool file opened once (``RunBodies``).
        """
        run = client.Pipelined(jobs=[])
        with RunBodies(self.context) as bodies:
            for job in jobs:
                try:
                    job_inline = self._inline(job, bodies)
                except SinkError:   # this job's fault: the run before it is sent and counted
                    await _flush(ch, run, progress)
                    raise
                if job_inline is not None and job_inline[2]:
                    run.jobs.append(job_inline)
                    continue
                if job_inline is None or run.jobs:
                    # A large job (step by step), or one with nothing to send
                    # (only empty files) behind jobs still to be acknowledged.
                    await _flush(ch, run, progress)
                if job_inline is None:
                    await self._send_one(ch, job, bodies)
                progress.done += 1
        await _flush(ch, run, progress)


async def _flush(ch: client.Channel, run: client.Pipelined, progress: client.Pipelined) -> None:
    """Send ``run``'s jobs pipelined; the acknowledged ones count in ``progress``."""
    if not run.jobs:
        return
    try:
        await client.send_pipelined(ch, run)
    finally:
        progress.done += run.done
        run.jobs.clear()
        run.done = 0


class _Ahead:
    """The connection for the next job of a run, made while the current job is sent.

    Only the TCP connect (LPRng forks and sets up its server process then, a
    few ms); the ``0x02`` waits for the current job's final ack.  A receiver
    that refuses a second connection meanwhile (a printer serving one at a
    time) costs nothing: ``take`` gives None and the next job connects as
    it would have.  Made only after a small job (``PIPELINE_BYTES``), so the
    connection is never idle for longer than a few round trips.
    """

    def __init__(self) -> None:
        self._ready = trio.Event()
        self._channel: client.Channel | None = None
        self._wanted = True

    async def connect(self, connect: Callable[[], Awaitable[client.Channel]]) -> None:
        try:
            self._channel = await connect()
        except SinkError as exc:
            log.event("debug", "connect_ahead_failed", error=str(exc))
        finally:
            self._ready.set()
        if not self._wanted:
            await self.drop()

    async def take(self) -> client.Channel | None:
        """The connection once made; None when it could not be."""
        await self._ready.wait()
        channel, self._channel = self._channel, None
        return channel

    async def drop(self) -> None:
        """Not needed after all: closed now, or as soon as it is made."""
        self._wanted = False
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.aclose()


async def _close_then_set(ch: client.Channel, closed: trio.Event) -> None:
    try:
        await ch.close_after_peer()
    finally:
        closed.set()


def is_lprng_answer(text: str) -> bool:
    """True when an lpq answer has LPRng's layout (its first line)."""
    first = text.lstrip("\n").partition("\n")[0]
    return bool(_LPRNG_ANSWER.match(first))


register("lpd", LpdSink)
