"""Snapshot fetch for a late joiner: download ``theta_v`` exactly, then follow from ``v + 1``.

An island that starts late, or whose versions are gone (``VersionGapError``), fetches the
aggregator's newest full model instead of replaying versions. ``SnapshotJoiner`` is that part
of ``SyncEngine`` (a mixin); ``fetch_snapshot`` blocks the training thread up to
``snapshot_timeout_s`` while the download runs on the engine's loop thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from comms.update import decode_update

if TYPE_CHECKING:
    from comms.aio import LoopThread
    from island.sync.config import SyncConfig, SyncStats

log = logging.getLogger(__name__)


class SnapshotJoiner:
    """Fetch the newest full model and follow versions after it (part of ``SyncEngine``)."""

    # set by SyncEngine.__init__
    config: SyncConfig
    _loop: LoopThread
    _lock: threading.Lock
    _stats: SyncStats

    def fetch_snapshot(self, timeout: float | None = None) -> tuple[int, dict[str, np.ndarray]]:
        """Download the newest full model ``(v, theta_v)`` and follow versions after ``v``."""
        timeout = self.config.snapshot_timeout_s if timeout is None else timeout
        start = time.perf_counter()
        try:
            data = self._loop.run(self._fetch(), timeout)
            env = self._open(data, "snapshot")
            params = decode_update(env)
            version = env.header.base_version
            with self._lock:
                self._stats.snapshots_fetched += 1
            self.follow(version)
            log.info("model %s: loaded snapshot of version %d", self.model_id, version)
            return version, params
        finally:
            self._add_blocked(time.perf_counter() - start)

    async def _fetch(self) -> bytes:
        client = self._new_client()
        try:
            return await client.fetch(self.model_id, -1)
        finally:
            with self._lock:
                self._stats.bytes_received += client.stats.bytes_received
            await client.close()
