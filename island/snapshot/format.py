"""The on-disk format of a snapshot: layout, manifest, digests; checking and reading one.

``<directory>/snap-<step:010d>/`` holds ``tensors.safetensors`` (every tensor and numpy array,
named as :mod:`island.snapshot.flatten` names them) and ``manifest.json`` (the format, the
step, the meta, the JSON tree of the state, and the size and blake2b digest of the tensor
file). The writer (:mod:`island.snapshot.writer`) fills a temporary directory, fsyncs it and
renames it into place, so a ``snap-*`` directory appears whole or not at all. A snapshot counts
as complete only when its manifest parses and the tensor file matches the digest in it;
:func:`latest_complete` skips anything else (a temporary directory left by ``kill -9``, a
corrupted file) and falls back to the previous one. A directory belongs to one run, whose
steps only grow: "newest" means the highest step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch

from island.snapshot.errors import CorruptSnapshotError
from island.snapshot.flatten import unflatten
from island.snapshot.state import SnapshotState

log = logging.getLogger(__name__)

FORMAT = 1
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
SNAPSHOT_DIR = re.compile(r"^snap-(\d{10,})$")
TMP_PREFIX = ".tmp-snap-"
_HASH_CHUNK = 1 << 20


def snapshot_path(directory: str | os.PathLike, step: int) -> Path:
    """Where the snapshot of ``step`` lives under ``directory``."""
    return Path(directory) / f"snap-{step:010d}"


def file_digest(path: Path) -> tuple[str, int]:
    """The hex blake2b-256 digest of a file and its size in bytes, read in 1 MiB chunks."""
    h, size = hashlib.blake2b(digest_size=32), 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except FileNotFoundError as e:
        raise CorruptSnapshotError(
            f"{path}: no {MANIFEST_FILE}; the write never finished", path
        ) from e
    except (OSError, ValueError) as e:
        raise CorruptSnapshotError(f"{path}: unreadable {MANIFEST_FILE} ({e})", path) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptSnapshotError(f"{path}: not a format-{FORMAT} snapshot manifest", path)
    return manifest


def _check_tensors(path: Path, manifest: Mapping[str, Any], digest: str, size: int) -> None:
    want = manifest.get("tensors", {})
    if want.get("bytes") != size or want.get("blake2b") != digest:
        raise CorruptSnapshotError(
            f"{path}: {TENSORS_FILE} does not match its manifest ({size} bytes, digest "
            f"{digest[:16]}..., manifest says {want.get('bytes')} bytes, "
            f"{str(want.get('blake2b'))[:16]}...); the snapshot is corrupt",
            path,
        )


def check_snapshot(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete snapshot; :class:`CorruptSnapshotError` otherwise."""
    path = Path(path)
    manifest = _read_manifest(path)
    try:
        digest, size = file_digest(path / TENSORS_FILE)
    except OSError as e:
        raise CorruptSnapshotError(f"{path}: cannot read {TENSORS_FILE} ({e})", path) from e
    _check_tensors(path, manifest, digest, size)
    return manifest


def snapshot_dirs(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``snap-*`` directory, newest step first."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = SNAPSHOT_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)


def latest_complete(directory: str | os.PathLike) -> Path | None:
    """The newest complete snapshot under ``directory`` (incomplete or corrupt ones are
    skipped with a warning), or None when there is none."""
    for _, path in snapshot_dirs(Path(directory)):
        try:
            check_snapshot(path)
        except CorruptSnapshotError as e:
            log.warning("skipping snapshot: %s", e)
            continue
        return path
    return None


def read_snapshot(path: str | os.PathLike) -> SnapshotState:
    """A complete snapshot's state, tensors on CPU and numpy arrays as saved; the meta holds
    ``step`` and ``time``. The tensor file is read once and checked against its digest."""
    path = Path(path)
    manifest = _read_manifest(path)
    try:
        blob = (path / TENSORS_FILE).read_bytes()
    except OSError as e:
        raise CorruptSnapshotError(f"{path}: cannot read {TENSORS_FILE} ({e})", path) from e
    _check_tensors(path, manifest, hashlib.blake2b(blob, digest_size=32).hexdigest(), len(blob))
    tensors = safetensors.torch.load(blob)
    tree = unflatten(manifest["state"], tensors)
    return SnapshotState(**tree, meta=manifest["meta"])
