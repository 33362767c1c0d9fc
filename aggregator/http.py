"""The aggregator's HTTP status endpoint: ``/healthz``, ``/status``, ``/metrics``, and the
dashboard (``/dashboard``, :mod:`aggregator.dashboard`)."""

from __future__ import annotations

from aiohttp import web

from aggregator.dashboard.app import add_dashboard
from comms.http import http_token, http_url, https_context, start_app, status_app


async def start_status_server(service, listen: str) -> web.AppRunner:
    """Serve the status of ``service`` on ``listen`` (host:port, port 0 picks one); with an
    ``http_token`` (config or ``ARCHIPELAGO_HTTP_TOKEN``) ``/status`` requires it. HTTPS when
    the config's ``[tls]`` has a certificate (``comms.http.https_context``); the URL served is
    ``service.http_url``."""
    app = status_app(
        service.status,
        service.metrics.exposition,
        token=http_token(service.config.http_token),
        protect_metrics=service.config.http_token_metrics,
    )
    if getattr(service, "view", None) is not None:  # the dashboard (aggregator.dashboard)
        add_dashboard(app, service.view, service, http_token(service.config.http_token))
    context = https_context(service.config.tls)  # HTTPS with the [tls] certificate, if any
    runner, service.http_address = await start_app(app, listen, context)
    service.http_url = http_url(service.http_address, context)
    return runner
