"""The errors of snapshots: a failed background write, a corrupt snapshot, a mismatched one."""

from __future__ import annotations

import os
from pathlib import Path


class SnapshotError(Exception):
    """Base class of snapshot errors; ``path`` is the snapshot (or directory) concerned."""

    def __init__(self, message: str, path: str | os.PathLike):
        super().__init__(message)
        self.path = Path(path)


class SnapshotWriteError(SnapshotError):
    """The background writer failed; raised from the next call on the snapshotter."""

    def __init__(self, message: str, path: str | os.PathLike, step: int):
        super().__init__(message, path)
        self.step = step


class CorruptSnapshotError(SnapshotError):
    """A snapshot directory that is incomplete or whose files do not match its manifest."""


class SnapshotMismatchError(SnapshotError):
    """A snapshot that does not fit the model, optimizer or mappings it is loaded into."""
