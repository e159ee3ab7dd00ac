"""relay._fastloop on its own: a stand-in connection over a socket pair.

What each event makes the loop do (a step and an ack, or leaving with the
reason Python acts on), without trio or a server: the hand-over kinds that
the end-to-end tests (test_fastsession) cannot provoke at will, such as an
acknowledgement the socket buffer will not take.
"""

from __future__ import annotations

import math
import socket
import time
from typing import Any

import pytest

from relay import _core, _fastloop
from relay.errors import ProtocolError

CF = b"Hh\nPana\nldfA001h\n"
JOB = (b"\x02q\n\x02%d cfA001h\n" % len(CF) + CF + b"\x00"
       + b"\x035 dfA001h\nhello\x00")


class _Deadline:
    def __init__(self) -> None:
        self.asked = 0

    def due(self, parser: Any, now: float) -> float:
        self.asked += 1
        return now + 60


class _Job:
    def __init__(self) -> None:
        self.control = False
        self.files: set[str] = set()

    def complete(self) -> bool:
        return self.control and "dfA001h" in self.files


class _Conn:
    """The steps the loop calls, recorded (relay.jobsteps has the real ones)."""

    def __init__(self) -> None:
        self.parser = _core.ServerParser()
        self.deadline = _Deadline()
        self.job: Any = None
        self.completed = 0
        self.steps: list[str] = []

    def take_receive_job(self, ev: Any) -> None:
        self.steps.append("0x02 " + ev.queue)

    def take_control_start(self, ev: Any) -> None:
        self.job = self.job or _Job()
        self.steps.append("cf")

    def take_control_end(self, ev: Any) -> None:
        self.job.control = True
        self.steps.append("cf end")

    def take_data_start(self, ev: Any) -> None:
        self.job = self.job or _Job()
        self.steps.append("df")

    def on_data_chunk(self, ev: Any) -> None:
        self.steps.append("chunk " + bytes(ev.data).decode())

    def take_data_end(self, ev: Any) -> None:
        self.job.files.add(ev.name)
        self.steps.append("df end")


@pytest.fixture
def pair() -> Any:
    server, client = socket.socketpair()
    server.setblocking(False)
    client.settimeout(5)
    yield server, client
    server.close()
    client.close()


def _kinds(out: list[Any]) -> list[int]:
    return [c.kind for c in out]


def test_a_job_is_stepped_and_acked_until_its_commit_then_resumed(pair: Any) -> None:
    server, client = pair
    loop, conn = _fastloop.FastLoop(65536), _Conn()
    try:
        assert loop.add(conn, server, "h", 1.0) == []       # nothing to read yet
        assert conn.deadline.asked == 1
        client.sendall(JOB)
        (c,) = loop.poll(2.0)
        assert c.kind == _fastloop.COMMIT and isinstance(c.payload, _Job)
        assert conn.steps == ["0x02 q", "cf", "cf end", "df", "chunk hello", "df end"]
        assert client.recv(10) == b"\x00" * 4               # the last ack waits
        assert conn.job is None and conn.completed == 1 and c.busy and c.last == 2.0
        assert loop.count == 1
        client.shutdown(socket.SHUT_WR)
        assert loop.poll(3.0) == []                         # out of the epoll set
        (closed,) = loop.resume(c, 4.0)                     # the ack, then EOF read
        assert closed.kind == _fastloop.CLOSED and loop.count == 0
        assert client.recv(10) == b"\x00"
    finally:
        loop.close()
        conn.parser.release()   # as Connection does at its end


NEXT = JOB[len(b"\x02q\n"):]      # a session's next job: its files only


def test_a_sessions_later_jobs_are_pipelined_their_acks_owed_until_released(
        pair: Any) -> None:
    server, client = pair
    loop, conn = _fastloop.FastLoop(65536), _Conn()
    conn.completed = 1     # one job of the session committed already
    try:
        loop.add(conn, server, "h", 1.0)
        client.sendall(JOB + NEXT)
        (c,) = loop.poll(2.0)
        assert c.kind == _fastloop.IN_LOOP and loop.count == 1 and not c.busy
        assert len(c.jobs) == 2 and conn.completed == 3 and conn.job is None
        # The first job's header acks went; the next job's wait behind its final ack.
        assert c.owed == [3, 0]
        assert client.recv(10) == b"\x00" * 4
        assert loop.release(c, True) == 0 and c.owed == [0]
        assert client.recv(10) == b"\x00" * 4          # its final ack and the 3 behind it
        assert loop.release(c, False) == 0 and c.owed == []   # not acknowledged
        client.sendall(NEXT[:5])
        assert loop.poll(3.0) == []
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(10)
    finally:
        loop.close()
        conn.parser.release()   # as Connection does at its end


def test_a_paused_connection_is_not_read_and_a_left_ones_acks_are_counted(
        pair: Any) -> None:
    server, client = pair
    loop, conn = _fastloop.FastLoop(65536), _Conn()
    conn.completed = 1
    try:
        loop.add(conn, server, "h", 1.0)
        client.sendall(JOB)
        (c,) = loop.poll(2.0)
        assert c.owed == [0] and client.recv(10) == b"\x00" * 4
        loop.pause(c)
        client.sendall(NEXT)
        assert loop.poll(3.0) == [] and c.busy and conn.steps.count("cf") == 1
        (c2,) = loop.unpause(c, 4.0)          # read again: the next job, pipelined
        assert c2 is c and not c.busy and c.owed == [3, 0] and len(c.jobs) == 2
        client.sendall(b"\x09garbage\n")
        (gone,) = loop.poll(5.0)
        assert gone.kind == _fastloop.RAISE and loop.count == 0
        assert loop.release(c, True) == 4      # out of the loop: Python sends them
        assert loop.release(c, True) == 1
    finally:
        loop.close()
        conn.parser.release()


@pytest.mark.parametrize(("data", "kind", "payload"), [
    (b"\x03q\n", _fastloop.EVENT, _core.Command),                  # lpq
    (b"\x02q\n\x01\n", _fastloop.EVENT, _core.AbortJob),
    (b"\x02q\n\x030 dfA001h\n", _fastloop.EVENT, _core.DataFileStart),  # until close
    (b"\x02q\n\x0399999 dfA001h\n", _fastloop.EVENT, _core.DataFileStart),  # > 64 KiB
    (b"\x09garbage\n", _fastloop.RAISE, ProtocolError),
])
def test_what_the_loop_does_not_take_leaves_with_the_event_or_error(
        pair: Any, data: bytes, kind: int, payload: type) -> None:
    server, client = pair
    loop, conn = _fastloop.FastLoop(65536), _Conn()
    try:
        loop.add(conn, server, "h", 1.0)
        client.sendall(data)
        (c,) = loop.poll(2.0)
        assert c.kind == kind and isinstance(c.payload, payload)
        assert loop.count == 0 and c.last == 2.0
    finally:
        loop.close()
        conn.parser.release()   # as Connection does at its end


def test_a_step_that_raises_leaves_with_its_exception(pair: Any) -> None:
    server, client = pair
    loop, conn = _fastloop.FastLoop(65536), _Conn()
    refusal = ProtocolError("no", reply=1, reason="unknown_queue")

    def refuse(ev: Any) -> None:
        raise refusal
    conn.take_receive_job = refuse  # type: ignore[method-assign]
    try:
        loop.add(conn, server, "h", 1.0)
        client.sendall(b"\x02nosuch\n")
        (c,) = loop.poll(2.0)
        assert c.kind == _fastloop.RAISE and c.payload is refusal
    finally:
        loop.close()
        conn.parser.release()   # as Connection does at its end


def test_an_ack_the_socket_will_not_take_leaves_to_be_sent_waiting(pair: Any) -> None:
    server, client = pair
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        while True:
            server.send(b"x" * 4096)
    except BlockingIOError:
        pass
    loop, conn = _fastloop.FastLoop(65536), _Conn()
    try:
        loop.add(conn, server, "h", 1.0)
        client.sendall(b"\x02q\n")
        (c,) = loop.poll(2.0)
        assert c.kind == _fastloop.SEND and conn.steps == ["0x02 q"]
    finally:
        loop.close()
        conn.parser.release()   # as Connection does at its end


def test_a_reset_peer_leaves_as_lost_with_the_error() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    accepted.setblocking(False)
    loop, conn = _fastloop.FastLoop(65536), _Conn()
    try:
        loop.add(conn, accepted, "h", 1.0)
        peer.sendall(b"\x02q\n\x02100 cfA001h\npartial")
        loop.poll(2.0)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()
        out: list[Any] = []
        for _ in range(100):     # a moment for the reset to arrive
            out += loop.poll(3.0)
            if out:
                break
            time.sleep(0.01)
        (c,) = out
        assert c.kind == _fastloop.LOST and isinstance(c.payload, ConnectionResetError)
    finally:
        loop.close()
        conn.parser.release()   # as Connection does at its end
        accepted.close()
        listener.close()


def test_a_connection_past_its_due_leaves_at_the_sweep(pair: Any) -> None:
    server, _ = pair
    loop, conn = _fastloop.FastLoop(65536), _Conn()
    try:
        loop.add(conn, server, "h", 1.0)                    # due: 61
        assert loop.expired(30.0) == ([], 61.0)
        (late,), nearest = loop.expired(61.0)
        assert late.kind == _fastloop.TIMEOUT and nearest == math.inf
        assert loop.count == 0
    finally:
        loop.close()
        conn.parser.release()   # as Connection does at its end


def test_a_fast_sender_yields_to_the_others_every_few_reads(pair: Any) -> None:
    server, client = pair
    loop, conn = _fastloop.FastLoop(1 << 20), _Conn()
    body = b"y" * 200_000
    try:
        loop.add(conn, server, "h", 1.0)
        client.sendall(b"\x02q\n\x03%d dfA001h\n" % len(body) + body)
        assert loop.poll(2.0) == []
        chunks = [s for s in conn.steps if s.startswith("chunk")]
        assert len(chunks) > 0 and sum(len(s) - 6 for s in chunks) < len(body)
        for _ in range(40):
            loop.poll(3.0)
        assert sum(len(s) - 6 for s in conn.steps if s.startswith("chunk")) == len(body)
    finally:
        loop.close()
        conn.parser.release()   # as Connection does at its end



def test_a_connection_that_yields_with_its_socket_emptied_keeps_a_deadline(pair: Any) -> None:
    # Sixteen 4 KiB reads take exactly these 65,536 bytes; the loop then turns to
    # the others.  Nothing more arrives, so no poll brings it back: only its
    # deadline does (a sender of a near-64 KiB file whose network then dies).
    server, client = pair
    loop, conn = _fastloop.FastLoop(65536), _Conn()
    head = b"\x02q\n\x0365536 dfA001h\n"
    try:
        loop.add(conn, server, "h", 1.0)
        client.sendall(head + b"z" * (65536 - len(head)))
        asked = conn.deadline.asked
        assert loop.poll(2.0) == []
        assert conn.deadline.asked == asked + 1
        assert loop.poll(3.0) == []                  # nothing left to read
        assert loop.expired(30.0) == ([], 62.0)
        (late,), _ = loop.expired(62.0)
        assert late.kind == _fastloop.TIMEOUT
    finally:
        loop.close()
        conn.parser.release()   # as Connection does at its end


def test_a_connection_the_epoll_set_refuses_goes_to_python_with_nothing_owed(
        tmp_path: Any) -> None:
    # epoll takes no regular file (EPERM), as it takes no socket past
    # fs.epoll.max_user_watches: the peer is not at fault, so it is not "lost".
    loop, conn = _fastloop.FastLoop(65536), _Conn()
    with open(tmp_path / "not-a-socket", "wb") as f:
        try:
            (c,) = loop.add(conn, f, "h", 1.0)
            assert (c.kind, c.payload, loop.count) == (_fastloop.AWAY, None, 0)
            assert conn.steps == []
        finally:
            loop.close()
            conn.parser.release()
