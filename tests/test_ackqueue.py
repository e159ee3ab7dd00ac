"""Pipelined receive (relay.ackqueue): a sender that writes several jobs ahead gets
every reply in order, each job's final ack after its own commit, and a commit
that fails mid-session keeps the jobs before it and none after it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from relay.errors import SpoolError
from relay.sinks import SinkContext, make_sink
from relay.spool import IncomingJob, JobMeta, Spool
from relay.uri import parse_destination
from tests.relayproc import relay_lpq
from tests.test_relay_batching import _deliver, _jobs, _owners, _receiver


def _spooled_users(spool_dir: Path) -> list[str]:
    """The user (P line) of every job still in the receiver's spool, in id order."""
    return [job.user for job in Spool(str(spool_dir)).jobs()]


def _failing_commit(monkeypatch: pytest.MonkeyPatch, user: str, commits: list[str]) -> None:
    """Make the commit of ``user``'s job fail, slowly, so the jobs behind it commit first."""
    real = Spool.commit

    async def commit(self: Spool, job: IncomingJob, **kw: Any) -> JobMeta:
        marker = f"\nP{user}\n".encode()
        if marker in job.control_raw:
            await trio.sleep(0.3)
            job.discard()
            raise SpoolError("injected: the disk said no")
        meta = await real(self, job, **kw)
        commits.append(meta.user)
        return meta

    monkeypatch.setattr(Spool, "commit", commit)


def test_pipelined_jobs_are_acked_and_queued_in_order(tmp_path: Path) -> None:
    _, jobs = _jobs(tmp_path, 30)
    with _receiver(tmp_path) as b:
        sink = make_sink(parse_destination(f"lpd://127.0.0.1:{b.port}/q"), SinkContext())
        assert _deliver(sink, jobs) == (30, None)
        commits = b.registry.get_sample_value("lpdrelay_jobs_received_total", {"queue": "q"})
        answer = relay_lpq(b.port)
    assert commits == 30
    assert _owners(answer) == ["nurse"] + [f"u{n}" for n in range(2, 31)]


def test_a_failed_commit_mid_session_keeps_the_jobs_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, jobs = _jobs(tmp_path, 8)           # A's spool, before the receiver's is broken
    commits: list[str] = []
    _failing_commit(monkeypatch, "u4", commits)
    with _receiver(tmp_path) as b:
        sink = make_sink(parse_destination(f"lpd://127.0.0.1:{b.port}/q"), SinkContext())
        done, error = _deliver(sink, jobs)
        answer = relay_lpq(b.port)
    assert done == 3 and error is not None
    assert "0x02" in str(error)                      # retry later: it will be sent again
    assert _owners(answer) == ["nurse", "u2", "u3"]
    # Jobs behind the failed one may have committed meanwhile (the test slows
    # the failure down so they do); unacknowledged, they must not stay.
    assert any(u in commits for u in ("u5", "u6", "u7", "u8")), commits
    assert _spooled_users(tmp_path / "b-spool") == ["nurse", "u2", "u3"]
