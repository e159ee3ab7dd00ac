"""docs/field-guide.md points at real things: every metric, alert, log event,
rejection reason and retry reason it names exists in the code, and the Windows
fake length it quotes is the one the core recognises."""

from __future__ import annotations

import errno
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from relay import _core
from relay.errors import REJECT_REASONS, RETRY_REASONS, reason_for_errno
from relay.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
GUIDE = (ROOT / "docs" / "field-guide.md").read_text()


def test_metrics_named_exist() -> None:
    registry = CollectorRegistry()
    Metrics(registry, queues=["q"], destinations=["lpd://h/q"])
    known = {m.name for m in registry.collect()}
    known |= {f"{n}_total" for n in known}
    named = set(re.findall(r"lpdrelay_[a-z_]+", GUIDE))
    assert named and named <= known, named - known


def test_alerts_named_exist() -> None:
    alerts = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    for name in set(re.findall(r"`(LpdRelay\w+)`", GUIDE)):
        assert f"alert: {name}" in alerts, name


def test_log_events_named_exist() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "relay").glob("*.py"))
    events = set(re.findall(r"`(job_\w+|connection_\w+)`", GUIDE))
    assert {"job_refused", "connection_refused", "job_received", "job_delivered"} <= events
    for event in events:
        assert f'"{event}"' in source, event


def test_reasons_named_exist() -> None:
    rejected = re.findall(r'reason="?(\w+)"?\}', GUIDE)
    table = re.search(r"lpdrelay_jobs_rejected_total\{reason\}` \(([^)]*)\)", GUIDE)
    assert table
    rejected += re.findall(r"`(\w+)`", table.group(1))
    assert set(rejected) <= set(REJECT_REASONS), set(rejected) - set(REJECT_REASONS)
    retry = re.search(r"says why \(([^)]*)\)", GUIDE)
    assert retry
    # The socket errors behind each reason the guide names map to it.
    examples = {"refused": errno.ECONNREFUSED, "timeout": errno.ETIMEDOUT,
                "reset": errno.ECONNRESET}
    named = re.findall(r"`(\w+)`", retry.group(1))
    assert named and set(named) <= set(RETRY_REASONS), set(named) - set(RETRY_REASONS)
    for reason in named:
        if reason in examples:
            assert reason_for_errno(examples[reason]) == reason


def test_windows_fake_length_is_the_cores() -> None:
    assert f"`{_core.LENGTH_WINDOWS}`" in GUIDE
