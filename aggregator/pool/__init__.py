"""Elastic merge workers: an event-driven pool of processes that sum updates in shared memory.

The design follows LIFL (Qi et al., "LIFL: A Lightweight, Event-driven Serverless Platform for
Federated Learning", MLSys 2024): aggregation is *event driven* (each accepted update is one
event, merged eagerly as it arrives), the *data plane is shared memory* (an update's bytes stay
in a shared segment or in the write-ahead log; only a reference travels to the worker, and each
worker's running sum lives in a shared segment the gateway reads without any copy through a
pipe), and the pool *scales with the queue and down to zero*, keeping ``warm_workers`` alive
for reuse.

- :mod:`~aggregator.pool.merge_pool`: :class:`MergePool`, what the gateway calls (submit, flush,
  close) and :class:`PoolStats`.
- :mod:`~aggregator.pool.supervisor`: the dispatcher thread: dispatch, scaling, retirement,
  crash replay.
- :mod:`~aggregator.pool.worker`: the worker process and its merge kernels; :class:`MergeEvent`.
- :mod:`~aggregator.pool.buffers`: the gateway's tally of each shared buffer, and their sum.
- :mod:`~aggregator.pool.shm`: the shared-memory segments (parameters and envelopes).
"""

from aggregator.pool.merge_pool import DEFAULT_MAX_ENVELOPE_BYTES, MergePool, PoolStats
from aggregator.pool.worker import DecodeFn, FileRef, MergeEvent, decode_with_codec

__all__ = [
    "DEFAULT_MAX_ENVELOPE_BYTES",
    "DecodeFn",
    "FileRef",
    "MergeEvent",
    "MergePool",
    "PoolStats",
    "decode_with_codec",
]
