"""The elastic merge pool's former home: its names, re-exported from :mod:`aggregator.pool`."""

from aggregator.pool import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    DecodeFn,
    FileRef,
    MergeEvent,
    MergePool,
    PoolStats,
    decode_with_codec,
)

__all__ = [
    "DEFAULT_MAX_ENVELOPE_BYTES",
    "DecodeFn",
    "FileRef",
    "MergeEvent",
    "MergePool",
    "PoolStats",
    "decode_with_codec",
]
