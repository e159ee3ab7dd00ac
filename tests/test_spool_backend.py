"""The spool's backend interface (relay.spoolbackend): bodies are descriptor ranges read
through the spool, so a sink can stream a small job's data out of a segment record as
well as a large job's own file, and a vanished body means SpoolFileMissing everywhere."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from relay.errors import SpoolFileMissing
from relay.sinks.base import SinkContext, open_body, open_control, stream_body
from relay.spool import FileMeta, JobMeta
from relay.spoolbackend import Body, open_file_body
from relay.spoolsegment import JOB, SegmentLog, job_body
from tests.test_spool import close, commit, reopen


async def drain_body(body: Body) -> bytes:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    got = bytearray()
    with ours, theirs, trio.fail_after(10):
        sent = await stream_body(ours.fileno(), body, idle_timeout=5)
        ours.shutdown(socket.SHUT_WR)
        while chunk := theirs.recv(65536):
            got += chunk
    assert sent == body.length
    return bytes(got)


def test_a_body_inside_a_segment_record_streams_alone(tmp_path: Path) -> None:
    log = SegmentLog(str(tmp_path / "segments"))
    log.replay()
    payload = os.urandom(3000)
    log.append(JOB, 1, job_body(b"{}", b"cf-before", [b"other"]))
    record = log.append(JOB, 2, job_body(b'{"id":2}', b"Hhost\n", [payload, b"after"]))
    log.sync()
    start = record.offset + 4 + len(b'{"id":2}') + len(b"Hhost\n")
    body = Body(os.dup(log.reader(record.segment)), start, len(payload))
    with body:
        assert trio.run(drain_body, body) == payload
        assert body.read() == payload
    log.close()


def test_a_whole_file_body_and_one_that_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    with open_file_body(str(path), 2) as body:
        assert (body.offset, body.length) == (2, 8)
        assert trio.run(drain_body, body) == b"23456789"
    with pytest.raises(SpoolFileMissing):
        open_file_body(str(tmp_path / "gone"))


class Source:
    """A BodySource that is not a local spool: bodies from memory files."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def _memory(self, data: bytes) -> Body:
        fd = os.memfd_create("body")
        os.write(fd, data)
        return Body(fd, 0, len(data))

    def open_body(self, file: FileMeta) -> Body:
        self.asked.append(file.name)
        return self._memory(b"from the backend")

    def open_control(self, job: JobMeta) -> Body:
        self.asked.append(job.control_name)
        return self._memory(b"Hhost\n")


def test_sinks_read_bodies_through_the_spool_they_were_given(tmp_path: Path) -> None:
    spool, _, _ = reopen(tmp_path / "spool")
    meta = commit(spool, data=b"spooled data\n")
    source = Source()
    with open_body(SinkContext(bodies=source), meta.files[0]) as body:
        assert body.read() == b"from the backend"
    with open_control(SinkContext(bodies=source), meta) as body:
        assert body.read() == b"Hhost\n"
    assert source.asked == ["dfA001host", "cfA001host"]
    # The local spool, as a BodySource and as the default
    for context in (SinkContext(bodies=spool), SinkContext()):
        with open_body(context, meta.files[0]) as body:
            assert body.read() == b"spooled data\n"
        with open_control(context, meta) as body:
            assert body.read().startswith(b"Hhost\nPalice\n")
    spool.remove(meta.id)
    with pytest.raises(SpoolFileMissing):
        spool.open_body(meta.files[0])
    close(spool)


def test_a_short_body_is_missing_not_truncated(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"abc")
    with open_file_body(str(path), 0, 10) as body, pytest.raises(SpoolFileMissing):
        body.read()
