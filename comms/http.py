"""HTTP plumbing every daemon shares (aiohttp): binding an app, and the status endpoints.

``status_app`` is the ``/healthz``, ``/status`` (JSON) and ``/metrics`` (Prometheus text)
trio of an island or an aggregator; ``start_app`` binds any app to ``host:port`` (port 0
picks a free one) and returns the address it really got. A daemon whose ``[tls]`` section has
a certificate serves these endpoints over HTTPS with it (``https_context``; ``tls.http =
false`` keeps plain HTTP, e.g. behind a proxy that terminates TLS).

With a ``token`` (config key ``http_token``, else the ``ARCHIPELAGO_HTTP_TOKEN`` environment
variable: ``http_token``), ``/status`` requires ``Authorization: Bearer <token>`` and answers
401 otherwise; ``/healthz`` stays open, and ``/metrics`` too unless ``protect_metrics``.
``bearer_middleware`` is the same check for any app (``router serve`` uses it).
"""

from __future__ import annotations

import hmac
import os
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from comms.tls import TLSConfig, load_pair, read_pem, server_ssl_context


def split_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); an empty host is 127.0.0.1, an empty port 0."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port or 0)


async def start_app(
    app: web.Application, listen: str, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on ``listen`` (HTTPS with ``ssl_context``); returns its runner
    (``cleanup()`` stops it) and the bound ``host:port``."""
    host, port = split_listen(listen)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    return runner, f"{host}:{runner.addresses[0][1]}"


def https_context(tls: TLSConfig, *, client_certs: bool = False) -> ssl.SSLContext | None:
    """The context a daemon serves HTTP with: HTTPS with the certificate and key of its
    ``[tls]`` section when it has them (and ``tls.http`` is on), else None (plain HTTP).

    A daemon's status endpoints ask no client certificate even with ``tls.mutual``: scrapers
    and browsers hold none, and the bearer token (``http_token``) guards what it protects.
    With ``client_certs`` (``router serve``) and ``tls.mutual``, clients must present a
    certificate that ``tls.ca`` signed."""
    if not (tls.cert and tls.http):
        return None
    cert_pem, key_pem = load_pair(tls.cert, tls.key)
    client_ca = read_pem(tls.ca) if client_certs and tls.mutual else None
    return server_ssl_context(cert_pem, key_pem, client_ca)


def http_url(address: str, ssl_context: ssl.SSLContext | None) -> str:
    """``https://host:port`` when served with TLS, else ``http://host:port``."""
    return f"{'https' if ssl_context is not None else 'http'}://{address}"


def url_of(address: str) -> str:
    """The base URL of a daemon's printed HTTP address: a URL (``http://`` or ``https://``,
    kept) or a bare ``host:port`` (plain HTTP)."""
    return address if "://" in address else f"http://{address}"


HTTP_TOKEN_ENV = "ARCHIPELAGO_HTTP_TOKEN"


def http_token(configured: str) -> str | None:
    """The bearer token of a daemon's HTTP endpoints: the config's, else the environment's
    ``ARCHIPELAGO_HTTP_TOKEN``; None (no token: open) when both are empty."""
    return configured or os.environ.get(HTTP_TOKEN_ENV) or None


def bearer_middleware(token: str, protects: Callable[[str], bool]):
    """An aiohttp middleware: a request whose path ``protects`` accepts must carry
    ``Authorization: Bearer <token>`` (compared in constant time), else it gets a JSON 401."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check_bearer(request: web.Request, handler) -> web.StreamResponse:
        if protects(request.path):
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                return unauthorized()
        return await handler(request)

    return check_bearer


def unauthorized() -> web.Response:
    """401 with a JSON error that says what to send (never the token itself)."""
    message = (
        "missing or wrong bearer token: send the header 'Authorization: Bearer <token>' "
        "with the server's http_token"
    )
    body = {"error": {"type": "unauthorized", "message": message}}
    return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})


def status_app(
    status: Callable[[], dict[str, Any]],
    metrics: Callable[[], bytes],
    health: Callable[[], str] = lambda: "ok",
    *,
    token: str | None = None,
    protect_metrics: bool = False,
) -> web.Application:
    """``/healthz`` (``health()`` as text), ``/status`` (``status()`` as JSON) and
    ``/metrics`` (``metrics()``, Prometheus exposition). With ``token``, ``/status`` (and
    ``/metrics`` if ``protect_metrics``) requires ``Authorization: Bearer <token>``."""
    protected = {"/status", "/metrics"} if protect_metrics else {"/status"}
    middlewares = [bearer_middleware(token, protected.__contains__)] if token else []
    app = web.Application(middlewares=middlewares)

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
