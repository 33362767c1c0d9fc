"""The island's HTTP status endpoint (aiohttp): ``/healthz``, ``/status``, ``/metrics``.

Runs on the island's network ``LoopThread``; the handlers only read counters the training
loop and the sync engine keep, so a scrape never stalls training.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from comms.http import http_token, http_url, https_context, start_app, status_app

# summary key -> (metric name after archipelago_island_, help); units in the names
_GAUGES = {
    "step": ("step", "Inner steps done"),
    "version": ("version", "Global version of the anchor"),
    "staleness": ("staleness_versions", "Staleness of the last accepted push, in versions"),
    "utilization": (
        "utilization_ratio",
        "Fraction of wall time in forward, backward and optimizer",
    ),
    "tokens_per_s": ("tokens_per_second", "Training throughput since the island started"),
    "queue_depth": ("queued_pushes", "Pushes waiting for the link"),
    "loss": ("train_loss", "Last training loss"),
}
_FRAGMENT_GAUGES = {
    "version": ("fragment_version", "Global version of a fragment line's anchor"),
    "staleness": ("fragment_staleness_versions", "Staleness of a fragment's last accepted push"),
}
_COUNTERS = {  # exposed with _total
    "bytes_sent": ("sent_bytes", "Bytes pushed"),
    "bytes_received": ("received_bytes", "Bytes received"),
    "tokens": ("tokens", "Tokens trained on"),
}


class _IslandCollector:
    def __init__(self, island):
        self.island = island

    def collect(self):
        s = self.island.summary()
        for key, (name, text) in _GAUGES.items():
            if s.get(key) is not None:
                g = GaugeMetricFamily(f"archipelago_island_{name}", text, labels=["island"])
                g.add_metric([s["name"]], float(s[key]))
                yield g
        for key, (name, text) in _COUNTERS.items():
            if s.get(key) is not None:
                c = CounterMetricFamily(f"archipelago_island_{name}", text, labels=["island"])
                c.add_metric([s["name"]], float(s[key]))
                yield c
        yield from _fragment_gauges(s)


def _fragment_gauges(s: dict):
    """With streamed fragments (``sync.fragments``): each fragment line's version and the
    staleness of its last accepted push, labelled by its model id."""
    if not s.get("fragments"):
        return
    for key, (name, text) in _FRAGMENT_GAUGES.items():
        g = GaugeMetricFamily(f"archipelago_island_{name}", text, labels=["island", "model_id"])
        for f in s["fragments"]:
            g.add_metric([s["name"], f["model_id"]], float(f[key]))
        yield g


async def start_status_server(island, listen: str) -> str:
    """Serve ``island``'s status on ``listen`` (host:port; port 0 picks one); returns the
    bound address."""
    registry = CollectorRegistry()
    registry.register(_IslandCollector(island))

    def status() -> dict:
        s = island.summary()
        s.pop("sync", None)
        return s

    app = status_app(
        status,
        lambda: generate_latest(registry),
        lambda: "ok" if island.ready.is_set() else "starting",
        token=http_token(island.config.http_token),
        protect_metrics=island.config.http_token_metrics,
    )
    context = https_context(island.config.tls)  # HTTPS with the [tls] certificate, if any
    island._status_runner, address = await start_app(app, listen, context)
    island.http_url = http_url(address, context)
    return address
