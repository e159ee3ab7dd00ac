"""relay.metrics: the SPEC §7 table, pre-created series, bounded labels, spool snapshot."""

from __future__ import annotations

import math
import random
import string

import pytest
from prometheus_client import CollectorRegistry

from relay.errors import REJECT_REASONS
from relay.metrics import (
    ATTEMPT_RESULTS,
    DELIVERY_BUCKETS,
    OTHER,
    PORT_WAIT_BUCKETS,
    RETRY_REASONS,
    SPOOL_STATES,
    Metrics,
)

QUEUES = ["ward3", "Lab", "*"]
DESTS = ["lpd://laptop-ward3.vpn/Ward3?mode=count", "socket://10.1.2.3:9100",
         "dir:///var/spool/lpd-relay-out"]

# SPEC §7, verbatim: family name (as exported) -> (type, label names).
SPEC_TABLE = {
    "lpdrelay_jobs_received_total": ("counter", {"queue"}),
    "lpdrelay_bytes_received_total": ("counter", {"queue"}),
    "lpdrelay_jobs_rejected_total": ("counter", {"reason"}),
    "lpdrelay_jobs_delivered_total": ("counter", {"queue", "destination"}),
    "lpdrelay_bytes_delivered_total": ("counter", {"queue", "destination"}),
    "lpdrelay_delivery_attempts_total": ("counter", {"destination", "result"}),
    "lpdrelay_delivery_retries_total": ("counter", {"destination", "reason"}),
    "lpdrelay_jobs_held_total": ("counter", {"queue"}),
    "lpdrelay_spool_jobs": ("gauge", {"queue", "state"}),
    "lpdrelay_spool_bytes": ("gauge", set()),
    "lpdrelay_spool_free_bytes": ("gauge", set()),
    "lpdrelay_job_delivery_seconds": ("histogram", {"queue"}),
    "lpdrelay_inbound_connections": ("gauge", set()),
    "lpdrelay_destination_up": ("gauge", {"destination"}),
    "lpdrelay_origin_ports_in_use": ("gauge", set()),
    "lpdrelay_origin_port_exhausted_total": ("counter", set()),
    "lpdrelay_origin_port_wait_seconds": ("histogram", set()),
    # SPEC §9
    "lpdrelay_tls_certificate_expiry_seconds": ("gauge", {"role"}),
    "lpdrelay_tls_handshake_failures_total": ("counter", {"reason"}),
    "lpdrelay_queue_state": ("gauge", {"queue", "state"}),
    # SPEC §11 (issue 13: in SPEC §7's table)
    "lpdrelay_audit_syslog_backlog_records": ("gauge", set()),
    "lpdrelay_audit_syslog_failures_total": ("counter", set()),
    # Beyond SPEC §7's table (docs/observability.md):
    "lpdrelay_destination_failovers_total": ("counter", {"queue", "direction"}),
}


@pytest.fixture
def reg() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def m(reg: CollectorRegistry) -> Metrics:
    return Metrics(reg, queues=QUEUES, destinations=DESTS)


def exported(reg: CollectorRegistry) -> dict[str, tuple[str, set[str]]]:
    """Exported name -> (type, label names), names as they appear in the text format."""
    out = {}
    for fam in reg.collect():
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        labels = {k for s in fam.samples for k in s.labels if k != "le"}
        out[name] = (fam.type, labels)
    return out


def series(reg: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(s.name, tuple(sorted(s.labels.items()))) for f in reg.collect() for s in f.samples}


def test_exports_exactly_the_spec_table(m: Metrics, reg: CollectorRegistry) -> None:
    assert exported(reg) == SPEC_TABLE


def test_certificate_expiry_keeps_the_earliest_per_role(m: Metrics,
                                                        reg: CollectorRegistry) -> None:
    name = "lpdrelay_tls_certificate_expiry_seconds"
    m.certificate_expires("client", 2000.0)
    m.certificate_expires("client", 1000.0)
    m.certificate_expires("client", 3000.0)
    assert reg.get_sample_value(name, {"role": "client"}) == 1000.0
    assert math.isnan(reg.get_sample_value(name, {"role": "server"}))  # none loaded
    with pytest.raises(ValueError, match="role"):
        m.certificate_expires("peer", 1.0)


def test_every_name_has_the_prefix_and_counters_end_in_total(
        reg: CollectorRegistry, m: Metrics) -> None:
    for name, (kind, _) in exported(reg).items():
        assert name.startswith("lpdrelay_")
        assert name.endswith("_total") == (kind == "counter"), name


def test_attributes_are_the_metric_objects(m: Metrics, reg: CollectorRegistry) -> None:
    m.jobs_received_total.labels("ward3").inc()
    m.bytes_received_total.labels("ward3").inc(4096)
    m.jobs_rejected_total.labels("acl").inc()
    m.jobs_delivered_total.labels("ward3", DESTS[0]).inc()
    m.bytes_delivered_total.labels("ward3", DESTS[0]).inc(4000)
    m.delivery_attempts_total.labels(DESTS[1], "retry").inc()
    m.delivery_retries_total.labels(DESTS[1], "refused").inc()
    m.jobs_held_total.labels("Lab").inc()
    m.inbound_connections.inc(3)
    m.destination_up.labels(DESTS[1]).set(0)
    m.origin_ports_in_use.set(11)
    m.origin_port_exhausted_total.inc()
    m.origin_port_wait_seconds.observe(0.2)
    m.job_delivery_seconds.labels("ward3").observe(1.5)
    v = reg.get_sample_value
    assert v("lpdrelay_jobs_received_total", {"queue": "ward3"}) == 1
    assert v("lpdrelay_bytes_received_total", {"queue": "ward3"}) == 4096
    assert v("lpdrelay_jobs_rejected_total", {"reason": "acl"}) == 1
    assert v("lpdrelay_jobs_delivered_total", {"queue": "ward3", "destination": DESTS[0]}) == 1
    assert v("lpdrelay_bytes_delivered_total",
             {"queue": "ward3", "destination": DESTS[0]}) == 4000
    assert v("lpdrelay_delivery_attempts_total",
             {"destination": DESTS[1], "result": "retry"}) == 1
    assert v("lpdrelay_delivery_retries_total",
             {"destination": DESTS[1], "reason": "refused"}) == 1
    assert v("lpdrelay_jobs_held_total", {"queue": "Lab"}) == 1
    assert v("lpdrelay_inbound_connections") == 3
    assert v("lpdrelay_destination_up", {"destination": DESTS[1]}) == 0
    assert v("lpdrelay_origin_ports_in_use") == 11
    assert v("lpdrelay_origin_port_exhausted_total") == 1
    assert v("lpdrelay_origin_port_wait_seconds_bucket", {"le": "0.25"}) == 1
    assert v("lpdrelay_origin_port_wait_seconds_bucket", {"le": "0.1"}) == 0
    assert v("lpdrelay_job_delivery_seconds_sum", {"queue": "ward3"}) == 1.5
    assert v("lpdrelay_job_delivery_seconds_count", {"queue": "ward3"}) == 1


def test_series_exist_at_zero_from_the_start(m: Metrics, reg: CollectorRegistry) -> None:
    v = reg.get_sample_value
    for q in [*QUEUES, OTHER]:
        assert v("lpdrelay_jobs_received_total", {"queue": q}) == 0
        assert v("lpdrelay_jobs_held_total", {"queue": q}) == 0
        assert v("lpdrelay_job_delivery_seconds_count", {"queue": q}) == 0
        for state in SPOOL_STATES:
            assert v("lpdrelay_spool_jobs", {"queue": q, "state": state}) == 0
    for reason in REJECT_REASONS:
        assert v("lpdrelay_jobs_rejected_total", {"reason": reason}) == 0
    for d in [*DESTS, OTHER]:
        # A destination is taken as up until an attempt fails: no alert after a restart.
        assert v("lpdrelay_destination_up", {"destination": d}) == 1
        for result in ATTEMPT_RESULTS:
            assert v("lpdrelay_delivery_attempts_total", {"destination": d, "result": result}) == 0
        for reason in RETRY_REASONS:
            assert v("lpdrelay_delivery_retries_total", {"destination": d, "reason": reason}) == 0
    for q in QUEUES:
        for d in DESTS:
            assert v("lpdrelay_jobs_delivered_total", {"queue": q, "destination": d}) == 0
    assert v("lpdrelay_origin_port_exhausted_total") == 0
    assert v("lpdrelay_origin_port_wait_seconds_count") == 0


def test_routes_limit_the_delivery_pairs(reg: CollectorRegistry) -> None:
    Metrics(reg, queues=["a", "b"], destinations=["socket://p1", "socket://p2"],
            routes=[("a", "socket://p1"), ("b", "socket://p2")])
    pairs = {(s.labels["queue"], s.labels["destination"])
             for f in reg.collect() if f.name == "lpdrelay_jobs_delivered" for s in f.samples}
    assert pairs == {("a", "socket://p1"), ("b", "socket://p2")}


def test_labels_map_unknown_names_to_other(m: Metrics) -> None:
    assert m.queue_label("ward3") == "ward3"
    assert m.queue_label("*") == "*"
    # The caller passes the routed (configured) name; a wire spelling is not one.
    assert m.queue_label("WARD3") == OTHER
    assert m.queue_label("../../etc/passwd") == OTHER
    assert m.destination_label(DESTS[1]) == DESTS[1]
    assert m.destination_label("socket://10.1.2.3:9101") == OTHER


def test_catch_all_is_a_label_only_when_configured(reg: CollectorRegistry) -> None:
    m = Metrics(reg, queues=["ward3"], destinations=[])
    assert m.queue_label("*") == OTHER


def test_hundred_thousand_wire_names_leave_the_series_unchanged(
        m: Metrics, reg: CollectorRegistry) -> None:
    before = series(reg)
    rng = random.Random(1179)
    alphabet = string.printable + "äÖ€\x00\x1b"
    for i in range(100_000):
        name = "".join(rng.choices(alphabet, k=rng.randint(1, 40)))
        if i % 1000 == 0:
            name = rng.choice(QUEUES).swapcase()  # case variants are wire names too
        q = m.queue_label(name)
        d = m.destination_label(name)
        m.jobs_received_total.labels(q).inc()
        m.job_delivery_seconds.labels(q).observe(1.0)
        m.delivery_retries_total.labels(d, "other").inc()
    assert series(reg) == before
    assert (reg.get_sample_value("lpdrelay_jobs_received_total", {"queue": OTHER}) or 0) >= 99_000


def test_set_spool_rebuilds_the_gauges(m: Metrics, reg: CollectorRegistry) -> None:
    m.spool_jobs.labels("Lab", "queued").set(99)  # stale value from before the rescan
    m.set_spool({("ward3", "queued"): 5, ("ward3", "held"): 2, ("gone", "held"): 1,
                 ("removed", "held"): 3}, 123456, 10 * 2**30)
    v = reg.get_sample_value
    assert v("lpdrelay_spool_jobs", {"queue": "ward3", "state": "queued"}) == 5
    assert v("lpdrelay_spool_jobs", {"queue": "ward3", "state": "held"}) == 2
    assert v("lpdrelay_spool_jobs", {"queue": OTHER, "state": "held"}) == 4
    assert v("lpdrelay_spool_jobs", {"queue": "Lab", "state": "queued"}) == 0
    assert v("lpdrelay_spool_bytes") == 123456
    assert v("lpdrelay_spool_free_bytes") == 10 * 2**30
    before = series(reg)
    m.set_spool({}, 0, 1)
    assert series(reg) == before
    assert v("lpdrelay_spool_jobs", {"queue": "ward3", "state": "queued"}) == 0


def test_set_spool_refuses_an_unknown_state(m: Metrics) -> None:
    with pytest.raises(ValueError, match="spool state"):
        m.set_spool({("ward3", "printing"): 1}, 0, 0)


def test_buckets_fit_print_jobs(m: Metrics, reg: CollectorRegistry) -> None:
    assert DELIVERY_BUCKETS[0] == pytest.approx(0.01)
    assert DELIVERY_BUCKETS[-1] == 3600
    assert PORT_WAIT_BUCKETS[0] == pytest.approx(0.001)
    assert PORT_WAIT_BUCKETS[-1] == 60
    assert list(DELIVERY_BUCKETS) == sorted(DELIVERY_BUCKETS)
    m.job_delivery_seconds.labels("Lab").observe(0.004)
    m.job_delivery_seconds.labels("Lab").observe(7200)  # a retried job: over the top bucket
    v = reg.get_sample_value
    assert v("lpdrelay_job_delivery_seconds_bucket", {"queue": "Lab", "le": "0.01"}) == 1
    assert v("lpdrelay_job_delivery_seconds_bucket", {"queue": "Lab", "le": "3600.0"}) == 1
    assert v("lpdrelay_job_delivery_seconds_bucket", {"queue": "Lab", "le": "+Inf"}) == 2


def test_no_created_series(m: Metrics, reg: CollectorRegistry) -> None:
    assert not [n for n, _ in series(reg) if n.endswith("_created")]


def test_each_registry_is_independent() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    ma = Metrics(a, queues=["q"], destinations=["socket://p"])
    Metrics(b, queues=["q"], destinations=["socket://p"])
    ma.jobs_received_total.labels("q").inc()
    assert a.get_sample_value("lpdrelay_jobs_received_total", {"queue": "q"}) == 1
    assert b.get_sample_value("lpdrelay_jobs_received_total", {"queue": "q"}) == 0
