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
    Service,
    free_port,
    log_tail,
    require_binary,
    start_process,
    stop_process_tree,
    wait_listening,
)


class HAProxy(Service):
    """One TCP frontend on ``LOOPBACK:port`` balancing round-robin over ``backends``."""

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

    def start(self) -> None:
        binary = require_binary("haproxy")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):   # another test may take the free port before we bind it
            self.port = free_port()
            conf = self.workdir / "haproxy.cfg"
            conf.write_text(self._config())
            self._proc = start_process([binary, "-db", "-f", str(conf)], self.log_path)
            if wait_listening(self._proc, self.port, self.startup_timeout):
                return
            stop_process_tree(self._proc)
            self._proc = None
        raise RuntimeError(f"haproxy did not start:\n{log_tail(self.log_path)}")

    def stop(self) -> None:
        if self._proc is not None:
            stop_process_tree(self._proc)
            self._proc = None
