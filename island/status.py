"""The island's HTTP status endpoint (aiohttp): ``/healthz``, ``/status``, ``/metrics``.

Runs on the island's network ``LoopThread``; the handlers only read counters the training
loop and the sync engine keep, so a scrape never stalls training.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_GAUGES = {
    "step": "Inner steps done",
    "version": "Global version of the anchor",
    "staleness": "Staleness of the last accepted push",
    "utilization": "Fraction of wall time in forward, backward and optimizer",
    "tokens_per_s": "Training throughput",
    "queue_depth": "Pushes waiting for the link",
    "loss": "Last training loss",
}
_COUNTERS = {"bytes_sent": "Bytes pushed", "bytes_received": "Bytes received", "tokens": "Tokens"}


class _IslandCollector:
    def __init__(self, island):
        self.island = island

    def collect(self):
        s = self.island.summary()
        for key, text in _GAUGES.items():
            if s.get(key) is not None:
                g = GaugeMetricFamily(f"archipelago_island_{key}", text, labels=["island"])
                g.add_metric([s["name"]], float(s[key]))
                yield g
        for key, text in _COUNTERS.items():
            if s.get(key) is not None:
                c = CounterMetricFamily(f"archipelago_island_{key}", text, labels=["island"])
                c.add_metric([s["name"]], float(s[key]))
                yield c


async def start_status_server(island, listen: str) -> str:
    """Serve ``island``'s status on ``listen`` (host:port; port 0 picks one); returns the
    bound address."""
    registry = CollectorRegistry()
    registry.register(_IslandCollector(island))
    app = web.Application()

    async def healthz(_request):
        return web.Response(text="ok\n" if island.ready.is_set() else "starting\n")

    async def status(_request):
        s = island.summary()
        s.pop("sync", None)
        return web.json_response(s)

    async def metrics(_request):
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(runner, host or "127.0.0.1", int(port or 0))
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    island._status_runner = runner
    return f"{host or '127.0.0.1'}:{bound}"
