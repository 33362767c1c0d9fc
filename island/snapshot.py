"""Lazy asynchronous snapshots of an island's training state, and resume from the newest one.

After DataStates-LLM (Maurya et al., "DataStates-LLM: Lazy Asynchronous Checkpointing for Large
Language Models", HPDC 2024): model and optimizer tensors are immutable for long stretches of a
step (between two optimizer updates nothing writes them), so at a safe point (a round
boundary, after ``optimizer.step()``) they are copied to host memory, which is quick, and the
slow part (serialising, writing, fsync) runs in the background while training goes on.

What a snapshot holds (:class:`SnapshotState`): the model's ``state_dict``, the inner
optimizer's ``state_dict`` (AdamW step counts, ``exp_avg``, ``exp_avg_sq``, param groups), the
anchor (the parameters of the global version the round started from), the error-feedback
residuals, the RNG states (python ``random``, numpy's global generator, torch CPU and every CUDA
device), the batch iterator's ``state_dict`` and a small JSON ``meta`` dict (see
:func:`make_meta`).

On disk, ``<directory>/snap-<step:010d>/`` holds ``tensors.safetensors`` (every tensor and numpy
array, under a path-like name such as ``optimizer/state/3/exp_avg``) and ``manifest.json`` (the
nested structure with each tensor replaced by a ``{"$tensor": name}`` reference, so tuples,
integer keys and python scalars rebuild exactly; the meta; the size and blake2b digest of the
tensor file). Both are written into a temporary directory, fsynced, and the directory is
renamed into place, so a ``snap-*`` directory appears whole or not at all. A snapshot counts as
complete only when its manifest parses and the tensor file matches the digest in it;
:func:`latest_complete` skips anything else (a temporary directory left by ``kill -9``, a
corrupted file) and falls back to the previous one.

Concurrency: :meth:`AsyncSnapshotter.snapshot` runs in the training thread; it copies every
tensor into reusable host buffers (pinned memory and ``non_blocking`` copies on CUDA, followed
by an event the writer waits on; on CPU a plain copy) and returns. One background writer thread
writes one snapshot at a time. If a write is still in flight when the next snapshot is asked
for, the new one is skipped (``when_busy="skip"``, the default: never stall the loop) or the
call waits for it (``"wait"``). A failed write is recorded and raised, as
:class:`SnapshotWriteError`, from the next call of ``snapshot``, ``wait`` or ``close``. A
directory belongs to one run, whose steps only grow (a resumed run continues from its snapshot's
step): "newest" means the highest step. One snapshotter per directory; several processes must
not share one.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import safetensors.torch
import torch

from comms.errors import ConfigError

__all__ = [
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

log = logging.getLogger(__name__)

FORMAT = 1
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
SNAPSHOT_DIR = re.compile(r"^snap-(\d{10,})$")
TMP_PREFIX = ".tmp-snap-"
_HASH_CHUNK = 1 << 20
# numpy dtypes stored as themselves (others as raw bytes); also the torch dtypes copied by numpy.
_NATIVE_NUMPY = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"}
)


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


# --- state ---------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Copies of every global RNG state: python, numpy, torch CPU and each CUDA device."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the global RNGs from :func:`capture_rng_state`'s output. CUDA states are restored for
    the devices present on both sides (a warning names any difference in count)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda") or []
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) != have:
        log.warning(
            "snapshot holds %d CUDA RNG states, this host has %d GPUs; restoring the common ones",
            len(cuda_states),
            have,
        )
    for device, cuda_state in enumerate(cuda_states[:have]):
        torch.cuda.set_rng_state(cuda_state, device)


def make_meta(
    *,
    island_id: str,
    round: int,
    base_version: int,
    last_pushed_seq: int,
    workload: str,
    workload_config: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """The meta dict an island stores with each snapshot; ``workload_config`` may be a
    dataclass. ``step`` and ``time`` are added by :meth:`AsyncSnapshotter.snapshot`."""
    if dataclasses.is_dataclass(workload_config) and not isinstance(workload_config, type):
        workload_config = dataclasses.asdict(workload_config)
    meta = {
        "island_id": island_id,
        "round": int(round),
        "base_version": int(base_version),
        "last_pushed_seq": int(last_pushed_seq),
        "workload": workload,
        "workload_config": workload_config,
        **extra,
    }
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"snapshot meta must be JSON-serialisable: {e}") from e
    return meta


@dataclasses.dataclass
class SnapshotState:
    """Everything an island needs to resume. Tensors may live on any device; anchor values
    are tensors or numpy arrays, residuals numpy arrays (as ``ErrorFeedback.residuals()``)."""

    model: Mapping[str, torch.Tensor]
    optimizer: Mapping[str, Any] | None = None
    anchor: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    residuals: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    rng: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data: Mapping[str, Any] | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def capture(
        cls,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        anchor: Mapping[str, Any] | None = None,
        residuals: Mapping[str, np.ndarray] | None = None,
        batches: Any = None,
        meta: Mapping[str, Any] | None = None,
    ) -> SnapshotState:
        """The live state, by reference (no copies but the RNG states): pass it to
        :meth:`AsyncSnapshotter.snapshot` before anything trains again."""
        return cls(
            model=model.state_dict(),
            optimizer=optimizer.state_dict() if optimizer is not None else None,
            anchor=dict(anchor or {}),
            residuals=dict(residuals or {}),
            rng=capture_rng_state(),
            data=batches.state_dict() if batches is not None else None,
            meta=dict(meta or {}),
        )

    def tree(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "anchor": self.anchor,
            "residuals": self.residuals,
            "rng": self.rng,
            "data": self.data,
        }


# --- flattening a nested state into tensors + a JSON tree (pure) ---------------------------


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


class _Flattener:
    """Walks a nested state: tensors go to ``tensors`` (through ``store``), the rest to a JSON
    tree where tuples, non-string keys, bytes and numpy values are tagged with ``$`` keys."""

    def __init__(self, store):
        self.store = store  # (name, tensor) -> tensor kept for writing
        self.tensors: dict[str, torch.Tensor] = {}
        self._aliases: dict[tuple, str] = {}

    def _name(self, path: str) -> str:
        name, n = path, 1
        while name in self.tensors:
            name, n = f"{path}#{n}", n + 1
        return name

    def _tensor(self, t: torch.Tensor, path: str) -> dict[str, Any]:
        if t.layout != torch.strided:
            raise TypeError(f"snapshot: {path!r} is a {t.layout} tensor; only dense ones are kept")
        t = t.detach()
        storage = t.untyped_storage().data_ptr()
        key = (t.device, storage, t.storage_offset(), t.shape, t.stride(), t.dtype)
        if key in self._aliases:  # a tied weight: one copy, two references
            return {"$tensor": self._aliases[key]}
        name = self._name(path)
        self.tensors[name] = self.store(name, t)
        self._aliases[key] = name
        return {"$tensor": name}

    def _array(self, a: np.ndarray, path: str) -> dict[str, Any]:
        if a.dtype.hasobject:
            raise TypeError(f"snapshot: {path!r} is a numpy array of objects; cannot store it")
        a = np.ascontiguousarray(a)
        native = a.dtype.isnative and a.dtype.name in _NATIVE_NUMPY
        t = torch.from_numpy(a if native else a.reshape(-1).view(np.uint8))
        name = self._name(path)
        self.tensors[name] = self.store(name, t)
        return {"$ndarray": name, "dtype": a.dtype.str, "shape": list(a.shape), "raw": not native}

    def encode(self, value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path)
        if isinstance(value, np.ndarray):
            return self._array(value, path)
        if isinstance(value, np.generic):
            return {**self._array(np.asarray(value), path), "scalar": True}
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, bytes):
            return {"$bytes": base64.b64encode(value).decode("ascii")}
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(v, _join(path, i)) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, _join(path, i)) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            if all(isinstance(k, str) and not k.startswith("$") for k in value):
                return {k: self.encode(v, _join(path, k)) for k, v in value.items()}
            pairs = [
                [self.encode(k, _join(path, "key")), self.encode(v, _join(path, k))]
                for k, v in value.items()
            ]
            return {"$dict": pairs}
        raise TypeError(
            f"snapshot: cannot store {type(value).__name__} at {path!r}; use tensors, numpy "
            "arrays, JSON scalars, lists, tuples and dicts"
        )


def _decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild the structure :class:`_Flattener` encoded, from the loaded tensors."""
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "$tensor" in node:
        return tensors[node["$tensor"]]
    if "$ndarray" in node:
        arr = tensors[node["$ndarray"]].numpy()
        if node["raw"]:
            arr = arr.view(np.dtype(node["dtype"]))
        arr = arr.reshape(node["shape"])
        return arr[()] if node.get("scalar") else arr
    if "$bytes" in node:
        return base64.b64decode(node["$bytes"])
    if "$tuple" in node:
        return tuple(_decode(v, tensors) for v in node["$tuple"])
    if "$dict" in node:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["$dict"]}
    return {k: _decode(v, tensors) for k, v in node.items()}


# --- on-disk layout --------------------------------------------------------------------------


def snapshot_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"snap-{step:010d}"


def _file_digest(path: Path) -> tuple[str, int]:
    h, size = hashlib.blake2b(digest_size=32), 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _fsync_path(path: Path) -> None:
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
        digest, size = _file_digest(path / TENSORS_FILE)
    except OSError as e:
        raise CorruptSnapshotError(f"{path}: cannot read {TENSORS_FILE} ({e})", path) from e
    _check_tensors(path, manifest, digest, size)
    return manifest


def _snapshot_dirs(directory: Path) -> list[tuple[int, Path]]:
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
    for _, path in _snapshot_dirs(Path(directory)):
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
    tree = _decode(manifest["state"], tensors)
    return SnapshotState(**tree, meta=manifest["meta"])


def _shorten(error: Exception, limit: int = 600) -> str:
    text = str(error)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more chars)"


def _restore_mapping(target: Any, saved: Mapping[str, Any], what: str, path: Path) -> None:
    """Copy ``saved`` into ``target``: an object with ``load_residuals``; an empty mapping
    (filled); or a mapping with the same names (tensors and arrays copied in place)."""
    if hasattr(target, "load_residuals"):
        target.load_residuals(dict(saved))
        return
    if target and target.keys() != saved.keys():
        raise SnapshotMismatchError(
            f"{path}: {what} names differ from the snapshot's: missing "
            f"{sorted(saved.keys() - target.keys())}, extra {sorted(target.keys() - saved.keys())}",
            path,
        )
    for name, value in saved.items():
        current = target.get(name)
        if isinstance(current, torch.Tensor | np.ndarray) and current.shape != value.shape:
            raise SnapshotMismatchError(
                f"{path}: {what} {name!r} has shape {tuple(current.shape)}, the snapshot "
                f"{tuple(value.shape)}",
                path,
            )
        if isinstance(current, torch.Tensor):
            with torch.no_grad():
                current.copy_(torch.as_tensor(value))
        elif isinstance(current, np.ndarray):
            np.copyto(current, np.asarray(value))
        else:
            target[name] = value


def load_snapshot(
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    anchor: MutableMapping[str, Any] | None = None,
    residuals: Any = None,
    batches: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a snapshot in place and return its meta (with ``step``).

    ``model`` and ``optimizer`` get ``load_state_dict`` (strict; optimizer state follows the
    parameters' devices); ``anchor`` (a mapping) and ``residuals`` (a mapping, or an object
    with ``load_residuals`` such as ``ErrorFeedback``) are filled or copied into; ``batches``
    gets its ``load_state_dict``; the global RNGs are set unless ``restore_rng`` is False.
    Anything not passed is left alone (:func:`read_snapshot` returns every part).
    """
    path = Path(path)
    state = read_snapshot(path)
    if model is not None:
        try:
            model.load_state_dict(state.model)
        except RuntimeError as e:
            raise SnapshotMismatchError(
                f"{path}: the model does not fit: {_shorten(e)}", path
            ) from e
    if optimizer is not None:
        if state.optimizer is None:
            raise SnapshotMismatchError(f"{path}: the snapshot holds no optimizer state", path)
        try:
            optimizer.load_state_dict(state.optimizer)
        except (ValueError, KeyError, RuntimeError) as e:
            raise SnapshotMismatchError(
                f"{path}: the optimizer does not fit: {_shorten(e)}", path
            ) from e
    if anchor is not None:
        _restore_mapping(anchor, state.anchor, "anchor", path)
    if residuals is not None:
        _restore_mapping(residuals, state.residuals, "residual", path)
    if batches is not None:
        if state.data is None:
            raise SnapshotMismatchError(f"{path}: the snapshot holds no iterator state", path)
        batches.load_state_dict(dict(state.data))
    if restore_rng and state.rng:
        restore_rng_state(state.rng)
    return dict(state.meta)


# --- the snapshotter -----------------------------------------------------------------------


@dataclasses.dataclass
class SnapshotStats:
    """Counters and timings. ``stall`` is time the training loop spent inside ``snapshot()``;
    ``write`` is background time from the start of a write to its rename."""

    requested: int = 0
    taken: int = 0
    skipped: int = 0
    written: int = 0
    failed: int = 0
    last_stall_s: float = 0.0
    max_stall_s: float = 0.0
    total_stall_s: float = 0.0
    last_write_s: float = 0.0
    total_write_s: float = 0.0
    last_bytes: int = 0
    last_step: int | None = None
    last_path: str | None = None


@dataclasses.dataclass
class _WriteJob:
    step: int
    tree: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    events: list[Any]


class AsyncSnapshotter:
    """Takes snapshots from the training loop and writes them in one background thread.

    Call :meth:`snapshot` at a safe point (after ``optimizer.step()``, before the next step
    changes anything); call :meth:`close` (or use ``with``) at shutdown so the last write
    finishes. Not thread-safe: one training thread calls it. ``keep`` snapshots stay on disk;
    ``when_busy`` is ``"skip"`` or ``"wait"``; ``fsync=False`` saves the fsyncs (a power loss
    may then lose recent snapshots, which fail their digest check and are skipped).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int = 3,
        when_busy: Literal["skip", "wait"] = "skip",
        fsync: bool = True,
    ):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"snapshot keep: must be an integer >= 1, got {keep!r}")
        if when_busy not in ("skip", "wait"):
            raise ConfigError(f"snapshot when_busy: must be 'skip' or 'wait', got {when_busy!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.when_busy = when_busy
        self.fsync = fsync
        for stale in self.directory.glob(TMP_PREFIX + "*"):  # left by a killed writer
            shutil.rmtree(stale, ignore_errors=True)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "snapshot-writer")
        self._future: concurrent.futures.Future | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._stats = SnapshotStats()
        self._lock = threading.Lock()  # guards _stats (the writer updates write figures)
        self._closed = False

    # -- training-thread side --

    def snapshot(self, state: SnapshotState, step: int) -> bool:
        """Copy ``state`` to host memory and queue it for writing as ``snap-<step>``.

        Returns False when skipped because the previous write is still in flight. Raises
        :class:`SnapshotWriteError` if the previous write failed, ``TypeError`` for a value
        that cannot be stored.
        """
        if self._closed:
            raise RuntimeError("snapshot() called after close()")
        started = time.perf_counter()
        with self._lock:
            self._stats.requested += 1
        if self._future is not None and not self._future.done():
            if self.when_busy == "skip":
                with self._lock:
                    self._stats.skipped += 1
                log.debug("snapshot at step %d skipped: the previous write is in flight", step)
                return False
            concurrent.futures.wait([self._future])
        self._collect()
        meta = {**state.meta, "step": int(step), "time": time.time()}
        json.dumps(meta)  # a meta that cannot be written fails here, in the caller
        job = self._copy_to_host(state, int(step), meta)
        self._future = self._executor.submit(self._write_and_record, job)
        stall = time.perf_counter() - started
        with self._lock:
            s = self._stats
            s.taken += 1
            s.last_stall_s, s.total_stall_s = stall, s.total_stall_s + stall
            s.max_stall_s = max(s.max_stall_s, stall)
        return True

    def _copy_to_host(self, state: SnapshotState, step: int, meta: dict[str, Any]) -> _WriteJob:
        buffers: dict[str, torch.Tensor] = {}
        devices: set[torch.device] = set()

        def store(name: str, t: torch.Tensor) -> torch.Tensor:
            buf = self._buffers.get(name)
            fits = buf is not None and buf.shape == t.shape and buf.dtype == t.dtype
            if not fits or (t.is_cuda and not buf.is_pinned()):
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            if t.is_cuda:
                devices.add(t.device)
                buf.copy_(t, non_blocking=True)
            elif str(t.dtype)[6:] in _NATIVE_NUMPY and not (t.is_conj() or t.is_neg()):
                # One plain memcpy: torch's copy_ fans out to intra-op threads, which stall
                # for tens of milliseconds when the CPU cores are oversubscribed.
                np.copyto(buf.numpy(), t.numpy())
            else:
                buf.copy_(t)
            buffers[name] = buf
            return buf

        flattener = _Flattener(store)
        tree = flattener.encode(state.tree(), "")
        # The buffers are reused next time; the writer is idle by then (skip or wait above).
        self._buffers = buffers
        events = []
        for device in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return _WriteJob(step, tree, flattener.tensors, meta, events)

    def _collect(self) -> None:
        """Raise the finished previous write's error, once."""
        future, self._future = self._future, None
        if future is not None and future.done():
            future.result()  # raises SnapshotWriteError
        elif future is not None:
            self._future = future

    def wait(self, timeout: float | None = None) -> Path | None:
        """Block until the in-flight write finishes (``TimeoutError`` after ``timeout``);
        raise its error if it failed; return the newest written snapshot's path."""
        if self._future is not None:
            done, _ = concurrent.futures.wait([self._future], timeout=timeout)
            if not done:
                raise TimeoutError(f"snapshot write still in flight after {timeout} s")
            self._collect()
        with self._lock:
            return Path(self._stats.last_path) if self._stats.last_path else None

    def close(self) -> None:
        """Finish the in-flight write (raising its error, if any) and stop the writer."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> AsyncSnapshotter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stats(self) -> SnapshotStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    @property
    def busy(self) -> bool:
        return self._future is not None and not self._future.done()

    # -- writer-thread side --

    def _write_and_record(self, job: _WriteJob) -> Path:
        started = time.perf_counter()
        final = snapshot_path(self.directory, job.step)
        try:
            size = self._write(job, final)
        except Exception as e:
            with self._lock:
                self._stats.failed += 1
            log.error("snapshot write for step %d failed: %s", job.step, e)
            raise SnapshotWriteError(
                f"writing snapshot {final} failed: {type(e).__name__}: {e}", final, job.step
            ) from e
        elapsed = time.perf_counter() - started
        with self._lock:
            s = self._stats
            s.written += 1
            s.last_write_s, s.total_write_s = elapsed, s.total_write_s + elapsed
            s.last_bytes, s.last_step, s.last_path = size, job.step, str(final)
        try:
            self._prune(keep_path=final)
        except OSError as e:  # the new snapshot is safe; old ones linger until next time
            log.warning("could not delete old snapshots in %s: %s", self.directory, e)
        return final

    def _write(self, job: _WriteJob, final: Path) -> int:
        for event in job.events:
            event.synchronize()  # the non-blocking device-to-host copies have landed
        tmp = self.directory / f"{TMP_PREFIX}{job.step:010d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()  # not parents: a vanished snapshot directory is an error, not recreated
        try:
            tensors_file = tmp / TENSORS_FILE
            safetensors.torch.save_file(job.tensors, tensors_file)
            if self.fsync:
                _fsync_path(tensors_file)
            digest, size = _file_digest(tensors_file)
            manifest = {
                "format": FORMAT,
                "step": job.step,
                "meta": job.meta,
                "tensors": {"file": TENSORS_FILE, "bytes": size, "blake2b": digest},
                "state": job.tree,
            }
            with open(tmp / MANIFEST_FILE, "w") as f:
                json.dump(manifest, f)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            if self.fsync:
                _fsync_path(tmp)
            self._move_into_place(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return size

    def _move_into_place(self, tmp: Path, final: Path) -> None:
        """Atomic rename; a snapshot already at this step (a resumed run) is replaced."""
        old = None
        if final.exists():
            old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
        os.rename(tmp, final)
        if self.fsync:
            _fsync_path(self.directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _prune(self, keep_path: Path) -> None:
        """Delete all but the newest ``keep`` snapshots; the one just written always stays."""
        others = [p for _, p in _snapshot_dirs(self.directory) if p != keep_path]
        for path in others[self.keep - 1 :]:
            shutil.rmtree(path)
            log.debug("deleted old snapshot %s", path)
