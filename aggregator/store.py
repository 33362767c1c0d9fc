"""The model store: published versions, periodic snapshots and the root's durable state.

For each ``model_id`` the root keeps, under ``DIR/<model_id>/``:

- ``manifest.json``: parameter names, shapes and dtypes;
- ``versions/<v>.env``: the exact signed envelope of every recent ``u_v`` (the update that
  takes ``theta_{v-1}`` to ``theta_v``), as published, so a subscriber catching up receives
  the same bytes as everyone else and lands on the same bits;
- ``snapshots/<v>.safetensors``: ``theta_v`` every ``snapshot_every`` versions, so a late
  joiner starts from the newest snapshot and replays the few ``u`` after it;
- ``state.safetensors`` + ``state.json``: the root's ``theta``, outer-optimizer state, version
  and bookkeeping, written atomically after each version, so a restarted root resumes exactly.

Every write goes to a temporary file, is fsynced and renamed into place: a crash leaves
either the old or the new file, never a torn one. ``save_version_and_state`` writes a new
version's files concurrently (worker threads: the writes and fsyncs overlap) and renames the
state into place last, so a state at version ``v`` always has ``u_v`` on disk beside it.
A write that fails (a full disk, an I/O error) removes its temporary files and raises
:class:`~comms.errors.StorageError`; ``save_version_and_state`` then also removes the new
version's files, so the store is as it was and the root does not publish that version.
numpy and safetensors only (no torch).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from aggregator.wal import StorageHealth, fsync_dir
from comms.errors import NotFoundError
from comms.update import Manifest

_VERSION_FILE = re.compile(r"^(\d{10})\.(env|safetensors)$")


def _tmp_of(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    tmp = _tmp_of(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # free what it took (a full disk)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def stage_arrays(path: Path, arrays: Mapping[str, np.ndarray], meta: dict | None = None) -> Path:
    """Write ``arrays`` to ``path``'s temporary file and fsync it; returns the temporary path
    (:func:`commit` renames it into place)."""
    tmp = _tmp_of(path)
    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    try:
        save_file(contiguous, str(tmp), metadata={"meta": json.dumps(meta or {})})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except Exception as err:  # safetensors reports a failed write as its own error type
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise
        raise _as_os_error(err) from err
    return tmp


def _as_os_error(err: Exception) -> OSError:
    """safetensors' write errors carry the OS error only in their text."""
    text = str(err)
    for code, name in ((28, "No space left on device"), (122, "Disk quota exceeded"),
                       (27, "File too large"), (30, "Read-only file system")):  # fmt: skip
        if name.lower() in text.lower():
            return OSError(code, f"{name} ({text})")
    return OSError(5, f"write failed: {text}")


def commit(tmp: Path, path: Path) -> None:
    """Rename a staged (fsynced) temporary file into place, durably."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_save_arrays(
    path: Path, arrays: Mapping[str, np.ndarray], meta: dict | None = None
) -> None:
    commit(stage_arrays(path, arrays, meta), path)


class ModelStore:
    """Versions and snapshots of one model on local disk."""

    def __init__(
        self,
        directory: str | os.PathLike,
        model_id: str,
        *,
        keep_versions: int = 1000,
        keep_snapshots: int = 3,
    ):
        self.model_id = model_id
        self.dir = Path(directory) / model_id
        self.versions_dir = self.dir / "versions"
        self.snapshots_dir = self.dir / "snapshots"
        for d in (self.dir, self.versions_dir, self.snapshots_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.keep_versions = keep_versions
        self.keep_snapshots = keep_snapshots
        self.health = StorageHealth(f"model store {self.dir}")

    # ------------------------------------------------------------------ manifest

    def save_manifest(self, manifest: Manifest) -> None:
        atomic_write_bytes(self.dir / "manifest.json", json.dumps(manifest.to_dict()).encode())

    def load_manifest(self) -> Manifest | None:
        path = self.dir / "manifest.json"
        if not path.exists():
            return None
        return Manifest.from_dict(json.loads(path.read_text()))

    # ------------------------------------------------------------------ versions

    def _list(self, directory: Path, ext: str) -> list[int]:
        out = []
        for p in directory.iterdir():
            m = _VERSION_FILE.match(p.name)
            if m and m.group(2) == ext:
                out.append(int(m.group(1)))
        return sorted(out)

    def put_version(self, version: int, envelope_bytes: bytes | memoryview) -> None:
        atomic_write_bytes(self.versions_dir / f"{version:010d}.env", envelope_bytes)

    def get_version(self, version: int) -> bytes:
        path = self.versions_dir / f"{version:010d}.env"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(
                f"model {self.model_id!r}: version {version} is not in the store "
                f"(held: {self.version_range()})"
            ) from None

    def stored_versions(self) -> list[int]:
        return self._list(self.versions_dir, "env")

    def version_range(self) -> tuple[int, int] | None:
        vs = self.stored_versions()
        return (vs[0], vs[-1]) if vs else None

    # ------------------------------------------------------------------ snapshots

    def put_snapshot(self, version: int, params: Mapping[str, np.ndarray]) -> None:
        atomic_save_arrays(
            self.snapshots_dir / f"{version:010d}.safetensors", params, {"version": version}
        )

    def snapshot_versions(self) -> list[int]:
        return self._list(self.snapshots_dir, "safetensors")

    def load_snapshot(self, version: int) -> dict[str, np.ndarray]:
        path = self.snapshots_dir / f"{version:010d}.safetensors"
        if not path.exists():
            raise NotFoundError(f"model {self.model_id!r}: no snapshot at version {version}")
        return load_file(str(path))

    def newest_snapshot_at_or_below(self, version: int) -> int | None:
        vs = [v for v in self.snapshot_versions() if v <= version]
        return vs[-1] if vs else None

    # ------------------------------------------------------------------ root state

    def save_state(self, arrays: Mapping[str, np.ndarray], meta: dict[str, Any]) -> None:
        """The root's full state (theta, optimizer state) and its bookkeeping, atomically."""
        atomic_save_arrays(self.dir / "state.safetensors", arrays, meta)

    def save_version_and_state(
        self,
        version: int,
        envelope_bytes: bytes | memoryview,
        arrays: Mapping[str, np.ndarray],
        meta: dict[str, Any],
        snapshot: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """A new version's files: ``u_v``, the root state at ``v`` and, if given, the
        snapshot of ``theta_v``; returns once all are durable (publish only then).

        The three are written and fsynced concurrently; the state is renamed into place only
        after ``u_v`` (and the snapshot) are durable, so a crash never leaves a state at ``v``
        without ``u_v`` beside it (a subscriber catching up to ``v`` needs it). A crash
        before the rename leaves the state at ``v - 1``, which replays to ``v`` again.
        """
        state_path = self.dir / "state.safetensors"
        written = [self.versions_dir / f"{version:010d}.env"]
        if snapshot is not None:
            written.append(self.snapshots_dir / f"{version:010d}.safetensors")
        try:
            with ThreadPoolExecutor(max_workers=3, thread_name_prefix="store") as pool:
                staged = pool.submit(stage_arrays, state_path, arrays, meta)
                others = [pool.submit(self.put_version, version, envelope_bytes)]
                if snapshot is not None:
                    others.append(pool.submit(self.put_snapshot, version, snapshot))
                failure = None
                for done in [*others, staged]:  # wait for all, then clean up after any
                    try:
                        done.result()
                    except OSError as err:
                        failure = failure or err
                if failure is not None:
                    for path in [state_path, *written]:
                        _tmp_of(path).unlink(missing_ok=True)
                    for path in written:  # the state stays at v - 1: no u_v beyond it
                        path.unlink(missing_ok=True)
                    raise failure
                tmp = staged.result()
            commit(tmp, state_path)
        except OSError as err:
            _tmp_of(state_path).unlink(missing_ok=True)  # if the rename itself failed
            raise self.health.failed(
                err,
                f"writing version {version} of {self.model_id!r}",
                then="the version is not published; it is tried again while writes fail",
            ) from err
        self.health.succeeded()

    def load_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        path = self.dir / "state.safetensors"
        if not path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        return arrays, meta

    # ------------------------------------------------------------------ retention

    def prune(self) -> None:
        """Drop versions and snapshots beyond the retention limits.

        A version is kept while it is needed to roll forward from the oldest kept snapshot.
        """
        snaps = self.snapshot_versions()
        for v in snaps[: -self.keep_snapshots] if self.keep_snapshots else []:
            (self.snapshots_dir / f"{v:010d}.safetensors").unlink(missing_ok=True)
        snaps = self.snapshot_versions()
        versions = self.stored_versions()
        floor = versions[-self.keep_versions] if len(versions) > self.keep_versions else 0
        if snaps:
            floor = min(floor, snaps[0] + 1)
        for v in versions:
            if v < floor:
                (self.versions_dir / f"{v:010d}.env").unlink(missing_ok=True)
