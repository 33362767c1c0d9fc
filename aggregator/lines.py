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
from collections import OrderedDict, deque

import numpy as np

from aggregator.config import ModelConfig
from aggregator.direction import Reference
from aggregator.merge import PartialAggregate, merge_into
from aggregator.norm_bound import NormBound
from aggregator.root import RootModel
from aggregator.store import ModelStore
from aggregator.wal import WriteAheadLog
from comms.errors import NotFoundError
from comms.update import Manifest

log = logging.getLogger("aggregator.service")  # one log for all the service's parts

VERSION_CACHE = 256  # most recent u_v a leaf or mid keeps for its subscribers...
VERSION_CACHE_BYTES = 256 << 20  # ...and most bytes of them (config version_cache_mb)
ROOT_VERSION_CACHE = 8  # the root's newest u_v in memory (older ones come from its store)
FLUSH_RETRY_S = 1.0  # a flush that could not be made durable is tried again after this


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
        self.cache_limit_bytes = VERSION_CACHE_BYTES  # oldest evicted beyond (newest kept)
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
        self.reference: Reference | None = None  # merge.direction: the last u_v, decoded
        self.agreements: deque[float] = deque(maxlen=64)  # recent deltas' cosines with -u_v
        self.reference_asked = -1  # leaf/mid: the version whose u_v it last asked its parent for
        self.refused_at = (0, 0)  # (version, deltas refused for their direction in it)
        self.direction_refused = 0  # since this process started
        self.direction_over_cap = 0  # below direction_min_cos, admitted past the cap
        self.flush_retry_at: float | None = None  # a flush failed (disk): not before this
        self.dropped = 0  # acknowledged updates dropped deliberately (a non-finite merge)

    @property
    def buffered(self) -> int:
        return self.buffer.count + self.pooled

    def take_buffer(self) -> tuple[PartialAggregate, int]:
        """Empty the buffer (the caller holds the lock and, with a pool, flushed it first)."""
        partial, index = self.buffer, self.buffer_index
        self.buffer, self.oldest_at = PartialAggregate(), None
        return partial, index

    def restore_buffer(self, partial: PartialAggregate, index: int, oldest_at) -> None:
        """Put back a partial whose flush failed (the caller holds the lock; the buffer is still
        the empty one :meth:`take_buffer` left, since nothing merges while the lock is held)."""
        partial.spare = self.buffer.spare
        self.buffer, self.buffer_index, self.oldest_at = partial, index, oldest_at
        self.wakeup.set()  # the deadline loop may have gone to sleep on the empty buffer

    def storage_status(self) -> dict:
        """Whether this line's writes fail (a full disk): its WAL's and, at the root, its store's."""
        parts = {"wal": self.wal.health}
        if self.store is not None:
            parts["store"] = self.store.health
        out = {part: h.status() for part, h in parts.items()}
        out["failing"] = any(h.failing for h in parts.values())
        return out

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
        """Keep a published u_v in memory for subscribers (the same bytes object for all).

        The oldest are evicted beyond ``VERSION_CACHE`` versions (the root's
        ``ROOT_VERSION_CACHE``) or ``cache_limit_bytes`` bytes; the newest is always kept."""
        self.cache.pop(version, None)
        self.cache[version] = data
        most = ROOT_VERSION_CACHE if self.root is not None else VERSION_CACHE
        held = self.cache_bytes
        while len(self.cache) > 1 and (len(self.cache) > most or held > self.cache_limit_bytes):
            _, evicted = self.cache.popitem(last=False)
            held -= len(evicted)

    @property
    def cache_bytes(self) -> int:
        """Bytes of the u_v held in ``cache`` (recounted: at most a few hundred entries)."""
        return sum(len(data) for data in self.cache.values())

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
