"""Start intake workers fast: a fork server that has the relay imported already.

A fresh ``python -m relay.intakeworker`` spends 0.5-0.8 s importing trio,
prometheus-client and the relay before it can listen; a daemon with two
workers started that much slower (docs/architecture.md, "Processes").
Forking the running main process is not safe: it is a trio program, and in
the tests it runs in a thread beside others, whose locks a fork would copy.
So one helper process per main process, with nothing running but this loop,
forks a worker for each request: the request carries the worker's
descriptors (``SCM_RIGHTS``), the reply its pid.  ``lpd-relay serve`` forks
the helper from itself before trio starts (``prefork``: one thread, the
relay imported, so the helper costs no interpreter start and no imports);
anywhere else (a daemon in a test's thread) the helper is a fresh
``python -m relay.forkserver`` started on first use, which imports the
worker module once.  The helper exits when the main process closes its
socket (or dies); it reaps its children itself, so a worker is known to the
main process by its channel, not by ``wait``.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import socket as pysocket
import subprocess
import sys
import threading

__all__ = ["fork_worker", "prefork"]


class _Forked:
    """The helper as ``prefork`` made it: a child of this process, polled like a Popen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:   # reaped elsewhere: gone all the same
                pid, status = self.pid, 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


_lock = threading.Lock()
_server: tuple[subprocess.Popen[bytes] | _Forked, pysocket.socket] | None = None


def prefork() -> bool:
    """Fork the helper from this process now; False (nothing done) unless it is safe:
    only one thread runs.  Call before trio starts, with nothing locked."""
    global _server
    if _server is not None or threading.active_count() != 1:
        return False
    from relay import intakeworker  # noqa: F401  imported before the fork, for every worker

    ours, theirs = pysocket.socketpair(pysocket.AF_UNIX, pysocket.SOCK_SEQPACKET)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:   # the helper: never returns into the caller's code
        code = 1
        try:
            ours.close()
            code = _serve(theirs.detach())
        finally:
            os._exit(code)
    theirs.close()
    _server = (_Forked(pid), ours)
    return True


def _start() -> tuple[subprocess.Popen[bytes], pysocket.socket]:
    ours, theirs = pysocket.socketpair(pysocket.AF_UNIX, pysocket.SOCK_SEQPACKET)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "relay.forkserver", str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),))
    finally:
        theirs.close()
    return proc, ours


def fork_worker(fds: tuple[int, ...]) -> int:
    """A new worker process on ``fds`` (blocking: run it in a thread); its pid."""
    global _server
    with _lock:
        for _ in range(2):   # a helper that died is replaced once
            if _server is None or _server[0].poll() is not None:
                _server = _start()
            sock = _server[1]
            try:
                pysocket.send_fds(sock, [b"fork"], list(fds))
                reply = sock.recv(64)
            except OSError:
                reply = b""
            if reply:
                pid = pickle.loads(reply)
                assert isinstance(pid, int)
                return pid
            _server[1].close()
            _server = None
        raise OSError("the intake fork server does not answer")


def _serve(fd: int) -> int:
    from relay import intakeworker  # imported once, here, for every fork

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # the kernel reaps the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = pysocket.socket(fileno=fd)
    while True:
        msg, fds, _, _ = pysocket.recv_fds(sock, 64, 8)
        if not msg:
            return 0
        pid = os.fork()
        if pid == 0:
            sock.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            random.seed()
            code = 1
            try:
                code = intakeworker.main([str(n) for n in fds])
            finally:
                os._exit(code)
        for n in fds:
            os.close(n)
        sock.send(pickle.dumps(pid))


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1])))
