"""The intake channel's frames: the per-job messages come back exactly as sent."""

from __future__ import annotations

import socket

import pytest
import trio

from relay.intakechannel import Channel
from relay.intakemessages import (
    Commit,
    Control,
    Failure,
    Reply,
    Stop,
    decode,
    encode,
)
from relay.spoolformat import FileMeta, JobMeta


def _commit(rid: int, control: Control | None, **kw: object) -> Commit:
    return Commit(rid=rid, token=f"7-{rid}", queue="lp", wire_queue="LP", peer="10.0.0.1:721",
                  tls_peer="ward", control=control, files=(("dfA001h", b"\x00data\xff"),
                                                           ("dfB001h", b"")),
                  promoted=False, hold="", **kw)  # type: ignore[arg-type]


def _meta(files: int) -> JobMeta:
    return JobMeta(id="000000042", queue="lp", wire_queue="LP", peer="10.0.0.1:721",
                   received=1.5, control_name="cfA001h", control_path="/s/j.cf", number="001",
                   user="ana", host="h", title="t", job_name="j", tls_peer="ward",
                   files=tuple(FileMeta(name=f"df{chr(65 + i)}001h", format="l", bytes=i,
                                        path=f"/s/{i}") for i in range(files)),
                   state="held", attempts=2, next_attempt=3.25, last_error="é")


CONTROL = Control(name="cfA001h", raw=b"Hh\nPana\n", number="001", user="ana", host="h",
                  title="t", job_name="j", formats={"dfA001h": "l", "dfB001h": "o"})


@pytest.mark.parametrize("message", [
    _commit(1, CONTROL),
    _commit(2, None, digests={"dfA001h": "ab" * 32}, previous="7-1"),
    Reply(3, value=_meta(0)),
    Reply(4, value=_meta(3)),
    Reply(5, failure=Failure("spool", "disk said no")),
    Reply(6, value="000000042"),
    Stop(),
])
def test_each_message_comes_back_equal_and_the_per_job_ones_are_not_pickled(
        message: object) -> None:
    frame = encode(message)
    assert decode(frame) == message
    per_job = isinstance(message, Commit) or (isinstance(message, Reply)
                                              and isinstance(message.value, JobMeta))
    assert (frame[:1] != b"P") == per_job


class Name(str):
    """A str subclass: marshal takes exact types only."""


def test_a_value_marshal_refuses_is_pickled_instead() -> None:
    message = _commit(7, CONTROL)._replace(queue=Name("lp"))
    frame = encode(message)
    assert frame[:1] == b"P" and decode(frame) == message


def _channels(sndbuf: int | None = None) -> tuple[Channel, Channel]:
    """A sender and a receiver Channel over one socket pair (the sender's buffer small)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if sndbuf is not None:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return Channel(trio.socket.from_stdlib_socket(a)), Channel(trio.socket.from_stdlib_socket(b))


def _big(rid: int) -> Commit:
    """A Commit larger than a 4 KiB socket buffer: its write waits for the reader."""
    return _commit(rid, CONTROL)._replace(files=(("dfA001h", b"x" * (1 << 20)),))


def test_frames_sent_at_once_arrive_whole_and_in_order() -> None:
    async def main() -> list[object]:
        sender, receiver = _channels()
        messages = [_commit(i, CONTROL) for i in range(1, 41)]
        got: list[object] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for m in messages:
                    nursery.start_soon(sender.send, m)
                for _ in messages:
                    got.append(await receiver.receive())
        sender.close()
        receiver.close()
        assert sorted(got, key=lambda m: m.rid) == messages  # type: ignore[attr-defined]
        return got
    assert len(trio.run(main)) == 40


def _big_frame_and_one_behind(cancelled: str) -> list[object]:
    """A (rid 1) writes a frame larger than the socket's buffer, B (rid 2) is
    queued behind it; the one ``cancelled`` names ("A" or "B") is cancelled
    while A's write waits for the reader.  With B cancelled a third send (rid 3)
    follows A.  The two messages that arrive."""
    async def main() -> list[object]:
        sender, receiver = _channels(sndbuf=4096)
        scope = trio.CancelScope()
        got: list[object] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for name, message in (("A", _big(1)), ("B", _commit(2, CONTROL))):
                    if name == cancelled:
                        nursery.start_soon(_cancelled, sender, message, scope)
                    else:
                        nursery.start_soon(sender.send, message)
                    await trio.sleep(0.05)       # A is writing, the buffer full
                scope.cancel()
                got.append(await receiver.receive())
                if cancelled == "B":
                    await sender.send(_commit(3, CONTROL))
                got.append(await receiver.receive())
        sender.close()
        receiver.close()
        return got
    return trio.run(main)


def test_a_send_cancelled_while_another_writes_is_not_sent() -> None:
    # B queues behind A's write and is cancelled: A and then C arrive whole.
    assert [m.rid for m in _big_frame_and_one_behind("B")] == [1, 3]  # type: ignore[attr-defined]


async def _cancelled(channel: Channel, message: Commit, scope: trio.CancelScope) -> None:
    with scope:
        await channel.send(message)


def test_a_send_from_a_cancelled_task_sends_nothing() -> None:
    async def main() -> list[object]:
        sender, receiver = _channels()
        with trio.fail_after(10):
            with trio.CancelScope() as scope:
                scope.cancel()
                await sender.send(_commit(1, CONTROL))
            await sender.send(_commit(2, CONTROL))
            got = [await receiver.receive()]
        sender.close()
        receiver.close()
        return got
    assert [m.rid for m in trio.run(main)] == [2]  # type: ignore[attr-defined]


def test_a_writer_cancelled_mid_frame_leaves_the_rest_to_the_next_write() -> None:
    # A is cancelled part-way; B, queued behind it and not begun, writes A's rest
    # and then its own frame: the stream holds A whole, then B (A's sender was
    # told it was cancelled).
    got = _big_frame_and_one_behind("A")
    assert [m.rid for m in got] == [1, 2]  # type: ignore[attr-defined]
    assert got[0] == _big(1)


def test_frames_split_over_reads_and_many_in_one_read_arrive_whole() -> None:
    async def main() -> list[object]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        receiver = Channel(trio.socket.from_stdlib_socket(b))
        frames = b"".join(len(f).to_bytes(4, "big") + f
                          for f in (encode(_commit(i, CONTROL)) for i in range(1, 31)))
        got: list[object] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                async def write() -> None:
                    a.sendall(frames[:7])            # part of a length, then of a frame
                    await trio.sleep(0.02)
                    a.sendall(frames[7:100])
                    await trio.sleep(0.02)
                    a.sendall(frames[100:])          # the rest at once
                    a.close()
                nursery.start_soon(write)
                for _ in range(30):
                    got.append(await receiver.receive())
                with pytest.raises(EOFError):
                    await receiver.receive()
        receiver.close()
        return got
    assert trio.run(main) == [_commit(i, CONTROL) for i in range(1, 31)]


def test_a_reply_before_its_waiter_parks_and_after_both_arrive() -> None:
    from relay.intakechannel import ReplyWaiter

    async def main() -> tuple[Reply, Reply]:
        early, late = ReplyWaiter(), ReplyWaiter()
        early.give(Reply(1, value="a"))          # came while the task was still sending
        first = await early.wait()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                got: list[Reply] = []

                async def wait() -> None:
                    got.append(await late.wait())
                nursery.start_soon(wait)
                await trio.sleep(0.01)
                late.give(Reply(2, value="b"))
        return first, got[0]
    assert trio.run(main) == (Reply(1, value="a"), Reply(2, value="b"))


def test_send_nowait_writes_a_frame_whole_or_leaves_the_rest_to_flush() -> None:
    # The fast loop's commit without a task: a frame the socket takes only in part
    # is queued whole for the rest, and a frame behind it waits its turn (False).
    async def main() -> list[object]:
        sender, receiver = _channels(sndbuf=4096)
        got: list[object] = []
        with trio.fail_after(10):
            assert sender.send_nowait(_commit(1, CONTROL)) and not sender.pending
            got.append(await receiver.receive())
            assert sender.send_nowait(_big(2))        # larger than the buffer: in part
            assert sender.pending
            assert not sender.send_nowait(_commit(3, CONTROL))   # nothing sent
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender.flush)
                got.append(await receiver.receive())
            assert not sender.pending
            assert sender.send_nowait(_commit(4, CONTROL))
            got.append(await receiver.receive())
        sender.close()
        receiver.close()
        return got
    assert [m.rid for m in trio.run(main)] == [1, 2, 4]  # type: ignore[attr-defined]
