"""What an inbound connection works with, handed over as one frozen value.

The server builds one ``ConnectionContext`` and gives it to every
``relay.connection.Connection``, so a connection never reaches back into the
server (hypercorn's "collaborators, not back-references"), and ``Delivery`` —
what intake needs of the scheduler — is a protocol here, below both, so no
module imports the one that imports it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay import status
from relay.buffers import BufferPool
from relay.config import ServerConfig
from relay.metrics import Metrics
from relay.privacy import KEEP, Redactor
from relay.queues import QueueRouter
from relay.spool import IncomingJob, JobMeta, Spool

__all__ = ["ConnectionContext", "Delivery"]


class Delivery(Protocol):
    """What intake needs from the delivery side (``relay.scheduler.Scheduler``)."""

    def submit(self, job: JobMeta) -> None: ...
    def wake(self, queue: str, job_ids: Sequence[str] = ()) -> None: ...
    def queue_state(self, queue: str) -> status.QueueState: ...
    def remove(self, queue: str, job_ids: Sequence[str]) -> list[str]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionContext:
    """Everything a connection uses, built once by the server."""

    config: ServerConfig
    spool: Spool
    router: QueueRouter
    delivery: Delivery
    metrics: Metrics
    buffers: BufferPool
    # Partial jobs whose removal failed (spool unwritable for a while): retried
    # when the next job starts, so a repaired spool keeps no debris.
    leftovers: list[IncomingJob] = field(default_factory=list)
    # [retention]: expire kept delivered jobs until ``need`` bytes fit; False: none left.
    make_room: Callable[[int], bool] | None = None
    privacy: Redactor = KEEP      # [privacy]: job names in lpq answers to non-admins
    # In an intake worker process: the one-shot commands (lpq, lprm, lpc) are
    # answered by the main process (relay.intakeworker); None = here.
    answer: Callable[[ConnectionContext, Any, str, int], Awaitable[bytes]] | None = None
