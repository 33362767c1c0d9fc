"""HTTP plumbing every daemon shares (aiohttp): binding an app, and the status endpoints.

``status_app`` is the ``/healthz``, ``/status`` (JSON) and ``/metrics`` (Prometheus text)
trio of an island or an aggregator; ``start_app`` binds any app to ``host:port`` (port 0
picks a free one) and returns the address it really got.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST


def split_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); an empty host is 127.0.0.1, an empty port 0."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port or 0)


async def start_app(app: web.Application, listen: str) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on ``listen``; returns its runner (``cleanup()`` stops it) and the bound
    ``host:port``."""
    host, port = split_listen(listen)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, f"{host}:{runner.addresses[0][1]}"


def status_app(
    status: Callable[[], dict[str, Any]],
    metrics: Callable[[], bytes],
    health: Callable[[], str] = lambda: "ok",
) -> web.Application:
    """``/healthz`` (``health()`` as text), ``/status`` (``status()`` as JSON) and
    ``/metrics`` (``metrics()``, Prometheus exposition)."""
    app = web.Application()

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text=health() + "\n")

    async def status_page(_request: web.Request) -> web.Response:
        return web.json_response(status())

    async def metrics_page(_request: web.Request) -> web.Response:
        return web.Response(body=metrics(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status_page)
    app.router.add_get("/metrics", metrics_page)
    return app
