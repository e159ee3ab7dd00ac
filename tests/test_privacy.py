"""``[privacy]`` (SPEC §11, docs/privacy.md): J/N/T values shown as ``keep``, ``hash``
(sha256: + 16 hex digits) or ``drop`` wherever they leave the job — log, hot-folder
metadata, lpq to peers outside admin_allow, ``spool show`` for non-root — and, with
``strip_downstream``, in the control file a destination receives."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import trio

from relay import log, spoolcli
from relay.controlfile import parse_control_file, redact_names
from relay.errors import ProtocolError
from relay.privacy import redact
from relay.spool import Spool
from tests.daemon import DaemonThread, relay_config, write_config_file
from tests.lpdwire import Job, send_job
from tests.relayproc import wait_until
from tests.test_removal import wire_from
from tests.test_retention import all_delivered, cli, hot_folder

PATIENT = "Doe Jane MRN4711"
TAG = "sha256:" + hashlib.sha256(PATIENT.encode()).hexdigest()[:16]
DOWN = "socket://127.0.0.1:1"


@dataclass
class PatientJob(Job):
    """A job whose J, N and T lines all carry the patient's name."""

    title: str = PATIENT

    def control(self) -> bytes:
        return super().control() + f"T{PATIENT}\n".encode()


def test_redact_keeps_hashes_or_drops_and_leaves_empty_values_empty() -> None:
    assert redact(PATIENT, "keep") == PATIENT
    assert redact(PATIENT, "hash") == TAG and len(TAG) == len("sha256:") + 16
    assert redact(PATIENT, "drop") == ""
    assert redact("", "hash") == "" and redact("", "drop") == ""
    with pytest.raises(ValueError):
        redact(PATIENT, "blur")


def test_redact_names_rewrites_only_j_n_and_t_lines() -> None:
    cf = parse_control_file(PatientJob().control())
    out = redact_names(cf, lambda v: redact(v, "hash")).serialize().decode()
    assert PATIENT not in out
    assert {line[:1] for line in out.splitlines() if TAG in line} == {"J", "N", "T"}
    assert {"Palice", "Hclient", "Lalice"} <= set(out.splitlines())


def test_a_malformed_name_line_is_refused_without_quoting_the_name() -> None:
    with pytest.raises(ProtocolError) as refused:
        parse_control_file(b"Hclient\nPalice\nJDoe Jane\x01MRN4711\n")
    assert "J line" in str(refused.value) and "Doe" not in str(refused.value)


@pytest.fixture
def captured_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    log.configure(fmt="json", level="debug", stream=stream)
    try:
        yield stream
    finally:
        log.configure()


def _config(tmp: Path, policy: str) -> dict[str, object]:
    return relay_config(
        tmp, server={"admin_allow": ["127.0.0.1/32"]}, privacy={"job_names": policy},
        retry={"initial": "1h", "max": "1h", "give_up_after": "24h"},
        queues={"q": {"destinations": [f"dir://{tmp / 'out'}"]},
                "down": {"destinations": [DOWN]}})


def _lpq(port: int, source: str) -> str:
    with wire_from(port, source) as w:
        w.send(b"\x03down\n")
        return w.read_all().decode()


def _show(cfg: Path, job: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
          euid: int) -> str:
    monkeypatch.setattr(spoolcli.os, "geteuid", lambda: euid)
    args = argparse.Namespace(action="show", job=[job], config=str(cfg), delivered=False,
                              to=None)
    assert spoolcli.main_spool(args) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("policy", ["hash", "drop"])
def test_no_job_name_leaves_the_job_in_logs_metadata_lpq_or_the_cli(
        tmp_path: Path, policy: str, captured_log: io.StringIO,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data = _config(tmp_path, policy)
    cfg = write_config_file(tmp_path / "relay.toml", data)
    with DaemonThread(data) as relay:
        assert all(r == 0 for r in send_job(relay.port, PatientJob(queue="q")))
        assert all(r == 0 for r in send_job(relay.port, PatientJob(queue="down", number="7")))
        [meta] = wait_until(lambda: hot_folder(tmp_path, "q"))
        waiting = wait_until(lambda: [j.id for j in Spool(tmp_path / "spool").jobs("down")])
        outside, admin = _lpq(relay.port, "127.0.0.2"), _lpq(relay.port, "127.0.0.1")
        listed = cli(cfg, "list").stdout
    assert PATIENT in admin                   # an admin_allow address sees the name
    shown = _show(cfg, waiting[0], monkeypatch, capsys, euid=1000)
    as_root = _show(cfg, waiting[0], monkeypatch, capsys, euid=0)
    assert PATIENT in as_root
    hot = meta.read_text()
    for text in (captured_log.getvalue(), hot, outside, listed, shown):
        assert PATIENT not in text and "MRN4711" not in text
    assert captured_log.getvalue().count("\n") > 3   # the daemon did log
    expected = TAG if policy == "hash" else ""
    record, hot_meta = orjson.loads(shown), orjson.loads(hot)
    assert record["title"] == record["job_name"] == expected and record["id"] == waiting[0]
    assert hot_meta["title"] == hot_meta["job_name"] == expected
    assert (TAG in outside) == (policy == "hash")


def _downstream_cf(tmp: Path, privacy: dict[str, object]) -> str:
    """The control file relay B keeps after relay A forwarded a patient job to it."""
    b_data = relay_config(tmp / "b", retention={"keep": "1h"},
                          queues={"q": {"destinations": [f"dir://{tmp / 'b' / 'out'}"]}})
    with DaemonThread(b_data) as b:
        a_data = relay_config(tmp / "a", privacy=privacy, queues={
            "q": {"destinations": [f"lpd://127.0.0.1:{b.port}/q?reserve=none"]}})
        with DaemonThread(a_data) as a:
            assert all(r == 0 for r in send_job(a.port, PatientJob(queue="q")))
            [kept] = all_delivered(tmp / "b", 1)
    spool = Spool(str(tmp / "b" / "spool"))      # B stopped: its job, files or a record
    spool.recover()
    try:
        with spool.open_control(spool.get(kept)) as body:
            return body.read().decode()
    finally:
        trio.run(spool.aclose)


def test_strip_downstream_rewrites_the_control_file_a_relay_receives(tmp_path: Path) -> None:
    stripped = _downstream_cf(tmp_path / "strip", {"job_names": "drop",
                                                   "strip_downstream": True})
    assert PATIENT not in stripped
    # J and T are sent empty; an N line left empty is dropped by the rewrite (SPEC §5)
    assert {line for line in stripped.splitlines() if line[:1] in "JNT"} == {"J", "T"}
    assert "Palice" in stripped.splitlines()
    unchanged = _downstream_cf(tmp_path / "keep", {"job_names": "hash"})
    assert f"J{PATIENT}" in unchanged.splitlines() and f"T{PATIENT}" in unchanged.splitlines()


def test_privacy_is_checked_at_load(tmp_path: Path) -> None:
    res = cli(write_config_file(tmp_path / "relay.toml", _config(tmp_path, "blur")), "list")
    assert res.returncode == 2 and "privacy.job_names" in res.stderr
    assert os.path.exists(tmp_path) and not (tmp_path / "spool").exists()
