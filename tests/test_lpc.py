"""LPRng's real ``lpc`` and ``lpd-relay ctl`` against a relay process (docs/server.md).

lpc runs as root (a reserved source port) in a private mount namespace with
its own /etc/lprng, as the suite runs every LPRng client (tests/peers).
"""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.lpdwire import Job, send_job
from tests.peers.clients import _lprng_client, lpq
from tests.relayproc import LoggedRelay, wait_until
from tests.test_reload import cli, config, down, hot, out


def lpc(relay: LoggedRelay, *args: str, queue: str = "ward3",
        reserved: bool = True) -> str:
    """``lpc -P queue@127.0.0.1%port ARGS``; ``Q`` in ARGS stands for that printer."""
    printer = f"{queue}@127.0.0.1%{relay.port}"
    result = _lprng_client("lpc", ["-P", printer, *(printer if a == "Q" else a for a in args)],
                           stdin=None, timeout=20,
                           conf=() if reserved else ("originate_port=",))
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def metric(relay: LoggedRelay, queue: str, state: str) -> float:
    with urllib.request.urlopen(relay.metrics_url(), timeout=10) as resp:
        text = resp.read().decode()
    line = f'lpdrelay_queue_state{{queue="{queue}",state="{state}"}} '
    return float(next(ln for ln in text.splitlines() if ln.startswith(line)).split()[-1])


def start(tmp: Path, queues: dict[str, Any]) -> tuple[Path, LoggedRelay]:
    data = config(tmp, queues)
    data["metrics"] = {"listen": "127.0.0.1:0"}
    data["log"] = {"format": "json", "level": "debug"}   # job_delivered is a debug event
    data["queues"]["ward3"]["concurrency"] = 1
    path = tmp / "relay.toml"
    from tests.daemon import write_config_file

    write_config_file(path, data)
    return path, LoggedRelay(path).start()


def delivered_order(relay: LoggedRelay) -> list[str]:
    return [e["job"] for e in relay.events("job_delivered")]


def test_lpc_stop_hold_topq_release_start_disable(tmp_path: Path) -> None:
    _, relay = start(tmp_path, {"ward3": hot(tmp_path, "out"), "lab": hot(tmp_path, "out")})
    try:
        assert "printing stopped" in lpc(relay, "stop")
        assert metric(relay, "ward3", "stopped") == 1
        assert metric(relay, "lab", "stopped") == 0
        for i, user in enumerate(("bob", "alice", "carol")):
            assert all(r == 0 for r in send_job(relay.port, Job(queue="ward3",
                                                                number=f"10{i}", user=user)))
        assert "printing stopped; 3 queued, 0 held" in lpc(relay, "status")
        assert "cfA101client hold: done" in lpc(relay, "hold", "Q", "alice")
        shown = lpq(relay.port, "ward3").stdout.decode()
        assert "ward3 is printing stopped" in shown and "held" in shown, shown
        assert "done" in lpc(relay, "topq", "Q", "102")
        assert out(tmp_path, "out", "ward3") == []
        assert lpc(relay, "start").startswith("ward3: enabled, printing")
        wait_until(lambda: len(delivered_order(relay)) == 2)
        ids = {e["job"]: e for e in relay.events("job_held")}
        assert delivered_order(relay) == ["000000000003", "000000000001"], ids
        assert "release: done" in lpc(relay, "release", "Q", "101")
        wait_until(lambda: len(out(tmp_path, "out", "ward3")) == 3)
        assert "ward3: disabled" in lpc(relay, "disable")
        assert metric(relay, "ward3", "disabled") == 1
        assert send_job(relay.port, Job(queue="ward3", number="200")) == [1]
        lpc(relay, "enable")
        assert all(r == 0 for r in send_job(relay.port, Job(queue="ward3", number="201")))
        assert metric(relay, "ward3", "disabled") == 0
    finally:
        relay.terminate()
    assert not relay.tracebacks()


def test_lpc_redirect_and_move_send_jobs_to_another_queue(tmp_path: Path) -> None:
    _, relay = start(tmp_path, {"ward3": down(tmp_path), "lab": hot(tmp_path, "lab-out")})
    try:
        for i in range(2):
            assert all(r == 0 for r in send_job(relay.port, Job(queue="ward3", number=f"{i}",
                                                                user=f"u{i}")))
        wait_until(lambda: relay.events("delivery_failed"))
        assert "move: done" in lpc(relay, "move", "Q", "u1", "lab")
        wait_until(lambda: len(relay.events("job_delivered")) == 1)
        assert "redirected to lab" in lpc(relay, "redirect", "Q", "lab")
        assert metric(relay, "ward3", "redirected") == 1
        # The waiting job went along; a new one is delivered by lab too.
        assert all(r == 0 for r in send_job(relay.port, Job(queue="ward3", number="7")))
        wait_until(lambda: len(relay.events("job_delivered")) == 3)
        assert {e["queue"] for e in relay.events("job_delivered")} == {"ward3"}
        assert len(list((tmp_path / "lab-out").rglob("*.json"))) == 3
        lpc(relay, "redirect", "Q", "off")
        assert metric(relay, "ward3", "redirected") == 0
        assert all(r == 0 for r in send_job(relay.port, Job(queue="ward3", number="8")))
        # Back with ward3, whose destination is down (and backing off): it waits there.
        assert "1 queued" in lpc(relay, "status")
        assert len(relay.events("job_delivered")) == 3
        # Held in ward3, released while ward3 is redirected: lab delivers it.
        assert "hold: done" in lpc(relay, "hold", "Q", "8")
        lpc(relay, "redirect", "Q", "lab")
        assert "release: done" in lpc(relay, "release", "Q", "8")
        wait_until(lambda: len(relay.events("job_delivered")) == 4)
    finally:
        relay.terminate()


def test_control_from_an_ephemeral_port_is_refused(tmp_path: Path) -> None:
    _, relay = start(tmp_path, {"ward3": hot(tmp_path, "out")})
    try:
        said = lpc(relay, "disable", reserved=False)
        assert "reserved source port" in said, said
        assert all(r == 0 for r in send_job(relay.port, Job(queue="ward3")))
        assert relay.events("control_refused")
    finally:
        relay.terminate()


def ctl(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("ctl", *args, "-c", str(cfg))


def test_ctl_offline_states_survive_a_restart(tmp_path: Path) -> None:
    cfg, relay = start(tmp_path, {"ward3": down(tmp_path), "lab": hot(tmp_path, "out")})
    try:
        for i in range(2):
            assert all(r == 0 for r in send_job(relay.port, Job(queue="ward3", number=f"{i}",
                                                                user=f"u{i}")))
        online = ctl(cfg, "ward3", "hold", "u0")
        assert online.returncode == 0 and "hold: done" in online.stdout, online
    finally:
        relay.terminate()
    # Daemon stopped: the spool and the state file.
    assert "disabled" in ctl(cfg, "disable", "ward3").stdout          # lpc's order
    assert "printing stopped" in ctl(cfg, "lab", "stop").stdout
    moved = ctl(cfg, "ward3", "move", "u1", "lab")
    assert moved.returncode == 0 and "move: done" in moved.stdout, moved
    topq = ctl(cfg, "ward3", "topq", "u1")
    assert topq.returncode == 2 and "running daemon" in topq.stderr
    assert "1 held" in ctl(cfg, "ward3", "status").stdout
    relay = LoggedRelay(cfg).start()
    try:
        assert metric(relay, "ward3", "disabled") == 1 and metric(relay, "lab", "stopped") == 1
        assert send_job(relay.port, Job(queue="ward3", number="9")) == [1]
        shown = lpq(relay.port, "lab").stdout.decode()
        assert "lab is printing stopped" in shown and "u1" in shown, shown
        assert "held" in lpq(relay.port, "ward3").stdout.decode()
        assert ctl(cfg, "lab", "start").returncode == 0
        wait_until(lambda: len(out(tmp_path, "out", "ward3")) == 1)   # u1's job, via lab
        assert "enabled" in ctl(cfg, "ward3", "enable").stdout
        assert all(r == 0 for r in send_job(relay.port, Job(queue="ward3", number="10")))
    finally:
        relay.terminate()
