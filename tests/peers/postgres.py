"""A private PostgreSQL cluster for tests: initdb + pg_ctl in a temporary directory.

Never the system's cluster: the data directory, the unix socket directory and
the log live under the test's temporary directory, the server listens on a
loopback port picked free at start and on that socket, and it is stopped by
the PID its ``postmaster.pid`` records.  PostgreSQL refuses to run as root, so
when the tests run as root the cluster runs as an unprivileged system user
(``nobody``, or ``lpdrelay-test`` created with ``useradd --system`` when
``nobody`` is missing).  ``require_postgres()`` skips a test with the reason
when the binaries are not installed (``scripts/install-peers.sh`` installs
the Debian package ``postgresql``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from tests.peers.process import LOOPBACK, free_port

BIN_GLOB = "/usr/lib/postgresql/*/bin"
TEST_USER = "lpdrelay-test"


def postgres_bindir() -> str | None:
    """The newest installed PostgreSQL's bin directory (Debian layout), or PATH's."""
    dirs = sorted(glob.glob(BIN_GLOB), key=lambda d: int(Path(d).parent.name)
                  if Path(d).parent.name.isdigit() else 0)
    for d in reversed(dirs):
        if os.access(os.path.join(d, "initdb"), os.X_OK):
            return d
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def require_postgres() -> str:
    """The bin directory of initdb/pg_ctl/postgres, else skip the calling test."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL (initdb, pg_ctl) not installed "
                    "(scripts/install-peers.sh installs the postgresql package)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg not installed (pip install -e '.[test]')")
    return bindir


def _run_as() -> pwd.struct_passwd | None:
    """The user the server runs as: None when not root (ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("nobody", TEST_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    TEST_USER], check=True, capture_output=True)
    return pwd.getpwnam(TEST_USER)


class PostgresCluster:
    """One private cluster: ``start()``, ``stop()``, ``kill()``, ``dsn``; context manager."""

    def __init__(self, base: Path | None = None, *, bindir: str | None = None) -> None:
        self.bindir = bindir or require_postgres()
        # pytest's tmp_path sits below a 0700 directory the server user cannot
        # walk through: by default the cluster gets a directory of its own.
        self._made = base is None
        self.base = base or Path(tempfile.mkdtemp(prefix="lpdrelay-pg-"))
        self.data = self.base / "data"
        self.sockets = self.base / "sock"
        self.logfile = self.base / "postgres.log"
        self.port = 0
        self.user = _run_as()
        self.role = self.user.pw_name if self.user else pwd.getpwuid(os.geteuid()).pw_name
        self.pid = 0

    # -- running commands as the cluster's owner ------------------------------------

    def _cmd(self, args: Sequence[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        def demote() -> None:
            if self.user is not None:
                os.setgid(self.user.pw_gid)
                os.setuid(self.user.pw_uid)
        env = {"PATH": f"{self.bindir}:/usr/bin:/bin", "LC_ALL": "C", "HOME": str(self.base),
               "TZ": "UTC"}
        return subprocess.run([os.path.join(self.bindir, args[0]), *args[1:]], env=env,
                              preexec_fn=demote, capture_output=True, text=True,
                              timeout=timeout, check=False, cwd=self.base)

    def _own(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def init(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)   # the server user walks into it
        for p in (self.base, self.sockets):
            p.mkdir(exist_ok=True)
            self._own(p)
        res = self._cmd(["initdb", "-D", str(self.data), "-A", "trust", "-U", self.role,
                         "-E", "UTF8", "--no-instructions", "--no-sync"])
        if res.returncode != 0:
            raise RuntimeError(f"initdb failed: {res.stderr.strip()[-500:]}")
        conf = self.data / "postgresql.conf"
        with conf.open("a") as f:
            # A test cluster: small, quiet, and durable as production (fsync on,
            # synchronous_commit left at its default so the relay's own setting counts).
            f.write("\nmax_connections = 100\nshared_buffers = 32MB\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.sockets}'\n"
                    "logging_collector = off\nlog_min_messages = warning\n")

    def start(self, timeout: float = 30) -> Self:
        if not self.data.exists():
            self.init()
        for _ in range(5):   # a port taken between free_port() and the bind: another one
            self.port = self.port or free_port(LOOPBACK)
            res = self._cmd(["pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w",
                             "-t", str(int(timeout)), "-o", f"-p {self.port}", "start"],
                            timeout=timeout + 10)
            if res.returncode == 0:
                self.pid = self._postmaster_pid()
                return self
            self.port = 0
        raise RuntimeError(f"pg_ctl start failed: {res.stderr.strip()[-300:]} "
                           f"{self._log_tail()}")

    def _postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.logfile.read_text()[-500:]
        return ""

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back sessions; ``immediate``: like a crash)."""
        if not self.pid:
            return
        res = self._cmd(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"])
        if res.returncode != 0:
            self.kill()
        self.pid = 0

    def kill(self) -> None:
        """SIGKILL the postmaster by its PID (its backends exit when it is gone)."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(self.pid):
                time.sleep(0.05)
            self.pid = 0

    def psql(self, sql: str, db: str = "postgres") -> str:
        res = self._cmd(["psql", "-h", str(self.sockets), "-p", str(self.port), "-d", db,
                         "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql])
        if res.returncode != 0:
            raise RuntimeError(f"psql failed: {res.stderr.strip()}")
        return res.stdout.strip()

    def create_db(self, name: str) -> str:
        """A fresh database; returns its DSN (over the loopback port, no password)."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://{self.role}@{LOOPBACK}:{self.port}/{db}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop("immediate")
        if self._made:
            shutil.rmtree(self.base, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True
