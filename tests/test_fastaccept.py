"""relay.fastaccept: clients waiting are accepted without a yield each; cancellation
and fairness still get through; the fallback is trio's own accept."""

from __future__ import annotations

import socket

import pytest
import trio

from relay import fastaccept
from relay.fastaccept import Acceptor


def _listener() -> tuple[trio.socket.SocketType, tuple[str, int]]:
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.bind(("127.0.0.1", 0))
    raw.listen(64)
    return trio.socket.from_stdlib_socket(raw), raw.getsockname()


def test_waiting_clients_are_accepted_with_a_yield_only_every_few(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The yields are counted where they are made: a task that runs whenever the
    # accepting task yields is not a count (trio may run the accepting task
    # first in the batch after its yield, and the other task after the loop).
    yields = 0
    checkpoint = trio.lowlevel.checkpoint

    async def counted() -> None:
        nonlocal yields
        yields += 1
        await checkpoint()
    monkeypatch.setattr(trio.lowlevel, "checkpoint", counted)

    async def main() -> int:
        lsock, address = _listener()
        clients = [socket.create_connection(address) for _ in range(fastaccept.YIELD_EVERY * 2)]
        acceptor, accepted = Acceptor(lsock), []
        with trio.fail_after(10):
            for _ in clients:
                sock, addr = await acceptor.accept()
                accepted.append(sock)
                assert addr[0] == "127.0.0.1" and sock.family == socket.AF_INET
        peers = {s.getpeername() for s in accepted}
        assert peers == {c.getsockname() for c in clients}
        for s in accepted:
            s.close()
        for c in clients:
            c.close()
        lsock.close()
        return len(accepted)
    assert trio.run(main) == fastaccept.YIELD_EVERY * 2
    assert 1 <= yields <= 2     # trio's accept yields once per client: 32 here


def test_an_accepted_socket_works_and_a_wait_ends_when_a_client_comes() -> None:
    async def main() -> bytes:
        lsock, address = _listener()
        acceptor = Acceptor(lsock)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                got: list[bytes] = []

                async def serve() -> None:
                    sock, _ = await acceptor.accept()   # nobody yet: it waits
                    with sock:
                        got.append(await sock.recv(10))

                nursery.start_soon(serve)
                await trio.sleep(0.05)
                client = trio.socket.socket()
                await client.connect(address)
                await client.send(b"\x02lp\n")
        client.close()
        lsock.close()
        return got[0]
    assert trio.run(main) == b"\x02lp\n"


def test_a_cancelled_accept_loop_stops_though_clients_wait() -> None:
    async def main() -> int:
        lsock, address = _listener()
        clients = [socket.create_connection(address) for _ in range(3)]
        acceptor, accepted = Acceptor(lsock), 0
        with trio.fail_after(10):
            with trio.CancelScope() as scope:
                scope.cancel()
                while True:
                    sock, _ = await acceptor.accept()
                    sock.close()
                    accepted += 1
        for c in clients:
            c.close()
        lsock.close()
        return accepted
    assert trio.run(main) == 0


def test_without_the_wrapped_socket_it_is_trio_s_accept() -> None:
    class Wrapped:
        """A listener that hides its standard socket (another trio)."""

        def __init__(self, inner: trio.socket.SocketType) -> None:
            self.inner, self.family = inner, inner.family

        async def accept(self) -> tuple[trio.socket.SocketType, object]:
            return await self.inner.accept()

    async def main() -> bool:
        lsock, address = _listener()
        client = socket.create_connection(address)
        acceptor = Acceptor(Wrapped(lsock))  # type: ignore[arg-type]
        with trio.fail_after(10):
            sock, _ = await acceptor.accept()
        ok = sock.getpeername() == client.getsockname()
        sock.close()
        client.close()
        lsock.close()
        return ok
    assert trio.run(main)
