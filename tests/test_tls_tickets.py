"""The TLS listener sends one session ticket per full handshake, and it still resumes.

Two tickets (OpenSSL's TLS 1.3 default) cost the server ~0.2 ms of CPU each
with mutual TLS and only help a client opening connections in parallel;
one keeps resumption for a client that reconnects (docs/tls.md "Cost").
"""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

from relay import tls
from tests.tlspki import make_pki


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext,
               session: ssl.SSLSession | None = None) -> ssl.SSLObject:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cl = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1", session=session)
    sv = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):                       # a handshake is a few flights
        for obj in (cl, sv):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    cl.write(b"x")
    s_in.write(c_out.read())
    assert sv.read(1) == b"x"
    c_in.write(s_out.read())
    with contextlib.suppress(ssl.SSLWantReadError):
        cl.read(1)                            # takes in the ticket
    return cl


def test_one_ticket_and_a_reconnect_resumes(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    server = tls.server_context(Path(pki.path("server.pem")), Path(pki.path("server.key")),
                                Path(pki.path("ca.pem")))
    assert server.num_tickets == 1
    client = tls.client_context(pki.path("ca.pem"), pki.path("branch-7.pem"),
                                pki.path("branch-7.key"))
    first = _handshake(client, server)
    assert first.version() == "TLSv1.3" and not first.session_reused
    assert first.session is not None and first.session.has_ticket
    again = _handshake(client, server, session=first.session)
    assert again.session_reused
