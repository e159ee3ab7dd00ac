"""One database session driven from trio's event loop: libpq's non-blocking interface.

A delivery's removal from the database is the one statement every delivered
job costs (docs/delivery.md, "With a shared spool"), and made through the
pool it is a worker thread's round trip: the hop to the thread and back, the
pool's checkout and psycopg's Python layers cost the relay about 400 us of
CPU a statement, more than the database spends on it.  Here the same
statement is a prepared one on a session of its own, sent and awaited with
libpq's asynchronous calls (``psycopg.pq``: ``send_query_prepared``,
``flush``, ``consume_input``, ``get_result``) while trio waits for the
socket, so the event loop never blocks and no thread is involved.  The
session is opened (in a worker thread, like every connect) on first use and
dropped on any error, timeout or cancellation, whose state it cannot trust:
the next statement opens a new one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import trio

from relay.errors import SpoolError


class LoopSession:
    """Prepared statements on one session, each awaited on the event loop."""

    def __init__(self, connect: Callable[[], Any], statements: dict[str, str],
                 timeout: float) -> None:
        self._connect = connect           # a psycopg connection, autocommit (blocking)
        self._statements = statements     # name -> SQL with $1.. parameters
        self._timeout = timeout
        self._conn: Any = None

    async def execute(self, name: str, params: Sequence[bytes]) -> None:
        """Run the prepared statement ``name`` with text parameters; raise on failure."""
        with trio.fail_after(self._timeout):
            conn = self._conn or await self._open()
            try:
                await _result(conn.pgconn, lambda p: p.send_query_prepared(
                    name.encode(), list(params)))
            except BaseException:
                self.close()
                raise

    async def _open(self) -> Any:
        conn = await trio.to_thread.run_sync(self._connect, abandon_on_cancel=True)
        try:
            conn.pgconn.nonblocking = 1
            for name, sql in self._statements.items():
                await _result(conn.pgconn, functools.partial(_prepare, name, sql))
        except BaseException:
            conn.pgconn.finish()
            raise
        self._conn = conn
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.pgconn.finish()   # no network wait: the socket is just closed


def _prepare(name: str, sql: str, pgconn: Any) -> None:
    pgconn.send_prepare(name.encode(), sql.encode())


async def _result(pgconn: Any, send: Callable[[Any], None]) -> None:
    """Send one command, then read until libpq has its whole result (one statement)."""
    from psycopg import pq
    send(pgconn)
    while pgconn.flush():                       # 1: more to send
        await trio.lowlevel.wait_writable(pgconn.socket)
    failure = ""
    while True:
        while pgconn.is_busy():
            await trio.lowlevel.wait_readable(pgconn.socket)
            pgconn.consume_input()
        res = pgconn.get_result()
        if res is None:
            break
        if res.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            failure = (res.error_message or b"").decode(errors="replace").strip()
    if failure or pgconn.status != pq.ConnStatus.OK:
        raise SpoolError(failure or pgconn.get_error_message())
