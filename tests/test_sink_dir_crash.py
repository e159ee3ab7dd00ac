"""The hot-folder sink's batching loses nothing on ``kill -9`` (docs/delivery.md).

A real daemon delivers a few hundred spooled jobs to ``dir://`` in batches and
is killed mid-delivery; after a restart every job is in the hot folder once
(one ``.json`` and one data file per spool id, a redelivery overwriting its
earlier copy) and intact, with no dot-file left behind.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

import orjson
import trio

from relay import _core
from relay.errors import SpoolFileMissing
from relay.sinks import SinkContext, make_sink
from relay.uri import parse_destination
from tests.daemon import RelayProcess, relay_config, write_config_file
from tests.lpdwire import Job, send_job
from tests.test_sink_lpd import make_job, make_job_in

JOBS = 300


def _config(tmp: Path, out: Path) -> Path:
    data = relay_config(tmp, server={"spool_dir": str(tmp / "spool"), "fsync": "always"},
                        metrics={"listen": ""}, log={"format": "json", "level": "warning"},
                        retry={"initial": "1h", "max": "1h"},
                        queues={"q": {"destinations": [f"dir://{out}"], "concurrency": 4}})
    return write_config_file(tmp / "relay.toml", data)


def _payload(i: int) -> bytes:
    return f"job {i:04d} ".encode() * (50 + i % 7)


def _metas(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".json")] if folder.is_dir() else []


def _wake(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(_core.print_waiting("q"))
        s.recv(16)


def _wait(check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.002)
    raise AssertionError(f"not reached within {timeout}s")


def test_kill_9_mid_batch_leaves_every_job_once_and_intact(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("not a folder yet")      # every delivery fails and backs off an hour
    folder = out / "q"
    cfg = _config(tmp_path, out)
    relay = RelayProcess(cfg).start()
    try:
        for i in range(JOBS):
            assert send_job(relay.port, Job(number=f"{i % 1000:03d}", files=[_payload(i)])) \
                == [0, 0, 0, 0, 0]
        out.unlink()
        out.mkdir()
        _wake(relay.port)
        _wait(lambda: len(_metas(folder)) >= 20, timeout=60)
        relay.kill9()
        at_kill = len(_metas(folder))
    finally:
        relay.kill9() if relay.proc is not None and relay.proc.poll() is None else None
    assert at_kill < JOBS, "all delivered before the kill: the test proved nothing"
    with RelayProcess(cfg):
        _wait(lambda: len(_metas(folder)) >= JOBS, timeout=120)
        time.sleep(0.2)    # nothing more may arrive
        names = sorted(os.listdir(folder))
    assert not [n for n in names if n.startswith(".")], names
    metas = [n for n in names if n.endswith(".json")]
    assert len(metas) == JOBS
    seen = []
    for meta in metas:
        doc = orjson.loads((folder / meta).read_bytes())
        [entry] = doc["files"]
        data = Path(entry["path"]).read_bytes()
        assert len(data) == entry["bytes"]
        seen.append(hashlib.sha256(data).hexdigest())
    want = sorted(hashlib.sha256(_payload(i)).hexdigest() for i in range(JOBS))
    assert sorted(seen) == want          # each job once, byte for byte
    assert len([n for n in names if not n.endswith(".json")]) == JOBS


def test_a_job_that_cannot_be_copied_stops_the_batch_after_the_ones_before(
        tmp_path: Path) -> None:
    spool, first = make_job(tmp_path / "a", [b"first\n"], segment_threshold=0)   # own files
    jobs = [first] + [make_job_in(spool, n) for n in (2, 3)]
    os.unlink(jobs[1].files[0].path)          # job 2's data file vanished
    sink = make_sink(parse_destination(f"dir://{tmp_path / 'out'}"), SinkContext())
    assert sink.batch > 1

    async def main() -> tuple[int, Exception | None]:
        with trio.fail_after(20):
            return await sink.deliver_many(jobs)
    done, error = trio.run(main)
    assert done == 1 and isinstance(error, SpoolFileMissing)
    names = os.listdir(tmp_path / "out" / "ward3")
    assert sorted(n for n in names if n.endswith(".json")) == [f"{first.id}.json"]
    assert not [n for n in names if n.startswith(".")]
