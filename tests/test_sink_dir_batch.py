"""The hot-folder sink's batch file work (relay._dirio) and a crash between its phases."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest
import trio

from relay import _dirio
from relay.sinks import SinkContext, make_sink
from relay.spool import JobMeta
from relay.uri import parse_destination
from tests.sinkjobs import Job, JobFile, make_job
from tests.test_sink_lpd import make_job as make_spooled_job
from tests.test_sink_lpd import make_job_in


def deliver_many(base: Path, jobs: list[JobMeta] | list[Job]) -> tuple[int, Exception | None]:
    sink = make_sink(parse_destination(f"dir://{base}"), SinkContext())

    async def main() -> tuple[int, Exception | None]:
        with trio.fail_after(20):
            return await sink.deliver_many(jobs)
    return trio.run(main)


def test_a_batch_of_small_jobs_opens_their_segment_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, first = make_spooled_job(tmp_path, [b"first\n"])
    jobs = [first] + [make_job_in(spool, n) for n in range(2, 7)]
    segments = tmp_path / "spool" / "segments"
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: object, *args: object, **kwargs: object) -> int:
        if str(path).startswith(str(segments)):
            opened.append(str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", counting_open)
    assert deliver_many(tmp_path / "out", jobs) == (6, None)
    monkeypatch.undo()
    assert len(opened) == 1, opened
    folder = tmp_path / "out" / "ward3"
    for n, job in enumerate(jobs, start=1):
        meta = orjson.loads((folder / f"{job.id}.json").read_bytes())
        [entry] = meta["files"]
        want = b"first\n" if n == 1 else f"job {n}\n".encode()
        assert Path(entry["path"]).read_bytes() == want
        assert entry["bytes"] == len(want)
    assert not [n for n in os.listdir(folder) if n.startswith(".")]


def test_a_leftover_dot_file_is_truncated_and_gets_the_mode(tmp_path: Path) -> None:
    job = make_job(tmp_path, [b"new body"])
    folder = tmp_path / "out" / "ward3"
    folder.mkdir(parents=True)
    leftover = folder / f".{job.id}-1.prn.tmp"
    leftover.write_bytes(b"an older, longer body left by a crash")
    leftover.chmod(0o666)
    old = os.umask(0o022)
    try:
        assert deliver_many(tmp_path / "out", [job]) == (1, None)
    finally:
        os.umask(old)
    final = folder / f"{job.id}-1.prn"
    assert final.read_bytes() == b"new body"
    assert final.stat().st_mode & 0o7777 == 0o640
    assert not leftover.exists()


def test_stage_stops_at_the_first_failure_and_reports_it(tmp_path: Path) -> None:
    src = tmp_path / "segment"
    src.write_bytes(b"0123456789")
    (tmp_path / "d").mkdir()
    dir_fd = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    fd = os.open(src, os.O_RDONLY)
    try:
        sizes, err, _ = _dirio.stage([dir_fd] * 3, [b".a", b"no/such/.b", b".c"], [fd, -1, fd],
                                     [2, 0, 0], [3, -1, 1], [None, b"x", None], 0o640, -1)
        assert (sizes, err) == ([3], errno.ENOENT)
        assert (tmp_path / "d" / ".a").read_bytes() == b"234"
        assert not (tmp_path / "d" / ".c").exists()
        sizes, err, copied = _dirio.stage([dir_fd, dir_fd], [b".e", b".f"], [-1, fd], [0, 8],
                                          [-1, 5], [b"meta", None], 0o640, -1)
        assert (sizes, err, copied) == ([4], _dirio.SHORT, 2)   # 2 of 5 bytes: short
        assert (tmp_path / "d" / ".e").read_bytes() == b"meta"
        assert _dirio.rename_all([dir_fd] * 3, [b".a", b".gone", b".e"], [b"a", b"g", b"e"]) \
            == (1, errno.ENOENT)
        assert sorted(os.listdir(tmp_path / "d")) == [".e", ".f", "a"]
        with pytest.raises(TypeError):       # neither a source nor bytes: never a crash
            _dirio.stage([dir_fd], [b".g"], [-1], [0], [-1], [None], 0o640, -1)
        with pytest.raises(TypeError):
            _dirio.stage([dir_fd], [".g"], [-1], [0], [-1], [b"x"], 0o640, -1)  # type: ignore[list-item]
    finally:
        os.close(fd)
        os.close(dir_fd)


def test_stage_falls_back_and_reports_no_error_when_the_fallback_copies(
        tmp_path: Path) -> None:
    # A pipe defeats copy_file_range (and sendfile on older kernels): the file
    # is still copied whole, and the fast path's errno is not reported.
    payload = os.urandom(200_000)
    read_end, write_end = os.pipe()
    (tmp_path / "d").mkdir()
    dir_fd = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)

    def feed() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        result = _dirio.stage([dir_fd], [b".p"], [read_end], [-1], [len(payload)], [None],
                              0o640, -1)
    finally:
        writer.join(10)
        os.close(read_end)
        os.close(dir_fd)
    assert result == ([len(payload)], 0, len(payload))
    assert (tmp_path / "d" / ".p").read_bytes() == payload


# Delivers one job in a child that dies (os._exit) at the n-th sync of the batch:
# after the data, after the renames and metadata, after the metadata renames.
_CRASH_SCRIPT = """
import os, sys, orjson, trio
from pathlib import Path
from relay.sinks import SinkContext, make_sink, dir as dirsink
from relay.uri import parse_destination
from tests.sinkjobs import make_job
work, out, at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
job = make_job(work, [3 * 1024 * 1024, b"small"])
print(orjson.dumps(job).decode(), flush=True)
real, calls = dirsink._Folders.sync, []
def sync(self, paths):
    real(self, paths)
    calls.append(1)
    if len(calls) == at:
        os._exit(9)
dirsink._Folders.sync = sync
trio.run(make_sink(parse_destination("dir://" + out), SinkContext()).deliver, job)
"""


@pytest.mark.parametrize("at", [1, 2, 3])
def test_a_crash_between_the_phases_shows_no_partial_file_and_redelivers(
        tmp_path: Path, at: int) -> None:
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(tmp_path), str(out),
                             str(at)], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 9, result.stderr
    doc = orjson.loads(result.stdout.splitlines()[0])
    job = Job(**{**doc, "files": tuple(JobFile(**f) for f in doc["files"])})
    folder = out / "ward3"
    bodies = {f"{job.id}-{i}.prn": Path(f.path).read_bytes()
              for i, f in enumerate(job.files, start=1)}
    seen = {n for n in os.listdir(folder) if not n.startswith(".")}
    # What a reader sees: nothing, the data files whole, or all of the job.
    assert seen in (set(), set(bodies), {*bodies, f"{job.id}.json"})
    for name in seen & set(bodies):
        assert (folder / name).read_bytes() == bodies[name]
    # The spool still has the job (deliver never returned): it comes again.
    assert deliver_many(out, [job]) == (1, None)
    names = sorted(os.listdir(folder))
    assert names == sorted([*bodies, f"{job.id}.json"])
    for name, body in bodies.items():
        assert (folder / name).read_bytes() == body
    assert len(orjson.loads((folder / f"{job.id}.json").read_bytes())["files"]) == 2
