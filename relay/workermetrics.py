"""The intake workers' metrics in the main process's registry: /metrics for the whole daemon.

A worker counts what its connections see (refusals by reason, connections,
TLS handshakes) in a registry of its own.  ``WorkerCounts`` adds what each
worker's values changed since they were last applied to the main metric
objects: counters grow by the difference, ``lpdrelay_inbound_connections``
is the sum over the workers, the certificate expiry is set.  The values are
read from every worker whenever the main registry is read (``PullFirst``,
registered ahead of the metric objects), and a worker also pushes them once
a second, so one that dies loses at most that.  Jobs and bytes received are
counted by the main process as it hands a durable job to delivery; the
gauges the main process owns (destinations, spool, queue states) are never
taken from a worker.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric

from relay.metrics import Metrics

__all__ = ["ADDITIVE_GAUGES", "WORKER_GAUGES", "Key", "WorkerCounts"]

ADDITIVE_GAUGES = frozenset({"lpdrelay_inbound_connections"})
# The only gauges a worker sets; the rest are the main process's own.
WORKER_GAUGES = ADDITIVE_GAUGES | {"lpdrelay_tls_certificate_expiry_seconds"}

Key = tuple[str, tuple[tuple[str, str], ...]]


class PullFirst:
    """A collector that yields nothing: reading it brings the workers' values in."""

    def __init__(self, pull: Callable[[], None]) -> None:
        self.pull = pull

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        self.pull()
        return []


class WorkerCounts:
    """Applies workers' metric values to the main ``Metrics`` (any thread)."""

    def __init__(self, metrics: Metrics, registry: CollectorRegistry,
                 pull: Callable[[], None]) -> None:
        self._collectors = {next(iter(m.describe())).name: m for m in vars(metrics).values()
                            if isinstance(m, Counter | Gauge)}
        self._lock = threading.Lock()
        # The registry yields its collectors in the order registered: the
        # metric objects go after the pull.
        objects = list(self._collectors.values())
        for metric in objects:
            registry.unregister(metric)
        registry.register(PullFirst(pull))
        for metric in objects:
            registry.register(metric)

    def apply(self, last: dict[Key, float], values: dict[Key, float],
              alive: Callable[[], bool]) -> None:
        """Add what changed from ``last`` (a worker's values as last applied) to ``values``."""
        with self._lock:
            if not alive():
                return   # gone: forget() took its gauges back
            for key, value in values.items():
                delta = value - last.get(key, 0.0)
                child = self._child(*key)
                if child is None or not delta:
                    continue
                if isinstance(child, Counter):
                    if delta > 0:
                        child.inc(delta)
                elif key[0] not in WORKER_GAUGES or math.isnan(value):
                    continue
                elif key[0] in ADDITIVE_GAUGES:
                    child.inc(delta)
                else:
                    child.set(value)
            last.update(values)

    def forget(self, last: dict[Key, float]) -> None:
        """A worker ended: its connections no longer count."""
        with self._lock:
            for (family, labels), value in _additive(last.items()):
                if isinstance(child := self._child(family, labels), Gauge):
                    child.dec(value)
            last.clear()

    def _child(self, family: str, labels: tuple[tuple[str, str], ...]) -> Counter | Gauge | None:
        metric = self._collectors.get(family)
        if metric is None:
            return None
        return metric.labels(**dict(labels)) if labels else metric


def _additive(items: Iterable[tuple[Key, float]]) -> list[tuple[Key, float]]:
    return [(key, value) for key, value in items if key[0] in ADDITIVE_GAUGES and value]
