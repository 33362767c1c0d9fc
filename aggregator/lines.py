"""A model line: everything one aggregator holds for one ``model_id``.

The replica of ``theta_v`` (the root's own model at the root), the version, the cache of recent
``u_v`` for subscribers, the merge buffer (in process, or in the merge pool's workers), the
write-ahead log, the norm bound of island updates, and the lock and conditions the service's
tasks share. The service changes a
line's state under ``line.lock``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

import numpy as np

from aggregator.config import ModelConfig
from aggregator.merge import PartialAggregate, merge_into
from aggregator.norm_bound import NormBound
from aggregator.root import RootModel
from aggregator.store import ModelStore
from aggregator.wal import WriteAheadLog
from comms.errors import NotFoundError
from comms.update import Manifest

log = logging.getLogger("aggregator.service")  # one log for all the service's parts

VERSION_CACHE = 256  # recent u_v a leaf or mid keeps for its subscribers
ROOT_VERSION_CACHE = 8  # the root's newest u_v in memory (older ones come from its store)


class ModelLine:
    """Everything one aggregator holds for one ``model_id``."""

    def __init__(self, model_id: str, wal: WriteAheadLog):
        self.model_id = model_id
        self.wal = wal
        self.manifest: Manifest | None = None
        self.theta: dict[str, np.ndarray] = {}  # replica of theta_v (the root's own at the root)
        self.version = 0
        self.root: RootModel | None = None
        self.config: ModelConfig | None = None  # the root's [[models]] entry
        self.store: ModelStore | None = None  # root: versions and snapshots on disk
        self.cache: OrderedDict[int, bytes] = OrderedDict()  # recent u_v (the root's too)
        self.buffer = PartialAggregate()
        self.buffer_index = 0  # WAL index of the newest update in the buffer
        self.oldest_at: float | None = None
        self.partial_seq = 0  # leaf/mid: sequence of the last partial sent up
        self.lock = asyncio.Lock()
        self.changed = asyncio.Condition()
        self.wakeup = asyncio.Event()
        self.snapshot: tuple[int, bytes] | None = None
        self.pool = None  # MergePool when merge.engine == "pool"
        self.pooled = 0  # updates submitted to the pool since the last flush
        self.norm_bound: NormBound | None = None  # merge.clip = "adaptive": island updates' bound
        self.theta_norm: tuple[int, float] | None = None  # (version, ||theta||), computed lazily
        self.clipped = 0  # island updates clipped since this process started
        self.norm_rejected = 0  # island updates refused for their norm (clip_action "reject")

    @property
    def buffered(self) -> int:
        return self.buffer.count + self.pooled

    def take_buffer(self) -> tuple[PartialAggregate, int]:
        """Empty the buffer (the caller holds the lock and, with a pool, flushed it first)."""
        partial, index = self.buffer, self.buffer_index
        self.buffer, self.oldest_at = PartialAggregate(), None
        return partial, index

    def recycle(self, partial: PartialAggregate) -> None:
        """Hand a finished partial's buffers (nothing refers to them any more) to the next."""
        if self.buffer.empty:
            self.buffer.spare = partial.weighted_sum
        partial.weighted_sum = {}

    async def collect_pool(self) -> None:
        """Move what the merge workers summed into the in-process buffer."""
        if self.pool is None or self.pooled == 0:
            return
        pooled = await asyncio.to_thread(self.pool.flush)
        for update_id, reason in self.pool.drain_rejected():
            log.error("merge worker refused an admitted update %s: %s", update_id, reason)
        merge_into(self.buffer, pooled)
        self.pooled = 0

    def remember(self, version: int, data: bytes) -> None:
        """Keep a published u_v in memory for subscribers (the same bytes object for all)."""
        self.cache[version] = data
        while len(self.cache) > (ROOT_VERSION_CACHE if self.root is not None else VERSION_CACHE):
            self.cache.popitem(last=False)

    def version_bytes(self, version: int) -> bytes:
        if self.root is not None and version not in self.cache:
            return self.store.get_version(version)
        try:
            return self.cache[version]
        except KeyError:
            raise NotFoundError(
                f"model {self.model_id!r}: version {version} is no longer cached here "
                f"(oldest {next(iter(self.cache), None)}); fetch a snapshot and resubscribe"
            ) from None
