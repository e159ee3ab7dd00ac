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
    ConfigFileDaemon,
    log_tail,
)


class Stunnel(ConfigFileDaemon):
    """One stunnel service ``[lpd]`` from ``LOOPBACK:port`` to ``connect``."""

    BINARY = "stunnel4"
    CONF_NAME = "stunnel.conf"

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

    def _argv(self, binary: str, conf: Path) -> list[str]:
        return [binary, str(conf)]

    def _output_path(self) -> Path:
        return self.workdir / "stunnel.out"

    def log_text(self) -> str:
        return log_tail(self.log_path, 100_000)
