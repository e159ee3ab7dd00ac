"""Delivery across relays sharing a PostgreSQL spool: queue leases feeding the runners.

Per-queue order and ``concurrency`` hold cluster-wide because one node at a
time delivers a queue: the one holding its row in ``lpd_leases``.  Every
tick (``lease_time``/4, at most a second; sooner when woken) a node renews
its leases and takes free or expired ones in one statement, checks that the
database is writable (the health ``/healthz`` and intake read), and, for the
queues it holds, compares the database's jobs with its runners': new ones
are brought into the body cache and handed to the ``Scheduler`` in id order
(a bounded window ahead of delivery; a round woken by a finished delivery
reads only the queues whose window is half empty), ones removed elsewhere (lprm, purge on
another node) leave the runner, held ones released elsewhere are woken.
A job committed anywhere wakes the holder at once: ``pg_notify`` in the
committing transaction, ``LISTEN`` here.  The live nodes (``lpd_nodes``,
heartbeats within ``lease_time``) share the queues: a node takes free ones
only up to its share, and one holding more stops feeding the surplus and
gives each back once nothing of it is in flight, so a queue never has two
nodes delivering.

A node that cannot renew stops handing out its queues' jobs before the
lease can expire elsewhere (``_LOCAL_SHARE`` of ``lease_time``); a node that
dies loses its leases after ``lease_time`` and another takes over.  What it
had in flight may be delivered twice: the duplicate window (docs/delivery.md).

``ClusterDelivery`` is the server's ``Delivery``: lpq and lprm answer from the
database, so they see and remove every node's jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import trio

from relay import log, status
from relay.dispatch import Scheduler
from relay.scheduler import QueueRunner
from relay.spoolformat import JobMeta
from relay.spoolpg import PgSpool
from relay.spoolpgdb import (
    LEASES_FREED,
    claim_leases,
    load_changed,
    load_window,
    release_leases,
    writable,
)
from relay.spoolpgschema import NOTIFY_CHANNEL

_LOCAL_SHARE = 0.75    # of lease_time: after this long unrenewed, stop delivering
_MIN_TICK = 0.02       # woken ticks are batched this much
WINDOW_PER_SLOT = 8    # jobs fed ahead of delivery per unit of a queue's concurrency

Counted = tuple[dict[str, tuple[str, str]], list[JobMeta]]   # spoolpgdb.load_changed


class Feeder:
    """Holds this node's queue leases and keeps its runners fed from the database."""

    def __init__(self, spool: PgSpool, scheduler: Scheduler) -> None:
        self.spool = spool
        self.scheduler = scheduler
        lease = spool.config.lease_time
        self.tick = min(1.0, lease / 4)
        self._woken = trio.Event()
        self._renewed = -math.inf            # trio clock of the last renewal that held
        self._draining: set[str] = set()     # held beyond our share: given back once idle
        self._next_full = -math.inf          # trio clock of the next full round
        spool.on_commit = lambda meta: self.wake()
        spool.on_change = self.wake          # a delivery done: the window has room

    def wake(self) -> None:
        self._woken.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen)
            try:
                while True:
                    await self._round()
                    with trio.move_on_after(self.tick):
                        await self._woken.wait()
                    self._woken = trio.Event()
                    await trio.sleep(_MIN_TICK)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await self._release()

    async def _round(self) -> None:
        """A full round every ``tick`` (health, leases, gauges, every queue's window);
        a feeding one when woken, reading only the queues whose window is half empty."""
        spool = self.spool
        if any(self._idle(q) for q in self._draining):
            self._next_full = -math.inf          # give it back now, not at the next tick
        full = trio.current_time() >= self._next_full
        if full:
            await self._full_round()
            self._next_full = trio.current_time() + self.tick
        if not spool.problem:
            await spool.sync()          # state changes and removals owed since last time
            feed = spool.leased - self._draining
            read = feed if full else {q for q in feed if self._hungry(q)}
            if not read:
                return                  # every window still at least half full
            limits = {q: self._limit(q) for q in read}
            try:
                jobs = await spool.acall(lambda conn: load_window(conn, spool.jobs_dir, limits))
            except Exception:
                return                  # the next full round says what is wrong
            await self._feed(feed, read, jobs)

    async def _full_round(self) -> None:
        spool = self.spool
        queues = sorted(self.scheduler.runners)
        started = trio.current_time()
        give_back = sorted(q for q in self._draining if self._idle(q))

        # What the gauges count now (this node's own commits and changes included),
        # less what the database still owes: only jobs that differ are re-read.
        index, owes = spool.index, spool.owes
        seen = {} if index is None else {i: k for i, k in index.states().items() if not owes(i)}

        def work(conn: Any) -> tuple[str, set[str], int, Counted]:
            problem = writable(conn)
            if problem:
                return problem, set(), 0, ({}, [])
            if give_back:
                release_leases(conn, spool.node, give_back)
            held, share = claim_leases(conn, queues, spool.node, spool.config.lease_time)
            return problem, held, share, load_changed(conn, spool.jobs_dir, seen)
        try:
            problem, held, share, every = await spool.acall(work)
        except Exception as exc:   # DatabaseUnavailable; anything else must not stop delivery
            text = str(exc).removeprefix(f"database {spool.where}: ")
            problem, held, share, every = f"unreachable: {text}", set(), 0, ({}, [])
            if trio.current_time() - self._renewed < spool.config.lease_time * _LOCAL_SHARE:
                held, share = set(spool.leased), len(spool.leased)   # ours for a while yet
        else:
            self._draining -= set(give_back)
            if held:
                self._renewed = started
            self._count(every)
        self._health(problem)
        self._lose(spool.leased - held)
        if held - spool.leased:
            log.event("info", "queue_lease_taken", node=spool.node,
                      queues=sorted(held - spool.leased))
        spool.leased = held
        self._drain(held, share)

    def _limit(self, queue: str) -> int:
        """How many of ``queue``'s first jobs to read: what its runner has, plus its window."""
        runner = self.scheduler.runners.get(queue)
        if runner is None:
            return WINDOW_PER_SLOT
        window = WINDOW_PER_SLOT * runner.queue.concurrency
        return window + len(runner.pending) + len(runner.in_flight)

    def _drain(self, held: set[str], share: int) -> None:
        """More queues than this node's share: stop feeding the surplus, give it back idle."""
        self._draining &= held
        surplus = len(held) - share - len(self._draining)
        for name in sorted(held - self._draining, reverse=True)[:max(0, surplus)]:
            self._draining.add(name)
            self._lose({name}, why="queue_lease_shared")

    def _idle(self, queue: str) -> bool:
        runner = self.scheduler.runners.get(queue)
        return runner is None or not (runner.in_flight or runner.pending)

    def _count(self, counted: Counted) -> None:
        """The spool gauges count the whole cluster's jobs, as the database has them:
        all of them by (queue, state), re-read in full only where that changed."""
        index = self.spool.index
        if index is None:
            return
        now, changed = counted
        owes = self.spool.owes
        for job_id in index.ids() - now.keys():
            if not owes(job_id):
                index.untrack(job_id)
        for job in changed:
            if not owes(job.id):
                index.track(job)

    def _health(self, problem: str) -> None:
        if problem != self.spool.problem:
            log.event("warning" if problem else "info", "spool_database_state",
                      database=self.spool.where, error=problem or "writable again")
        self.spool.problem = problem

    def _lose(self, queues: set[str], why: str = "queue_lease_lost") -> None:
        """Queues another node may take now: their waiting jobs leave this node."""
        for name in sorted(queues):
            runner = self.scheduler.runners.get(name)
            if runner is None:
                continue
            drop = [j.id for j in runner.pending] + list(runner.held)
            runner.pending.clear()
            runner.held.clear()
            for job_id in drop:
                self.spool.forget(job_id)
            log.event("warning" if why == "queue_lease_lost" else "info", why,
                      node=self.spool.node, queue=name, jobs=len(drop))

    def _runners(self) -> list[QueueRunner]:
        return list(self.scheduler.runners.values())

    def _drop_strays(self, feed: set[str]) -> None:
        """Jobs of queues this node does not feed (a reload adopting a queue's jobs
        from the database) leave its runners: only the holder delivers them."""
        for runner in self._runners():
            stray = [j.id for j in runner.pending if j.queue not in feed]
            stray += [i for i, j in runner.held.items() if j.queue not in feed]
            if not stray:
                continue
            runner.pending = deque(j for j in runner.pending if j.queue in feed)
            for job_id in stray:
                runner.held.pop(job_id, None)
                self.spool.forget(job_id)

    async def _feed(self, held: set[str], read: set[str], jobs: list[JobMeta]) -> None:
        """Hand ``jobs`` (the windows of the queues in ``read``) to the runners."""
        self._drop_strays(held)
        in_db = {j.id: j for j in jobs}
        known: dict[str, JobMeta] = {}
        for runner in self._runners():
            known.update({j.id: j for j in runner.pending})
            known.update(runner.held)
            known.update(runner.in_flight)
            gone = [i for i, j in [*((j.id, j) for j in runner.pending), *runner.held.items()]
                    if j.queue in read and i not in in_db]
            if gone:
                runner.remove(gone)          # lprm or purge on another node
            released = [i for i, j in runner.held.items()
                        if i in in_db and in_db[i].state == "queued"]
            for job_id in released:
                self.spool.remember(in_db[job_id])
            if released:
                runner.wake(released)        # ``spool retry`` on another node
        room: dict[str, int] = {}
        new: list[JobMeta] = []
        for job in jobs:                     # id order
            if job.id in known:
                continue
            target = self.scheduler.runner_for(job.queue)
            if target is not None and job.state == "queued":
                left = room.setdefault(job.queue, self._room(target))
                if left <= 0:
                    continue
                room[job.queue] = left - 1
            new.append(job)
        for job in await self.spool.prefetch_many(new):   # less those removed since
            self.spool.remember(job)
            self.scheduler.submit(job)

    def _hungry(self, queue: str) -> bool:
        """Its window is at least half empty: worth a query (a delivery done makes room
        for one job; feeding in halves reads each job once or twice, not every round)."""
        runner = self.scheduler.runners.get(queue)
        if runner is None:
            return True
        return 2 * self._room(runner) >= WINDOW_PER_SLOT * runner.queue.concurrency

    def _room(self, runner: QueueRunner) -> int:
        """How many more jobs ``runner``'s window takes."""
        window = WINDOW_PER_SLOT * runner.queue.concurrency
        return window - len(runner.pending) - len(runner.in_flight)

    async def _listen(self) -> None:
        """Wake on every job committed anywhere (``pg_notify`` at commit)."""
        while True:
            try:
                conn = await trio.to_thread.run_sync(self.spool.connect)
            except Exception:
                await trio.sleep(self.tick)
                continue
            try:
                await trio.to_thread.run_sync(conn.execute, f"LISTEN {NOTIFY_CHANNEL}")
                while True:
                    got = await trio.to_thread.run_sync(_wait_notifies, conn, self.tick,
                                                        abandon_on_cancel=True)
                    if LEASES_FREED in got:
                        self._next_full = -math.inf   # claim them now
                    if got:
                        self.wake()
            except Exception:
                await trio.sleep(self.tick)   # the database went away; the rounds notice
            finally:
                with contextlib.suppress(Exception):
                    conn.close()

    async def _release(self) -> None:
        spool = self.spool
        if spool.leased:
            with contextlib.suppress(Exception):
                await spool.acall(lambda conn: release_leases(conn, spool.node))
            spool.leased = set()


def _wait_notifies(conn: Any, timeout: float) -> set[str]:
    return {n.payload for n in conn.notifies(timeout=timeout, stop_after=64)}


class ClusterDelivery:
    """The server's ``Delivery`` over a shared spool: lpq and lprm see every node's jobs."""

    def __init__(self, scheduler: Scheduler, spool: PgSpool, feeder: Feeder) -> None:
        self.scheduler = scheduler
        self.spool = spool
        self.feeder = feeder

    def submit(self, job: JobMeta) -> None:
        # The lease holder feeds it (in id order) from the database: wake it.
        self.feeder.wake()

    def wake(self, queue: str, job_ids: Sequence[str] = ()) -> None:
        self.scheduler.wake(queue, job_ids)
        if queue not in self.spool.leased:
            self._release_elsewhere(queue, job_ids)

    def _release_elsewhere(self, queue: str, job_ids: Sequence[str]) -> None:
        # Held jobs of a queue another node delivers: released in the database,
        # which that node's next round acts on.
        with contextlib.suppress(Exception):
            for job in self.spool.jobs(queue):
                if job.state == "held" and (not job_ids or job.id in job_ids):
                    self.spool.update(dataclasses.replace(job, state="queued", failures=0))
            self.feeder.wake()

    def queue_state(self, queue: str) -> status.QueueState:
        state = self.scheduler.queue_state(queue)
        try:
            jobs = self.spool.jobs(queue)
        except Exception:
            return state     # the database is away: this node's own view
        local = {j.id: j for j in state.jobs}
        return dataclasses.replace(state, jobs=tuple(local.get(j.id, j) for j in jobs))

    def remove(self, queue: str, job_ids: Sequence[str]) -> list[str]:
        removed = set(self.scheduler.remove(queue, job_ids))
        busy = {i for r in self.scheduler.runners.values() for i in r.in_flight}
        rest = [i for i in job_ids if i not in removed and i not in busy]
        with contextlib.suppress(Exception):
            removed.update(self.spool.delete_now(rest))
        return sorted(removed)
