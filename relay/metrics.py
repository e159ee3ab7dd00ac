"""Every Prometheus metric lpd-relay exports, in one place (SPEC §7).

The registry is passed in, so the daemon uses one registry for ``/metrics`` and
each test a fresh ``CollectorRegistry`` it asserts on with ``get_sample_value``.

Label values are bounded by construction: a queue label is a configured queue
name (``"*"`` for the catch-all), a destination label is a destination URI as
configured, anything else becomes ``"other"`` through ``queue_label`` /
``destination_label``.  Rejection reasons, attempt results, retry reasons and
spool states are fixed tuples below.  Every series those sets allow (the
queue x destination pairs of the configured routes) is created at start, at 0,
so dashboards and ``rate()`` see a series before its first event and the number
of series never grows while the relay runs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from relay.errors import REJECT_REASONS, RETRY_REASONS
from relay.tls import HANDSHAKE_REASONS

# The label value for every queue or destination name that is not configured.
# Wire data (queue names typed by any client) must never mint new series.
OTHER = "other"

# Outcome of one delivery attempt: delivered, will be retried, or refused for
# good (the job is held, SPEC §5).
ATTEMPT_RESULTS = ("ok", "retry", "rejected")

# Why an attempt is retried: ``relay.errors.RETRY_REASONS`` (refused, timeout,
# reset, reply, unavailable, other), defined there once because sinks raise them.

# A queue moves to its next destination (failover) or back to its first one
# once that delivers again (failback).
FAILOVER_DIRECTIONS = ("failover", "failback")

# A spooled job is waiting for delivery (queued) or held after give_up_after or
# a permanent refusal; held jobs wait for `lpd-relay spool retry`.
SPOOL_STATES = ("queued", "held")

# What an operator made of a queue (lpc / `lpd-relay ctl`): relay.queuestate.STATES.
QUEUE_STATES = ("disabled", "stopped", "redirected")

# Print jobs: a page to a LAN printer takes tens of milliseconds, a big job over
# a VPN minutes, and with retries the end-to-end time reaches hours.
DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

# Waiting for an origin port is free when the pool has one and up to the
# TIME_WAIT cool-down (60 s on Linux) when every reserved port is cooling.
PORT_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The metric objects, pre-labelled for the configured queues and destinations.

    ``queues`` are the configured queue names (include ``"*"`` when a catch-all
    is configured); ``destinations`` the destination URIs exactly as configured.
    ``routes`` optionally lists the (queue, destination) pairs that can occur so
    only those delivery series are pre-created; by default every pair is.
    Callers always pass label values through ``queue_label`` and
    ``destination_label``.
    """

    def __init__(self, registry: CollectorRegistry, *, queues: Iterable[str],
                 destinations: Iterable[str],
                 routes: Iterable[tuple[str, str]] | None = None) -> None:
        # The *_created series double the series count and no dashboard or
        # alert reads them; this process exports only lpd-relay's metrics.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self._queues = frozenset(queues)
        self._destinations = frozenset(destinations)
        self._following: Mapping[tuple[str, str], int] | None = None   # follow_spool's
        self._labelled: dict[tuple[Any, tuple[str, ...]], Any] = {}   # child()'s
        self._create_intake(registry)
        self._create_delivery(registry)
        self._create_spool(registry)
        self._create_queue_state(registry)
        self._create_connections(registry)
        self._create_tls(registry)
        self._precreate(routes)

    def add_labels(self, queues: Iterable[str], destinations: Iterable[str]) -> None:
        """A reload's new queues and destinations: their series are created now, at 0.

        Labels are only added, never dropped: a removed queue's held jobs
        still count under its name, and counters keep their history.
        """
        new_q = frozenset(queues) - self._queues
        new_d = frozenset(destinations) - self._destinations
        self._queues |= new_q
        self._destinations |= new_d
        self._precreate_queues(new_q)
        self._precreate_destinations(new_d)
        for q in new_q:
            for d in self._destinations:
                self.jobs_delivered_total.labels(q, d)
                self.bytes_delivered_total.labels(q, d)
        for d in new_d:
            for q in self._queues:
                self.jobs_delivered_total.labels(q, d)
                self.bytes_delivered_total.labels(q, d)
        if self._following is not None:
            self._follow_queues(self._following, new_q)

    def queue_label(self, name: str) -> str:
        """``name`` if it is a configured queue (or ``"*"`` when configured), else ``"other"``.

        Pass the routed, configured queue name, not the name the client sent.
        """
        return name if name in self._queues else OTHER

    def count_received(self, queue: str, nbytes: int) -> None:
        """One job of ``nbytes`` received on configured ``queue``: the two intake counters.

        Per job on the event loop, so each label's children are looked up once
        (``labels()`` hashes and locks on every call); bounded by the labels.
        """
        label = self.queue_label(queue)
        self.child(self.jobs_received_total, label).inc()
        self.child(self.bytes_received_total, label).inc(nbytes)

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)`` (label values in the metric's order), looked up
        once: ``labels()`` hashes and locks on every call, and the per-job paths
        (intake, delivery) would pay it each time.  Bounded by the labels."""
        key = (metric, values)
        found = self._labelled.get(key)
        if found is None:
            found = self._labelled[key] = metric.labels(*values)
        return found

    def destination_label(self, name: str) -> str:
        """``name`` if it is a configured destination URI, else ``"other"``."""
        return name if name in self._destinations else OTHER

    def set_spool(self, by_queue_state: Mapping[tuple[str, str], int], bytes: int,
                  free: int) -> None:
        """Set the spool gauges from a snapshot (a tool, a test; the daemon uses
        ``follow_spool``, which overrides these values).

        ``by_queue_state`` maps (queue, state) to a job count; unconfigured
        queues are summed under ``"other"``; pairs not in the snapshot become 0.
        Raises ``ValueError`` for a state outside ``SPOOL_STATES``.
        """
        counts = {(q, s): 0 for q in self._queue_values() for s in SPOOL_STATES}
        for (queue, state), n in by_queue_state.items():
            if state not in SPOOL_STATES:
                raise ValueError(f"unknown spool state {state!r}")
            counts[(self.queue_label(queue), state)] += n
        for (queue, state), n in counts.items():
            self.spool_jobs.labels(queue, state).set(n)
        self.spool_bytes.set(bytes)
        self.spool_free_bytes.set(free)

    def follow_spool(self, counts: Mapping[tuple[str, str], int], stored_bytes: Callable[[], int],
                     free_bytes: Callable[[], int]) -> None:
        """Read the spool gauges from the spool's own bookkeeping at every scrape.

        ``counts`` is a live mapping (queue, state) -> jobs, changed by the
        spool when a job is committed, changes state or is removed
        (``relay.spoolindex``), so the gauges equal the spool's content
        whenever they are read — no scan interval to lag behind.  Scrapes run
        on the event loop that owns the mapping.
        """
        self._following = counts
        self._follow_queues(counts, self._queue_values())
        self.spool_bytes.set_function(stored_bytes)
        self.spool_free_bytes.set_function(functools.partial(_or_nan, free_bytes))

    def _follow_queues(self, counts: Mapping[tuple[str, str], int],
                       queues: Iterable[str]) -> None:
        for queue in queues:
            for state in SPOOL_STATES:
                self.spool_jobs.labels(queue, state).set_function(
                    functools.partial(self._spool_count, counts, queue, state))

    def _spool_count(self, counts: Mapping[tuple[str, str], int], queue: str,
                     state: str) -> float:
        if queue != OTHER:
            return counts.get((queue, state), 0)
        return sum(n for (q, s), n in counts.items() if s == state and q not in self._queues)

    def _queue_values(self) -> list[str]:
        return sorted(self._queues | {OTHER})

    def _destination_values(self) -> list[str]:
        return sorted(self._destinations | {OTHER})

    def _create_intake(self, r: CollectorRegistry) -> None:
        self.jobs_received_total = Counter(
            "lpdrelay_jobs_received_total",
            "Jobs accepted and committed to the spool (acknowledged to the sender).",
            ["queue"], registry=r)
        self.bytes_received_total = Counter(
            "lpdrelay_bytes_received_total",
            "Bytes of control and data files of jobs committed to the spool.",
            ["queue"], registry=r)
        self.jobs_rejected_total = Counter(
            "lpdrelay_jobs_rejected_total",
            "Inbound jobs or connections refused, by reason.",
            ["reason"], registry=r)

    def _create_delivery(self, r: CollectorRegistry) -> None:
        self.jobs_delivered_total = Counter(
            "lpdrelay_jobs_delivered_total",
            "Jobs the destination confirmed; the job then leaves the spool.",
            ["queue", "destination"], registry=r)
        self.bytes_delivered_total = Counter(
            "lpdrelay_bytes_delivered_total",
            "Data bytes of jobs the destination confirmed.",
            ["queue", "destination"], registry=r)
        self.delivery_attempts_total = Counter(
            "lpdrelay_delivery_attempts_total",
            "Delivery attempts, by result (ok, retry, rejected).",
            ["destination", "result"], registry=r)
        self.delivery_retries_total = Counter(
            "lpdrelay_delivery_retries_total",
            "Failed delivery attempts that will be retried, by reason.",
            ["destination", "reason"], registry=r)
        self.jobs_held_total = Counter(
            "lpdrelay_jobs_held_total",
            "Jobs moved to the held state (gave up retrying or refused for good).",
            ["queue"], registry=r)
        self.job_delivery_seconds = Histogram(
            "lpdrelay_job_delivery_seconds",
            "Seconds from a job's acknowledgement to its confirmed delivery, retries included.",
            ["queue"], buckets=DELIVERY_BUCKETS, registry=r)
        self.destination_up = Gauge(
            "lpdrelay_destination_up",
            "1 when the last delivery attempt to the destination succeeded (or none was made "
            "yet), 0 when it failed or the destination is known unusable.",
            ["destination"], registry=r)
        self.destination_failovers_total = Counter(
            "lpdrelay_destination_failovers_total",
            "Times a queue moved to another destination: failover after failover_after "
            "consecutive failures, failback to its first destination once that delivered.",
            ["queue", "direction"], registry=r)

    def _create_spool(self, r: CollectorRegistry) -> None:
        self.spool_jobs = Gauge(
            "lpdrelay_spool_jobs", "Jobs in the spool, by queue and state (queued, held).",
            ["queue", "state"], registry=r)
        self.spool_bytes = Gauge(
            "lpdrelay_spool_bytes", "Bytes of the jobs in the spool.", registry=r)
        self.spool_free_bytes = Gauge(
            "lpdrelay_spool_free_bytes",
            "Bytes free for the relay on the spool's file system.", registry=r)
        # SPEC §11: audit records written but not yet confirmed by the syslog collector.
        self.audit_syslog_backlog_records = Gauge(
            "lpdrelay_audit_syslog_backlog_records",
            "Audit records not yet confirmed sent to [audit] syslog.", registry=r)
        self.audit_syslog_failures_total = Counter(
            "lpdrelay_audit_syslog_failures_total",
            "Connections to [audit] syslog that failed or were lost.", registry=r)

    def _create_tls(self, r: CollectorRegistry) -> None:
        # Expiry as a timestamp (as blackbox_exporter's probe_ssl_earliest_cert_expiry);
        # NaN until a certificate of that role is loaded, so a relay without
        # TLS never looks like one whose certificate expired (NaN < x is false).
        self.tls_certificate_expiry_seconds = Gauge(
            "lpdrelay_tls_certificate_expiry_seconds",
            "Epoch seconds when the earliest certificate of this role expires "
            "(server: the TLS listeners'; client: an lpds:// destination's).",
            ["role"], registry=r)
        self.tls_handshake_failures_total = Counter(
            "lpdrelay_tls_handshake_failures_total",
            "TLS handshakes that failed, inbound and outbound, by reason.",
            ["reason"], registry=r)
        for reason in HANDSHAKE_REASONS:
            self.tls_handshake_failures_total.labels(reason=reason)
        for role in ("server", "client"):
            self.tls_certificate_expiry_seconds.labels(role=role).set(math.nan)
        self._expiry: dict[str, float] = {}

    def certificate_expires(self, role: str, not_after: float, *, replace: bool = False,
                            ) -> None:
        """Record a loaded certificate; the gauge keeps the earliest per role
        (``replace``: this one instead, after a reload)."""
        if role not in ("server", "client"):
            raise ValueError(f"unknown certificate role {role!r}")
        earliest = not_after if replace else min(not_after, self._expiry.get(role, math.inf))
        self._expiry[role] = earliest
        self.tls_certificate_expiry_seconds.labels(role=role).set(earliest)

    def _create_queue_state(self, r: CollectorRegistry) -> None:
        self.queue_state = Gauge(
            "lpdrelay_queue_state",
            "1 while an operator has the queue disabled (new jobs refused), stopped (no "
            "delivery) or redirected (delivered by another queue), else 0.",
            ["queue", "state"], registry=r)

    def _create_connections(self, r: CollectorRegistry) -> None:
        self.inbound_connections = Gauge(
            "lpdrelay_inbound_connections", "Open inbound LPD connections.", registry=r)
        self.origin_ports_in_use = Gauge(
            "lpdrelay_origin_ports_in_use",
            "Origin ports held by outbound LPD connections.", registry=r)
        self.origin_port_exhausted_total = Counter(
            "lpdrelay_origin_port_exhausted_total",
            "Times a sender found every origin port busy or cooling and had to wait.",
            registry=r)
        self.origin_port_wait_seconds = Histogram(
            "lpdrelay_origin_port_wait_seconds",
            "Seconds a sender waited for an origin port (0 when one was free).",
            buckets=PORT_WAIT_BUCKETS, registry=r)

    def _precreate(self, routes: Iterable[tuple[str, str]] | None) -> None:
        # Touching .labels() creates the child at 0: the series exists before
        # its first event, so rate() and absent-value panels behave.
        for reason in REJECT_REASONS:
            self.jobs_rejected_total.labels(reason)
        self._precreate_queues(self._queue_values())
        self._precreate_destinations(self._destination_values())
        pairs = ([(q, d) for q in self._queues for d in self._destinations]
                 if routes is None else list(routes))
        for q, d in pairs:
            ql, dl = self.queue_label(q), self.destination_label(d)
            self.jobs_delivered_total.labels(ql, dl)
            self.bytes_delivered_total.labels(ql, dl)

    def _precreate_queues(self, queues: Iterable[str]) -> None:
        for q in queues:
            self.jobs_received_total.labels(q)
            self.bytes_received_total.labels(q)
            self.jobs_held_total.labels(q)
            self.job_delivery_seconds.labels(q)
            for direction in FAILOVER_DIRECTIONS:
                self.destination_failovers_total.labels(q, direction)
            for state in SPOOL_STATES:
                self.spool_jobs.labels(q, state)
            if q != OTHER:     # operator states exist for configured queues only
                for state in QUEUE_STATES:
                    self.queue_state.labels(q, state)

    def _precreate_destinations(self, destinations: Iterable[str]) -> None:
        for d in destinations:
            for result in ATTEMPT_RESULTS:
                self.delivery_attempts_total.labels(d, result)
            for reason in RETRY_REASONS:
                self.delivery_retries_total.labels(d, reason)
            # Up until an attempt says otherwise: a destination nothing was
            # sent to since start is not an outage (no alert after restart).
            self.destination_up.labels(d).set(1)


def _or_nan(read: Callable[[], int]) -> float:
    # A spool folder that vanished must not break the whole scrape.
    try:
        return read()
    except OSError:
        return math.nan
