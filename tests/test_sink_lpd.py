"""The lpd:// sink against real receivers: LPRng's lpd, and a scripted LPD that
misbehaves the ways FIELD-NOTES lists (stray LF, error lines, silence)."""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path

import pytest
import trio

from relay import client
from relay.controlfile import parse_control_file
from relay.errors import SinkRejected, SinkUnavailable, SpoolFileMissing
from relay.sinks import SinkContext, make_sink
from relay.sinks.lpd import SESSION_RUN
from relay.spool import SEGMENT_THRESHOLD, JobMeta, Spool
from relay.uri import parse_destination
from tests.peers import LpdScript, LprngServer, RecordingLpdServer

PAYLOADS = [b"%!PS-Adobe-3.0\n" + bytes(range(256)) * 200, b"second file\n" * 100]


def make_job(tmp_path: Path, payloads: list[bytes] = PAYLOADS,
             segment_threshold: int = SEGMENT_THRESHOLD) -> tuple[Spool, JobMeta]:
    spool = Spool(tmp_path / "spool", fsync=False, segment_threshold=segment_threshold)
    spool.recover()

    async def build() -> JobMeta:
        job = spool.begin(queue="ward3", wire_queue="Ward3", peer="10.1.2.3:721")
        names = [f"df{chr(65 + i)}042winserver" for i in range(len(payloads))]
        for name, data in zip(names, payloads, strict=True):
            writer = job.open_data(name)
            writer.write(data)
            writer.close()
        control = ("Hwinserver\nPnurse\nJdischarge letter\n" + "".join(
            f"l{n}\nU{n}\nNletter.ps\n" for n in names) + "Sdev,inode\n").encode()
        job.set_control("cfA042winserver", control, number="042", user="nurse",
                        host="winserver", title="discharge letter", job_name="discharge letter",
                        formats=dict.fromkeys(names, "l"))
        return await spool.commit(job)
    return spool, trio.run(build)


def deliver(uri: str, job: JobMeta) -> None:
    sink = make_sink(parse_destination(uri), SinkContext())

    async def main() -> None:
        with trio.fail_after(30):
            await sink.deliver(job)
    trio.run(main)


@pytest.mark.peers
@pytest.mark.parametrize("query", ["", "?order=data-first", "?jobnumbers=6", "?mode=stream"])
def test_delivers_to_lprng(tmp_path: Path, query: str) -> None:
    _, job = make_job(tmp_path)
    with LprngServer(tmp_path / "lprng", queues=("Ward3",)) as lprng:
        deliver(f"lpd://127.0.0.1:{lprng.port}/Ward3{query}", job)
        (received,) = lprng.wait_jobs("Ward3", 1)
    assert [f.data for f in received.files] == PAYLOADS
    assert received.user == "nurse" and received.host == "winserver"


@pytest.mark.peers
def test_lprng_refuses_windows_fake_length_and_we_retry(tmp_path: Path) -> None:
    # FIELD-NOTES: LPRng refuses the Windows fake length with 0x02.
    _, job = make_job(tmp_path)
    with LprngServer(tmp_path / "lprng", queues=("Ward3",)) as lprng, \
            pytest.raises(SinkUnavailable, match="0x02"):
        deliver(f"lpd://127.0.0.1:{lprng.port}/Ward3?mode=windows", job)


def test_control_file_is_rewritten_for_the_destination(tmp_path: Path) -> None:
    _, job = make_job(tmp_path)
    with RecordingLpdServer() as server:
        deliver(f"lpd://127.0.0.1:{server.port}/q?jobnumbers=6", job)
        (received,) = server.wait_jobs(1)
    assert received.raw_control is not None
    cf = parse_control_file(received.raw_control)
    assert cf.host == "winserver" and cf.user == "nurse"          # H and P kept
    assert received.control_name.startswith("cfA") and len(received.control_name) > 9
    number = received.control_name[3:9]
    assert number.isdigit()
    new_names = [f.name for f in received.files]
    assert all(n.startswith("df") and n[3:9] == number for n in new_names)
    assert [pf.name for pf in cf.print_files] == new_names         # format lines follow
    text = received.raw_control.decode()
    assert "winserver\nU" not in text or all(f"U{n}" in text for n in new_names)
    assert "\nS" not in text                                      # S dropped
    assert [f.data for f in received.files] == PAYLOADS


def test_stray_lf_after_replies_is_tolerated(tmp_path: Path) -> None:
    _, job = make_job(tmp_path)
    with RecordingLpdServer(LpdScript(trailing=b"\n")) as server:
        deliver(f"lpd://127.0.0.1:{server.port}/q", job)
        assert len(server.wait_jobs(1)) == 1


@pytest.mark.parametrize(("step", "reply", "error", "answered"), [
    ("job", b"\x01queue not accepting\n", SinkUnavailable, client.RECEIVE_JOB_STEP),
    ("data_file", b"\x02disk full\n", SinkUnavailable, client.DATA_FILE_STEP),
    ("control_file", b"\x03bad control file\n", SinkRejected, client.CONTROL_FILE_STEP),
])
def test_reply_codes(tmp_path: Path, step: str, reply: bytes, error: type,
                     answered: str) -> None:
    _, job = make_job(tmp_path)
    with RecordingLpdServer(LpdScript(replies={step: reply})) as server, \
            pytest.raises(error) as info:
        deliver(f"lpd://127.0.0.1:{server.port}/q", job)
    assert reply[1:].strip().decode() in str(info.value)
    # What was refused is data, not words of the message.
    assert (info.value.reason, info.value.reply, info.value.step) == ("reply", reply[0], answered)


def test_silent_receiver_times_out(tmp_path: Path) -> None:
    _, job = make_job(tmp_path)
    with RecordingLpdServer(LpdScript(silent_at="data_file")) as server, \
            pytest.raises(SinkUnavailable, match="timed out") as info:
        deliver(f"lpd://127.0.0.1:{server.port}/q?timeout=1s", job)
    assert info.value.reason == "timeout"


def test_receiver_closing_mid_job_is_a_retry(tmp_path: Path) -> None:
    _, job = make_job(tmp_path)
    with RecordingLpdServer(LpdScript(close_at="control_header")) as server, \
            pytest.raises(SinkUnavailable) as info:
        deliver(f"lpd://127.0.0.1:{server.port}/q", job)
    assert info.value.reason == "reset"


def test_refused_connection_is_a_retry(tmp_path: Path) -> None:
    _, job = make_job(tmp_path)
    with RecordingLpdServer() as server:
        port = server.port
    with pytest.raises(SinkUnavailable) as info:
        deliver(f"lpd://127.0.0.1:{port}/q", job)
    assert info.value.reason == "refused"


def test_empty_data_files_are_left_out(tmp_path: Path) -> None:
    # Count 0 would mean "until EOF" to the receiver: an empty file is not sent.
    _, job = make_job(tmp_path, [b"", b"real page\n"])
    with RecordingLpdServer() as server:
        deliver(f"lpd://127.0.0.1:{server.port}/q", job)
        (received,) = server.wait_jobs(1)
    assert [f.data for f in received.files] == [b"real page\n"]
    assert received.raw_control is not None
    assert len(parse_control_file(received.raw_control).print_files) == 1


def test_batch_sends_several_jobs_in_one_session(tmp_path: Path) -> None:
    spool, first = make_job(tmp_path)
    jobs = [first] + [make_job_in(spool, n) for n in range(2, 5)]
    with RecordingLpdServer() as server:
        sink = make_sink(parse_destination(f"lpd://127.0.0.1:{server.port}/q?batch=4"),
                         SinkContext())
        assert sink.batch == 4

        async def main() -> tuple[int, Exception | None]:
            with trio.fail_after(30):
                return await sink.deliver_many(jobs)
        assert trio.run(main) == (4, None)
        received = server.wait_jobs(4)
        assert len(server.connections) == 1
    assert [j.user for j in received] == ["nurse", "u2", "u3", "u4"]


@pytest.mark.peers
def test_batch_to_lprng(tmp_path: Path) -> None:
    # LPRng takes several control files in one 0x02 session (FIELD-NOTES).
    spool, first = make_job(tmp_path)
    jobs = [first] + [make_job_in(spool, n) for n in range(2, 6)]
    with LprngServer(tmp_path / "lprng", queues=("q",)) as lprng:
        sink = make_sink(parse_destination(f"lpd://127.0.0.1:{lprng.port}/q?batch=8"),
                         SinkContext())

        async def main() -> tuple[int, Exception | None]:
            with trio.fail_after(30):
                return await sink.deliver_many(jobs)
        assert trio.run(main) == (5, None)
        received = lprng.wait_jobs("q", 5)
    assert sorted(j.user for j in received) == ["nurse", "u2", "u3", "u4", "u5"]


def test_one_job_a_connection_runs_in_order_and_stops_at_the_first_failure(
        tmp_path: Path) -> None:
    # Without batching an attempt carries SESSION_RUN jobs, each in its own
    # session, in order; the one that fails ends the run and later ones stay.
    spool, first = make_job(tmp_path, segment_threshold=0)
    jobs = [first] + [make_job_in(spool, n) for n in range(2, 5)]
    os.unlink(jobs[2].files[0].path)
    with RecordingLpdServer() as server:
        sink = make_sink(parse_destination(f"lpd://127.0.0.1:{server.port}/q?batch=1"),
                         SinkContext())
        assert (sink.batch, sink.per_attempt) == (1, SESSION_RUN)

        async def main() -> tuple[int, Exception | None]:
            with trio.fail_after(30):
                return await sink.deliver_many(jobs)
        done, error = trio.run(main)
        assert done == 2 and isinstance(error, SpoolFileMissing)
        connections = server.wait_connections(3)
        received = server.jobs
    assert [j.user for j in received] == ["nurse", "u2"]
    # One connection a job; the third ended before its files; the fourth never opened.
    assert len(connections) == 3


def test_a_job_taken_at_the_senders_close_is_not_overtaken_by_the_next(
        tmp_path: Path) -> None:
    # cups-lpd takes a job when the sender closes, in a process per connection:
    # the first connection's takes 0.5 s here, so a next session begun before
    # the receiver closed the first would be taken first.  (``reserve=none``:
    # an origin-port pool of the sink's own, whose close waits for the
    # receiver's, as in the daemon.)
    spool, first = make_job(tmp_path, segment_threshold=0)
    jobs = [first] + [make_job_in(spool, n) for n in range(2, 4)]
    with RecordingLpdServer(LpdScript(take_delay=(0.5, 0.0))) as server:
        sink = make_sink(parse_destination(
            f"lpd://127.0.0.1:{server.port}/q?batch=1&reserve=none"), SinkContext())

        async def main() -> tuple[int, Exception | None]:
            with trio.fail_after(30):
                return await sink.deliver_many(jobs)
        assert trio.run(main) == (3, None)
        received = server.wait_jobs(3)
    assert [j.user for j in received] == ["nurse", "u2", "u3"]


@pytest.mark.parametrize("query", ["?batch=1", "?batch=1&reserve=none&mode=stream"])
def test_a_large_body_in_a_segment_goes_out_as_its_range(tmp_path: Path, query: str) -> None:
    # Above PIPELINE_BYTES a body is sent from the spool, not loaded: from a
    # segment that is its range of the segment file, nothing before or after.
    payloads = [os.urandom(100_000), os.urandom(70_000)]
    _, job = make_job(tmp_path, payloads, segment_threshold=1 << 20)
    assert all("/segments/" in f.path for f in job.files)
    with RecordingLpdServer() as server:
        deliver(f"lpd://127.0.0.1:{server.port}/q{query}", job)
        (received,) = server.wait_jobs(1)
    assert [f.data for f in received.files] == payloads


def test_streamed_mode_never_batches(tmp_path: Path) -> None:
    sink = make_sink(parse_destination("lpd://127.0.0.1:9/q?batch=8&mode=stream"),
                     SinkContext())
    assert sink.batch == 1


def make_job_in(spool: Spool, n: int) -> JobMeta:
    async def build() -> JobMeta:
        job = spool.begin(queue="ward3", wire_queue="ward3", peer="10.1.2.3:721")
        name = f"dfA{n:03d}host"
        writer = job.open_data(name)
        writer.write(f"job {n}\n".encode())
        writer.close()
        job.set_control(f"cfA{n:03d}host", f"Hhost\nPu{n}\nl{name}\n".encode(),
                        number=f"{n:03d}", user=f"u{n}", host="host", title="", job_name="",
                        formats={name: "l"})
        return await spool.commit(job)
    return trio.run(build)


@pytest.mark.parametrize("which", ["control", "data"])
def test_missing_spool_file_is_spool_file_missing(tmp_path: Path, which: str) -> None:
    _, job = make_job(tmp_path, segment_threshold=0)  # files of its own, one deleted
    path = job.control_path if which == "control" else job.files[1].path
    os.unlink(path)
    with RecordingLpdServer() as server, pytest.raises(SpoolFileMissing) as info:
        deliver(f"lpd://127.0.0.1:{server.port}/q", job)
    assert (info.value.path, info.value.errno) == (path, errno.ENOENT)
    assert not server.jobs        # nothing acknowledged as a whole job


class _AheadWatcher:
    """A minimal trio LPD receiver that logs connects, sessions and acks in order;
    it closes the connections whose index is in ``drop`` at once, unread."""

    def __init__(self, drop: frozenset[int] = frozenset()) -> None:
        self.drop = drop
        self.events: list[str] = []
        self.jobs = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        index = sum(1 for e in self.events if e.startswith("connect"))
        self.events.append(f"connect {index}")
        if index in self.drop:
            await stream.aclose()
            return
        buf = bytearray()

        async def need(n: int) -> bool:
            while len(buf) < n:
                data = await stream.receive_some(65536)
                if not data:
                    return False
                buf.extend(data)
            return True

        async def line() -> bytes | None:
            while b"\n" not in buf:
                if not await need(len(buf) + 1):
                    return None
            end = buf.index(b"\n")
            text = bytes(buf[:end])
            del buf[:end + 1]
            return text

        async def ack() -> None:
            self.events.append(f"ack {index}")
            await stream.send_all(b"\x00")

        if (command := await line()) is None:
            return
        assert command[:1] == b"\x02"
        self.events.append(f"session {index}")
        await ack()
        while (header := await line()) is not None:
            size = int(header[1:].split()[0])
            await ack()
            assert await need(size + 1)
            del buf[:size + 1]
            await ack()
            self.jobs += header[:1] == b"\x02"

    def first(self, event: str) -> int:
        return self.events.index(event)

    def last(self, event: str) -> int:
        return len(self.events) - 1 - self.events[::-1].index(event)


def _deliver_run(tmp_path: Path, watcher: _AheadWatcher, count: int
                 ) -> tuple[int, Exception | None]:
    spool, first = make_job(tmp_path)
    jobs = [first] + [make_job_in(spool, n) for n in range(2, count + 1)]

    async def main() -> tuple[int, Exception | None]:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                (listener,) = await nursery.start(
                    functools.partial(trio.serve_tcp, host="127.0.0.1"), watcher.handle, 0)
                port = listener.socket.getsockname()[1]
                sink = make_sink(parse_destination(f"lpd://127.0.0.1:{port}/q?batch=1"),
                                 SinkContext())
                result = await sink.deliver_many(jobs)
                nursery.cancel_scope.cancel()
        return result
    return trio.run(main)


def test_one_job_a_connection_connects_the_next_while_a_job_is_sent(tmp_path: Path) -> None:
    # The TCP connect of job n+1 overlaps job n (LPRng forks and sets up its
    # server meanwhile); its 0x02 goes only after job n's final ack.
    watcher = _AheadWatcher()
    assert _deliver_run(tmp_path, watcher, 3) == (3, None)
    events = watcher.events
    assert watcher.jobs == 3 and sum(e.startswith("connect") for e in events) == 3
    for n in (0, 1):
        assert watcher.first(f"connect {n + 1}") < watcher.last(f"ack {n}")
        assert watcher.first(f"session {n + 1}") > watcher.last(f"ack {n}")


def test_a_connection_made_ahead_and_dropped_by_the_receiver_costs_no_failure(
        tmp_path: Path) -> None:
    # A receiver serving one connection at a time may close the one made
    # ahead: that job goes out on a fresh connection instead, in order.
    watcher = _AheadWatcher(drop=frozenset({1}))
    assert _deliver_run(tmp_path, watcher, 3) == (3, None)
    assert watcher.jobs == 3
    assert sum(e.startswith("session") for e in watcher.events) == 3
