"""The one-shot commands of RFC 1179 §5: 0x01 print waiting, 0x03/0x04 lpq, 0x05 lprm,
and LPRng's 0x06 control request (``relay.lpc``).

Each takes the connection's collaborators and the requester's address and
returns the bytes to answer with; the connection sends them and closes.
Who may do what (SPEC §12): anyone may ask for the queue state and remove
their own jobs sent from their own address; removing other users' jobs
(``root``, ``-all``) and releasing every held job (plain 0x01) need a
request from an ``admin_allow`` address *and* a reserved source port, i.e.
root on a trusted host, as BSD lpd trusts root only from its own machine.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING

from relay import _core, log, status
from relay.config import CATCH_ALL, Network
from relay.errors import REPLY_OK, ProtocolError
from relay.jobevents import acting
from relay.queues import sanitize_name
from relay.spoolformat import ID_RE, ID_WIDTH

if TYPE_CHECKING:
    from relay.context import ConnectionContext

# wake() releases only the held jobs it names; naming none that can exist
# ("" is never a spool id) resets the queue's backoff and releases nothing.
_RELEASE_NONE = ("",)


def source_allowed(host: str, networks: Sequence[Network]) -> bool:
    """Whether the address ``host`` is in one of ``networks`` (IPv4-mapped IPv6 as IPv4)."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def is_admin(ctx: ConnectionContext, host: str, port: int) -> bool:
    """An ``admin_allow`` address and a reserved source port (only root binds those)."""
    return port < 1024 and source_allowed(host, ctx.config.admin_allow)


def answer(ctx: ConnectionContext, ev: _core.Command, host: str, port: int) -> bytes:
    """What to send back for ``ev``; ProtocolError for an unknown queue under 0x01."""
    if ev.code == 0x06:
        from relay import lpc  # lpc answers lprm through this module

        return lpc.answer(ctx, ev.queue, ev.operands, host=host, port=port)
    if ev.code == 0x01:
        queue = ctx.router.route(ev.queue)
        return print_waiting(ctx, queue.name, ev.operands, admin=is_admin(ctx, host, port),
                             peer=f"{host}:{port}")
    try:
        queue = ctx.router.route(ev.queue)
    except ProtocolError as exc:
        return f"{exc}\n".encode("ascii", "replace")
    if ev.code in (0x03, 0x04):
        state = queue_state(ctx, queue.name, ev.queue)
        if ctx.privacy.active and not source_allowed(host, ctx.config.admin_allow):
            state = status.redacted(state, ctx.privacy.name)   # [privacy] job_names
        text = status.render(state, long=ev.code == 0x04, items=ev.operands)
    else:
        text = remove(ctx, queue.name, ev.queue, ev.operands, host=host, port=port)
    return text.encode("utf-8", "replace")


def by_spool_id(items: Sequence[str]) -> bool:
    """Whether a request names its jobs by spool id: ``lpd-relay spool`` asking the daemon.

    LPD clients name jobs by number (at most 6 digits) or user; only the
    relay's own CLI sends 12-digit spool ids, so the audit log says ``cli``.
    """
    return bool(items) and all(len(i) >= ID_WIDTH and ID_RE.fullmatch(i) for i in items)


def print_waiting(ctx: ConnectionContext, queue: str, operands: Sequence[str], *,
                  admin: bool, peer: str) -> bytes:
    """0x01: wake the queue; operands (an lpd-relay extension) are spool ids to release.

    Plain 0x01 releases every held job, but only for an admin; from anyone
    else it only resets the backoff.
    """
    if operands or admin:
        by = "cli" if admin and by_spool_id(operands) else f"lpd:{peer.rsplit(':', 1)[0]}"
        with acting(by):   # 0x01 releases, audited (SPEC §11)
            ctx.delivery.wake(queue, operands)
    else:
        log.event("info", "release_refused", peer=peer, queue=queue,
                  error="releasing all held jobs needs admin_allow and a reserved port")
        ctx.delivery.wake(queue, _RELEASE_NONE)
    return bytes([REPLY_OK])


def queue_state(ctx: ConnectionContext, queue: str, wire_queue: str) -> status.QueueState:
    """The queue as the asker named it: for the catch-all, only that name's jobs."""
    state = ctx.delivery.queue_state(queue)
    if queue != CATCH_ALL:
        return state
    wanted = wire_queue.casefold()
    return dataclasses.replace(state, queue=wire_queue, jobs=tuple(
        j for j in state.jobs if j.wire_queue.casefold() == wanted))


def remove(ctx: ConnectionContext, queue: str, wire_queue: str, operands: Sequence[str], *,
           host: str, port: int) -> str:
    """0x05: remove the jobs the agent may remove; a line of text either way."""
    if not operands:
        return "lpd-relay: lprm needs the requesting user\n"
    agent, admin = operands[0], is_admin(ctx, host, port)
    if agent in status.PRIVILEGED_AGENTS and not admin:
        log.event("warning", "removal_refused", peer=f"{host}:{port}", queue=queue,
                  error=f"agent {agent} from a non-admin source")
        return (f"lpd-relay: removal as {sanitize_name(agent)} needs a reserved source port "
                "from an admin_allow address; no job removed\n")
    chosen = status.select_for_removal(queue_state(ctx, queue, wire_queue).jobs, agent=agent,
                                       items=operands[1:], host=host, admin=admin)
    by = "cli" if admin and agent == "root" and by_spool_id(operands[1:]) else \
        f"lprm:{agent}@{host}"
    with acting(by):   # the audit log's ``by`` (SPEC §11)
        removed = set(ctx.delivery.remove(queue, [j.id for j in chosen]))
    return status.render_removal(chosen, removed)
