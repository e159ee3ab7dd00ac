"""PROTOTYPE: the Python half of relay._fastloop (decisions, commits, bookkeeping)."""

from __future__ import annotations

from typing import Any

import trio

from relay import _fastloop, controlfile
from relay.committed import accepted, record_committed
from relay.jobevents import NoEvents
from relay.spoolbackend import Session


class _Token:
    __slots__ = ("cf", "host", "peer", "port", "session")

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port, self.peer = host, port, f"{host}:{port}"
        self.session = Session()
        self.cf: Any = None


class FastSessions:
    def __init__(self, server: Any) -> None:
        self.server = server
        self.loop = _fastloop.FastLoop(server.config, self._route, self._control)
        self.nursery: trio.Nursery | None = None

    def add(self, fd: int, host: str, port: int) -> None:
        self._dispatch(self.loop.add(fd, _Token(host, port)))

    async def run(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        loop = self.loop
        while True:
            await trio.lowlevel.wait_readable(loop.fd)
            self._dispatch(loop.poll())

    def _route(self, conn: Any, wire_queue: str) -> str | None:
        ctx = self.server.context
        try:
            queue = ctx.router.route(wire_queue, new_job=True)
            ctx.spool.check_space(0)
        except Exception:
            return None
        return queue.name   # type: ignore[no-any-return]

    def _control(self, conn: Any, data: bytes) -> tuple[str, ...] | None:
        try:
            cf = controlfile.parse_control_file(data)
        except Exception:
            return None
        conn.token.cf = cf
        return cf.data_files   # type: ignore[no-any-return]

    def _dispatch(self, events: list[tuple[str, Any]]) -> None:
        for kind, conn in events:
            if kind == "job":
                self._commit(conn)
            else:
                self.server.fast_closed(conn.token)

    def _commit(self, conn: Any) -> None:
        ctx = self.server.context
        tok = conn.token
        spool = ctx.spool
        cf = tok.cf
        try:
            incoming = spool.begin(queue=conn.queue, wire_queue=conn.wire_queue, peer=tok.peer,
                                   session=tok.session)
            name = controlfile.split_job_name(conn.control_name)
            incoming.set_control(
                conn.control_name, conn.control, number=name.number, user=cf.user or "",
                host=cf.host or "", title=cf.title or cf.job_name or "",
                job_name=cf.job_name or "", formats={f.name: f.format for f in cf.print_files})
            for fname, data in conn.files:
                w = incoming.open_data(fname)
                w.write(data)
                w.close()
            conn.reset_job()
            if isinstance(spool.events, NoEvents) and spool.commit_soon(
                    incoming, lambda reply: self._replied(conn, reply)):
                return
        except Exception:
            self._dispatch(self.loop.finish(conn, "failed"))
            return
        assert self.nursery is not None
        self.nursery.start_soon(self._commit_task, conn, incoming)

    def _replied(self, conn: Any, reply: Any) -> None:
        if reply.failure is not None:
            self._dispatch(self.loop.finish(conn, "failed"))
            return
        ctx = self.server.context
        accepted(ctx.metrics, ctx.delivery, reply.value, conn.token.peer, held=False)
        self._dispatch(self.loop.resume(conn))

    async def _commit_task(self, conn: Any, incoming: Any) -> None:
        ctx = self.server.context
        spool = ctx.spool
        try:
            meta = await spool.commit(incoming)
            await record_committed(spool.events, meta, incoming.digests, "")
        except Exception:
            self._dispatch(self.loop.finish(conn, "failed"))
            return
        accepted(ctx.metrics, ctx.delivery, meta, conn.token.peer, held=False)
        self._dispatch(self.loop.resume(conn))
