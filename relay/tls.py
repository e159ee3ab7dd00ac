"""TLS for LPD between sites (SPEC §9): contexts, the stream, names and refusal reasons.

No LPD-over-TLS standard exists, so the relay speaks what stunnel speaks:
TLS from the first byte, plain RFC 1179 inside.  This module builds the
``ssl`` contexts (TLS 1.2 minimum, 1.3 preferred, no renegotiation), wraps a
connected trio socket in ``TlsStream`` — the same ``recv_into`` /
``send_all`` pair as ``relay.fastio.FastSocket``, so the connection and the
client drive either without knowing which (the plain path keeps its
scheduler-free system calls; TLS goes through ``trio.SSLStream``) — maps a
peer certificate to the queues ``[tls.peers]`` grants it, sorts a failed
handshake into the bounded ``reason`` label of
``lpdrelay_tls_handshake_failures_total``, and reads a certificate's expiry
for ``lpdrelay_tls_certificate_expiry_seconds`` without a crypto dependency
(a few lines of DER walking).
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from relay import log
from relay.errors import ConfigError
from relay.fastio import FastSocket

if TYPE_CHECKING:
    from relay.config import ServerConfig, TlsConfig
    from relay.metrics import Metrics

__all__ = [
    "HANDSHAKE_REASONS",
    "InboundTls",
    "TlsPeer",
    "TlsStream",
    "certificate_label",
    "certificate_not_after",
    "client_context",
    "failure_reason",
    "identify",
    "server_context",
    "session_line",
    "session_summary",
]

HANDSHAKE_REASONS = ("no_certificate", "unknown_ca", "expired", "bad_name", "protocol", "other")
ANY_QUEUE = "*"
RAW_READ = 256 * 1024     # ciphertext read (and plaintext encrypted) per system call
SESSION_TICKETS = 1       # TLS 1.3 tickets a server sends after a full handshake

# OpenSSL verify codes (X509_V_ERR_*) and alert/reason names, by our reason.
_VERIFY_CODES = {10: "expired", 62: "bad_name", 2: "unknown_ca", 18: "unknown_ca",
                 19: "unknown_ca", 20: "unknown_ca", 21: "unknown_ca"}
_REASON_WORDS = (("CERTIFICATE_REQUIRED", "no_certificate"),
                 ("DID_NOT_RETURN_A_CERTIFICATE", "no_certificate"),
                 ("CERTIFICATE_EXPIRED", "expired"), ("UNKNOWN_CA", "unknown_ca"),
                 ("BAD_CERTIFICATE", "unknown_ca"), ("HOSTNAME_MISMATCH", "bad_name"),
                 ("VERSION", "protocol"), ("PROTOCOL", "protocol"), ("HTTP_REQUEST", "protocol"),
                 ("NO_SHARED_CIPHER", "protocol"), ("UNEXPECTED_MESSAGE", "protocol"),
                 ("PACKET_LENGTH", "protocol"), ("RECORD", "protocol"))


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2   # 1.3 is negotiated when both have it
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    return ctx


def server_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """The listeners' context; with ``client_ca`` a signed client certificate is required."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    # TLS 1.3 sends session tickets after every full handshake (2 by
    # default); each carries the client's certificate, ~0.2 ms of CPU with
    # mutual TLS.  One is all a client resuming its next connection needs.
    ctx.num_tickets = SESSION_TICKETS
    ctx.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        ctx.load_verify_locations(str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: str, cert: str = "", key: str = "") -> ssl.SSLContext:
    """An ``lpds://`` destination's context: the server verified against ``ca`` and its name."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if ca:
        ctx.load_verify_locations(ca)
    else:
        ctx.load_default_certs()
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


class TlsStream:
    """``recv_into`` / ``send_all`` through an ``ssl.SSLObject`` on memory BIOs.

    The socket side is ``relay.fastio.FastSocket`` (system call first, park
    only when it would block); ``recv_into`` decrypts every TLS record
    already buffered straight into the caller's buffer (``SSLObject.read``
    into a buffer, no intermediate bytes), so a 16 KiB record costs one C
    call, not a scheduler round trip — trio.SSLStream returned one record
    per ``receive_some`` and capped a 1 GiB job at ~100 MB/s here.  Errors
    are OSError, which the connection and the client read as "peer gone".
    End of data is a close_notify or the TCP FIN alike: stunnel and our own
    stream mode end with a FIN.
    """

    __slots__ = ("_in", "_out", "_raw", "_rawview", "io", "obj")

    def __init__(self, sock: trio.socket.SocketType, ctx: ssl.SSLContext, *,
                 server_hostname: str | None = None) -> None:
        self.io = FastSocket(sock)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=server_hostname is None,
                                server_hostname=server_hostname)
        self._raw = bytearray(RAW_READ)
        self._rawview = memoryview(self._raw)

    @classmethod
    def wrap(cls, sock: trio.socket.SocketType, ctx: ssl.SSLContext, *,
             server_hostname: str | None = None) -> TlsStream:
        return cls(sock, ctx, server_hostname=server_hostname)

    async def _flush(self) -> None:
        if self._out.pending:
            await self.io.send_all(self._out.read())

    async def _fill(self) -> bool:
        n = await self.io.recv_into(self._raw)
        if not n:
            self._in.write_eof()
            return False
        self._in.write(self._rawview[:n])
        return True

    async def handshake(self) -> None:
        """Run the handshake; ``ssl.SSLError`` (or OSError) when it fails."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionResetError("closed during the TLS handshake") from None
            except ssl.SSLError:
                with contextlib.suppress(OSError):   # the alert tells the peer why
                    await self._flush()
                raise
        await self._flush()

    async def recv_into(self, buf: bytearray) -> int:
        """Decrypt into ``buf`` what has arrived; 0 at the end of the data."""
        view, total = memoryview(buf), 0
        while True:
            try:
                # With a buffer, read() returns a count (typeshed says bytes).
                n: int = self.obj.read(len(view) - total, view[total:])  # type: ignore[assignment]
            except ssl.SSLWantReadError:
                if total:
                    return total
                await self._flush()      # e.g. a TLS 1.3 key update to answer
                await self._fill()       # at EOF, the next read reports it
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return total             # close_notify, or a FIN without one
            except ssl.SSLError as exc:
                raise ConnectionResetError(f"TLS: {describe_failure(exc)}") from None
            if not n:
                return total
            total += n
            if total == len(view) or not (self._in.pending or self.obj.pending()):
                return total

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), RAW_READ):
            try:
                self.obj.write(view[start:start + RAW_READ])
            except ssl.SSLError as exc:
                raise BrokenPipeError(f"TLS: {describe_failure(exc)}") from None
            await self._flush()

    def version(self) -> str:
        cipher = self.obj.cipher()
        return f"{self.obj.version()} {cipher[0] if cipher else ''}".strip()

    def peer_certificate(self) -> dict[str, Any]:
        return self.obj.getpeercert() or {}

    def peer_chain(self) -> list[dict[str, Any]]:
        """The verified chain, server certificate first, as ``getpeercert()`` dicts.

        Python 3.13 has ``get_verified_chain``; before it the same call is on
        the private ``_sslobj``.  Only the server certificate when neither is there.
        """
        obj: Any = self.obj
        chain = getattr(obj, "get_verified_chain", None) or getattr(
            getattr(obj, "_sslobj", None), "get_verified_chain", None)
        if chain is None:
            return [self.peer_certificate()]
        return [c.get_info() for c in chain()]


def certificate_label(cert: Mapping[str, Any]) -> str:
    """A certificate's name for people: its first SAN or CN, else its subject's O/OU."""
    names = certificate_names(cert)
    if names:
        return names[0]
    parts = [v for rdn in cert.get("subject", ()) for _, v in rdn]
    return ", ".join(parts) or "(no subject)"


def session_summary(stream: TlsStream, now: float | None = None) -> dict[str, Any]:
    """What ``probe lpds://`` shows of a handshake: version, cipher, chain, expiry."""
    chain = stream.peer_chain()
    cipher = stream.obj.cipher()
    not_after = ssl.cert_time_to_seconds(chain[0]["notAfter"]) if chain and \
        "notAfter" in chain[0] else None
    left = None if not_after is None else (not_after - (time.time() if now is None else now))
    return {"version": stream.obj.version() or "", "cipher": cipher[0] if cipher else "",
            "chain": [certificate_label(c) for c in chain],
            "not_after": None if not_after is None else time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(not_after)),
            "days_left": None if left is None else int(left // 86400)}


def session_line(summary: Mapping[str, Any]) -> str:
    """``session_summary`` in one line: ``TLSv1.3 CIPHER, chain A <- B, expires T (in N days)``."""
    line = f"{summary['version']} {summary['cipher']}, chain " + " <- ".join(summary["chain"])
    if summary["not_after"] is not None:
        line += f", expires {summary['not_after']} (in {summary['days_left']} days)"
    return line


def failure_reason(exc: BaseException) -> str:
    """The ``HANDSHAKE_REASONS`` value of a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(exc.verify_code, "other")
    if isinstance(exc, ssl.SSLError):
        text = f"{exc.reason or ''} {exc}".upper()
        for word, reason in _REASON_WORDS:
            if word in text:
                return reason
    return "other"


def describe_failure(exc: BaseException) -> str:
    """A short human reason: the verify message or OpenSSL's reason name."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc) or type(exc).__name__


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsPeer:
    """Who a TLS client is: ``name`` (mapped or shown) and the queues it may use."""

    name: str
    queues: frozenset[str] | None     # None: any queue
    mapped: bool = True

    def permits(self, queue: str, wire_queue: str) -> bool:
        """Whether this peer may use the configured ``queue`` (asked for as ``wire_queue``)."""
        if self.queues is None or ANY_QUEUE in self.queues:
            return True
        return queue.casefold() in self.queues or wire_queue.casefold() in self.queues


def certificate_names(cert: Mapping[str, Any]) -> list[str]:
    """DNS and URI SANs in order; the subject CN only when there are none."""
    names = [v for kind, v in cert.get("subjectAltName", ()) if kind in ("DNS", "URI")]
    if names:
        return names
    return [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]


def identify(cert: Mapping[str, Any], peers: Mapping[str, frozenset[str]]) -> TlsPeer:
    """Map a verified client certificate through ``[tls.peers]`` (empty table: any queue)."""
    names = certificate_names(cert)
    if not peers:
        return TlsPeer(name=names[0] if names else "", queues=None)
    for name in names:
        if name in peers:
            return TlsPeer(name=name, queues=peers[name])
    return TlsPeer(name=names[0] if names else "", queues=frozenset(), mapped=False)


class InboundTls:
    """The TLS listeners' side: one context, the handshake, the peer's identity."""

    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        assert config.tls is not None, "config requires [tls] with listen_tls"
        self.timeout = config.command_timeout
        self.metrics = metrics
        self.reload(config.tls)

    def reload(self, tls: TlsConfig) -> None:
        """Re-read the certificate, key, CA and peers (SIGHUP); new handshakes use them.

        Connections already open keep the context they were accepted with.
        On a failure nothing changes and ``ConfigError`` says why.
        """
        try:
            context = server_context(tls.cert, tls.key, tls.client_ca)
            not_after = certificate_not_after(tls.cert)
        except (OSError, ValueError) as exc:   # at start: a clear "cannot start" line
            raise ConfigError("tls", f"cannot load the certificate, key or client_ca: {exc}",
                              ) from exc
        self.context, self.peers, self.mutual = context, tls.peers, tls.client_ca is not None
        self.metrics.certificate_expires("server", not_after, replace=True)

    async def accept(self, sock: trio.socket.SocketType, peer: str,
                     ) -> tuple[TlsStream, TlsPeer] | None:
        """Handshake within ``command_timeout``; None (logged, counted) when it fails."""
        stream = TlsStream.wrap(sock, self.context)
        try:
            with trio.fail_after(self.timeout):
                await stream.handshake()
        except Exception as exc:
            reason = failure_reason(exc)
            self.metrics.tls_handshake_failures_total.labels(reason=reason).inc()
            shown = "handshake timed out" if isinstance(exc, trio.TooSlowError) else (
                describe_failure(exc))
            log.event("warning", "tls_handshake_failed", peer=peer, reason=reason, error=shown)
            return None
        who = identify(stream.peer_certificate(), self.peers) if self.mutual else (
            TlsPeer(name="", queues=None))
        log.event("debug", "tls_accepted", peer=peer, tls_peer=who.name,
                  tls=stream.version())
        return stream, who


# ---- certificate expiry, from the PEM file ----

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)


def _der(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at ``pos``."""
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    return tag, pos, pos + length


def certificate_not_after(path: str | Path) -> float:
    """Epoch seconds at which the first certificate in the PEM file ``path`` expires.

    ValueError when the file holds no readable certificate.
    """
    match = _PEM.search(Path(path).read_bytes())
    if match is None:
        raise ValueError(f"{path}: no PEM certificate")
    der = base64.b64decode(b"".join(match.group(1).split()))
    try:
        _, pos, _ = _der(der, 0)             # Certificate
        _, pos, _ = _der(der, pos)           # tbsCertificate
        if der[pos] == 0xA0:                 # [0] version
            pos = _der(der, pos)[2]
        for _ in range(3):                   # serial, signature algorithm, issuer
            pos = _der(der, pos)[2]
        _, pos, _ = _der(der, pos)           # validity
        pos = _der(der, pos)[2]              # notBefore
        tag, start, end = _der(der, pos)     # notAfter
        text = der[start:end].decode("ascii")
    except (IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable certificate") from exc
    fmt = "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ"
    return float(calendar.timegm(time.strptime(text, fmt)))
