"""Lazy asynchronous snapshots of an island's training state, and resume from the newest one.

After DataStates-LLM (Maurya et al., "DataStates-LLM: Lazy Asynchronous Checkpointing for Large
Language Models", HPDC 2024): model and optimizer tensors are immutable for long stretches of a
step (between two optimizer updates nothing writes them), so at a safe point (a round
boundary, after ``optimizer.step()``) they are copied to host memory, which is quick, and the
slow part (serialising, writing, fsync) runs in the background while training goes on.

One module per concept:

- ``state``: what a snapshot holds (:class:`SnapshotState`, the RNG states, :func:`make_meta`);
- ``flatten``: a nested state to named tensors plus a JSON tree, and back (pure);
- ``format``: the on-disk layout (``snap-<step>/`` with a tensor file and a manifest holding
  its digest), checking a snapshot, finding the newest complete one, reading it;
- ``restore``: loading a snapshot into a live model, optimizer, anchor, residuals, iterator;
- ``writer``: :class:`AsyncSnapshotter`, the copy to host memory in the training thread and
  the background writer (temporary directory, fsync, atomic rename, pruning);
- ``errors``: :class:`SnapshotError` and its kinds.
"""

from island.snapshot.errors import (
    CorruptSnapshotError,
    SnapshotError,
    SnapshotMismatchError,
    SnapshotWriteError,
)
from island.snapshot.format import (
    FORMAT,
    MANIFEST_FILE,
    SNAPSHOT_DIR,
    TENSORS_FILE,
    TMP_PREFIX,
    check_snapshot,
    latest_complete,
    read_snapshot,
    snapshot_path,
)
from island.snapshot.restore import load_snapshot
from island.snapshot.state import SnapshotState, capture_rng_state, make_meta, restore_rng_state
from island.snapshot.writer import AsyncSnapshotter, SnapshotStats

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "SNAPSHOT_DIR",
    "TENSORS_FILE",
    "TMP_PREFIX",
    "AsyncSnapshotter",
    "CorruptSnapshotError",
    "SnapshotError",
    "SnapshotMismatchError",
    "SnapshotState",
    "SnapshotStats",
    "SnapshotWriteError",
    "capture_rng_state",
    "check_snapshot",
    "latest_complete",
    "load_snapshot",
    "make_meta",
    "read_snapshot",
    "restore_rng_state",
    "snapshot_path",
]
