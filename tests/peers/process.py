"""Running a peer program privately: preconditions, namespaces, process trees.

Every real peer runs on a free 127.0.0.1 port inside a private mount
namespace whose bind mounts give it its own ``/etc/hosts``,
``/etc/resolv.conf`` (and ``/etc/services``, ``/etc/lprng``): system files are
never touched, and LPRng's two host lookups per job never wait on DNS
(FIELD-NOTES "Running the real peers in tests"). Long-lived peers also get a
private PID namespace, so stopping them by PID ends all they forked; peers
left running when the test process exits are stopped then.

The ``require_*`` helpers skip the calling test (``pytest.skip``) with the
reason when a program, root, or namespace support is missing.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------
# Preconditions: ports, binaries, root, namespaces
# --------------------------------------------------------------------------

def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def require_binary(name: str) -> str:
    """Path of ``name`` on PATH (or sbin), else skip the test."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.skip(f"{name} not installed (scripts/install-peers.sh installs it)")
    return path


def promtool_path() -> str:
    """Path of Prometheus' ``promtool``, else skip the test."""
    return require_binary("promtool")


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


@functools.cache
def _namespace_problem() -> str | None:
    """Why private mount/PID namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root for private mount namespaces"
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    probe = ["unshare", "--mount", "--propagation", "private",
             "--pid", "--fork", "--kill-child", "true"]
    try:
        res = subprocess.run(probe, capture_output=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return "unshare probe timed out"
    if res.returncode != 0:
        return f"unshare failed: {res.stderr.decode(errors='replace').strip()}"
    return None


def require_namespaces() -> None:
    """Skip unless private mount and PID namespaces work (root, unshare)."""
    problem = _namespace_problem()
    if problem is not None:
        pytest.skip(problem)


def namespace_argv(argv: Sequence[str], binds: Mapping[str, Path | str], *,
                   pid_namespace: bool = False) -> list[str]:
    """``argv`` wrapped to run with ``binds`` (system path -> our path) mounted.

    The mounts live in a private mount namespace, so nothing outside sees them.
    A system path that does not exist is left alone (mount needs a target;
    glibc treats a missing resolv.conf as "nameserver 127.0.0.1" anyway).
    With ``pid_namespace`` the program is PID 1 of its own PID namespace, so
    killing it ends everything it forked.
    """
    lines = ["set -e"]
    for target, source in binds.items():
        lines.append(f"if [ -e {shlex.quote(target)} ]; then "
                     f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}; fi")
    lines.append('exec "$@"')
    head = ["unshare", "--mount", "--propagation", "private"]
    if pid_namespace:
        head += ["--pid", "--fork", "--kill-child"]
    return [*head, "sh", "-c", "\n".join(lines), "peers-ns", *argv]


def write_private_etc(directory: Path, *, printer_port: int | None = None) -> dict[str, Path]:
    """Write hosts, resolv.conf (and services) into ``directory``; return binds.

    hosts names this machine and localhost on 127.0.0.1 and resolv.conf points
    at 127.0.0.1, so every lookup is answered at once or refused at once.
    ``printer_port`` maps the ``printer`` service there (rlpr dials only it).
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = socket.gethostname()
    (directory / "hosts").write_text(
        f"127.0.0.1 localhost {name} client\n::1 localhost ip6-localhost\n")
    (directory / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    binds = {"/etc/hosts": directory / "hosts", "/etc/resolv.conf": directory / "resolv.conf"}
    if printer_port is not None:
        (directory / "services").write_text(_services_text(printer_port))
        binds["/etc/services"] = directory / "services"
    return binds


def _services_text(printer_port: int) -> str:
    try:
        lines = Path("/etc/services").read_text().splitlines()
    except OSError:
        lines = []
    kept = [ln for ln in lines if ln.split("#")[0].split()[:1] != ["printer"]]
    return "\n".join([*kept, f"printer\t\t{printer_port}/tcp\t\tspooler"]) + "\n"


# --------------------------------------------------------------------------
# Processes: start, wait for the listener, stop the whole tree by PID
# --------------------------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    """PIDs of every descendant of ``pid`` (children first found via /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces; ppid is the 2nd field after ")".
        ppid = int(stat_line.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    frontier = [pid]
    while frontier:
        kids = parents.get(frontier.pop(), [])
        found += kids
        frontier += kids
    return found


# Peers started and not yet stopped, so a test process that ends without
# stopping them (an error between start and stop) still stops them at exit.
_LIVE: set[subprocess.Popen[bytes]] = set()


def start_process(argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a peer in its own session, output to ``log_path``.

    Started from the main thread, the peer also gets a parent-death signal
    (``setpriv --pdeathsig``): should the test process die without stopping it,
    the kernel kills it. (That signal fires when the starting *thread* ends,
    so it is not used from worker threads.)
    """
    argv = list(argv)
    if threading.current_thread() is threading.main_thread() and shutil.which("setpriv"):
        argv = ["setpriv", "--pdeathsig", "KILL", *argv]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _LIVE.add(proc)
    return proc


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_LIVE):
        stop_process_tree(proc, grace=0.5)


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def stop_process_tree(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """Stop ``proc`` and all its descendants: SIGTERM, then SIGKILL after ``grace``.

    Signals go to the PIDs found under ``proc`` only. A PID-namespace init
    ignores SIGTERM it has no handler for; the SIGKILL step covers it.
    """
    if proc.poll() is None:
        _signal_all([*_descendants(proc.pid), proc.pid], signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_all([*_descendants(proc.pid), proc.pid], signal.SIGKILL)
            proc.wait(timeout=grace)
    # Anything that outlived its parent (re-parented to init): kill it too.
    _signal_all(_descendants(proc.pid), signal.SIGKILL)
    _LIVE.discard(proc)


def _socket_inodes(pids: Sequence[int]) -> set[str]:
    """Inode numbers of the sockets the processes ``pids`` hold open."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    return inodes


def _listening(port: int, pids: Sequence[int]) -> bool:
    """Whether one of ``pids`` listens on TCP ``port`` (read from /proc, no connect).

    Matching the socket's inode, not just the port, tells our program's
    listener from another one that grabbed the port first.
    """
    inodes = _socket_inodes(pids)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if (cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port
                    and cols[9] in inodes):
                return True
    return False


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """Wait until ``port`` listens; False if ``proc`` exited or time ran out.

    Readiness is read from /proc rather than by connecting, because a probe
    connection would be a job (p910nd) or a log line (lpd) of its own.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _listening(port, [proc.pid, *_descendants(proc.pid)]):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def start_listening(argv: Sequence[str], log_path: Path, port: int, timeout: float, *,
                    grace: float = 3.0) -> subprocess.Popen[bytes] | None:
    """``start_process``, then wait until it listens on ``port``; None, its process
    tree stopped (``grace`` as for ``stop_process_tree``), if not within ``timeout``."""
    proc = start_process(argv, log_path)
    if wait_listening(proc, port, timeout):
        return proc
    stop_process_tree(proc, grace)
    return None


def log_tail(path: Path, limit: int = 2000) -> str:
    """The last ``limit`` characters of a peer's log ("" if unreadable)."""
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


class Service:
    """A peer started by the test: ``with X(...) as x:`` starts it and always stops it."""

    _proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _stop_process(self, grace: float = 3.0) -> None:
        """End the peer's process and all it forked, by PID, if it runs."""
        if self._proc is not None:
            stop_process_tree(self._proc, grace)
            self._proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class ConfigFileDaemon(Service):
    """A peer run in the foreground from a config file naming a free loopback port.

    Subclasses set ``workdir``, ``log_path``, ``startup_timeout`` and ``port``
    in ``__init__`` and give ``BINARY``, ``CONF_NAME``, ``_config()`` and
    ``_argv()``; ``start`` writes the file, starts the process and waits until
    it listens (trying another port if a parallel test took the first), and
    ``stop`` ends it by PID.
    """

    BINARY = ""
    CONF_NAME = ""
    workdir: Path
    log_path: Path
    startup_timeout: float
    port: int

    def _config(self) -> str:
        raise NotImplementedError

    def _argv(self, binary: str, conf: Path) -> list[str]:
        raise NotImplementedError

    def _output_path(self) -> Path:
        return self.log_path

    def start(self) -> None:
        binary = require_binary(self.BINARY)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):   # another test may take the free port before we bind it
            self.port = free_port()
            conf = self.workdir / self.CONF_NAME
            conf.write_text(self._config())
            self._proc = start_listening(self._argv(binary, conf), self._output_path(),
                                         self.port, self.startup_timeout)
            if self._proc is not None:
                return
        raise RuntimeError(f"{self.BINARY} did not start:\n{log_tail(self.log_path)}")

    def stop(self) -> None:
        self._stop_process()
