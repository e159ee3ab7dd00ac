"""stunnel (Debian ``stunnel4``) as the TLS end in front of a plain LPD peer (SPEC §9).

No LPD-over-TLS standard exists; what admins put in front of an LPD sender
or receiver that cannot speak TLS is stunnel.  ``Stunnel.client`` accepts
plain LPD on a loopback port (LPRng's ``lpr`` sends there) and connects to a
TLS listener with a client certificate, verifying the server's against a CA
and a name; ``Stunnel.server`` terminates TLS (client certificate required)
in front of a plain receiver such as LPRng's ``lpd``.  It runs in the
foreground with its own config and log file and is stopped by its PID.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.peers.process import (
    LOOPBACK,
    Service,
    free_port,
    log_tail,
    require_binary,
    start_process,
    stop_process_tree,
    wait_listening,
)


class Stunnel(Service):
    """One stunnel service ``[lpd]`` from ``LOOPBACK:port`` to ``connect``."""

    def __init__(self, workdir: Path, *, client: bool, connect: int, cert: str, key: str,
                 ca: str, check_host: str = "localhost", startup_timeout: float = 10.0) -> None:
        self.workdir = workdir
        self.client = client
        self.connect = connect
        self.cert, self.key, self.ca = cert, key, ca
        self.check_host = check_host
        self.startup_timeout = startup_timeout
        self.port = 0
        self.log_path = workdir / "stunnel.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def client_to(cls, workdir: Path, port: int, *, cert: str, key: str, ca: str) -> Stunnel:
        return cls(workdir, client=True, connect=port, cert=cert, key=key, ca=ca)

    @classmethod
    def server_for(cls, workdir: Path, port: int, *, cert: str, key: str, ca: str) -> Stunnel:
        return cls(workdir, client=False, connect=port, cert=cert, key=key, ca=ca)

    def _config(self) -> str:
        lines = ["foreground = yes", "pid =", f"output = {self.log_path}", "debug = 5",
                 "[lpd]", f"accept = {LOOPBACK}:{self.port}",
                 f"connect = {LOOPBACK}:{self.connect}", f"cert = {self.cert}",
                 f"key = {self.key}", f"CAfile = {self.ca}", "verifyChain = yes",
                 "sslVersionMin = TLSv1.2"]
        if self.client:
            lines += ["client = yes", f"checkHost = {self.check_host}"]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        binary = require_binary("stunnel4")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):   # another test may take the free port before we bind it
            self.port = free_port()
            conf = self.workdir / "stunnel.conf"
            conf.write_text(self._config())
            self._proc = start_process([binary, str(conf)], self.workdir / "stunnel.out")
            if wait_listening(self._proc, self.port, self.startup_timeout):
                return
            stop_process_tree(self._proc)
            self._proc = None
        raise RuntimeError(f"stunnel did not start:\n{log_tail(self.log_path)}")

    def stop(self) -> None:
        if self._proc is not None:
            stop_process_tree(self._proc)
            self._proc = None

    def log_text(self) -> str:
        return log_tail(self.log_path, 100_000)
