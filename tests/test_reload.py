"""SIGHUP and `lpd-relay reload` against a real relay process (docs/operations.md).

Each test starts the relay as a subprocess, rewrites its configuration file,
reloads, and checks what changed and that nothing in flight was lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from prometheus_client import CollectorRegistry

from relay.config import QueueConfig, config_from_dict
from relay.dispatch import Scheduler, removed_reason
from relay.metrics import Metrics
from relay.reload import effective, restart_changes
from relay.scheduler import QueueRunner
from relay.sinks import Sink, SinkContext, make_sink
from relay.spool import JobMeta, Spool
from tests.daemon import ROOT, relay_config, write_config_file
from tests.lpdwire import Job, Wire, send_job, start_data_file
from tests.relayproc import LoggedRelay, wait_until


def closed_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def config(tmp: Path, queues: dict[str, Any], **server: Any) -> dict[str, Any]:
    return relay_config(tmp, server={"graceful_timeout": "2s", **server},
                        metrics={"listen": ""}, retry={"initial": "1h", "max": "1h"},
                        queues=queues)


def out(tmp: Path, folder: str, queue: str) -> list[Path]:
    return sorted((tmp / folder / queue).glob("*.json"))


def down(tmp: Path) -> dict[str, Any]:
    return {"destinations": [f"socket://127.0.0.1:{closed_port()}"]}


def hot(tmp: Path, folder: str) -> dict[str, Any]:
    return {"destinations": [f"dir://{tmp / folder}"]}


def reload(relay: LoggedRelay, event: str = "reloaded", count: int = 1) -> dict[str, Any]:
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    try:
        found = wait_until(lambda: len(relay.events(event)) >= count and relay.events(event), 20)
    except AssertionError:
        raise AssertionError(relay.lines[-15:]) from None
    assert relay.alive(), relay.lines[-20:]
    return found[-1]  # type: ignore[no-any-return]


def daemon_json(tmp: Path) -> dict[str, Any]:
    return orjson.loads((tmp / "spool" / "daemon.json").read_bytes())  # type: ignore[no-any-return]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False)


def test_restart_only_keys_keep_their_running_values(tmp_path: Path) -> None:
    old = config_from_dict(config(tmp_path, {"q": hot(tmp_path, "out")}), "a")
    data = config(tmp_path, {"q": hot(tmp_path, "out2")}, spool_dir=str(tmp_path / "s2"),
                  fsync="never", max_connections=7, allow=["10.0.0.0/8"])
    data["log"]["format"] = "text"
    new = config_from_dict(data, "a")
    assert restart_changes(old, new) == ["server.spool_dir", "server.fsync",
                                         "server.max_connections", "log.format"]
    kept = effective(old, new)
    assert kept.server.spool_dir == old.server.spool_dir and kept.server.fsync == old.server.fsync
    assert kept.server.max_connections == old.server.max_connections
    assert kept.log.format == "json" and kept.server.allow == new.server.allow
    assert kept.queues["q"].destinations == new.queues["q"].destinations


def test_sighup_changes_a_destination_while_jobs_queue(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    cfg = write_config_file(tmp_path / "relay.toml", config(tmp_path, {"ward3": down(tmp_path)}))
    relay = LoggedRelay(cfg).start()
    try:
        for i in range(3):
            assert all(r == 0 for r in send_job(relay.port, Job(queue="ward3", number=f"{i:03d}")))
        wait_until(lambda: relay.events("delivery_failed"))
        while b"READY=1" not in notify.recv(4096):
            pass
        write_config_file(cfg, config(tmp_path, {"ward3": hot(tmp_path, "out")}))
        reload(relay)
        wait_until(lambda: len(out(tmp_path, "out", "ward3")) == 3)
        messages = [notify.recv(4096) for _ in range(2)]
        while b"READY=1" not in messages[-1]:
            messages.append(notify.recv(4096))
        assert b"RELOADING=1" in messages[0] and b"MONOTONIC_USEC=" in messages[0]
        assert daemon_json(tmp_path)["reload"] == {"generation": 1, "outcome": "ok",
                                                   "error": "", "restart_needed": []}
    finally:
        relay.terminate()
        notify.close()
    assert not relay.tracebacks()


def test_reload_opens_and_closes_listen_addresses(tmp_path: Path) -> None:
    extra = closed_port()
    base = config(tmp_path, {"q": hot(tmp_path, "out")})
    cfg = write_config_file(tmp_path / "relay.toml", base)
    relay = LoggedRelay(cfg).start()
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", extra), timeout=5).close()
        write_config_file(cfg, config(tmp_path, {"q": hot(tmp_path, "out")},
                                      listen=["127.0.0.1:0", f"127.0.0.1:{extra}"]))
        reload(relay)
        assert all(r == 0 for r in send_job(extra, Job(queue="q", number="001")))
        assert [127, extra] in [[int(h.split(".")[0]), p] for h, p in daemon_json(tmp_path)["lpd"]]
        write_config_file(cfg, base)
        reload(relay, count=2)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", extra), timeout=5).close()
        assert all(r == 0 for r in send_job(relay.port, Job(queue="q", number="002")))
        wait_until(lambda: len(out(tmp_path, "out", "q")) == 2)
        assert relay.events("listener_closed")[0]["listen"] == f"127.0.0.1:{extra}"
        with socket.socket() as taken:   # an address in use: refused, the rest unchanged
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            write_config_file(cfg, config(tmp_path, {"q": hot(tmp_path, "out2")}, listen=[
                "127.0.0.1:0", f"127.0.0.1:{taken.getsockname()[1]}"]))
            result = cli("reload", "-c", str(cfg))
        assert result.returncode == 1 and "server.listen[1]" in result.stderr, result.stderr
        assert "reload refused" in result.stderr
        assert all(r == 0 for r in send_job(relay.port, Job(queue="q", number="003")))
        wait_until(lambda: len(out(tmp_path, "out", "q")) == 3)
    finally:
        relay.terminate()


def test_a_reload_is_reported_only_once_every_worker_listens(tmp_path: Path) -> None:
    """With intake workers, "reloaded" (and daemon.json) wait for every worker to apply it.

    One worker is stopped (SIGSTOP) across the SIGHUP: the reload must not be
    reported while it cannot have opened the added address, and is once it runs again.
    """
    base = config(tmp_path, {"q": hot(tmp_path, "out")}, workers=2)
    cfg = write_config_file(tmp_path / "relay.toml", base)
    relay = LoggedRelay(cfg).start()
    assert relay.proc is not None
    try:
        pid = wait_until(lambda: relay.events("worker_started")
                         and relay.events("worker_started")[-1]["pid"])
        extra = closed_port()
        write_config_file(cfg, config(tmp_path, {"q": hot(tmp_path, "out")}, workers=2,
                                      listen=["127.0.0.1:0", f"127.0.0.1:{extra}"]))
        os.kill(pid, signal.SIGSTOP)
        try:
            relay.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: relay.events("reload"))
            trio.run(trio.sleep, 1.0)     # ample for the running worker and the main process
            assert relay.events("reloaded") == [], "reported while a worker was stopped"
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: relay.events("reloaded"), 10)
        for n in range(4):   # the kernel spreads connections over both workers' sockets
            assert all(r == 0 for r in send_job(extra, Job(queue="q", number=f"{n + 1}")))
        wait_until(lambda: len(out(tmp_path, "out", "q")) == 4)
    finally:
        relay.terminate()


def test_invalid_file_is_refused_and_the_old_configuration_serves(tmp_path: Path) -> None:
    cfg = write_config_file(tmp_path / "relay.toml", config(tmp_path, {"q": hot(tmp_path, "out")}))
    relay = LoggedRelay(cfg).start()
    try:
        bad = config(tmp_path, {"q": hot(tmp_path, "out2")}, max_job_size="lots")
        write_config_file(cfg, bad)
        refused = reload(relay, "reload_refused")
        assert "server.max_job_size" in refused["error"]
        assert len(relay.events("reload_refused")) == 1
        # The CLI reads the file to find the spool: it names the key, sends nothing.
        result = cli("reload", "-c", str(tmp_path / "relay.toml"))
        assert result.returncode == 2 and "server.max_job_size" in result.stderr
        assert daemon_json(tmp_path)["reload"]["outcome"] == "refused"
        assert all(r == 0 for r in send_job(relay.port, Job(queue="q")))
        wait_until(lambda: len(out(tmp_path, "out", "q")) == 1)
        assert not (tmp_path / "out2").exists()
        assert not relay.events("reloaded")
    finally:
        relay.terminate()


def test_restart_only_key_is_named_and_left_running(tmp_path: Path) -> None:
    cfg = write_config_file(tmp_path / "relay.toml", config(tmp_path, {"q": hot(tmp_path, "out")}))
    relay = LoggedRelay(cfg).start()
    try:
        write_config_file(cfg, config(tmp_path, {"q": hot(tmp_path, "out")}, fsync="never"))
        result = cli("reload", "-c", str(tmp_path / "relay.toml"))
        assert result.returncode == 0, result.stderr
        assert "reloaded" in result.stdout
        assert "warning: server.fsync:" in result.stderr
        # spool_dir: the CLI would look for the daemon in the new spool, so SIGHUP.
        write_config_file(cfg, config(tmp_path, {"q": hot(tmp_path, "out")},
                                      spool_dir=str(tmp_path / "elsewhere"), fsync="never"))
        reload(relay, "reload_restart_needed", count=2)
        first, second = relay.events("reload_restart_needed")
        assert first["keys"] == "server.fsync"
        assert second["keys"] == "server.spool_dir, server.fsync"
        assert all(r == 0 for r in send_job(relay.port, Job(queue="q")))
        wait_until(lambda: len(out(tmp_path, "out", "q")) == 1)
        assert not (tmp_path / "elsewhere").exists()
    finally:
        relay.terminate()


def test_connection_in_the_middle_of_a_job_keeps_its_configuration(tmp_path: Path) -> None:
    cfg = write_config_file(tmp_path / "relay.toml", config(tmp_path, {"q": hot(tmp_path, "out")}))
    relay = LoggedRelay(cfg).start()
    try:
        job = Job(queue="q", files=[b"x" * 200_000])
        with Wire(relay.port) as w:
            start_data_file(w, job)
            w.send(job.files[0][:100_000])
            # New connections from loopback are now refused; this one is older.
            write_config_file(cfg, config(tmp_path, {"q": hot(tmp_path, "out")},
                                          allow=["10.0.0.0/8"]))
            reload(relay)
            w.send(job.files[0][100_000:] + b"\x00")
            assert w.reply() == 0
        wait_until(lambda: len(out(tmp_path, "out", "q")) == 1)
        # Closed without a word: the new ACL refused it.
        with Wire(relay.port) as late, contextlib.suppress(ConnectionResetError):
            late.send(b"\x02q\n")
            assert late.reply() == -1
        wait_until(lambda: any(e["error"] == "source not in allow"
                               for e in relay.events("connection_refused")))
        assert len(out(tmp_path, "out", "q")) == 1
    finally:
        relay.terminate()


def test_removed_queue_holds_its_jobs_and_readding_releases_them(tmp_path: Path) -> None:
    two = {"ward3": down(tmp_path), "lab": hot(tmp_path, "out")}
    cfg = write_config_file(tmp_path / "relay.toml", config(tmp_path, two))
    relay = LoggedRelay(cfg).start()
    try:
        for i in range(2):
            assert all(r == 0 for r in send_job(relay.port, Job(queue="ward3", number=f"{i}")))
        wait_until(lambda: relay.events("delivery_failed"))
        write_config_file(cfg, config(tmp_path, {"lab": hot(tmp_path, "out")}))
        reload(relay)
        listing = cli("spool", "list", "-c", str(cfg))
        assert listing.returncode == 0
        assert listing.stdout.count("held") >= 2, listing.stdout
        assert "queue ward3 removed by reload" in cli("spool", "show", _first_id(listing.stdout),
                                                      "-c", str(cfg)).stdout
        assert send_job(relay.port, Job(queue="ward3", number="9"))[:1] == [1]
        write_config_file(cfg, config(tmp_path, {"lab": hot(tmp_path, "out"),
                                                 "ward3": hot(tmp_path, "out")}))
        reload(relay, count=2)
        try:
            wait_until(lambda: len(out(tmp_path, "out", "ward3")) == 2)
        except AssertionError:
            raise AssertionError(relay.lines[-20:]) from None
    finally:
        relay.terminate()
    assert not relay.tracebacks()


def _first_id(listing: str) -> str:
    return next(line.split()[0] for line in listing.splitlines() if "ward3" in line)


def test_reload_cli_without_a_daemon_says_so(tmp_path: Path) -> None:
    cfg = write_config_file(tmp_path / "relay.toml", config(tmp_path, {"q": hot(tmp_path, "out")}))
    result = cli("reload", "-c", str(cfg))
    assert result.returncode == 1 and "no running daemon" in result.stderr


# -- a job intake hands to delivery while a reload removes or re-adds its queue --------

def _scheduler(tmp_path: Path) -> tuple[Scheduler, Spool, Callable[[bool], None]]:
    """A scheduler with queue ward3 (dir://) and ``reload(present)`` removing/re-adding it."""
    raw = {"queues": {"ward3": hot(tmp_path, "out")},
           "server": {"spool_dir": str(tmp_path / "spool")}}
    queues = config_from_dict(raw, "<test>").queues
    metrics = Metrics(CollectorRegistry(), queues=["ward3"],
                      destinations=[d.uri for d in queues["ward3"].destinations])
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.recover()

    def sinks(queue: QueueConfig) -> list[Sink]:
        return [make_sink(d, SinkContext()) for d in queue.destinations]

    def runner(queue: QueueConfig, made: list[Sink]) -> QueueRunner:
        return QueueRunner(queue, made, spool, metrics)

    scheduler = Scheduler({"ward3": runner(queues["ward3"], sinks(queues["ward3"]))}, spool)

    def reload(present: bool) -> None:
        scheduler.reconfigure(queues if present else {}, sinks, runner)
    return scheduler, spool, reload


async def _committed(spool: Spool) -> JobMeta:
    job = spool.begin(queue="ward3", wire_queue="ward3", peer="127.0.0.1:721")
    writer = job.open_data("dfA001client")
    writer.write(b"data\n")
    writer.close()
    job.set_control("cfA001client", b"Hclient\nPalice\nldfA001client\n", number="001",
                    user="alice", host="client", title="t", job_name="t",
                    formats={"dfA001client": "l"})
    return await spool.commit(job)


def test_a_job_handed_over_after_its_queue_was_removed_is_released_when_it_returns(
        tmp_path: Path) -> None:
    # Committed before the reload, handed to delivery after it (a worker's
    # connection acked it meanwhile): held as "removed by reload", so re-adding
    # the queue releases it like the jobs the retired runner held.
    scheduler, spool, reload = _scheduler(tmp_path)
    meta = trio.run(_committed, spool)
    reload(False)
    scheduler.submit(meta)
    held = spool.get(meta.id)
    assert (held.state, held.last_error) == ("held", removed_reason("ward3"))
    reload(True)
    assert [j.id for j in scheduler.runners["ward3"].pending] == [meta.id]
    assert spool.get(meta.id).state == "queued"


def test_a_job_handed_over_after_its_queue_was_re_added_is_queued_once(tmp_path: Path) -> None:
    # Committed, then its queue removed and re-added before intake handed it over:
    # the re-added queue takes it from the spool, intake's submit adds no second copy.
    scheduler, spool, reload = _scheduler(tmp_path)
    meta = trio.run(_committed, spool)
    reload(False)
    reload(True)
    scheduler.submit(meta)
    assert [j.id for j in scheduler.runners["ward3"].pending] == [meta.id]
