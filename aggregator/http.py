"""The aggregator's HTTP status endpoint (aiohttp): ``/healthz``, ``/status``, ``/metrics``."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST


async def start_status_server(service, listen: str) -> web.AppRunner:
    """Serve the status of ``service`` on ``listen`` (host:port, port 0 picks one)."""
    app = web.Application()

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def status(_request: web.Request) -> web.Response:
        return web.json_response(service.status())

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(
            body=service.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(runner, host or "127.0.0.1", int(port or 0))
    await site.start()
    sockets = site._server.sockets if site._server else []
    bound = sockets[0].getsockname()[1] if sockets else int(port or 0)
    service.http_address = f"{host or '127.0.0.1'}:{bound}"
    return runner
