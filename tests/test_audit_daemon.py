"""The audit log of a real relay process (SPEC §11): a mixed run, kill -9, the ack rule."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from relay.audit import AuditLog
from relay.auditchain import records, verify
from tests.daemon import ROOT, DaemonThread, RelayProcess, relay_config, write_config_file
from tests.lpdwire import Job, Wire, send_job


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "audit" / "audit.log"


def audit_records(tmp_path: Path) -> list[dict[str, Any]]:
    path = audit_path(tmp_path)
    return [orjson.loads(line) for _f, _n, line in records(str(path))
            if line.endswith(b"\n")] if path.exists() else []


def wait_record(tmp_path: Path, timeout: float = 20, **match: object) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in audit_records(tmp_path):
            if all(rec.get(k) == v for k, v in match.items()):
                return rec
        time.sleep(0.05)
    raise AssertionError(f"no audit record {match}: {audit_records(tmp_path)[-5:]}")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)


def mixed_config(tmp_path: Path, workers: int = 1) -> Path:
    down = f"lpd://127.0.0.1:{closed_port()}/x?reserve=none&timeout=2s"
    data = relay_config(tmp_path, server={"workers": workers}, metrics={"listen": ""},
                        audit={"rotate_keep": 10},
                        retry={"initial": "1h", "max": "1h"},
                        queues={"q": {"destinations": [f"dir://{tmp_path / 'out'}"],
                                      "retention": {"keep": "8s"}},
                                "bad": {"destinations": [down], "retry": {"give_up_after": "0s"}},
                                "slow": {"destinations": [down]}})
    return write_config_file(tmp_path / "relay.toml", data)


# workers = 2: the main process writes the worker's received/acknowledged records
# (with the SHA-256s the worker took) before the worker sends the final ack.
@pytest.mark.parametrize("workers", [1, 2])
def test_a_mixed_run_leaves_a_whole_chain_of_every_event(tmp_path: Path, workers: int) -> None:
    cfg = mixed_config(tmp_path, workers)
    data = b"%PDF-1.4 patient chart\n" * 40
    with RelayProcess(cfg) as relay:
        assert send_job(relay.port, Job(queue="q", number="101", files=[data])) == [0] * 5
        delivered = wait_record(tmp_path, event="delivered", queue="q")
        reprint = cli("spool", "reprint", delivered["job"], "-c", str(cfg))   # kept 8 s
        assert reprint.returncode == 0, reprint.stderr
        reprinted = wait_record(tmp_path, event="reprinted", original=delivered["job"])
        wait_record(tmp_path, event="delivered", job=reprinted["job"])
        assert send_job(relay.port, Job(queue="bad", number="102")) == [0] * 5
        assert send_job(relay.port, Job(queue="slow", number="103")) == [0] * 5
        held = wait_record(tmp_path, event="held", queue="bad")
        slow = wait_record(tmp_path, event="attempt", queue="slow", result="retry")
        with Wire(relay.port) as w:                     # lprm -Pslow 103 as alice
            w.send(b"\x05slow alice 103\n")
            assert b"dequeued" in w.read_all()
        removed = wait_record(tmp_path, event="removed", job=slow["job"])
        assert cli("ctl", "bad", "release", "all", "-c", str(cfg)).returncode == 0
        released = wait_record(tmp_path, event="released", job=held["job"])
        deadline = time.monotonic() + 20
        while sum(r["event"] == "held" for r in audit_records(tmp_path)) < 2:
            assert time.monotonic() < deadline, "the released job was not held again"
            time.sleep(0.05)
        retried = cli("spool", "retry", held["job"], "-c", str(cfg))
        assert retried.returncode == 0, retried.stderr
        by_cli = wait_record(tmp_path, event="released", by="cli")
        wait_record(tmp_path, event="expired", job=delivered["job"], timeout=90)
        assert relay.terminate() == 0
    result = cli("audit", "verify", "-c", str(cfg))
    assert result.returncode == 0, result.stdout + result.stderr
    recs = audit_records(tmp_path)
    events = [r["event"] for r in recs]
    assert events[0] == "start" and events[1] == "config" and events[-1] == "stop"
    assert {"received", "acknowledged", "attempt", "delivered", "held", "released",
            "removed", "reprinted", "expired"} <= set(events)
    assert recs[1]["config_sha256"] == hashlib.sha256(cfg.read_bytes()).hexdigest()
    received = next(r for r in recs if r["event"] == "received" and r["job_number"] == "101")
    assert received["files"] == [{"name": "dfA101client", "format": "l", "bytes": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest()}]
    assert (received["queue"], received["wire_queue"], received["user"], received["host"]) == \
        ("q", "q", "alice", "client")
    assert received["peer"].startswith("127.0.0.1:")
    acked = next(r for r in recs if r["event"] == "acknowledged" and r["job"] == received["job"])
    assert acked["seq"] > received["seq"]
    assert removed["by"] == "lprm:alice@127.0.0.1" and removed["user"] == "alice"
    assert released["by"] == "lpc:root@127.0.0.1"
    assert by_cli["job"] == held["job"]
    assert "gave up" in held["reason"]
    assert all(set(r) <= set(_KEYS) for r in recs)
    assert reprinted["by"] == "cli" and reprinted["job"] != delivered["job"]
    shown = cli("audit", "show", "-c", str(cfg), "--job", received["job"])
    assert [line.split()[2] for line in shown.stdout.splitlines()] == \
        ["received", "acknowledged", "attempt", "delivered", "expired"]


_KEYS = ("seq", "ts", "event", "job", "queue", "wire_queue", "job_number", "user", "host",
         "peer", "tls_peer", "files", "destination", "result", "reason", "by", "original",
         "config_sha256", "prev", "hash")


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_leaves_a_verifiable_chain_holding_every_acknowledged_job(
        tmp_path: Path, workers: int) -> None:
    data = relay_config(tmp_path, server={"workers": workers}, metrics={"listen": ""},
                        audit={"rotate_keep": 10},
                        queues={"q": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    cfg = write_config_file(tmp_path / "relay.toml", data)
    acked: list[str] = []
    lock = threading.Lock()

    def sender(first: int) -> None:
        for n in range(first, first + 10):
            if send_job(relay.port, Job(number=str(n))) == [0] * 5:
                with lock:
                    acked.append(str(n))

    relay = RelayProcess(cfg).start()
    try:
        threads = [threading.Thread(target=sender, args=(100 + 10 * i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        relay.kill9()              # right after the last ack: nothing more is flushed
    finally:
        if relay.proc is not None and relay.proc.poll() is None:
            relay.kill9()
    assert len(acked) == 80
    assert verify(str(audit_path(tmp_path))) is None
    for event in ("received", "acknowledged"):
        numbers = {r["job_number"] for r in audit_records(tmp_path) if r["event"] == event}
        assert set(acked) <= numbers, event
    with RelayProcess(cfg) as again:             # the chain goes on after the crash
        assert send_job(again.port, Job(number="999")) == [0] * 5
        assert again.terminate() == 0
    assert verify(str(audit_path(tmp_path))) is None
    events = [r["event"] for r in audit_records(tmp_path)]
    assert events.count("start") == 2 and events[-1] == "stop"


def test_each_reload_records_the_hash_of_the_file(tmp_path: Path) -> None:
    data = relay_config(tmp_path, metrics={"listen": ""}, audit={"rotate_keep": 10},
                        queues={"q": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    cfg = write_config_file(tmp_path / "relay.toml", data)
    with RelayProcess(cfg) as relay:
        first = wait_record(tmp_path, event="config")
        assert first["config_sha256"] == hashlib.sha256(cfg.read_bytes()).hexdigest()
        cfg.write_text(cfg.read_text() + "# edited\n")
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGHUP)
        second = wait_record(tmp_path, event="config",
                             config_sha256=hashlib.sha256(cfg.read_bytes()).hexdigest())
        assert second["seq"] > first["seq"]
        assert relay.terminate() == 0
    assert verify(str(audit_path(tmp_path))) is None


def test_the_final_ack_waits_for_the_received_record_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    appended: list[str] = []
    real = AuditLog._append

    def slow_append(self: AuditLog, batch: list[dict[str, Any]]) -> None:
        if any(r["event"] == "received" for r in batch):
            assert gate.wait(20), "the test never opened the gate"
        real(self, batch)
        appended.extend(r["event"] for r in batch)

    monkeypatch.setattr(AuditLog, "_append", slow_append)
    job = Job(number="321")
    with DaemonThread(relay_config(tmp_path, audit={"rotate_keep": 10})) as relay, \
            Wire(relay.port) as w:
        w.send(b"\x02q\n")
        assert w.reply() == 0
        w.send(b"\x02%d %s\n" % (len(job.control()), job.cf_name.encode()))
        assert w.reply() == 0
        w.send(job.control() + b"\x00")
        assert w.reply() == 0
        data = job.files[0]
        w.send(b"\x03%d %s\n" % (len(data), job.df_names()[0].encode()))
        assert w.reply() == 0
        w.send(data + b"\x00")                    # the job is complete: committed, not acked
        w.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            w.reply()
        assert "received" not in appended
        gate.set()
        w.sock.settimeout(10)
        assert w.reply() == 0
        assert "received" in appended              # written (and fdatasync'd) before the ack
    assert wait_record(tmp_path, event="received", job_number="321")
