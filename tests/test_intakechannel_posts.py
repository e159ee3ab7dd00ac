"""Replies the spool's flush thread writes on a worker's channel (``Channel.post``).

The main process answers a small job's ``Commit`` from the flush thread right
after the batch's sync; these tests drive that writer from a real thread
against a real socket pair: whole frames in order, a socket that takes only
part (the rest goes back to trio, first), a trio write under way, a worker
gone, a channel closed.
"""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import trio

from relay.intakechannel import Channel
from relay.intakemessages import Reply
from tests.test_intakemessages import CONTROL, _big, _channels, _commit, _meta


def _post_from_thread(channel: Channel, messages: list[object]) -> None:
    """As the flush thread does: post each, then write once."""
    write = None
    for message in messages:
        write = channel.post(message)
    assert write is not None
    write()


def test_posted_replies_arrive_whole_in_order_in_one_write(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> list[object]:
        sender, receiver = _channels()
        sender.allow_posts()
        replies = [Reply(i, value=_meta(2)) for i in range(1, 21)]
        writes: list[int] = []
        real_write = os.write

        def counting(fd: int, data: bytes) -> int:
            writes.append(len(data))
            return real_write(fd, data)

        with trio.fail_after(10):
            monkeypatch.setattr(os, "write", counting)
            await trio.to_thread.run_sync(_post_from_thread, sender, replies)
            monkeypatch.undo()
            got = [await receiver.receive() for _ in replies]
        sender.close()
        receiver.close()
        assert len(writes) == 1   # a batch's replies to one worker: one write
        return got
    assert trio.run(main) == [Reply(i, value=_meta(2)) for i in range(1, 21)]


def test_a_post_the_socket_takes_in_part_is_finished_by_trio_before_its_next_send() -> None:
    # The socket buffer is full part-way through the flush thread's frame: its
    # rest goes back to trio and is written first, then a frame trio sends.
    async def main() -> list[object]:
        sender, receiver = _channels(sndbuf=4096)
        sender.allow_posts()
        big = _big(1)
        got: list[object] = []
        with trio.fail_after(10):
            await trio.to_thread.run_sync(_post_from_thread, sender, [big])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender.send, _commit(2, CONTROL))
                got.append(await receiver.receive())
                got.append(await receiver.receive())
        assert not sender.pending
        sender.close()
        receiver.close()
        return got
    got = trio.run(main)
    assert got[0] == _big(1) and got[1] == _commit(2, CONTROL)


def test_a_post_while_trio_writes_goes_after_that_write_whole() -> None:
    # trio's own frame is larger than the buffer and still being written when the
    # flush thread posts: the thread does not write into the middle of it.
    async def main() -> list[object]:
        sender, receiver = _channels(sndbuf=4096)
        sender.allow_posts()
        got: list[object] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender.send, _big(1))
                await trio.sleep(0.05)      # trio's write waits for the reader
                await trio.to_thread.run_sync(
                    _post_from_thread, sender, [Reply(2, value=_meta(1)), Reply(3, value="x")])
                for _ in range(3):
                    got.append(await receiver.receive())
        sender.close()
        receiver.close()
        return got
    got = trio.run(main)
    assert got == [_big(1), Reply(2, value=_meta(1)), Reply(3, value="x")]


def test_a_post_to_a_worker_gone_or_a_closed_channel_is_dropped_quietly() -> None:
    async def main() -> None:
        with trio.fail_after(10):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            gone = Channel(trio.socket.from_stdlib_socket(a))
            gone.allow_posts()
            b.close()                     # the worker died
            await trio.to_thread.run_sync(_post_from_thread, gone, [Reply(1, value="x")])
            number = gone.sock.fileno()
            gone.close()
            # A descriptor number reused after the close gets nothing.
            c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            assert number in (c.fileno(), d.fileno())   # the number was reused
            await trio.to_thread.run_sync(_post_from_thread, gone, [Reply(2, value="x")])
            c.setblocking(False)
            d.setblocking(False)
            try:
                for end in (c, d):
                    with contextlib.suppress(BlockingIOError):   # nothing there: right
                        assert end.recv(100) == b""
            finally:
                c.close()
                d.close()
    trio.run(main)


def test_a_post_racing_trio_sends_keeps_every_frame_whole() -> None:
    # Many trio sends and many thread posts at once: every frame arrives whole.
    async def main() -> list[object]:
        sender, receiver = _channels(sndbuf=4096)
        sender.allow_posts()
        got: list[object] = []
        posted = [Reply(100 + i, value=_meta(3)) for i in range(40)]

        def thread() -> None:
            for i in range(0, 40, 4):
                _post_from_thread(sender, posted[i:i + 4])

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(1, 21):
                    nursery.start_soon(sender.send, _commit(i, CONTROL))
                nursery.start_soon(trio.to_thread.run_sync, thread)
                for _ in range(60):
                    got.append(await receiver.receive())
        sender.close()
        receiver.close()
        return got
    got = trio.run(main)
    assert sorted(m.rid for m in got) == [*range(1, 21), *range(100, 140)]  # type: ignore[attr-defined]
    assert [m for m in got if isinstance(m, Reply)] == [
        Reply(100 + i, value=_meta(3)) for i in range(40)]


def test_a_channel_closed_while_trio_finishes_a_post_ends_quietly() -> None:
    # The worker stops reading; the flush thread's frame goes back to trio, whose
    # system task waits on the full socket; the channel is then closed (the
    # worker's handle ends).  That task must end quietly: anything escaping a
    # system task ends the whole run (the main process).
    async def main() -> None:
        sender, receiver = _channels(sndbuf=4096)
        sender.allow_posts()
        with trio.fail_after(10):
            await trio.to_thread.run_sync(_post_from_thread, sender, [_big(1)])
            await trio.sleep(0.1)          # the take-back task is waiting to write
            assert sender._writing        # blocked on the full socket
            sender.close()
            await trio.sleep(0.1)          # it wakes on the closed socket
        receiver.close()
    trio.run(main)
