"""The router's state on the dashboard: an aggregator configured with ``router`` (the URL of a
``router serve``) asks it every ``interval_s`` for ``GET /v1/experts`` and shows what it
serves: workload, ensemble rule, router kind, and each expert with its cluster and version
(c-BTM, Gururangan et al. 2023; Decentralized Diffusion Models, McAllister et al. 2025: the
router's weights mix the experts). The aggregator imports nothing of ``router``: this is HTTP.

The answer is a peer's input: :func:`router_state` rebuilds it field by field (types checked,
strings cut to 64 characters, at most ``MAX_EXPERTS`` experts); a bad answer, a refusal (a
wrong ``router_token``) or no answer within ``timeout_s`` shows the router as ``down`` with
the reason, keeping the last good answer and its age. Nothing here raises into the service.

Runs on the aggregator's event loop (aiohttp client, one request at a time).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from typing import Any

import aiohttp

from aggregator.dashboard.reports import MAX_COUNT, _number, text
from comms.errors import MalformedError

log = logging.getLogger("aggregator.service")

ASK_INTERVAL_S = 5.0  # seconds between two questions to the router
MAX_EXPERTS = 256
MAX_ANSWER_BYTES = 1 << 20


def _optional_int(entry: dict, key: str, where: str) -> int | None:
    value = entry.get(key)
    return None if value is None else int(_number(value, "int", -1, MAX_COUNT, f"{where}.{key}"))


def router_state(answer: Any) -> dict[str, Any]:
    """The checked fields of a ``/v1/experts`` answer; ``MalformedError`` naming the field."""
    if not isinstance(answer, dict):
        raise MalformedError(f"router: expected a map, got {type(answer).__name__}")
    experts = answer.get("experts")
    if not isinstance(experts, list) or len(experts) > MAX_EXPERTS:
        raise MalformedError(f"router.experts: expected a list of at most {MAX_EXPERTS}")
    out = {
        key: text(answer[key], f"router.{key}")
        for key in ("workload", "rule", "router")
        if isinstance(answer.get(key), str)
    }
    out["experts"] = []
    for i, entry in enumerate(experts):
        where = f"router.experts[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise MalformedError(f"{where}: expected a map with an id")
        out["experts"].append({
            "id": text(entry["id"], f"{where}.id"),
            "cluster": _optional_int(entry, "cluster", where),
            "version": _optional_int(entry, "version", where),
            "output": _optional_int(entry, "output", where),
            "train_steps": _optional_int(entry, "train_steps", where),
        })  # fmt: skip
    return out


class RouterWatch:
    """Polls one ``router serve`` for the dashboard; ``snapshot()`` is what the page shows."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        interval_s: float = 5.0,
        timeout_s: float = 3.0,
        ssl_context: ssl.SSLContext | None = None,
        clock=time.time,
    ):
        self.url = url.rstrip("/")
        self.token, self.interval_s, self.timeout_s = token, interval_s, timeout_s
        self.ssl_context, self.clock = ssl_context, clock
        self.state: dict[str, Any] | None = None  # the last good answer, checked
        self.checked_at: float | None = None  # when it came
        self.asked = False
        self.error = ""  # why the last ask failed; "" when it succeeded

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        out: dict[str, Any] = {
            "url": text(self.url, "url", 200),
            "status": "unknown" if not self.asked else ("down" if self.error else "up"),
            "error": self.error,
            "age_s": None if self.checked_at is None else round(now - self.checked_at, 3),
        }
        if self.state is not None:
            out.update(self.state)
        return out

    async def ask_once(self, session: aiohttp.ClientSession) -> None:
        """One ``GET /v1/experts``; the state or the error it leaves is in ``snapshot()``."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            async with session.get(
                self.url + "/v1/experts", headers=headers, ssl=self.ssl_context or True,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as r:  # fmt: skip
                if r.status != 200:
                    raise MalformedError(f"HTTP {r.status} from {self.url}/v1/experts")
                body = await r.content.read(MAX_ANSWER_BYTES + 1)
                if len(body) > MAX_ANSWER_BYTES:
                    raise MalformedError(f"an answer over {MAX_ANSWER_BYTES} bytes")
                self.state = router_state(json.loads(body))
            if self.error:
                log.info("router %s answers again", self.url)
            self.checked_at, self.error = self.clock(), ""
        except asyncio.CancelledError:
            raise
        except (MalformedError, aiohttp.ClientError, TimeoutError, ValueError, OSError) as e:
            if not self.error:  # once per outage
                log.warning("router %s: no state for the dashboard: %s", self.url, e)
            self.error = text(f"{type(e).__name__}: {e}", "error", 200) or "failed"
        finally:
            self.asked = True

    async def run(self) -> None:
        """Ask every ``interval_s`` until cancelled."""
        async with aiohttp.ClientSession() as session:
            while True:
                await self.ask_once(session)
                await asyncio.sleep(self.interval_s)


def router_watch(config) -> RouterWatch:
    """The watch of an aggregator config's ``router`` (its token: ``router_token``); an
    ``https://`` router is verified with the config's ``[tls] ca`` when it has one, and
    shown the config's certificate when it asks for one."""
    context = None
    if config.router.startswith("https://") and config.tls.ca:
        context = ssl.create_default_context(cafile=config.tls.ca)
        if config.tls.cert and config.tls.key:
            context.load_cert_chain(config.tls.cert, config.tls.key)
    return RouterWatch(
        config.router, config.router_token or None, interval_s=ASK_INTERVAL_S, ssl_context=context
    )
