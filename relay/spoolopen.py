"""Choosing the spool backend from ``[spool] backend`` (SPEC §10), in one place.

The daemon, ``lpd-relay spool`` and ``lpd-relay ctl`` open their spool here:
the local file spool by default, the shared PostgreSQL spool when
configured.  The rest of the relay is typed against ``relay.spool.Spool``;
``PgSpool`` implements the same ``relay.spoolbackend.SpoolBackend`` interface
(checked by mypy in ``relay.spoolpg``), so it is handed out under that type.
For PostgreSQL the daemon also runs the lease feeder and gives the server
the cluster-wide ``Delivery`` (``relay.spoolpgfeed``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from relay.config import Config
from relay.context import Delivery
from relay.spool import Spool

if TYPE_CHECKING:
    from relay.dispatch import Scheduler
    from relay.spoolbackend import BodySource


def open_spool(config: Config) -> Spool:
    """The configured backend, not yet recovered."""
    if config.spool.backend == "postgresql":
        from relay.spoolpg import PgSpool
        return cast(Spool, PgSpool(config.server.spool_dir, config.spool,
                                   min_free_disk=config.server.min_free_disk))
    return Spool(config.server.spool_dir, fsync=config.server.fsync,
                 min_free_disk=config.server.min_free_disk,
                 segment_threshold=config.server.segment_threshold)


def body_source(spool: Spool) -> BodySource | None:
    """What sinks read bodies through: None for local files (whole files at their paths)."""
    return None if type(spool) is Spool else spool


def problem(spool: Spool) -> str:
    """Why the spool's database cannot take jobs now ("" when it can, or local)."""
    text = getattr(spool, "problem", "")
    return f"database {getattr(spool, 'where', '')} {text}" if text else ""


def cluster(spool: Spool, scheduler: Scheduler
            ) -> tuple[Delivery, Callable[[], Awaitable[None]] | None]:
    """The server's ``Delivery`` and the backend's service task (None: none needed)."""
    from relay.spoolpg import PgSpool
    backend: object = spool
    if not isinstance(backend, PgSpool):
        return scheduler, None
    from relay.spoolpgfeed import ClusterDelivery, Feeder
    feeder = Feeder(backend, scheduler)
    return ClusterDelivery(scheduler, backend, feeder), feeder.run
