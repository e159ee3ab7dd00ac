"""The command line as a user runs it: real subprocesses of `lpd-relay` (SPEC §6)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import orjson
import pytest

from tests.daemon import DaemonThread, RelayProcess, relay_config, write_config_file
from tests.lpdwire import Job, send_job
from tests.peers import LprngServer
from tests.test_recovery import closed_port, write_config
from tests.test_server import delivered


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_help_lists_every_command() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for command in ("serve", "check-config", "send", "queue", "remove", "spool", "probe",
                    "loadgen"):
        assert command in result.stdout


def test_console_script() -> None:
    script = Path(sys.executable).parent / "lpd-relay"
    if not script.exists():
        pytest.skip("package not installed in this interpreter's environment (make test does)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0 and "lpd-relay" in result.stdout


def test_check_config(tmp_path: Path) -> None:
    good = write_config(tmp_path, "socket://127.0.0.1:9100")
    result = cli("check-config", "-c", str(good))
    assert result.returncode == 0 and "ok" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = ["nowhere"]\nidle_timeout = "soon"\n'
                   '[queues.q]\ndestinations = ["ftp://x"]\n')
    result = cli("check-config", "-c", str(bad))
    assert result.returncode == 2
    for path in ("server.listen", "server.idle_timeout", "queues.q.destinations"):
        assert path in result.stderr, result.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert cli("send").returncode == 2
    assert cli("send", "socket://x", str(tmp_path)).returncode == 2
    assert cli("send", "lpd://127.0.0.1/q", str(tmp_path / "missing")).returncode == 2


@pytest.mark.peers
def test_send_queue_remove_against_lprng(tmp_path: Path) -> None:
    doc = tmp_path / "doc.ps"
    doc.write_bytes(b"%!PS\n" + b"x" * 5000)
    with LprngServer(tmp_path / "lprng", queues=("q",)) as lprng:
        uri = f"lpd://127.0.0.1:{lprng.port}/q"
        for mode in ("count", "stream"):
            result = cli("send", uri, str(doc), "--mode", mode, "--user", "carol")
            assert result.returncode == 0, result.stderr
        jobs = lprng.wait_jobs("q", 2)
        assert [j.data for j in jobs] == [doc.read_bytes()] * 2
        assert {j.user for j in jobs} == {"carol"}
        # LPRng refuses the Windows fake length (FIELD-NOTES): exit 1, reason shown.
        result = cli("send", uri, str(doc), "--mode", "windows")
        assert result.returncode == 1 and "0x02" in result.stderr
        result = cli("queue", uri, "--long")
        assert result.returncode == 0 and "carol" in result.stdout
        result = cli("remove", uri, "all", "--agent", "root")
        assert result.returncode == 0


def test_send_and_loadgen_against_the_relay(tmp_path: Path) -> None:
    doc = tmp_path / "a.txt"
    doc.write_bytes(b"to the relay\n")
    with DaemonThread(relay_config(tmp_path)) as relay:
        uri = f"lpd://127.0.0.1:{relay.port}/ward3"
        assert cli("send", uri, str(doc), str(doc), "--title", "twice").returncode == 0
        (meta,) = delivered(tmp_path / "out", "ward3")
        assert len(meta["files"]) == 2 and meta["title"] in ("twice", "a.txt")
        result = cli("loadgen", uri, "--jobs", "50", "--concurrency", "8", "--size", "2KiB",
                     "--json")
        assert result.returncode == 0, result.stderr
        summary = orjson.loads(result.stdout)
        assert summary["ok"] == 50 and summary["jobs_per_second"] > 0
        delivered(tmp_path / "out", "ward3", 51, timeout=60)


def test_spool_commands_with_daemon_stopped_and_running(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f"socket://127.0.0.1:{closed_port()}")
    with RelayProcess(cfg) as relay:
        for n in ("001", "002"):
            assert all(r == 0 for r in send_job(relay.port, Job(number=n)))
        listing = cli("spool", "list", "-c", str(cfg))
        assert listing.returncode == 0 and "2 job(s)" in listing.stdout
        first = listing.stdout.splitlines()[1].split()[0]
        shown = cli("spool", "show", first, "-c", str(cfg))
        assert orjson.loads(shown.stdout)["number"] == "001"
        # Safe while the daemon runs: it removes the job itself.
        purged = cli("spool", "purge", first, "-c", str(cfg))
        assert purged.returncode == 0 and "dequeued" in purged.stdout, purged.stdout
        assert "1 job(s)" in cli("spool", "list", "-c", str(cfg)).stdout
        retry = cli("spool", "retry", "2", "-c", str(cfg))
        assert retry.returncode == 0 and "released" in retry.stdout
    # With the daemon stopped.
    listing = cli("spool", "list", "-c", str(cfg))
    second = listing.stdout.splitlines()[1].split()[0]
    assert cli("spool", "purge", second, "-c", str(cfg)).returncode == 0
    assert "0 job(s)" in cli("spool", "list", "-c", str(cfg)).stdout
    assert cli("spool", "show", "999", "-c", str(cfg)).returncode == 1


@pytest.mark.root
def test_reserved_ports_without_privilege_fail_at_start(tmp_path: Path) -> None:
    import os
    import shutil
    import stat
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the relay as an unprivileged user")
    home = Path(tempfile.mkdtemp(prefix="lpd-relay-nobody-"))
    try:
        home.chmod(0o777)
        cfg = write_config_file(home / "relay.toml", relay_config(
            home, metrics={"listen": ""},
            queues={"q": {"destinations": ["lpd://127.0.0.1:9/q"]}}))
        cfg.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "--inh-caps=-all", "--bounding-set=-all",
             sys.executable, "-m", "relay", "serve", "-c", str(cfg)],
            capture_output=True, text=True, timeout=60, check=False, cwd="/")
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert "721" in result.stderr and "origin_ports" in result.stderr, result.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)
