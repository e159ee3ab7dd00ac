"""``p910nd``, the raw port-9100 printer daemon, printing into a pipe we read.

The printer device is a FIFO (or a raw pty for bidirectional mode) drained
by a reader thread; p910nd's own log says where each job ended.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import threading
import time
import tty
from pathlib import Path

import pytest

from tests.peers.process import (
    LOOPBACK,
    Service,
    log_tail,
    namespace_argv,
    require_binary,
    require_namespaces,
    start_listening,
)

_GRACE = 0.2   # stop_process_tree's wait between SIGTERM and SIGKILL


class P910nd(Service):
    """``p910nd -d`` (foreground) on 127.0.0.1:9100+N, printing into a pipe we read.

    p910nd only listens on 9100+N for one digit N, so the free N is chosen at
    start (ten candidates; another one is tried if the bind races). Its lock
    file lives under a private /var/lock, so instances never wait on each
    other. The "printer" is a FIFO we drain; with ``bidirectional`` (``-b``)
    it is a raw pty instead, and ``reply`` makes the printer talk back.
    Jobs are split by p910nd's own log line "Finished job: n/m bytes".
    """

    def __init__(self, workdir: Path, *, bidirectional: bool = False,
                 startup_timeout: float = 5.0) -> None:
        self.workdir = workdir
        self.bidirectional = bidirectional
        self.startup_timeout = startup_timeout
        self.host = LOOPBACK
        self.port = 0
        self.log_path = workdir / "p910nd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._fds: list[int] = []
        self.device = ""

    def start(self) -> None:
        require_namespaces()
        require_binary("p910nd")
        require_binary("stdbuf")  # line-buffers p910nd's log so job ends show at once
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "lock" / "p910nd").mkdir(parents=True, exist_ok=True)
        read_fd = self._open_device()
        self._reader = threading.Thread(target=self._drain, args=(read_fd,), daemon=True)
        self._reader.start()
        for n in self._free_numbers():
            if self._launch(n):
                return
        self.stop()
        pytest.skip("no free port among 127.0.0.1:9100-9109 for p910nd")

    def _open_device(self) -> int:
        """Create the printer device; return the fd we read printer output from."""
        if self.bidirectional:
            master, slave = os.openpty()
            tty.setraw(slave)  # no echo, no CR/LF rewriting: bytes pass unchanged
            self._fds = [master, slave]  # keep the slave open: it holds raw mode
            self.device = os.ttyname(slave)
            os.set_blocking(master, False)
            return master
        fifo = self.workdir / "printer"
        with contextlib.suppress(FileNotFoundError):
            fifo.unlink()
        os.mkfifo(fifo, 0o600)
        self.device = str(fifo)
        # Opened before p910nd starts, so its blocking open for writing succeeds.
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        self._fds = [fd]
        return fd

    @staticmethod
    def _free_numbers() -> list[int]:
        candidates = []
        for n in range(10):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((LOOPBACK, 9100 + n))
                except OSError:
                    continue
            candidates.append(n)
        return candidates

    def _launch(self, n: int) -> bool:
        argv = ["stdbuf", "-oL", require_binary("p910nd"), "-d", "-i", LOOPBACK,
                "-f", self.device, *(["-b"] if self.bidirectional else []), str(n)]
        binds = {"/var/lock": self.workdir / "lock"}
        self.port = 9100 + n
        # As its namespace's init without a SIGTERM handler p910nd ignores
        # SIGTERM, and it has nothing to clean up: SIGKILL comes quickly.
        self._proc = start_listening(namespace_argv(argv, binds, pid_namespace=True),
                                     self.log_path, self.port, self.startup_timeout,
                                     grace=_GRACE)
        return self._proc is not None

    def _drain(self, fd: int) -> None:
        """Copy printer output into our buffer until stopped (bounded waits)."""
        while not self._stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.05)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:  # pty without a writer reports EIO
                chunk = b""
            if not chunk:
                time.sleep(0.01)  # no writer between jobs: EOF until p910nd reopens
                continue
            with self._lock:
                self._buf += chunk

    def reply(self, data: bytes) -> None:
        """Bidirectional mode: the printer sends ``data`` back to the client."""
        if not self.bidirectional:
            raise RuntimeError("reply() needs P910nd(bidirectional=True)")
        os.write(self._fds[0], data)

    @property
    def received(self) -> bytes:
        """Every byte p910nd has written to the printer so far."""
        with self._lock:
            return bytes(self._buf)

    def finished_jobs(self) -> list[int]:
        """Printer byte counts of the jobs p910nd reports finished, in order."""
        counts = []
        for line in log_tail(self.log_path, 1_000_000).splitlines():
            if line.startswith("Finished job:"):
                counts.append(int(line.split(":")[1].split("/")[0]))
        return counts

    def wait_jobs(self, n: int, timeout: float = 10.0) -> list[bytes]:
        """Wait for ``n`` finished connections; return each one's printed bytes."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.finished_jobs()
            data = self.received
            if len(counts) >= n and len(data) >= sum(counts):
                jobs, at = [], 0
                for count in counts:
                    jobs.append(data[at:at + count])
                    at += count
                return jobs
            if time.monotonic() >= deadline:
                raise TimeoutError(f"p910nd finished {len(counts)} of {n} jobs, "
                                   f"{len(data)} bytes; log:\n{log_tail(self.log_path)}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop p910nd (by PID, with its namespace), then the reader thread."""
        self._stop_process(grace=_GRACE)
        self._stop.set()
        if self._reader is not None:
            self._reader.join(timeout=2)
            self._reader = None
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
