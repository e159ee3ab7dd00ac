"""LPRng's control request (0x06, ``lpc``) served by the running daemon.

The request line is ``\\6queue user operation [options]``: LPRng's ``lpc -P
ward3@relay status`` sends ``\\6ward3 root status``, and ``lpc hold
ward3@relay 12`` sends ``\\6ward3 root hold ward3 12`` (the queue named once
more as the first option).  The answer is text, then the server closes.
Only admins may send it: an ``admin_allow`` address and a reserved source
port, the rule of privileged removal (``relay.commands``).

Operations: ``status``; ``hold``/``release``/``topq`` JOB|USER|all;
``move`` JOB|USER|all TARGET; ``redirect`` TARGET|off; ``disable``/
``enable`` (refuse new jobs / accept again), ``stop``/``start`` (pause /
resume delivery); ``lpq`` and ``lprm``.  Queue states persist in
``relay.queuestate``'s file; holds are the spooled jobs' own state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from relay import log, status
from relay.commands import is_admin, remove
from relay.dispatch import Scheduler
from relay.errors import ProtocolError, SpoolError
from relay.jobevents import acting
from relay.printable import printable
from relay.queues import sanitize_name
from relay.spool import JobMeta

if TYPE_CHECKING:
    from relay.context import ConnectionContext

__all__ = ["OPERATIONS", "answer", "control"]

# Operations that name jobs (JOB|USER|all), and the rest.
JOB_OPERATIONS = ("hold", "release", "topq", "move")
OPERATIONS = ("status", *JOB_OPERATIONS, "redirect", "disable", "enable", "stop", "start",
              "lpq", "lprm", "reprint", "purge")


def answer(ctx: ConnectionContext, queue: str, operands: Sequence[str], *, host: str,
           port: int) -> bytes:
    """The reply text for a 0x06 request (``operands``: user, operation, options)."""
    user, operation, options = operands[0], operands[1].lower(), list(operands[2:])
    peer = f"{host}:{port}"
    if not is_admin(ctx, host, port):
        log.event("warning", "control_refused", peer=peer, queue=queue, operation=operation,
                  error="control requests need admin_allow and a reserved port")
        return (b"lpd-relay: control requests need a reserved source port from an "
                b"admin_allow address\n")
    if not isinstance(ctx.delivery, Scheduler):
        return b"lpd-relay: control requests are not available here\n"
    try:
        name = ctx.router.route(queue).name
        if options and options[0] != "all" and _same(ctx, options[0], name):
            options = options[1:]     # LPRng names the queue again as the first option
        with acting(f"lpc:{user}@{host}"):   # the audit log's ``by`` (SPEC §11)
            text = control(ctx.delivery, ctx, name, operation, options, user=user,
                           peer=(host, port), wire_queue=queue)
    except (ProtocolError, ValueError) as exc:
        text = f"lpd-relay: {exc}\n"
    except OSError as exc:   # the state file could not be written (full disk): nothing changed
        text = f"lpd-relay: cannot save the queue state: {exc}\n"
    log.event("info", "control", peer=peer, queue=queue, operation=operation,
              options=" ".join(options), user=user)
    return text.encode("utf-8", "replace")


def _same(ctx: ConnectionContext, option: str, name: str) -> bool:
    try:
        return ctx.router.route(option.split("@", 1)[0]).name == name
    except ProtocolError:
        return False


def control(scheduler: Scheduler, ctx: ConnectionContext, queue: str, operation: str,
            options: list[str], *, user: str, peer: tuple[str, int],
            wire_queue: str = "") -> str:
    """Do ``operation`` on ``queue``; the answer's text (ValueError for a bad request)."""
    if operation in JOB_OPERATIONS:
        return _job_operation(scheduler, ctx, queue, operation, options, user=user)
    if operation == "reprint":    # lpd-relay's: `spool reprint JOB --to QUEUE` (relay.reprint)
        return _reprint(scheduler, queue, wire_queue or queue, options)
    if operation == "purge":      # lpd-relay's: `spool purge JOB` of a kept delivered job
        return _purge_kept(scheduler, options)
    states = scheduler.states
    if operation == "status":
        return status_text(scheduler, queue)
    if operation == "lpq":
        return status.render(scheduler.queue_state(queue), long=False, items=options)
    if operation == "lprm":
        return remove(ctx, queue, queue, ["root", *options], host=peer[0], port=peer[1])
    if states is None:
        raise ValueError("queue states are not available")
    if operation in ("disable", "enable"):
        states.change(queue, disabled=operation == "disable")
    elif operation in ("stop", "start"):
        states.change(queue, stopped=operation == "stop")
        scheduler.runners[queue].set_stopped(operation == "stop")
    elif operation == "redirect":
        _redirect(scheduler, ctx, queue, options)
    else:
        raise ValueError(f"unknown operation {sanitize_name(operation)!r}; one of "
                         f"{', '.join(OPERATIONS)}")
    scheduler.publish(queue)
    return f"{queue}: {states.get(queue).notice() or 'enabled, printing'}\n"


def _reprint(scheduler: Scheduler, queue: str, wire_queue: str, options: list[str]) -> str:
    if len(options) != 1 or scheduler.reprinter is None:
        raise ValueError("reprint takes one option: the spool id of a kept job")
    try:
        new = scheduler.reprinter.start(options[0], queue=queue, wire_queue=wire_queue)
    except SpoolError as exc:
        raise ValueError(f"cannot take a new job now: {exc}") from None
    return f"job {options[0]} reprinted as job {new} on queue {queue}\n"


def _purge_kept(scheduler: Scheduler, options: list[str]) -> str:
    """Remove a kept (delivered) job: no queue holds it, so lprm cannot name it."""
    retention = scheduler.retention
    job = retention.forget(options[0]) if retention is not None and len(options) == 1 else None
    if job is None or scheduler.spool is None:
        raise ValueError("purge takes one option: the spool id of a kept job")
    scheduler.spool.remove(job.id)
    scheduler.spool.events.record("removed", job)
    return f"{job.control_name} dequeued (job {job.id})\n"


def _target(ctx: ConnectionContext, name: str, queue: str) -> str:
    target = ctx.router.route(name.split("@", 1)[0]).name
    if target == queue:
        raise ValueError(f"{queue} cannot be its own target")
    return target


def _redirect(scheduler: Scheduler, ctx: ConnectionContext, queue: str,
              options: list[str]) -> None:
    if len(options) != 1:
        raise ValueError("redirect takes one option: the target queue, or off")
    assert scheduler.states is not None
    before = scheduler.runner_for(queue)
    if options[0] == "off":
        scheduler.states.change(queue, redirect="")
    else:
        scheduler.states.change(queue, redirect=_target(ctx, options[0], queue))
    after = scheduler.runner_for(queue)
    if before is not None and after is not None and before is not after:
        for job in before.hand_over(queue):   # waiting jobs follow the redirect
            after.submit(job)


def _chosen(scheduler: Scheduler, queue: str, items: Sequence[str]) -> list[JobMeta]:
    if not items:
        raise ValueError("name the jobs: a job number, a user, or all")
    jobs = scheduler.queue_state(queue).jobs
    return status.select_for_removal(jobs, agent="root", items=items, host="", admin=True)


def _job_operation(scheduler: Scheduler, ctx: ConnectionContext, queue: str, operation: str,
                   options: list[str], *, user: str) -> str:
    items = options[:-1] if operation == "move" else options
    if operation == "move" and not options:
        raise ValueError("move takes the jobs and the target queue")
    chosen = _chosen(scheduler, queue, items)
    ids = [j.id for j in chosen]
    if not chosen:
        return "no matching jobs\n"
    runner = scheduler.runner_for(queue)
    assert runner is not None
    held = [j.id for j in chosen if j.state == "held"]
    if operation == "hold":
        changed = runner.hold_jobs(ids, f"held by {sanitize_name(user)} (lpc hold)")
    elif operation == "move":
        changed = _move(scheduler, ctx, queue, chosen, options[-1])
    else:   # release, topq: a held job is released first (topq puts it at the head)
        _release(scheduler, queue, held)
        changed = held if operation == "release" else runner.to_front(ids)
    done = set(changed)
    return "".join(
        printable(f"{j.control_name} {operation}: "
                  f"{'done' if j.id in done else 'not changed (being delivered, or not held)'}")
        + "\n" for j in chosen)


def _release(scheduler: Scheduler, queue: str, held: list[str]) -> None:
    """Release held jobs wherever they wait; a redirected queue's go to its target."""
    own, target = scheduler.runners[queue], scheduler.runner_for(queue)
    for runner in {id(r): r for r in (own, target) if r is not None}.values():
        if any(i in runner.held for i in held):
            runner.wake(held)
    if target is not None and target is not own:
        for job in own.hand_over(queue):
            target.submit(job)


def _move(scheduler: Scheduler, ctx: ConnectionContext, queue: str, chosen: list[JobMeta],
          name: str) -> list[str]:
    target = _target(ctx, name, queue)
    assert scheduler.states is not None
    to = scheduler.runners[target]
    runners = [r for r in {scheduler.runners[queue], scheduler.runner_for(queue)} if r]
    busy = {i for r in runners for i in r.in_flight}
    moving = [j for j in chosen if j.id not in busy]
    ids = {j.id for j in moving}
    scheduler.states.move(sorted(ids), target)   # first: on a full disk nothing moves
    held: dict[str, JobMeta] = {}
    for runner in runners:   # its own runner, and its redirect target's
        runner.pending = type(runner.pending)(j for j in runner.pending if j.id not in ids)
        held.update({i: runner.held.pop(i) for i in list(runner.held) if i in ids})
    for job in moving:
        to.submit(held.get(job.id, job))
    return sorted(ids)


def status_text(scheduler: Scheduler, queue: str) -> str:
    """lpc status: the queue's state, job counts and its destinations."""
    state = scheduler.queue_state(queue)
    held = sum(1 for j in state.jobs if j.state == "held")
    active = len(state.in_flight)
    queued = len(state.jobs) - held - sum(1 for j in state.jobs if j.id in state.in_flight)
    lines = [f"{queue}: {state.notice or 'enabled, printing'}; {queued} queued, {held} held, "
             f"{active} being delivered"]
    for dest in state.destinations:
        mark = "up" if dest.up else ("not tried yet" if dest.up is None else "DOWN")
        lines.append(f"  destination {dest.name} {mark}{' (active)' if dest.active else ''}")
    return "".join(printable(line) + "\n" for line in lines)
