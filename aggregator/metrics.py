"""Prometheus metrics of one aggregator (a registry of its own, so several run in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
# an update's norm / the median of the window: honest ones sit near 1 (docs/reliability.md)
# an island update's cosine with -u_v (aggregator.direction): honest ones +0.09 and up
AGREEMENT_BUCKETS = (-0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
NORM_RATIO_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 10.0, 100.0)


class AggregatorMetrics:
    """``lines`` (the service's ``model_id -> ModelLine``, read at each scrape) adds the storage
    gauges: whether each line's WAL and store writes fail (a full disk) and how often they did."""

    def __init__(self, name: str, role: str, lines: dict | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        if lines is not None:
            r.register(_StorageCollector(lines))
        self.flush_failures = Counter(
            "archipelago_flush_failures",
            "Flushes (versions at the root, partials elsewhere) deferred because they could not "
            "be made durable, by model and reason (disk_full, disk_error)",
            ["model_id", "reason"], registry=r,
        )  # fmt: skip
        self.dropped = Counter(
            "archipelago_updates_dropped",
            "Acknowledged updates dropped deliberately, by model and reason (nonfinite_merge: "
            "their float32 merge overflowed)",
            ["model_id", "reason"], registry=r,
        )  # fmt: skip
        self.reads_refused = Counter(
            "archipelago_reads_refused",
            "Fetch and Subscribe requests refused by the read guard, by reason",
            ["reason"], registry=r,
        )  # fmt: skip
        self.updates = Counter(
            "archipelago_updates_accepted", "Updates accepted", ["model_id", "kind"], registry=r
        )
        self.rejected = Counter(
            "archipelago_updates_rejected", "Updates rejected, by reason", ["reason"], registry=r
        )
        self.replayed = Counter(
            "archipelago_updates_replayed", "Updates replayed from the WAL", registry=r
        )
        self.staleness = Histogram(
            "archipelago_update_staleness_versions", "Staleness of accepted updates, in versions",
            buckets=STALENESS_BUCKETS, registry=r,
        )  # fmt: skip
        self.push_seconds = Histogram(
            "archipelago_push_seconds", "Time from a complete upload to its ack", registry=r
        )
        self.merge_seconds = Histogram(
            "archipelago_merge_seconds", "Time of one flush (outer step at the root)", registry=r
        )
        self.bytes_in = Counter(
            "archipelago_received_bytes", "Bytes received in updates", registry=r
        )
        self.bytes_out = Counter(
            "archipelago_sent_bytes", "Bytes sent (versions, partials)", registry=r
        )
        self.partials_sent = Counter(
            "archipelago_partials_sent", "Partial aggregates pushed to the parent", registry=r
        )
        self.partials_dropped = Counter(
            "archipelago_partials_dropped", "Partials the parent refused", ["reason"], registry=r
        )
        self.clipped = Counter(
            "archipelago_updates_clipped",
            "Island updates scaled down to the norm bound, by model and bound "
            "(norm_bound: the adaptive one; warmup: relative to theta; clip_norm: static)",
            ["model_id", "reason"], registry=r,
        )  # fmt: skip
        self.norm_bound = Gauge(
            "archipelago_update_norm_bound", "The current L2 bound of island updates",
            ["model_id"], registry=r,
        )  # fmt: skip
        self.norm_ratio = Histogram(
            "archipelago_update_norm_ratio",
            "An accepted island update's L2 norm over the median of recent ones (before clipping)",
            buckets=NORM_RATIO_BUCKETS, registry=r,
        )  # fmt: skip
        self.opposed = Counter(
            "archipelago_updates_opposed",
            "Island updates pointing against the last merged step (cosine with -u_v below "
            "direction_min_cos), by model and decision (refused; over_cap: admitted, the "
            "version had refused its share)",
            ["model_id", "decision"], registry=r,
        )  # fmt: skip
        self.agreement = Histogram(
            "archipelago_update_agreement",
            "An island update's cosine with the last merged step -u_v, at admission",
            buckets=AGREEMENT_BUCKETS, registry=r,
        )  # fmt: skip
        self.version = Gauge(
            "archipelago_model_version", "Current version", ["model_id"], registry=r
        )
        self.info = Gauge(
            "archipelago_aggregator_info", "Static facts", ["name", "role"], registry=r
        )
        self.info.labels(name, role).set(1)

    def accepted(self, admitted) -> None:
        h = admitted.envelope.header
        self.updates.labels(h.model_id, h.kind).inc()
        self.staleness.observe(admitted.staleness)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StorageCollector:
    """``archipelago_storage_failing`` (1 while writes fail) and
    ``archipelago_storage_write_failures_total`` per model and part (wal, store)."""

    def __init__(self, lines: dict):
        self.lines = lines

    def collect(self):
        failing = GaugeMetricFamily(
            "archipelago_storage_failing",
            "1 while writes of this part fail (a full or failing disk): pushes are refused",
            labels=["model_id", "part"],
        )
        failures = CounterMetricFamily(
            "archipelago_storage_write_failures",
            "Writes that failed (full disk, I/O error) since the process started",
            labels=["model_id", "part"],
        )
        for model_id, line in list(self.lines.items()):
            parts = {"wal": line.wal.health}
            if line.store is not None:
                parts["store"] = line.store.health
            for part, health in parts.items():
                failing.add_metric([model_id, part], 1.0 if health.failing else 0.0)
                failures.add_metric([model_id, part], float(health.failures))
        yield failing
        yield failures

    def describe(self):
        return []
