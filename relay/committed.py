"""What follows a job's commit, in one process and in the workers' main process alike.

Its audit records, durable before the final ack (SPEC §4.4, §11); then, in
arrival order, its counts, its ``received`` summary count, the hand-off to
delivery and its ``job_received`` debug event (built only when debug is
logged: per job on the hot path).  ``relay.connection`` commits through these
and re-exports them.
"""

from __future__ import annotations

from relay import log
from relay.context import Delivery
from relay.jobevents import JobEvents
from relay.metrics import Metrics
from relay.spool import JobMeta

__all__ = ["accepted", "log_received", "record_committed"]


async def record_committed(events: JobEvents, meta: JobMeta, digests: dict[str, str] | None,
                           hold: str) -> None:
    """A committed job's received and acknowledged records, durable on return: before
    the final ack (one audit flush for both; a held job is not acknowledged)."""
    events.record("received", meta, digests=digests)
    if not hold:
        events.record("acknowledged", meta)
    await events.durable()


def accepted(metrics: Metrics, delivery: Delivery, meta: JobMeta, peer: str, *,
             held: bool, counted: bool = False) -> None:
    """A committed job, in arrival order: counted, logged and handed to delivery
    (one process's connections and the workers' main process alike).  ``counted``:
    its intake counters were already bumped, before its ack was written (the
    spool's flush thread answering a worker: ``relay.workerjobs``)."""
    if not counted:
        metrics.count_received(meta.queue, meta.total_bytes)
    log.count("received")
    delivery.submit(meta)
    if not held:
        log_received(meta, peer)


def log_received(meta: JobMeta, peer: str) -> None:
    """The job's ``job_received`` event (debug), built only when debug is logged:
    per job on the hot path, in one process and in the workers' main process alike."""
    if log.enabled("debug"):
        log.event("debug", "job_received", job=meta.id, queue=meta.queue, peer=peer,
                  user=meta.user, bytes=meta.total_bytes, files=len(meta.files),
                  **({"tls_peer": meta.tls_peer} if meta.tls_peer else {}))
