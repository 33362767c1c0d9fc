"""Snapshot fetch for a late joiner: download ``theta_v`` exactly, then follow from ``v + 1``.

An island that starts late, or whose versions are gone (``VersionGapError``), fetches the
aggregator's newest full model instead of replaying versions. ``SnapshotJoiner`` is that part
of ``SyncEngine`` (a mixin); ``fetch_snapshot`` blocks the training thread up to
``snapshot_timeout_s`` while the download runs on the engine's loop thread.

A snapshot is checked like a version (kind, model id, signature) and against the island's
manifest (``expect_manifest``: names, shapes, dtypes) before anything is decoded or returned.
One that is refused is logged with what differs and counted in ``snapshots_refused``; by
default the fetch is tried again (with backoff) until the timeout, then
``SnapshotRefusedError`` says why. The caller's model is never touched by a refused snapshot.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from comms.errors import RejectedError
from comms.update import decode_update

if TYPE_CHECKING:
    from comms.aio import LoopThread
    from comms.update import Manifest
    from island.sync.config import SyncConfig, SyncStats

log = logging.getLogger(__name__)


class SnapshotRefusedError(RejectedError):
    """Every snapshot the aggregator served was refused (malformed, badly signed, or not the
    island's model); ``reason`` is the last refusal's, ``__cause__`` the refusal itself."""


class SnapshotJoiner:
    """Fetch the newest full model and follow versions after it (part of ``SyncEngine``)."""

    # set by SyncEngine.__init__
    config: SyncConfig
    _loop: LoopThread
    _lock: threading.Lock
    _stats: SyncStats
    _manifest: Manifest | None
    _closed: bool
    address: str

    def fetch_snapshot(
        self, timeout: float | None = None, *, retry_refused: bool = True
    ) -> tuple[int, dict[str, np.ndarray]]:
        """Download the newest full model ``(v, theta_v)`` and follow versions after ``v``.

        A snapshot that is refused (``_open``'s checks, the manifest, decoding) is fetched
        again after a backoff while ``retry_refused`` and time is left, else
        ``SnapshotRefusedError``; errors of the fetch itself (not found, read denied, the
        link) propagate as before.
        """
        timeout = self.config.snapshot_timeout_s if timeout is None else timeout
        start = time.perf_counter()
        deadline = start + timeout
        delay = self.config.retry_interval_s
        refused: RejectedError | None = None  # the last refusal, once one was retried

        def give_up(err: RejectedError, why: str = "") -> SnapshotRefusedError:
            return SnapshotRefusedError(
                f"model {self.model_id}: refused the snapshot from {self.address}: {err}{why}",
                reason=err.reason,
            )

        try:
            while True:
                remaining = max(deadline - time.perf_counter(), 0.001)
                try:
                    data = self._loop.run(self._fetch(), remaining)
                except TimeoutError:
                    if refused is None:
                        raise
                    # the retry after a refusal ran out of the time left: say what was refused
                    raise give_up(refused, " (the try after it ran out of time)") from refused
                try:
                    env = self._open(data, "snapshot")
                    params = decode_update(env, self._manifest)
                    break
                except RejectedError as err:
                    with self._lock:
                        self._stats.snapshots_refused += 1
                    log.error(
                        "model %s: refused the snapshot from %s: %s",
                        self.model_id, self.address, err,
                    )  # fmt: skip
                    left = deadline - time.perf_counter()
                    if not retry_refused or self._closed or left <= delay:
                        raise give_up(err) from err
                    refused = err
                    time.sleep(delay)
                    delay = min(2 * delay, self.config.max_retry_interval_s)
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
        self.address = getattr(client, "address", self.address)  # named in refusals
        try:
            return await client.fetch(self.model_id, -1)
        finally:
            with self._lock:
                self._stats.bytes_received += client.stats.bytes_received
            await client.close()
