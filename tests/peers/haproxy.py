"""HAProxy (Debian ``haproxy``) in TCP mode in front of relays, with the PROXY protocol.

A private config on a free loopback port, ``haproxy -db`` in the foreground
(no daemon, no chroot, no user switch), stopped by its PID.  Each backend
server gets ``send-proxy-v2`` or ``send-proxy`` (v1), so the relay sees the
real client's address in the header (SPEC §9).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.peers.process import (
    LOOPBACK,
    ConfigFileDaemon,
)


class HAProxy(ConfigFileDaemon):
    """One TCP frontend on ``LOOPBACK:port`` balancing round-robin over ``backends``."""

    BINARY = "haproxy"
    CONF_NAME = "haproxy.cfg"

    def __init__(self, workdir: Path, backends: Sequence[int], *, send_proxy: str = "v2",
                 startup_timeout: float = 10.0) -> None:
        self.workdir = workdir
        self.backends = tuple(backends)
        self.option = {"v2": "send-proxy-v2", "v1": "send-proxy", "": ""}[send_proxy]
        self.startup_timeout = startup_timeout
        self.port = 0
        self.log_path = workdir / "haproxy.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        servers = [f"    server r{i} {LOOPBACK}:{p} {self.option}".rstrip()
                   for i, p in enumerate(self.backends)]
        return "\n".join([
            "global", "    maxconn 512",
            "defaults", "    mode tcp", "    timeout connect 2s", "    timeout client 30s",
            "    timeout server 30s", "    retries 2", "    option redispatch",
            "frontend lpd", f"    bind {LOOPBACK}:{self.port}", "    default_backend relays",
            "backend relays", "    balance roundrobin", *servers, ""])

    def _argv(self, binary: str, conf: Path) -> list[str]:
        return [binary, "-db", "-f", str(conf)]
