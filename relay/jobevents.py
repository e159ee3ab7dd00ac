"""Job lifecycle events: the one place the daemon says what happened to a job.

Intake, delivery, removal, retention and the CLI report each state change of
a job here (``received``, ``acknowledged``, ``attempt``, ``delivered``,
``held``, ``released``, ``removed``, ``expired``, ``reprinted``) and the
daemon's own life (``config``, ``start``, ``stop``) — the event names of
SPEC §11.  Whoever needs the trail subscribes by implementing ``JobEvents``
(the audit log, ``relay.audit``); without one the daemon uses ``NO_EVENTS``,
which costs one method call per event and nothing else.  The subscriber in
use is ``Spool.events``: whatever changes a job holds its spool (intake, the
scheduler, lprm/lpc, the CLI), so no constructor needs another argument.

``fields`` are the SPEC §11 record keys that the job's ``JobMeta`` does not
already carry (``destination``, ``result``, ``reason``, ``by``, ``original``,
``config_sha256``); the subscriber takes ``job``, ``queue``, ``user`` and the
rest from ``meta``.  Intake also passes ``digests`` (wire file name -> SHA-256
hex of its bytes, taken while they arrived) with ``received``.

Two additions serve the audit trail without changing ``record``: ``durable()``
waits until every event recorded so far is on disk (intake awaits it before
the final ack of a job, SPEC §11), and ``acting(by)`` names who is acting —
``lprm:AGENT@PEER``, ``lpc:USER@PEER``, ``cli`` — for the events recorded
inside it, so the scheduler that removes or releases a job need not be told.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from relay.spoolformat import JobMeta

EVENTS = ("received", "acknowledged", "attempt", "delivered", "held", "released",
          "removed", "expired", "reprinted", "config", "start", "stop")


class JobEvents(Protocol):
    """A subscriber to job and daemon events."""

    def record(self, event: str, meta: JobMeta | None = None, **fields: object) -> None:
        """Note ``event`` (one of ``EVENTS``) for ``meta`` (None: a daemon event)."""

    async def durable(self) -> None:
        """Return once every event recorded so far is durable."""


class NoEvents:
    """The default subscriber: drops every event."""

    def record(self, event: str, meta: JobMeta | None = None, **fields: object) -> None:
        return None

    async def durable(self) -> None:
        return None


NO_EVENTS: JobEvents = NoEvents()


# Who causes the events recorded in this task now ("" = the daemon itself).
ACTOR: ContextVar[str] = ContextVar("ACTOR", default="")


@contextlib.contextmanager
def acting(by: str) -> Iterator[None]:
    """Name ``by`` as the cause of events recorded inside; an outer actor wins.

    lpc's ``lprm`` goes through the 0x05 code, so the request it came in
    (``lpc:USER@PEER``) stays the one named.
    """
    if ACTOR.get():
        yield
        return
    token = ACTOR.set(by)
    try:
        yield
    finally:
        ACTOR.reset(token)
