"""rsyslog (Debian ``rsyslog``) as the audit log's syslog collector (SPEC §11).

``Rsyslog`` runs ``rsyslogd -n -f CONF -i PIDFILE`` in the foreground with
its own configuration: ``imtcp`` on a free loopback port (plain TCP, or TLS
with the ``gtls`` driver of ``rsyslog-gnutls`` and a client certificate
required, as IHE ATNA expects), every message's MSG — the record's JSON —
written one a line to ``messages``, and the whole RFC 5424 message to
``raw``.  ``stop`` and ``start_again`` (same port) stand for a collector
that goes away for a while.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import pytest

from tests.peers.process import (
    LOOPBACK,
    ConfigFileDaemon,
    log_tail,
    require_binary,
    start_listening,
)

GTLS_MODULE_DIRS = ("/usr/lib/x86_64-linux-gnu/rsyslog", "/usr/lib/aarch64-linux-gnu/rsyslog",
                    "/usr/lib/rsyslog")


def require_gtls() -> None:
    """Skip unless rsyslog's GnuTLS stream driver (``rsyslog-gnutls``) is installed."""
    if not any(os.path.exists(os.path.join(d, "lmnsd_gtls.so")) for d in GTLS_MODULE_DIRS):
        pytest.skip("rsyslog-gnutls (rsyslog's gtls driver) not installed "
                    "(scripts/install-peers.sh installs it)")


class Rsyslog(ConfigFileDaemon):
    """One rsyslogd receiving syslog over TCP (``tls`` None) or TLS on a loopback port."""

    BINARY = "rsyslogd"
    CONF_NAME = "rsyslog.conf"

    def __init__(self, workdir: Path, *, tls: dict[str, str] | None = None,
                 startup_timeout: float = 10.0) -> None:
        self.workdir = workdir
        self.tls = tls                   # {"ca", "cert", "key"} PEM paths, or None
        self.log_path = workdir / "rsyslogd.out"
        self.messages = workdir / "messages"
        self.raw = workdir / "raw"
        self.startup_timeout = startup_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        work = self.workdir / "work"
        work.mkdir(exist_ok=True)
        lines = [f'global(workDirectory="{work}" maxMessageSize="64k"']
        if self.tls is not None:
            lines[0] += (f' defaultNetstreamDriverCAFile="{self.tls["ca"]}"'
                         f' defaultNetstreamDriverCertFile="{self.tls["cert"]}"'
                         f' defaultNetstreamDriverKeyFile="{self.tls["key"]}"')
            lines += [lines.pop() + ")",
                      'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" '
                      'StreamDriver.AuthMode="x509/certvalid")']
        else:
            lines += [lines.pop() + ")", 'module(load="imtcp")']
        lines += [f'input(type="imtcp" address="{LOOPBACK}" port="{self.port}")',
                  'template(name="msgonly" type="string" string="%msg%\\n")',
                  'template(name="whole" type="string" string="%rawmsg%\\n")',
                  f'*.* action(type="omfile" file="{self.messages}" template="msgonly")',
                  f'*.* action(type="omfile" file="{self.raw}" template="whole")']
        return "\n".join(lines) + "\n"

    def _argv(self, binary: str, conf: Path) -> list[str]:
        return [binary, "-n", "-f", str(conf), "-i", str(self.workdir / "rsyslogd.pid")]

    def start_again(self) -> None:
        """Start on the port it had (the relay is configured with it)."""
        binary = require_binary(self.BINARY)
        conf = self.workdir / self.CONF_NAME
        self._proc = start_listening(self._argv(binary, conf), self.log_path, self.port,
                                     self.startup_timeout)
        if self._proc is None:
            raise RuntimeError(f"rsyslogd did not start again:\n{log_tail(self.log_path)}")

    def records(self) -> list[dict[str, object]]:
        """Every audit record received so far, in arrival order (duplicates kept)."""
        try:
            text = self.messages.read_bytes()
        except FileNotFoundError:
            return []
        found = []
        for line in text.splitlines():
            line = line.strip()
            if line.startswith(b"{"):
                found.append(orjson.loads(line))
        return found
