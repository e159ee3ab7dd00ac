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

from relay import _core
from tests.daemon import RelayProcess, relay_config, write_config_file
from tests.lpdwire import Job, send_job

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
