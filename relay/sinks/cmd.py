"""``cmd:PROGRAM ARG...`` — hand each job to a local spooler command (SPEC §3.3).

The program runs without a shell (``Destination.argv`` is already split), once
per job, with the job's data files concatenated in order on stdin and the job's
facts in the environment.  One run per job, not per file, because a spooler
such as ``lp`` then sees one job: one banner, pages collated, never interleaved
with another job, and a failure never leaves half a job printed that a retry
would print again.

stdin is fed without loading files into memory.  Bodies are read through
the spool (``relay.sinks.base.open_body``): a single data file that is a whole
file of its own is passed as stdin itself (the program reads the spool file
directly); several, or a small job's body inside a segment file (at an
offset, among other records), fill a pipe with ``os.sendfile`` of exactly
each body's range in turn (``relay.sinks.base.stream_body``, non-blocking, on
the event loop).

Outcome: exit 0 = delivered; 75 (EX_TEMPFAIL, sysexits.h) = retry; any other
exit = the job is held, with the last ~2 KiB of stderr in the error; a program
that cannot be started (not installed, not executable) = retry, since the
admin may install it — and ``program_problem`` says so at config time and at
start, so the destination is DOWN before the first job; killed by a signal,
or still running after ``run_timeout`` (default 10 minutes; ``cmd:`` URIs have
no options, so it is a constructor parameter) = retry — the run is then
killed with its whole process group.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Sequence

import trio

from relay.errors import SinkRejected, SinkUnavailable
from relay.sinks.base import (
    Body,
    DeliveryJob,
    Sink,
    SinkContext,
    open_body,
    register,
    stream_body,
)
from relay.uri import Destination

__all__ = ["DEFAULT_RUN_TIMEOUT", "EX_TEMPFAIL", "CmdSink", "job_environment", "program_problem"]

DEFAULT_RUN_TIMEOUT = 600.0
EX_TEMPFAIL = 75
_TAIL_BYTES = 2048
# After the program exits, how long its stderr/stdin pipes may stay open (a
# child it left running in the background may hold them) before we stop caring.
_EXIT_GRACE = 1.0


def job_environment(job: DeliveryJob, base: dict[str, str] | None = None) -> dict[str, str]:
    """The daemon's environment (or ``base``) plus the job's facts as ``LPD_*``."""
    env = dict(os.environ if base is None else base)
    facts = {
        "LPD_JOB_ID": job.id,
        "LPD_QUEUE": job.queue,
        "LPD_WIRE_QUEUE": job.wire_queue,
        "LPD_USER": job.user,
        "LPD_HOST": job.host,
        "LPD_TITLE": job.title,
        "LPD_JOB_NAME": job.job_name,
        "LPD_PEER": job.peer,
        "LPD_FORMAT": job.files[0].format if job.files else "",
        "LPD_FILES": str(len(job.files)),
        "LPD_BYTES": str(sum(f.bytes for f in job.files)),
    }
    # Values come from the wire: a NUL cannot be passed in an environment.
    env.update({key: value.replace("\0", "") for key, value in facts.items()})
    return env


class CmdSink(Sink):
    """Run a command per job: data on stdin, facts in ``LPD_*``, verdict in the exit code."""

    def __init__(self, destination: Destination, context: SinkContext, *,
                 run_timeout: float = DEFAULT_RUN_TIMEOUT) -> None:
        super().__init__(destination, context)
        self.run_timeout = run_timeout

    def describe(self) -> str:
        return f"command {shlex.join(self.destination.argv)} (job on stdin)"

    async def deliver(self, job: DeliveryJob) -> None:
        sources = _open_sources(self.context, job)
        try:
            code, tail = await self._run(sources, job_environment(job))
        finally:
            for body in sources:
                body.close()
        program = self.destination.argv[0]
        if code == 0:
            return
        if code is None:
            raise SinkUnavailable(f"cmd: {program} ran longer than {self.run_timeout:g}s "
                                  f"and was killed{_show(tail)}", reason="timeout")
        if code == EX_TEMPFAIL:
            raise SinkUnavailable(f"cmd: {program} exited 75 (temporary failure){_show(tail)}")
        if code < 0:
            raise SinkUnavailable(f"cmd: {program} was killed by "
                                  f"{signal.Signals(-code).name}{_show(tail)}")
        raise SinkRejected(f"cmd: {program} exited {code}{_show(tail)}")

    async def _run(self, sources: Sequence[Body],
                   env: dict[str, str]) -> tuple[int | None, str]:
        """Run once; returns (exit code, or None if killed for time; stderr tail)."""
        stdin, feed = _stdin_for(sources)
        spawned = False
        try:
            proc = await _spawn(self.destination.argv, stdin, env)
            spawned = True
        finally:
            if feed is not None:
                os.close(stdin)  # our copy of the pipe's read end: the child has its own
                if not spawned:
                    os.close(feed)
        try:
            return await self._supervise(proc, feed, sources)
        finally:
            if proc.returncode is None:  # cancelled from outside: leave nothing running
                _kill_group(proc)
                with trio.CancelScope(shield=True):
                    await proc.wait()
            if proc.stderr is not None:
                with trio.CancelScope(shield=True):
                    await proc.stderr.aclose()

    async def _supervise(self, proc: trio.Process, feed: int | None,
                         sources: Sequence[Body]) -> tuple[int | None, str]:
        """Feed stdin, keep the stderr tail, and wait for the exit, all within the run timeout."""
        tail = bytearray()
        feed_errors: list[str] = []
        assert proc.stderr is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect_tail, proc.stderr, tail)
            if feed is not None:
                nursery.start_soon(_feed, feed, sources, proc, feed_errors)
            with trio.move_on_after(self.run_timeout):
                await proc.wait()
            timed_out = proc.returncode is None
            if timed_out:
                _kill_group(proc)
                await proc.wait()
                nursery.cancel_scope.cancel()
            else:
                nursery.cancel_scope.deadline = trio.current_time() + _EXIT_GRACE
        if feed_errors:
            # Whatever the exit code, the program saw a truncated job.
            raise SinkUnavailable(f"cmd: feeding the job to {self.destination.argv[0]} "
                                  f"failed: {feed_errors[0]}")
        return (None if timed_out else proc.returncode), _decode(tail)


def program_problem(destination: Destination) -> str | None:
    """Why the program of a ``cmd:`` destination cannot be started now, or None.

    Looked up as ``open_process`` will (PATH of this process), so a program
    that is not installed is reported by ``check-config`` and at start.
    """
    program = destination.argv[0]
    if "/" not in program:
        return None if shutil.which(program) else f'program "{program}" not found on PATH'
    if not os.path.isfile(program):
        return f'program "{program}" not found'
    if not os.access(program, os.X_OK):
        return f'program "{program}" is not executable'
    return None


def _open_sources(context: SinkContext, job: DeliveryJob) -> list[Body]:
    bodies: list[Body] = []
    try:
        for spool_file in job.files:
            bodies.append(open_body(context, spool_file))
    except BaseException:
        for body in bodies:
            body.close()
        raise
    return bodies


def _whole_file(body: Body) -> bool:
    # The child may read the descriptor itself only when the body is all of it:
    # a small job's body lies inside a segment file, among other jobs' records.
    return body.offset == 0 and os.fstat(body.fd).st_size == body.length


def _stdin_for(sources: Sequence[Body]) -> tuple[int, int | None]:
    """(fd the child gets as stdin, our write end of a pipe to feed or None)."""
    if not sources:
        return subprocess.DEVNULL, None
    if len(sources) == 1 and _whole_file(sources[0]):
        return sources[0].fd, None
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # only our end: the child reads a blocking pipe
    return read_end, write_end


async def _spawn(argv: Sequence[str], stdin: int,
                 env: dict[str, str]) -> trio.Process:
    try:
        # A new session makes the program a group leader, so a timeout can
        # kill it together with everything it started (sh -> lp -> ...).
        return await trio.lowlevel.open_process(
            list(argv), stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, start_new_session=True)
    # Not installed or not executable: the admin may fix that, so retry (the
    # destination shows DOWN with this message) rather than hold every job.
    except FileNotFoundError:
        where = "" if "/" in argv[0] else " on PATH"
        raise SinkUnavailable(f"cmd: program {argv[0]!r} not found{where}") from None
    except PermissionError:
        raise SinkUnavailable(f"cmd: {argv[0]!r} is not executable (permission denied)") from None
    except OSError as exc:
        raise SinkRejected(f"cmd: cannot run {argv[0]!r}: {exc.strerror or exc}") from exc


async def _feed(write_end: int, sources: Sequence[Body], proc: trio.Process,
                errors: list[str]) -> None:
    try:
        for body in sources:
            # No idle bound of its own: the run timeout bounds the whole run;
            # exactly the body's range, wherever in its file it lies.
            await stream_body(write_end, body, idle_timeout=math.inf)
    except BrokenPipeError:
        pass  # the program stopped reading; its exit code says whether that was fine
    except OSError as exc:
        # Reading the spool failed: stop the program before it prints half a job.
        errors.append(str(exc))
        _kill_group(proc)
    finally:
        os.close(write_end)


async def _collect_tail(stream: trio.abc.ReceiveStream, tail: bytearray) -> None:
    # Keep only the end: a chatty program must not grow our memory.
    while chunk := await stream.receive_some(65536):
        tail += chunk
        if len(tail) > 2 * _TAIL_BYTES:
            del tail[:-_TAIL_BYTES]


def _kill_group(proc: trio.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _decode(tail: bytearray) -> str:
    return bytes(tail[-_TAIL_BYTES:]).decode("utf-8", errors="replace").strip()


def _show(tail: str) -> str:
    return f": {tail}" if tail else ""


register("cmd", CmdSink, check=program_problem)
