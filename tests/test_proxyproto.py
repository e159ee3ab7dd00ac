"""relay.proxyproto: PROXY v1 and v2 headers whole, byte by byte, with trailing bytes."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.proxyproto import (
    MAX_V1_LENGTH,
    V2_SIGNATURE,
    HeaderReader,
    ProxyHeader,
    ProxyProtocolError,
    looks_like_header,
    parse_header,
)


def v2(command: int = 1, family: int = 0x11, addresses: bytes | None = None,
       tlvs: bytes = b"") -> bytes:
    if addresses is None:
        addresses = (socket.inet_aton("192.0.2.7") + socket.inet_aton("10.0.0.1")
                     + struct.pack("!HH", 40001, 515))
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


V6 = (socket.inet_pton(socket.AF_INET6, "2001:db8::7") + socket.inet_pton(socket.AF_INET6, "::1")
      + struct.pack("!HH", 721, 6515))
CASES = [
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 40001 515\r\n", ("192.0.2.7", 40001), 1),
    (b"PROXY TCP6 2001:db8::7 ::1 721 6515\r\n", ("2001:db8::7", 721), 1),
    (b"PROXY UNKNOWN\r\n", None, 1),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None, 1),
    (v2(), ("192.0.2.7", 40001), 2),
    (v2(family=0x21, addresses=V6), ("2001:db8::7", 721), 2),
    (v2(tlvs=b"\x04\x00\x03abc"), ("192.0.2.7", 40001), 2),   # a TLV is skipped
    (v2(command=0, family=0, addresses=b""), None, 2),           # LOCAL: health check
    (v2(family=0, addresses=b""), None, 2),                      # PROXY UNSPEC
]


def feed_by_wanted(data: bytes) -> tuple[ProxyHeader, int]:
    """Read as the server does: only ``wanted()`` bytes at a time."""
    reader, pos = HeaderReader(), 0
    while (want := reader.wanted()) > 0:
        reader.feed(data[pos:pos + want])
        pos += want
    assert reader.header is not None
    return reader.header, pos


@pytest.mark.parametrize(("wire", "source", "version"), CASES)
def test_whole_byte_by_byte_and_never_past_the_header(wire: bytes, source: object,
                                                      version: int) -> None:
    header = parse_header(wire)
    assert header is not None and header.source == source and header.version == version
    assert header.length == len(wire)
    reader = HeaderReader()
    for i in range(len(wire) - 1):
        assert reader.feed(wire[i:i + 1]) is None
    assert reader.feed(wire[-1:]) == header
    # With the LPD bytes behind it in the same segment, the reader stops at the header.
    got, consumed = feed_by_wanted(wire + b"\x02ward3\n")
    assert got == header and consumed == len(wire)


@pytest.mark.parametrize("wire", [
    b"GET / HTTP/1.0\r\n", b"\x02ward3\n", b"\x16\x03\x01",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 40001\r\n",
    b"PROXY TCP4 192.0.2.999 10.0.0.1 1 2\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 1 65536\r\n",
    b"PROXY TCP5 192.0.2.7 10.0.0.1 1 2\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\n",
    b"PROXY UNKNOWN " + b"x" * MAX_V1_LENGTH,
    b"PROXY TCP4 \xff 10.0.0.1 1 2\r\n",
    V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c",
    V2_SIGNATURE + b"\x11\x11\x00\x0c",                     # version 1 in a v2 header
    V2_SIGNATURE + b"\x22\x11\x00\x0c",                     # command 2
    V2_SIGNATURE + b"\x21\x11\xff\xff",                     # beyond MAX_V2_LENGTH
    v2(addresses=b"\x00" * 4),                              # too short for TCP4
    v2(family=0x12),                                        # UDP over IPv4
])
def test_malformed_headers_are_refused(wire: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        reader = HeaderReader()
        for i in range(len(wire)):
            reader.feed(wire[i:i + 1])
        raise ProxyProtocolError("incomplete counts as refused at the deadline")


def test_first_bytes_of_lpd_or_tls_are_not_a_header() -> None:
    assert looks_like_header(b"PROXY TCP4") and looks_like_header(b"\r\n\r\n")
    assert looks_like_header(b"P") and looks_like_header(b"\r")
    for first in (b"\x02q\n", b"\x03q\n", b"\x16\x03\x01", b"", b"PROXY!"):
        assert not looks_like_header(first)


@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_none_or_the_error(data: bytes) -> None:
    try:
        header = parse_header(data)
    except ProxyProtocolError:
        return
    assert header is None or 0 < header.length <= len(data)
