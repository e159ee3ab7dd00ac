"""Job lifecycle events: the one place the daemon says what happened to a job.

Intake, delivery, removal, retention and the CLI report each state change of
a job here (``received``, ``acknowledged``, ``attempt``, ``delivered``,
``held``, ``released``, ``removed``, ``expired``, ``reprinted``) and the
daemon's own life (``config``, ``start``, ``stop``) — the event names of
SPEC §11.  Whoever needs the trail subscribes by implementing ``JobEvents``
(the audit log, ``relay.audit``); without one the daemon uses ``NO_EVENTS``,
which costs one method call per event and nothing else.

``fields`` are the SPEC §11 record keys that the job's ``JobMeta`` does not
already carry (``destination``, ``result``, ``reason``, ``by``, ``original``,
``config_sha256``); the subscriber takes ``job``, ``queue``, ``user`` and the
rest from ``meta``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from relay.spoolformat import JobMeta

EVENTS = ("received", "acknowledged", "attempt", "delivered", "held", "released",
          "removed", "expired", "reprinted", "config", "start", "stop")


class JobEvents(Protocol):
    """A subscriber to job and daemon events."""

    def record(self, event: str, meta: JobMeta | None = None, **fields: object) -> None:
        """Note ``event`` (one of ``EVENTS``) for ``meta`` (None: a daemon event)."""


class _NoEvents:
    """The default subscriber: drops every event."""

    def record(self, event: str, meta: JobMeta | None = None, **fields: object) -> None:
        return None


NO_EVENTS: JobEvents = _NoEvents()
