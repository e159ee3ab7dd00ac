"""The hot-folder sink (SPEC §3.3) and the sink registry it is built through."""

from __future__ import annotations

import dataclasses
import errno
import grp
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest
import trio

from relay.config import config_from_dict
from relay.errors import SinkRejected, SinkUnavailable, SpoolFileMissing
from relay.sinks import Sink, SinkContext, config_warnings, make_sink, register
from relay.sinks.dir import (
    DirSink,
    _copy_buffered,
    _copy_fd,
    _copy_from,
    data_file_name,
    extension_for,
)
from relay.uri import parse_destination
from tests.sinkjobs import Job, make_job


def deliver(sink: Sink, job: Job, seconds: float = 20.0) -> None:
    async def main() -> None:
        with trio.fail_after(seconds):
            await sink.deliver(job)
    trio.run(main)


def hot_folder(base: Path) -> Sink:
    return make_sink(parse_destination(f"dir://{base}"), SinkContext())


def visible(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_registry_builds_a_dir_sink_and_describes_it(tmp_path: Path) -> None:
    sink = hot_folder(tmp_path / "out")
    assert isinstance(sink, DirSink)
    assert sink.describe() == f"hot folder {tmp_path}/out/<queue>/"


def test_registry_refuses_unknown_schemes_and_double_registration() -> None:
    destination = dataclasses.replace(parse_destination("dir:///tmp/x"), scheme="ipp")
    with pytest.raises(ValueError, match="no sink for scheme 'ipp'"):
        make_sink(destination, SinkContext())
    register("dir", DirSink)  # the same factory again is harmless
    with pytest.raises(ValueError, match="already registered"):
        register("dir", lambda destination, context: DirSink(destination, context))


def test_job_lands_with_data_files_and_metadata(tmp_path: Path) -> None:
    job = make_job(tmp_path, [b"%!PS-Adobe\nshowpage\n", b"plain text\n", b"\x1b%-12345X@PJL"],
                   formats="ofl", title="Entlassbrief \u00e4\u00f6\u00fc")
    deliver(hot_folder(tmp_path / "out"), job)

    folder = tmp_path / "out" / "ward3"
    names = [f"{job.id}-1.ps", f"{job.id}-2.txt", f"{job.id}-3.prn"]
    assert visible(folder) == sorted([*names, f"{job.id}.json"])
    for name, spool_file in zip(names, job.files, strict=True):
        assert (folder / name).read_bytes() == Path(spool_file.path).read_bytes()

    meta = orjson.loads((folder / f"{job.id}.json").read_bytes())
    assert meta["job"] == job.id
    assert (meta["queue"], meta["wire_queue"]) == ("ward3", "ward3")
    assert (meta["user"], meta["host"]) == ("alice", "ward3-pc")
    assert meta["title"] == "Entlassbrief \u00e4\u00f6\u00fc"
    assert meta["received"] == "2023-11-14T22:13:20.250Z"
    assert (meta["peer"], meta["number"], meta["job_name"]) == (job.peer, job.number, job.title)
    assert meta["files"] == [
        {"name": f.name, "format": f.format, "bytes": f.bytes, "path": str(folder / name)}
        for f, name in zip(job.files, names, strict=True)
    ]


def test_catch_all_uses_the_sanitised_wire_name(tmp_path: Path) -> None:
    job = make_job(tmp_path, [b"x"], queue="*", wire_queue="../HP Ward/3")
    deliver(hot_folder(tmp_path / "out"), job)
    assert visible(tmp_path / "out") == ["_._HP_Ward_3"]
    meta_path = tmp_path / "out" / "_._HP_Ward_3" / f"{job.id}.json"
    assert orjson.loads(meta_path.read_bytes())["wire_queue"] == "../HP Ward/3"


def test_redelivery_overwrites_instead_of_duplicating(tmp_path: Path) -> None:
    job = make_job(tmp_path, [b"first", b"second"])
    sink = hot_folder(tmp_path / "out")
    deliver(sink, job)
    before = visible(tmp_path / "out" / "ward3")
    Path(job.files[0].path).write_bytes(b"FIRST, again")
    deliver(sink, dataclasses.replace(
        job, files=(dataclasses.replace(job.files[0], bytes=12), job.files[1])))
    assert visible(tmp_path / "out" / "ward3") == before
    assert (tmp_path / "out" / "ward3" / f"{job.id}-1.prn").read_bytes() == b"FIRST, again"


def test_missing_base_folder_is_created(tmp_path: Path) -> None:
    job = make_job(tmp_path, [b"data"])
    deliver(hot_folder(tmp_path / "a" / "b" / "out"), job)
    assert (tmp_path / "a" / "b" / "out" / "ward3" / f"{job.id}-1.prn").read_bytes() == b"data"


def test_job_without_data_files_gets_only_metadata(tmp_path: Path) -> None:
    job = make_job(tmp_path, [])
    deliver(hot_folder(tmp_path / "out"), job)
    assert visible(tmp_path / "out" / "ward3") == [f"{job.id}.json"]


def test_base_path_that_is_a_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(SinkUnavailable, match=r"hot folder .*out/ward3"):
        deliver(hot_folder(tmp_path / "out"), make_job(tmp_path, [b"x"]))


def test_missing_spool_file_is_spool_file_missing(tmp_path: Path) -> None:
    job = make_job(tmp_path, [b"x", b"y"])
    os.unlink(job.files[1].path)
    with pytest.raises(SpoolFileMissing, match="cannot be read") as caught:
        deliver(hot_folder(tmp_path / "out"), job)
    assert (caught.value.path, caught.value.errno) == (job.files[1].path, errno.ENOENT)
    # The first file may be in place, but no dot-file and no metadata.
    assert not [n for n in visible(tmp_path / "out" / "ward3") if n.startswith(".") or
                n.endswith(".json")]


def test_unsafe_job_id_is_refused(tmp_path: Path) -> None:
    job = dataclasses.replace(make_job(tmp_path, [b"x"]), id="../../etc/passwd")
    with pytest.raises(SinkRejected, match="not safe"):
        deliver(hot_folder(tmp_path / "out"), job)
    assert not (tmp_path / "out").exists()


def test_readers_never_see_partial_files(tmp_path: Path) -> None:
    sizes = [24 * 1024 * 1024, 3, 8 * 1024 * 1024]
    job = make_job(tmp_path, sizes)
    folder = tmp_path / "out" / "ward3"
    folder.mkdir(parents=True)
    final = {data_file_name(job.id, i, "l"): size for i, size in enumerate(sizes, start=1)}
    done = threading.Event()
    problems: list[str] = []

    def watch() -> None:
        for _ in range(1_000_000):  # bounded; ends when delivery is done
            if done.is_set():
                return
            names = {n for n in os.listdir(folder) if not n.startswith(".")}
            if f"{job.id}.json" in names and not set(final) <= names:
                problems.append("metadata visible before the data files")
            for name in names & set(final):
                try:
                    size = os.stat(folder / name).st_size
                except FileNotFoundError:
                    continue
                if size != final[name]:
                    problems.append(f"{name} visible at {size} bytes")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        deliver(hot_folder(tmp_path / "out"), job)
    finally:
        done.set()
        watcher.join(10)
    assert not problems
    assert set(visible(folder)) == {*final, f"{job.id}.json"}


def test_copy_falls_back_when_zero_copy_is_impossible(tmp_path: Path) -> None:
    # A pipe as the source defeats copy_file_range (and sendfile on older
    # kernels): the buffered path must still copy every byte.
    payload = os.urandom(300_000)
    read_end, write_end = os.pipe()

    def feed() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)

    writer = threading.Thread(target=feed)
    writer.start()
    with open(tmp_path / "copy", "wb") as out:
        copied = _copy_fd(read_end, out.fileno())
    writer.join(10)
    os.close(read_end)
    assert copied == len(payload)
    assert (tmp_path / "copy").read_bytes() == payload


def test_extensions_follow_the_format_letter() -> None:
    assert [extension_for(c) for c in "olfpdvZ"] == ["ps", "prn", "txt", "txt", "dvi", "ras",
                                                     "prn"]


_FULL_DISK_SCRIPT = """
import sys, trio
from relay.sinks import SinkContext, make_sink
from relay.uri import parse_destination
from relay.errors import SinkUnavailable
from tests.sinkjobs import make_job
from pathlib import Path
work, out = Path(sys.argv[1]), sys.argv[2]
job = make_job(work, [4 * 1024 * 1024])
sink = make_sink(parse_destination("dir://" + out), SinkContext())
try:
    trio.run(sink.deliver, job)
except SinkUnavailable as exc:
    print("UNAVAILABLE", exc)
"""


@pytest.mark.root
def test_full_disk_is_unavailable_and_leaves_no_dot_files(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare to mount a tiny tmpfs")
    out = tmp_path / "small"
    out.mkdir()
    script = ('mount -t tmpfs -o size=1m tmpfs "$2" && "$0" -c "$1" "$3" "$2/out"; '
              'ls -A "$2/out/ward3"')
    result = subprocess.run(
        [unshare, "-m", "--propagation", "private", "sh", "-c", script,
         sys.executable, _FULL_DISK_SCRIPT, str(out), str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    if "mount:" in result.stderr:
        pytest.skip(f"cannot mount tmpfs here: {result.stderr.strip()}")
    assert "UNAVAILABLE" in result.stdout, result.stderr
    assert "disk full" in result.stdout
    assert "ENOSPC" in result.stdout
    # The listing of the queue folder after the failure: nothing half-written.
    assert result.stdout.strip().splitlines()[-1].startswith("UNAVAILABLE")


def modes(base: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (permission bits, gid) of everything under ``base``, base included."""
    found = {".": (base.stat().st_mode & 0o7777, base.stat().st_gid)}
    for path in base.rglob("*"):
        st = path.stat()
        found[str(path.relative_to(base))] = (st.st_mode & 0o7777, st.st_gid)
    return found


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_files_are_0640_and_folders_0750_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    job = make_job(tmp_path, [b"x", b"y"])
    old = os.umask(umask)
    try:
        deliver(hot_folder(tmp_path / "out" / "base"), job)
    finally:
        os.umask(old)
    found = modes(tmp_path / "out")
    gid = os.getegid()
    assert found == {
        ".": (0o750, gid), "base": (0o750, gid), "base/ward3": (0o750, gid),
        f"base/ward3/{job.id}-1.prn": (0o640, gid), f"base/ward3/{job.id}-2.prn": (0o640, gid),
        f"base/ward3/{job.id}.json": (0o640, gid)}


def test_an_existing_folder_keeps_its_mode(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir(mode=0o755)
    os.chmod(tmp_path / "out", 0o755)
    deliver(hot_folder(tmp_path / "out"), make_job(tmp_path, [b"x"]))
    assert modes(tmp_path / "out")["."][0] == 0o755
    assert modes(tmp_path / "out")["ward3"][0] == 0o750


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_destination_sets_its_own_mode_and_group(tmp_path: Path, umask: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving files another group needs root (or membership of it)")
    group = grp.getgrnam("daemon")
    sink = make_sink(parse_destination(f"dir://{tmp_path / 'out'}?mode=0660&group=daemon"),
                     SinkContext())
    assert sink.describe().endswith('/<queue>/ (mode 0660, group "daemon")')
    job = make_job(tmp_path, [b"x"])
    old = os.umask(umask)
    try:
        deliver(sink, job)
        # A leftover dot-file from a crash keeps nothing of its old mode either.
        stale = tmp_path / "out" / "ward3" / f".{job.id}.json.tmp"
        stale.write_bytes(b"{")
        os.chmod(stale, 0o604)
        deliver(sink, job)
    finally:
        os.umask(old)
    found = modes(tmp_path / "out")
    gid = group.gr_gid
    assert found == {".": (0o770, gid), "ward3": (0o770, gid),
                     f"ward3/{job.id}-1.prn": (0o660, gid), f"ward3/{job.id}.json": (0o660, gid)}


def test_numeric_gid_is_taken_as_is(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving files another group needs root")
    sink = make_sink(parse_destination(f"dir://{tmp_path / 'out'}?group=54321&mode=640"),
                     SinkContext())
    job = make_job(tmp_path, [b"x"])
    deliver(sink, job)
    assert (tmp_path / "out" / "ward3" / f"{job.id}.json").stat().st_gid == 54321


def test_group_the_daemon_cannot_give_is_a_config_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_from_dict({"server": {"spool_dir": str(tmp_path / "spool")}, "queues": {
        "ward3": {"destinations": ["dir:///srv/a?group=daemon", "dir:///srv/b"]}}}, "<test>")
    if os.geteuid() == 0:
        assert config_warnings(config) == []    # root may give any group
    # As an unprivileged user outside the group:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getegid", lambda: 1000)
    monkeypatch.setattr(os, "getgroups", lambda: [1000])
    assert config_warnings(config) == [
        'queues.ward3.destinations[0]: group "daemon": the daemon\'s user is not a member, '
        "so hot-folder files cannot be given this group"]


def test_a_body_range_is_copied_exactly_and_a_short_one_is_missing(tmp_path: Path) -> None:
    # A small job's body is a range of a segment file: copied with offsets,
    # every fallback too, and a body shorter than its record is the spool's fault.
    src = tmp_path / "segment"
    src.write_bytes(b"h" * 100 + b"the body" + b"t" * 100)
    fd = os.open(src, os.O_RDONLY)
    try:
        for copy in (_copy_fd, _copy_buffered):
            with open(tmp_path / "out", "wb") as out:
                assert copy(fd, out.fileno(), 100, 8) == 8
            assert (tmp_path / "out").read_bytes() == b"the body"
    finally:
        os.close(fd)
    with open(tmp_path / "out", "wb") as out:
        assert _copy_from(str(src), 208, out.fileno()) == 208
        with pytest.raises(SpoolFileMissing):
            _copy_from(str(src), 300, out.fileno())
        with pytest.raises(SpoolFileMissing):
            _copy_from(str(tmp_path / "gone"), 1, out.fileno())
