"""The aggregator's HTTP status endpoint: ``/healthz``, ``/status``, ``/metrics``."""

from __future__ import annotations

from aiohttp import web

from comms.http import http_token, start_app, status_app


async def start_status_server(service, listen: str) -> web.AppRunner:
    """Serve the status of ``service`` on ``listen`` (host:port, port 0 picks one); with an
    ``http_token`` (config or ``ARCHIPELAGO_HTTP_TOKEN``) ``/status`` requires it."""
    app = status_app(
        service.status,
        service.metrics.exposition,
        token=http_token(service.config.http_token),
        protect_metrics=service.config.http_token_metrics,
    )
    runner, service.http_address = await start_app(app, listen)
    return runner
