"""The queue states file and the lpdrelay_queue_state series (relay.queuestate, metrics)."""

from __future__ import annotations

from pathlib import Path

import orjson
from prometheus_client import CollectorRegistry

from relay.metrics import Metrics
from relay.queuestate import QueueStates, State


def test_states_are_written_and_read_back(tmp_path: Path) -> None:
    states = QueueStates(tmp_path)
    assert states.get("ward3") == State()
    states.change("ward3", disabled=True, stopped=True)
    states.change("lab", redirect="ward3")
    states.move(["000000000007"], "lab")
    again = QueueStates(tmp_path)
    assert again.get("ward3").notice() == "disabled, printing stopped"
    assert again.redirects() == {"lab": "ward3"}
    assert again.moved == {"000000000007": "lab"}
    again.change("ward3", disabled=False, stopped=False)
    raw = orjson.loads((tmp_path / "queue-states.json").read_bytes())
    assert "ward3" not in raw["queues"]      # a normal queue needs no entry


def test_an_unreadable_file_leaves_every_queue_normal(tmp_path: Path) -> None:
    (tmp_path / "queue-states.json").write_text("{not json")
    assert QueueStates(tmp_path).get("ward3") == State()


def test_queue_state_series_exist_for_configured_and_reloaded_queues() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg, queues=["ward3"], destinations=["dir:///tmp/x"])
    for state in ("disabled", "stopped", "redirected"):
        assert reg.get_sample_value("lpdrelay_queue_state",
                                    {"queue": "ward3", "state": state}) == 0
    assert reg.get_sample_value("lpdrelay_queue_state",
                                {"queue": "other", "state": "stopped"}) is None
    m.add_labels(["ward3", "lab"], ["dir:///tmp/y"])
    assert reg.get_sample_value("lpdrelay_queue_state", {"queue": "lab", "state": "stopped"}) == 0
    assert reg.get_sample_value("lpdrelay_jobs_delivered_total",
                                {"queue": "lab", "destination": "dir:///tmp/y"}) == 0
    assert reg.get_sample_value("lpdrelay_destination_up", {"destination": "dir:///tmp/y"}) == 1
