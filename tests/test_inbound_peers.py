"""Real clients against the relay: LPRng's lpr/lpq/lprm and rlpr (SPEC §4), and the
whole chain lpr -> relay -> LPRng lpd."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.spool import Spool
from tests.daemon import DaemonThread, relay_config
from tests.peers import LprngServer, lpq, lpr, lprm, rlpr
from tests.test_server import delivered, file_bytes, wait_for

pytestmark = pytest.mark.peers


@pytest.fixture
def relay(tmp_path: Path):  # type: ignore[no-untyped-def]
    with DaemonThread(relay_config(tmp_path)) as daemon:
        yield daemon


def test_lprng_lpr_several_files(relay, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = []
    for i, size in enumerate((10, 70_000, 3)):
        path = tmp_path / f"part{i}.txt"
        path.write_bytes(bytes([65 + i]) * size)
        files.append(path)
    result = lpr(relay.port, "Ward3", *files, user="nurse", title="chart")
    assert result.returncode == 0, result.stderr
    (meta,) = delivered(tmp_path / "out", "Ward3")
    assert meta["user"] == "nurse"
    assert file_bytes(meta) == [p.read_bytes() for p in files]


@pytest.mark.parametrize("conf", [(), ("send_data_first",)])
def test_lprng_lpr_stdin_streamed_and_data_first(relay, tmp_path: Path, conf) -> None:  # type: ignore[no-untyped-def]
    payload = b"streamed from stdin\n" * 5000
    stream = not conf   # "-k" (length 0, until close) needs the control file first
    result = lpr(relay.port, "q", stdin=payload, stream=stream, conf=conf)
    assert result.returncode == 0, result.stderr
    (meta,) = delivered(tmp_path / "out", "q")
    assert file_bytes(meta) == [payload]


def test_rlpr(relay, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    doc = tmp_path / "doc.txt"
    doc.write_bytes(b"from rlpr\n")
    result = rlpr(relay.port, "q", doc, user="bob", no_bind=True)
    assert result.returncode == 0, result.stderr
    (meta,) = delivered(tmp_path / "out", "q")
    assert file_bytes(meta) == [b"from rlpr\n"] and meta["user"] == "bob"


def test_lprng_lpq_and_lprm_see_relay_jobs(tmp_path: Path) -> None:
    # Nothing listens on port 1: jobs wait in the relay's queue.
    cfg = relay_config(tmp_path, queues={"ward3": {"destinations": ["socket://127.0.0.1:1"]}},
                       retry={"initial": "1h", "max": "1h", "give_up_after": "24h"})
    with DaemonThread(cfg) as relay:
        for user in ("alice", "bob"):
            assert lpr(relay.port, "ward3", stdin=b"x\n", user=user).returncode == 0
        wait_for(lambda: relay.metric("lpdrelay_jobs_received_total", queue="ward3") == 2)
        out = lpq(relay.port, "ward3").stdout.decode()
        assert "alice" in out and "bob" in out and "socket://127.0.0.1:1" in out
        jobs = [j for j in relay_jobs(tmp_path) if j]
        assert len(jobs) == 2
        result = lprm(relay.port, "ward3", "all")   # sent as "05 ward3 root all"
        assert result.returncode == 0, result.stderr
        wait_for(lambda: not relay_jobs(tmp_path) or None)


def relay_jobs(tmp_path: Path) -> list[str]:
    """Ids of the jobs in the relay's spool (files or segment records)."""
    return [j.id for j in Spool(tmp_path / "spool").jobs()]


def test_chain_lpr_relay_lprng(tmp_path: Path) -> None:
    with LprngServer(tmp_path / "lprng", queues=("Ward3",)) as upstream:
        cfg = relay_config(tmp_path, queues={"ward3": {
            "destinations": [f"lpd://127.0.0.1:{upstream.port}/Ward3"]}})
        with DaemonThread(cfg) as relay:
            payload = b"%!PS\n" + b"page\n" * 2000
            assert lpr(relay.port, "WARD3", stdin=payload, user="nurse").returncode == 0
            (job,) = upstream.wait_jobs("Ward3", 1, timeout=20)
            assert job.data == payload and job.user == "nurse"
            wait_for(lambda: relay.metric("lpdrelay_jobs_delivered_total", queue="ward3",
                                          destination=f"lpd://127.0.0.1:{upstream.port}/Ward3")
                     == 1)
