"""The dashboard's HTTP side: the page, its two assets, its data and its live stream.

Routes, added to an aggregator's status app (``aggregator.http``):

- ``GET /dashboard``: the page (``static/index.html``);
- ``GET /dashboard/static/{dashboard.css,dashboard.js}``: its style and script, nothing else;
- ``GET /dashboard/data``: one snapshot of the view (JSON);
- ``GET /dashboard/events``: server-sent events (``text/event-stream``), one ``snapshot``
  event at once and one every ``interval_s`` after; the page redraws on each.

Access. Without a token (``http_token``) everything is open, as ``/status`` is. With one,
every dashboard route needs ``Authorization: Bearer <token>`` (for scripts) or the session
cookie. A browser cannot send a header when it opens a page, so the operator opens
``/dashboard?token=<token>`` once: the server checks it, answers with a redirect to
``/dashboard`` that sets an HttpOnly, SameSite=Strict cookie scoped to ``/dashboard``, and the
token leaves the address bar and the history. The cookie holds an HMAC of the token, not the
token. Requests are not logged (``comms.http.start_app`` turns the access log off), so the
token is in no log either. Anything else gets a 401 that says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from pathlib import Path

from aiohttp import web

from comms.http import unauthorized

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
COOKIE = "archipelago_dashboard"
EVENT_INTERVAL_S = 1.0


def session_value(token: str) -> str:
    """The cookie's value: an HMAC of the token (the cookie never holds the token)."""
    return hmac.new(token.encode(), b"archipelago dashboard session", hashlib.sha256).hexdigest()


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def _denied_page() -> web.Response:
    body = (
        "<!doctype html><meta charset=utf-8><title>401: token needed</title>"
        "<p>This dashboard needs the aggregator's <code>http_token</code>: open "
        "<code>/dashboard?token=&lt;token&gt;</code> once (the token is then kept in a cookie "
        "and leaves the address bar), or send <code>Authorization: Bearer &lt;token&gt;"
        "</code>.</p>"
    )
    return web.Response(
        text=body, status=401, content_type="text/html", headers={"WWW-Authenticate": "Bearer"}
    )


def add_dashboard(
    app: web.Application, view, service, token: str | None, interval_s: float = EVENT_INTERVAL_S
) -> None:
    """Add the dashboard's routes to ``app``, serving ``view.snapshot(service)``."""
    session = session_value(token) if token else None
    stopping = asyncio.Event()

    def allowed(request: web.Request) -> bool:
        if token is None:
            return True
        header = request.headers.get("Authorization", "")
        cookie = request.cookies.get(COOKIE, "")
        return _equal(header, f"Bearer {token}") or _equal(cookie, session)

    def guarded(handler, page: bool = False):
        async def check(request: web.Request) -> web.StreamResponse:
            if allowed(request):
                return await handler(request)
            return _denied_page() if page else unauthorized()

        return check

    async def page(request: web.Request) -> web.StreamResponse:
        if token is not None and "token" in request.query:
            if not _equal(request.query["token"], token):
                return _denied_page()
            # a redirect to the bare page: the token leaves the address bar and the history
            response = web.Response(status=303, headers={"Location": "/dashboard"})
            response.set_cookie(COOKIE, session, path="/dashboard", httponly=True,
                                samesite="Strict", secure=request.secure)  # fmt: skip
            return response
        if not allowed(request):
            return _denied_page()
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound(text=f"no dashboard asset {name!r}")
        return web.FileResponse(
            STATIC / name, headers={"Content-Type": ASSETS[name], "Cache-Control": "no-cache"}
        )

    async def data(_request: web.Request) -> web.Response:
        return web.json_response(view.snapshot(service))

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        })  # fmt: skip
        await response.prepare(request)
        try:
            while not stopping.is_set():
                body = json.dumps(view.snapshot(service), separators=(",", ":"))
                await response.write(f"event: snapshot\ndata: {body}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), interval_s)
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        return response

    async def on_shutdown(_app: web.Application) -> None:
        stopping.set()  # open streams end now, not at the server's shutdown timeout

    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/static/{name}", guarded(asset))
    app.router.add_get("/dashboard/data", guarded(data))
    app.router.add_get("/dashboard/events", guarded(events))
