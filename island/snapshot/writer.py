"""The asynchronous snapshotter: a quick copy to host memory, then a background write.

Concurrency: :meth:`AsyncSnapshotter.snapshot` runs in the training thread; it copies every
tensor into reusable host buffers (pinned memory and ``non_blocking`` copies on CUDA, followed
by an event the writer waits on; on CPU a plain copy) and returns. One background writer thread
writes one snapshot at a time: into a temporary directory, fsynced, then renamed into place
(:mod:`island.snapshot.format`), and old snapshots beyond ``keep`` are deleted. If a write is
still in flight when the next snapshot is asked for, the new one is skipped
(``when_busy="skip"``, the default: never stall the loop) or the call waits for it
(``"wait"``). A failed write is recorded and raised, as :class:`SnapshotWriteError`, from the
next call of ``snapshot``, ``wait`` or ``close``. One snapshotter per directory; several
processes must not share one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
import safetensors.torch
import torch

from comms.errors import ConfigError
from comms.faults import fault_point
from island.snapshot.errors import SnapshotWriteError
from island.snapshot.flatten import NATIVE_NUMPY, Flattener
from island.snapshot.format import (
    FORMAT,
    MANIFEST_FILE,
    TENSORS_FILE,
    TMP_PREFIX,
    file_digest,
    fsync_path,
    snapshot_dirs,
    snapshot_path,
)
from island.snapshot.state import SnapshotState

log = logging.getLogger(__name__)


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
            elif str(t.dtype)[6:] in NATIVE_NUMPY and not (t.is_conj() or t.is_neg()):
                # One plain memcpy: torch's copy_ fans out to intra-op threads, which stall
                # for tens of milliseconds when the CPU cores are oversubscribed.
                np.copyto(buf.numpy(), t.numpy())
            else:
                buf.copy_(t)
            buffers[name] = buf
            return buf

        flattener = Flattener(store)
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
                fsync_path(tensors_file)
            fault_point("island.mid_snapshot")
            digest, size = file_digest(tensors_file)
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
                fsync_path(tmp)
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
            fsync_path(self.directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _prune(self, keep_path: Path) -> None:
        """Delete all but the newest ``keep`` snapshots; the one just written always stays."""
        others = [p for _, p in snapshot_dirs(self.directory) if p != keep_path]
        for path in others[self.keep - 1 :]:
            shutil.rmtree(path)
            log.debug("deleted old snapshot %s", path)
