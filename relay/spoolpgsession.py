"""Sessions with the shared spool's database: a bounded pool, used from worker threads.

trio has no PostgreSQL driver and psycopg's async API needs asyncio, so the
synchronous API runs in worker threads (``acall``: ``trio.to_thread`` under a
limiter one below the pool's size) over ``psycopg_pool`` sessions, each
committing with ``synchronous_commit = on`` whatever the database's default
(SPEC §10).  Waiting for a session is bounded by ``db_timeout``; any driver
error becomes ``DatabaseUnavailable`` (0x02 at intake), its text free of
secrets (the dsn is shown redacted, and holds no password anyway).
docs/spool.md ("Talking to PostgreSQL from trio") has the measurements.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from relay.errors import SpoolError
from relay.spoolpgconfig import SpoolConfig

T = TypeVar("T")


class DatabaseUnavailable(SpoolError):
    """The database cannot take a job now (unreachable, read-only): 0x02 to the sender."""


class Sessions:
    """The pool and the calls through it; ``relay.spoolpg.PgSpool`` is one."""

    config: SpoolConfig
    node: str
    where: str               # the redacted dsn
    _pool: Any
    _limiter: trio.CapacityLimiter

    def _connect_args(self) -> dict[str, Any]:
        # Our own sessions commit durably whatever the database's default
        # (SPEC §10); the default itself is logged at start.
        return {"autocommit": True, "application_name": f"lpd-relay {self.node}"[:63],
                "connect_timeout": max(1, round(self.config.db_timeout)),
                "options": "-c synchronous_commit=on"}

    def connect(self, *, plain: bool = False) -> Any:
        """One session outside the pool (LISTEN, the CLI): same settings.

        ``plain``: without our ``synchronous_commit``, to read the database's own.
        """
        import psycopg
        args = self._connect_args()
        if plain:
            del args["options"]
        return psycopg.connect(self.config.dsn, **args)

    def _open_pool(self) -> None:
        from psycopg_pool import ConnectionPool
        self._pool = ConnectionPool(
            self.config.dsn, min_size=1, max_size=self.config.pool_size, open=False,
            kwargs=self._connect_args(), timeout=self.config.db_timeout,
            reconnect_timeout=max(60.0, self.config.lease_time * 4), name="lpd-relay")
        self._pool.open(wait=False)

    def call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(connection)`` with a pooled session (blocking: a worker thread's job)."""
        if self._pool is None:
            raise SpoolError("recover() first")
        try:
            with self._pool.connection(timeout=self.config.db_timeout) as conn:
                return fn(conn)
        except (KeyError, SpoolError):
            raise
        except Exception as exc:
            raise self.unavailable(exc) from exc

    async def acall(self, fn: Callable[[Any], T]) -> T:
        """``call`` in a worker thread (bounded by the pool's size)."""
        return await trio.to_thread.run_sync(self.call, fn, limiter=self._limiter)

    def unavailable(self, exc: BaseException) -> DatabaseUnavailable:
        """A database error as the one error intake and delivery act on."""
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        return DatabaseUnavailable(f"database {self.where}: {text}")


def close_pool(pool: Any) -> None:
    """Close a pool, quietly: a database gone away leaves nothing to close."""
    with contextlib.suppress(Exception):   # a database gone away: nothing left to close
        pool.close(timeout=2.0)
