"""The merge pool's shared-memory segments, re-exported from :mod:`aggregator.pool.shm`."""

from aggregator.pool.shm import (
    ALIGN_ELEMENTS,
    DEFAULT_PREFIX,
    SHM_DIR,
    BlobRef,
    ParamLayout,
    SharedBlob,
    SharedParams,
    TensorSlot,
    list_segments,
    segment_name,
)

__all__ = [
    "ALIGN_ELEMENTS",
    "DEFAULT_PREFIX",
    "SHM_DIR",
    "BlobRef",
    "ParamLayout",
    "SharedBlob",
    "SharedParams",
    "TensorSlot",
    "list_segments",
    "segment_name",
]
