"""Prometheus metrics of one aggregator (a registry of its own, so several run in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
# an update's norm / the median of the window: honest ones sit near 1 (docs/reliability.md)
NORM_RATIO_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 10.0, 100.0)


class AggregatorMetrics:
    def __init__(self, name: str, role: str):
        self.registry = CollectorRegistry()
        r = self.registry
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
            "archipelago_update_staleness", "Staleness of accepted updates (versions)",
            buckets=STALENESS_BUCKETS, registry=r,
        )  # fmt: skip
        self.push_seconds = Histogram(
            "archipelago_push_seconds", "Time from a complete upload to its ack", registry=r
        )
        self.merge_seconds = Histogram(
            "archipelago_merge_seconds", "Time of one flush (outer step at the root)", registry=r
        )
        self.bytes_in = Counter("archipelago_bytes_in", "Bytes received in updates", registry=r)
        self.bytes_out = Counter(
            "archipelago_bytes_out", "Bytes sent (versions, partials)", registry=r
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
