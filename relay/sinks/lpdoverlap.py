"""Overlapped one-job connections to LPRng, completing in order (docs/delivery.md).

A receiver that takes one job per connection costs an ordered queue the
receiver's whole per-connection latency per job: LPRng forks a server per
connection, sets it up, and from right after its answer to ``0x02`` until
that server exits holds a per-host lock (``fifo.lock.<host>``, its ``fifo``
option), which whoever waits on it may get first.  Here up to ``OVERLAP``
jobs of a run are in flight at once, each on its own connection: a job
connects at once; it sends ``0x02`` once LPRng answered the first file
header of the job before it (that job holds the lock: at most one of ours
waits on it), then every byte of its files but the *completing part* — the
last byte of its last file and the trailing NUL.  The completing part and
our EOF (LPRng completes a job there) go only after the job before it got
its final acknowledgement and LPRng closed its connection, so the receiver
completes jobs in exactly the order of the queue, with or without its fifo
lock.  A job that fails or is refused ends the run there: the
jobs behind it are closed without their completing part, which LPRng
discards as a transfer cut short (``Link_file_read`` short of its count),
and they are retried, in order, with it.

Only small jobs (their data loaded, ``PIPELINE_BYTES``) overlap; a larger one
waits until the jobs before it are done and goes alone, step by step.  Each
extra connection takes an origin port only when the pool has one to spare
(``OriginPortPool.has_spare``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from relay import _core, client
from relay.errors import SinkError, SinkUnavailable

if TYPE_CHECKING:
    from relay.sinks.base import DeliveryJob
    from relay.sinks.lpd import LpdSink, Prepared

# One-job connections in flight at once (a run's first unfinished job and
# three behind it).  LPRng serialises the jobs from one host behind its fifo
# lock anyway; the overlap hides its fork, setup and our round trips.
OVERLAP = 4
# Jobs per delivery attempt when overlapping: the pipeline drains at the end
# of every attempt, so a longer run fills it for longer.
OVERLAP_RUN = 32
# Jobs up to this many bytes of data are sent from memory: pipelined to an
# lpd-relay, overlapped to LPRng, and made the next connection ahead for.
PIPELINE_BYTES = 64 * 1024

_Step = tuple[str, str]      # (client.*_STEP, file name) of each reply, in order


def job_parts(prepared: Prepared, order: str) -> tuple[bytes, bytes, list[_Step]]:
    """A ``_prepare``d job as (everything but the completing part, the completing
    part, the replies it gets): the files in ``order``, exact counts, data in memory."""
    cf_name, control, files = prepared
    ctrl = [_core.control_header(cf_name, len(control)), control, b"\x00"]
    ctrl_steps = [(client.CONTROL_HEADER_STEP, cf_name), (client.CONTROL_FILE_STEP, cf_name)]
    data: list[bytes] = []
    data_steps: list[_Step] = []
    for f in files:
        data += [_core.data_header(f.name, f.size, "count"), f.data or b"", b"\x00"]
        data_steps += [(client.DATA_HEADER_STEP, f.name), (client.DATA_FILE_STEP, f.name)]
    if order == "control-first":
        blob, steps = b"".join(ctrl + data), ctrl_steps + data_steps
    else:
        blob, steps = b"".join(data + ctrl), data_steps + ctrl_steps
    # The last file is never empty (empty data files are left out, a control
    # file has at least one line): its last byte and NUL complete the job.
    return blob[:-2], blob[-2:], steps


class _Run:
    """Who of a run's jobs ended, and how: the one record the job tasks share."""

    def __init__(self, n: int) -> None:
        self.reading = [trio.Event() for _ in range(n)]   # first file header answered
        self.ended = [trio.Event() for _ in range(n)]
        self.closed = [trio.Event() for _ in range(n)]    # the receiver closed it too
        self.ok = [False] * n
        self.started = 0
        self.error: SinkError | None = None
        self.failed_at = n
        self._changed = trio.Event()

    def finish(self, i: int, error: SinkError | None = None) -> None:
        if error is None:
            self.ok[i] = True
        elif i < self.failed_at:
            self.failed_at, self.error = i, error
        self.reading[i].set()
        self.ended[i].set()
        self._changed.set()
        self._changed = trio.Event()

    @property
    def unended(self) -> int:
        return sum(1 for e in self.ended[:self.started] if not e.is_set())

    @property
    def done(self) -> int:
        """Jobs acknowledged from the first on, without a gap."""
        return next((i for i, ok in enumerate(self.ok) if not ok), len(self.ok))

    async def wait_turn(self, i: int) -> bool:
        """Until job ``i - 1`` ended; whether it was acknowledged (so ``i`` may complete)."""
        if i == 0:
            return True
        await self.ended[i - 1].wait()
        return self.ok[i - 1]

    async def wait_closed(self, i: int) -> None:
        """Until job ``i - 1``'s connection is closed, the receiver's side too: a
        receiver that takes a job at the sender's close has taken it then."""
        if i > 0:
            await self.closed[i - 1].wait()

    async def wait_reading(self, i: int) -> None:
        """Until the receiver reads job ``i - 1``'s files (answered its first file
        header) or it ended: LPRng holds its fifo lock for that job from then on."""
        if i > 0:
            await self.reading[i - 1].wait()

    async def wait_change(self) -> None:
        await self._changed.wait()


class Overlapped:
    """One run of jobs for ``LpdSink.deliver_many``, overlapped as the module says."""

    def __init__(self, sink: LpdSink, jobs: Sequence[DeliveryJob]) -> None:
        self.sink = sink
        self.jobs = jobs
        self.run = _Run(len(jobs))

    async def deliver(self) -> tuple[int, SinkError | None]:
        """(jobs acknowledged in order, the first failure or None)."""
        run = self.run
        async with trio.open_nursery() as nursery:
            for i, job in enumerate(self.jobs):
                alone = not small_job(job)
                await self._wait_slot(alone)
                if run.error is not None:
                    break
                try:
                    prepared = self.sink._prepare(job)
                except SinkError as exc:
                    run.started = i + 1
                    run.finish(i, exc)
                    break
                run.started = i + 1
                if alone:
                    await self._alone(i, prepared)
                else:
                    nursery.start_soon(self._overlapped, i, prepared)
        return run.done, run.error

    async def _wait_slot(self, alone: bool) -> None:
        """Until the next job may start: nothing in flight, or (a small job) room
        in the overlap and an origin port to spare; at once after a failure."""
        run, pool = self.run, self.sink.pool
        while run.error is None and run.unended:
            if not alone and run.unended < OVERLAP and (pool is None or pool.has_spare()):
                return
            await run.wait_change()

    async def _alone(self, i: int, prepared: Prepared) -> None:
        """A large job, after every job before it: a session of its own, step by step."""
        try:
            self.run.finish(i, await self._fresh(prepared))
        finally:
            self.run.closed[i].set()

    async def _fresh(self, prepared: Prepared) -> SinkError | None:
        """``prepared`` on a new connection, step by step (as a job not overlapped),
        closed once the receiver closed its side."""
        try:
            ch = await self.sink._connect()
        except SinkError as exc:
            return exc
        error = await self.sink._session(ch, prepared)
        if error is None:
            await ch.close_after_peer()
        return error

    async def _overlapped(self, i: int, prepared: Prepared) -> None:
        """Job ``i`` in a task of its own.  Its connection is closed after its
        result is known, so the job behind it may send all but its completing
        part meanwhile; that part waits for this close (``wait_closed``)."""
        ch: client.Channel | None = None
        try:
            try:
                ch = await self.sink._connect() if prepared[2] else None
            except SinkError as exc:
                error = await self._at_turn(i, exc)
            else:   # no connection: only empty data files, nothing to send (as LpdSink)
                error = await (self._send(i, prepared, ch) if ch is not None
                               else self._at_turn(i, None))
        except BaseException:
            self.run.finish(i, _Abandoned("cancelled"))
            if ch is not None:
                await ch.aclose()
            raise
        self.run.finish(i, error)
        try:
            if ch is not None:
                await ch.close_after_peer()
        finally:
            self.run.closed[i].set()

    async def _at_turn(self, i: int, error: SinkError | None) -> SinkError | None:
        """``error`` (None: done) once job ``i - 1`` ended well, else abandoned."""
        return error if await self.run.wait_turn(i) else _Abandoned("a job before it failed")

    async def _send(self, i: int, prepared: Prepared, ch: client.Channel) -> SinkError | None:
        """Job ``i`` on ``ch``: its ``0x02`` and all but its completing part once the
        receiver reads job ``i - 1``; the completing part at its turn."""
        sink = self.sink
        head, tail, steps = job_parts(prepared, sink.destination.order)
        # LPRng takes its per-host fifo lock right after answering 0x02, and
        # whoever waits on it may get it first: one session at most waits.
        await self.run.wait_reading(i)
        try:
            with ch.stall_guard():
                await client.open_session(ch, sink.destination.path)
                await ch.send_all(head)
        except (SinkError, OSError, trio.TooSlowError) as exc:
            return await self._early_failure(i, ch, prepared, sink._classify(exc))
        return await self._complete(i, ch, tail, steps)

    async def _complete(self, i: int, ch: client.Channel, tail: bytes,
                        steps: list[_Step]) -> SinkError | None:
        """At job ``i``'s turn its completing part and our EOF (LPRng completes a
        job there), then the replies: the first says the receiver reads job ``i``.

        The completing part goes before that first reply, not after it: LPRng
        reads job ``i`` under its lock, and a round trip of ours there would
        hold up every job behind it.
        """
        run = self.run
        if not await run.wait_turn(i):
            return _Abandoned("a job before it failed")   # closed incomplete: discarded
        await run.wait_closed(i)   # LPRng's fifo lock orders its jobs; not every LPRng has it
        try:
            with ch.stall_guard():
                await ch.send_all(tail)
                ch.half_close()
                await ch.expect_ok(*steps[0])
                run.reading[i].set()
                for step, what in steps[1:]:
                    await ch.expect_ok(step, what)
        except (SinkError, OSError, trio.TooSlowError) as exc:
            return self.sink._classify(exc)
        return None

    async def _early_failure(self, i: int, ch: client.Channel, prepared: Prepared,
                             error: SinkError) -> SinkError | None:
        """A job that failed before its turn: reported at its turn, and a
        connection the receiver dropped before answering ``0x02`` tried once
        more then, on a fresh one, step by step (as a job not overlapped)."""
        await ch.aclose()
        if not await self.run.wait_turn(i):
            return _Abandoned("a job before it failed")
        if not stale_connection(error) or i == 0:
            return error
        return await self._fresh(prepared)


class _Abandoned(SinkError):
    """A job not completed because one before it was not (never reported: the
    run's error is the first failure's)."""


def small_job(job: DeliveryJob) -> bool:
    """Whether ``job`` is sent from memory (its data loaded) rather than from its spool file."""
    return sum(f.bytes for f in job.files) <= PIPELINE_BYTES


def stale_connection(error: SinkError | None) -> bool:
    """A connection closed or reset before the receiver answered our ``0x02``."""
    return (isinstance(error, SinkUnavailable) and error.reply is None
            and (error.step == client.RECEIVE_JOB_STEP
                 or (not error.step and error.reason == "reset")))
