"""Start-up as an admin sees it: `lpd-relay serve -c FILE` and `check-config` as processes.

Every way the daemon cannot start prints exactly one line naming the key,
the address and the OS reason, and exits 2 (the configuration cannot work)
or 1 (the environment refused) — never a traceback or a trio exception
group.  Logging is at "error" and max_connections small in these files, so
that one line is the whole of stderr.  File-descriptor limits: ``serve``
raises its soft RLIMIT_NOFILE to the hard limit, and both commands warn when
``max_connections`` cannot be honoured.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.errors import BindError, ConfigError, SpoolError
from relay.servecli import failure
from tests.daemon import relay_config, write_config_file

ROOT = Path(__file__).resolve().parent.parent
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_NET_BIND_SERVICE = 1, 2, 10


def _config(tmp_path: Path, **server: Any) -> Path:
    data = relay_config(tmp_path, server={"max_connections": 50, **server})
    data["log"] = {"format": "text", "level": "error"}
    data["metrics"] = {"listen": ""}
    return write_config_file(tmp_path / "relay.toml", data)


def _run(*args: str, preexec: Callable[[], None] | None = None,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, cwd=ROOT,
                          preexec_fn=preexec)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line; nothing else may be there (no traceback, no group)."""
    assert "Traceback" not in result.stderr and "Exceptions from" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _drop_caps(*caps: int) -> Callable[[], None]:
    """A preexec_fn dropping capabilities from the bounding set: root without them.

    The suite runs as root, and the interpreter lives where uid 65534 may
    not read it, so "no privilege" is made by taking the capability away
    (root's powers are capabilities: CAP_NET_BIND_SERVICE for ports under
    1024, CAP_DAC_* for files it does not own) rather than by setuid.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def drop() -> None:
        for cap in caps:
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    return drop


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_lpd_port_in_use(tmp_path: Path, busy_port: int) -> None:
    config = _config(tmp_path, listen=["127.0.0.1:0", f"127.0.0.1:{busy_port}"])
    result = _run("serve", "-c", str(config))
    assert _one_line(result) == (f"lpd-relay: cannot start: server.listen[1]: cannot listen "
                                 f"on 127.0.0.1:{busy_port}: Address already in use")
    assert result.returncode == 1


def test_metrics_port_in_use(tmp_path: Path, busy_port: int) -> None:
    data = relay_config(tmp_path, server={"max_connections": 50})
    data["log"] = {"format": "json", "level": "error"}
    data["metrics"] = {"listen": f"127.0.0.1:{busy_port}"}
    result = _run("serve", "-c", str(write_config_file(tmp_path / "relay.toml", data)))
    assert _one_line(result) == (f"lpd-relay: cannot start: metrics.listen: cannot listen on "
                                 f"127.0.0.1:{busy_port}: Address already in use")
    assert result.returncode == 1


def test_no_permission_for_port_515(tmp_path: Path) -> None:
    preexec = _drop_caps(CAP_NET_BIND_SERVICE) if os.geteuid() == 0 else None
    result = _run("serve", "-c", str(_config(tmp_path, listen=["127.0.0.1:515"])),
                  preexec=preexec)
    assert _one_line(result) == ("lpd-relay: cannot start: server.listen[0]: cannot listen "
                                 "on 127.0.0.1:515: Permission denied")
    assert result.returncode == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the spool to another uid")
def test_spool_unwritable(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    os.chown(spool, 65534, 65534)
    result = _run("serve", "-c", str(_config(tmp_path)),
                  preexec=_drop_caps(CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH))
    assert _one_line(result) == (f"lpd-relay: cannot start: server.spool_dir: spool {spool}: "
                                 "Permission denied")
    assert result.returncode == 1


def test_spool_locked_by_another_daemon(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    with open(spool / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running daemon holds
        result = _run("serve", "-c", str(_config(tmp_path)))
    assert _one_line(result) == (f"lpd-relay: cannot start: server.spool_dir: spool {spool} "
                                 "is in use by another process")
    assert result.returncode == 1


# ---- the configuration's own errors: exit 2 naming the key, for both commands ----

@pytest.mark.parametrize(("text", "fragment"), [
    ('[server]\nlisten = ["999.1.1.1:30090"]\n', 'server.listen[0]: "999.1.1.1" is not an IPv4'),
    ("[server]\nmax_connections = 99999999999999999999\n",
     "server.max_connections: expected 1 to 1000000, got 99999999999999999999"),
    ("[server]\nallow = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
])
@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_bad_files_exit_2_naming_the_key(tmp_path: Path, text: str, fragment: str,
                                         command: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(text + '[queues.q]\ndestinations = ["socket://127.0.0.1"]\n')
    result = _run(command, "-c", str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and fragment in result.stderr, result.stderr


# ---- exception groups are flattened, however deep ----

def test_nested_groups_give_the_innermost_error() -> None:
    bind = BindError("server.listen[0]", "127.0.0.1:1", OSError(errno.EADDRINUSE, "in use"))
    nested = ExceptionGroup("a", [ExceptionGroup("b", [ExceptionGroup("c", [bind])])])
    assert failure(nested, started=False) == (
        1, "lpd-relay: cannot start: server.listen[0]: cannot listen on 127.0.0.1:1: in use")
    assert failure(ExceptionGroup("x", [ConfigError("origin_ports", "no privilege")]),
                   started=False) == (2, "lpd-relay: origin_ports: no privilege")
    assert failure(ExceptionGroup("x", [ExceptionGroup("y", [SpoolError("spool /s: EIO")])]),
                   started=True) == (1, "lpd-relay: stopped: server.spool_dir: spool /s: EIO")
    assert failure(ExceptionGroup("x", [RuntimeError("bug\nsecond line")]), started=True) == (
        1, "lpd-relay: stopped: RuntimeError: bug second line")


# ---- file descriptors ----

def _nofile(soft: int, hard: int) -> Callable[[], None]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return limit


def test_check_config_warns_when_max_connections_exceeds_the_fd_limit(tmp_path: Path) -> None:
    config = _config(tmp_path, max_connections=10000)
    result = _run("check-config", "-c", str(config), preexec=_nofile(256, 256))
    assert result.returncode == 0 and "ok" in result.stdout
    line = _one_line(result)
    assert line.startswith("warning: server.max_connections: 10000 connections need about "), line
    assert "the limit is 256 (hard limit 256)" in line
    assert int(re.search(r"about (\d+) can be served", line).group(1)) < 128  # type: ignore[union-attr]
    quiet = _run("check-config", "-c", str(_config(tmp_path, max_connections=50)),
                 preexec=_nofile(256, 256))
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_serve_raises_the_soft_limit_and_warns(tmp_path: Path) -> None:
    config = _config(tmp_path, max_connections=1000)
    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "-c", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, preexec_fn=_nofile(256, 1024))
    try:
        assert proc.stdout is not None and proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "relay exited before its banner"
            if line.startswith("spool "):
                break
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        soft_hard = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits)
        assert soft_hard is not None and soft_hard.groups() == ("1024", "1024")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        warning = proc.stderr.read().splitlines()
        assert len(warning) == 1 and warning[0].startswith(
            "warning: server.max_connections: 1000 connections need about "), warning
        assert "the limit is 1024 (hard limit 1024)" in warning[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
