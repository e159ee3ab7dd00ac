"""Certificates for the TLS tests, made at test time with trustme (SPEC §9).

One CA signs the relay's server certificate (127.0.0.1 and localhost) and
the client certificates: ``branch-7.example.org`` (mapped to queue ward3),
``stranger.example.org`` (valid, not mapped) and an expired one; a second CA
signs ``rogue.example.org``, which the relay must not trust.  Every PEM is
written under the test's tmp folder and addressed by ``Pki.path(name)``.
"""

from __future__ import annotations

import datetime
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class Pki:
    folder: Path
    ca: trustme.CA
    not_after: datetime.datetime    # of the server certificate

    def path(self, name: str) -> str:
        return str(self.folder / name)

    def client_context(self, who: str | None = "branch-7", ca: str = "ca.pem") -> ssl.SSLContext:
        """A Python client context trusting ``ca``, showing ``who``'s certificate."""
        ctx = ssl.create_default_context(cafile=self.path(ca))
        if who is not None:
            ctx.load_cert_chain(self.path(f"{who}.pem"), self.path(f"{who}.key"))
        return ctx


def make_pki(folder: Path, days: int = 30) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca, rogue = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    rogue.cert_pem.write_to_path(str(folder / "rogue-ca.pem"))
    now = datetime.datetime.now(datetime.UTC)
    not_after = (now + datetime.timedelta(days=days)).replace(microsecond=0)
    certs = {
        "server": ca.issue_cert("127.0.0.1", "localhost", not_after=not_after),
        "branch-7": ca.issue_cert("branch-7.example.org"),
        "stranger": ca.issue_cert("stranger.example.org"),
        "expired": ca.issue_cert("branch-7.example.org",
                                 not_before=now - datetime.timedelta(days=10),
                                 not_after=now - datetime.timedelta(days=1)),
        "rogue": rogue.issue_cert("rogue.example.org"),
    }
    for name, cert in certs.items():
        cert.cert_chain_pems[0].write_to_path(str(folder / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(folder / f"{name}.key"))
    return Pki(folder=folder, ca=ca, not_after=not_after)


def tls_exchange(port: int, ctx: ssl.SSLContext, data: bytes, *, replies: int,
                 timeout: float = 10.0) -> bytes:
    """Send ``data`` over TLS to 127.0.0.1:``port`` and read ``replies`` bytes (or to EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(data)
        got = b""
        while len(got) < replies:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        return got
