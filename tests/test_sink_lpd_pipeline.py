"""A pipelined session (relay -> relay) against a scripted receiver that refuses at
every step: the sender stops there, each job counts only at its own last ack, and
the retry of the rest delivers every job once, in order.

The sender writes the run's subcommands at once and counts the acks as they
come (``ReplyParser.take_ok``); a refusal, a close or a stray line end between
replies must read as the same step-by-step exchange would."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import trio

from relay import client
from relay.errors import SinkError, SinkRejected, SinkUnavailable, SpoolFileMissing
from relay.sinks import SinkContext, make_sink
from relay.sinks.lpd import AUTO_BATCH, LpdSink
from relay.spool import JobMeta
from relay.uri import parse_destination
from tests.test_sink_lpd import make_job, make_job_in

JOBS = 3
STEPS = [client.CONTROL_HEADER_STEP, client.CONTROL_FILE_STEP, client.DATA_HEADER_STEP,
         client.DATA_FILE_STEP]


def _jobs(tmp_path: Path) -> list[JobMeta]:
    spool, first = make_job(tmp_path, [b"job 1\n"])
    return [first] + [make_job_in(spool, n) for n in range(2, JOBS + 1)]


class ScriptedReceiver:
    """Takes one session; acks every subcommand until reply number ``refuse_at``
    (counted from 0 after the ``0x02``), where it sends ``refusal`` (b"": closes).

    ``taken`` lists the users (``P`` lines) of the jobs whose every file it acked.
    """

    def __init__(self, refuse_at: int | None = None, refusal: bytes = b"",
                 trailing: bytes = b"") -> None:
        self.refuse_at = refuse_at
        self.refusal = refusal
        self.trailing = trailing
        self.taken: list[str] = []
        self._replies = 0
        self._user = ""
        self._files_left = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        buf = bytearray()

        async def line() -> bytes:
            while b"\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    raise EOFError
                buf.extend(data)
            end = buf.index(b"\n") + 1
            text = bytes(buf[:end])
            del buf[:end]
            return text

        async def exactly(n: int) -> bytes:
            while len(buf) < n:
                data = await stream.receive_some(65536)
                if not data:
                    raise EOFError
                buf.extend(data)
            text = bytes(buf[:n])
            del buf[:n]
            return text

        try:
            await line()                      # \x02q\n
            await stream.send_all(b"\x00")
            while True:
                head = await line()
                if not await self._answer(stream):
                    return
                size = int(head[1:].split(b" ", 1)[0])
                body = await exactly(size + 1)
                if head[:1] == b"\x02":
                    self._user = next(ln[1:] for ln in body.decode().split("\n")
                                      if ln.startswith("P"))
                    self._files_left = body.count(b"\nl")
                else:
                    self._files_left -= 1
                if not await self._answer(stream):
                    return
                if head[:1] == b"\x03" and self._files_left == 0:
                    self.taken.append(self._user)
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()

    async def _answer(self, stream: trio.SocketStream) -> bool:
        index, self._replies = self._replies, self._replies + 1
        if index == self.refuse_at:
            if self.refusal:
                await stream.send_all(self.refusal)
            return False
        await stream.send_all(b"\x00" + self.trailing)
        return True


def _pipelining_sink(port: int) -> LpdSink:
    sink = make_sink(parse_destination(f"lpd://127.0.0.1:{port}/q"), SinkContext())
    assert isinstance(sink, LpdSink)
    sink.relay_peer, sink.batch = True, AUTO_BATCH     # as if its lpq said lpd-relay
    return sink


def _attempt(receiver: ScriptedReceiver, jobs: list[JobMeta]
             ) -> tuple[int, Exception | None]:
    async def main() -> tuple[int, Exception | None]:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(
                    functools.partial(trio.serve_tcp, receiver.handle, 0, host="127.0.0.1"))
                port = listeners[0].socket.getsockname()[1]
                result = await _pipelining_sink(port).deliver_many(jobs)
                nursery.cancel_scope.cancel()
        return result
    return trio.run(main)


REFUSALS = {"busy": (b"\x02\n", SinkUnavailable, 2), "bad job": (b"\x03 no\n", SinkRejected, 3),
            "closed": (b"", SinkUnavailable, None)}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
@pytest.mark.parametrize("refuse_at", range(4 * JOBS))
def test_a_refusal_at_any_step_stops_the_run_and_the_retry_completes_it(
        tmp_path: Path, refuse_at: int, kind: str) -> None:
    refusal, error_type, code = REFUSALS[kind]
    jobs = _jobs(tmp_path)
    first = ScriptedReceiver(refuse_at=refuse_at, refusal=refusal)
    done, error = _attempt(first, jobs)
    assert done == refuse_at // 4 and first.taken == ["nurse", "u2", "u3"][:done]
    assert isinstance(error, error_type) and isinstance(error, SinkError)
    assert error.reply == code
    if code is not None:
        assert error.step == STEPS[refuse_at % 4]
    second = ScriptedReceiver()
    assert _attempt(second, jobs[done:]) == (JOBS - done, None)
    assert first.taken + second.taken == ["nurse", "u2", "u3"]    # each once, in order


def test_stray_line_ends_between_pipelined_acks_are_skipped(tmp_path: Path) -> None:
    receiver = ScriptedReceiver(trailing=b"\n")
    assert _attempt(receiver, _jobs(tmp_path)) == (JOBS, None)
    assert receiver.taken == ["nurse", "u2", "u3"]


def test_a_job_that_cannot_be_read_mid_run_is_the_one_that_fails(tmp_path: Path) -> None:
    """The jobs before it are sent and counted; the error is that job's, not the next good one's."""
    jobs = _jobs(tmp_path)
    jobs[1] = dataclasses.replace(jobs[1], control_path=str(tmp_path / "gone.cf"))
    receiver = ScriptedReceiver()
    done, error = _attempt(receiver, jobs)
    assert (done, receiver.taken) == (1, ["nurse"])
    assert isinstance(error, SpoolFileMissing)
