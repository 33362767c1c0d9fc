"""Serving versions: each subscriber's stream of ``u_v``, snapshots by fetch, and waking the
subscribers when a line's version moves.

Every aggregator serves the versions it holds (its replica's, or the root's own), so islands
subscribe to and fetch from their own leaf. A stream reads the line's cache, or the root's
store for a version no longer cached there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aggregator.lines import ModelLine
from aggregator.root import snapshot_envelope
from comms.errors import NotFoundError


class Publishing:
    """The ``subscribe``, ``fetch`` and ``on_read_refused`` of
    :class:`~aggregator.service.AggregatorService` (its transport handler) and
    :meth:`_publish`. Uses the service's ``lines``, ``identity``, ``metrics`` and ``view``.
    """

    async def subscribe(self, model_id: str, from_version: int) -> AsyncIterator[tuple[int, bytes]]:
        line = self.lines.get(model_id)
        if line is None:
            raise NotFoundError(f"model {model_id!r} is not served here")
        v = max(1, from_version)
        while True:
            async with line.changed:
                await line.changed.wait_for(lambda v=v: line.version >= v)
            data = line.cache.get(v) or await asyncio.to_thread(line.version_bytes, v)
            self.metrics.bytes_out.inc(len(data))
            yield v, data
            v += 1

    async def fetch(self, model_id: str, version: int) -> bytes:
        line = self.lines.get(model_id)
        if line is None:
            raise NotFoundError(f"model {model_id!r} is not served here")
        if version not in (-1, line.version):
            if line.store is not None and version in line.store.snapshot_versions():
                theta = await asyncio.to_thread(line.store.load_snapshot, version)
                return snapshot_envelope(model_id, theta, version, self.identity)
            raise NotFoundError(
                f"model {model_id!r}: no snapshot of version {version} here (current "
                f"{line.version}); fetch version -1 for the current one"
            )
        async with line.lock:
            if line.snapshot is None or line.snapshot[0] != line.version:
                theta = {k: v.copy() for k, v in line.theta.items()}
                data = await asyncio.to_thread(
                    snapshot_envelope, model_id, theta, line.version, self.identity
                )
                line.snapshot = (line.version, data)
            data = line.snapshot[1]
        self.metrics.bytes_out.inc(len(data))
        return data

    def on_read_refused(self, method: str, reason: str) -> None:
        """The transport server refused a Fetch or Subscribe (``comms.reads``): count it."""
        self.metrics.reads_refused.labels(reason).inc()

    async def _publish(self, line: ModelLine, version: int) -> None:
        line.version = version
        self.view.versioned(line.model_id, version)
        async with line.changed:
            line.changed.notify_all()
