"""The PROXY protocol header, v1 (text) and v2 (binary), sans-I/O (SPEC §9).

An L4 balancer (HAProxy ``send-proxy`` / ``send-proxy-v2``, a cloud load
balancer, a Kubernetes Service with PROXY v2) opens its connection to the
relay with one header naming the real client; the relay's ACLs, limits,
logs and metadata then see that client instead of the balancer.  This module
only parses: ``HeaderReader`` takes bytes and says how many it wants next
(``wanted``), so the caller can read exactly the header and not one LPD (or
TLS) byte beyond it — what follows belongs to the connection.  No sockets,
no clock; the 5 s deadline is the caller's.

Grammar (haproxy.org/download/2.9/doc/proxy-protocol.txt): v1 is
``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` or ``PROXY UNKNOWN...\\r\\n``,
107 bytes at most; v2 is a 12-byte signature, version/command, family,
a 2-byte length, addresses and TLVs (ignored), bounded here by
``MAX_V2_LENGTH``.  A v2 LOCAL command (health checks) and v1 UNKNOWN carry no
client: the connection is the balancer's own.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "V2_SIGNATURE",
    "HeaderReader",
    "ProxyHeader",
    "ProxyProtocolError",
    "parse_header",
]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
MAX_V1_LENGTH = 107
MAX_V2_LENGTH = 4096            # address block and TLVs; HAProxy sends far less
_V2_FIXED = 16
# v2 family/transport byte -> (address block length, address size)
_V2_FAMILIES = {0x11: (12, 4), 0x21: (36, 16)}


class ProxyProtocolError(ValueError):
    """Not a valid PROXY protocol header; the connection is refused."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyHeader:
    """A parsed header: the client's address, or None for LOCAL / UNKNOWN."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int                  # bytes the header took on the wire


def looks_like_header(first: bytes) -> bool:
    """Whether a connection's first byte(s) could start a header (never LPD or TLS)."""
    return bool(first) and (V1_PREFIX.startswith(first[:6]) or
                            V2_SIGNATURE.startswith(first[:12]))


class HeaderReader:
    """Bytes in, one ``ProxyHeader`` out; ``wanted`` never asks past the header."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.header: ProxyHeader | None = None

    @property
    def empty(self) -> bool:
        """No byte fed yet."""
        return not self._buf

    def wanted(self) -> int:
        """How many bytes to read next without reading beyond the header (0: done)."""
        buf = self._buf
        if self.header is not None:
            return 0
        if not buf:
            return 1
        if buf[0] == V2_SIGNATURE[0]:
            if len(buf) < _V2_FIXED:
                return _V2_FIXED - len(buf)
            return _V2_FIXED + int.from_bytes(buf[14:16], "big") - len(buf)
        return 1                  # v1: one byte at a time up to its LF

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add bytes; the header once complete (bytes beyond it are not consumed)."""
        if self.header is not None:
            return self.header
        self._buf += data
        buf = bytes(self._buf)
        if buf[:1] == V2_SIGNATURE[:1]:
            self.header = _v2(buf)
        elif buf[:1] == V1_PREFIX[:1]:
            self.header = _v1(buf)
        else:
            raise ProxyProtocolError("the connection does not start with a PROXY header")
        return self.header


def parse_header(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data`` (None: incomplete); for tests and tools."""
    return HeaderReader().feed(data)


def _v1(buf: bytes) -> ProxyHeader | None:
    head = buf[:len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        raise ProxyProtocolError("not a PROXY v1 header")
    end = buf.find(b"\r\n")
    if end < 0:
        if len(buf) >= MAX_V1_LENGTH:
            raise ProxyProtocolError(f"PROXY v1 header longer than {MAX_V1_LENGTH} bytes")
        if b"\n" in buf:
            raise ProxyProtocolError("PROXY v1 header not ended by CRLF")
        return None
    if end + 2 > MAX_V1_LENGTH:
        raise ProxyProtocolError(f"PROXY v1 header longer than {MAX_V1_LENGTH} bytes")
    try:
        parts = buf[len(V1_PREFIX):end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 header is not ASCII") from None
    if parts[0] == "UNKNOWN":
        return ProxyHeader(version=1, source=None, destination=None, length=end + 2)
    if parts[0] not in ("TCP4", "TCP6") or len(parts) != 5:
        raise ProxyProtocolError(f"PROXY v1: expected TCP4, TCP6 or UNKNOWN and 4 fields, "
                                 f"got {' '.join(parts)[:60]!r}")
    kind = ipaddress.IPv4Address if parts[0] == "TCP4" else ipaddress.IPv6Address
    src, dst = (_v1_address(kind, a, p) for a, p in ((parts[1], parts[3]),
                                                    (parts[2], parts[4])))
    return ProxyHeader(version=1, source=src, destination=dst, length=end + 2)


def _v1_address(kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address], addr: str,
                port: str) -> tuple[str, int]:
    try:
        host = str(kind(addr))
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1: bad address {addr[:45]!r}") from None
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ProxyProtocolError(f"PROXY v1: bad port {port[:8]!r}")
    return host, int(port)


def _v2(buf: bytes) -> ProxyHeader | None:
    sig = buf[:len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(sig):
        raise ProxyProtocolError("not a PROXY v2 signature")
    if len(buf) < _V2_FIXED:
        return None
    version, command, family = buf[12] >> 4, buf[12] & 0x0F, buf[13]
    length = int.from_bytes(buf[14:16], "big")
    if version != 2 or command not in (0, 1):
        raise ProxyProtocolError(f"PROXY v2: unsupported version/command 0x{buf[12]:02x}")
    if length > MAX_V2_LENGTH:
        raise ProxyProtocolError(f"PROXY v2: {length} address bytes, more than "
                                 f"{MAX_V2_LENGTH}")
    if len(buf) < _V2_FIXED + length:
        return None
    total = _V2_FIXED + length
    if command == 0 or family == 0x00:   # LOCAL (health check) or UNSPEC: the balancer
        return ProxyHeader(version=2, source=None, destination=None, length=total)
    if family not in _V2_FAMILIES:
        raise ProxyProtocolError(f"PROXY v2: unsupported family/transport 0x{family:02x}")
    need, size = _V2_FAMILIES[family]
    if length < need:
        raise ProxyProtocolError(f"PROXY v2: {length} address bytes, expected {need}")
    a = buf[_V2_FIXED:_V2_FIXED + need]
    kind = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    src = (str(kind(a[:size])), int.from_bytes(a[2 * size:2 * size + 2], "big"))
    dst = (str(kind(a[size:2 * size])), int.from_bytes(a[2 * size + 2:2 * size + 4], "big"))
    return ProxyHeader(version=2, source=src, destination=dst, length=total)
