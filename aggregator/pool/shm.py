"""Shared-memory buffers for the merge workers: a model's float32 parameters and raw envelopes.

Two kinds of POSIX shared-memory segment (``/dev/shm/<name>``), both created and unlinked by
one owner process (the aggregator's gateway) and attached by its merge workers:

- :class:`SharedParams`: one segment holding every tensor of a model as float32, laid out by a
  :class:`ParamLayout` (name -> shape and element offset, each tensor aligned to 64 bytes);
  :attr:`SharedParams.arrays` gives numpy views, no copy. A worker accumulates into one.
- :class:`SharedBlob`: one segment holding an envelope's bytes as received. Only its reference
  (:class:`BlobRef`: name and size) travels to a worker (LIFL, Qi et al., MLSys 2024: the
  payload stays in shared memory and only references move between functions).

Lifetime. ``create`` registers the segment with :mod:`multiprocessing`'s resource tracker,
which unlinks it if the owner dies without doing so. Children started by ``multiprocessing``
(spawn or forkserver) share their parent's tracker, so an attach in a child registers the name
again in the same set (a no-op) and the owner's single ``unlink`` unregisters it: no tracker
warnings, no leaks. Only the owner unlinks; attachers only ``close``. A process that is not a
child of the owner must not attach (its own tracker would unlink the segment at its exit).

``close`` releases the mapping and fails with :class:`BufferError` while numpy views of it are
still alive: drop them first. No locking here: concurrent writers coordinate elsewhere.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

ALIGN_ELEMENTS = 16  # 64 bytes of float32: each tensor starts on a cache line
SHM_DIR = Path("/dev/shm")
DEFAULT_PREFIX = "arcp"


def segment_name(prefix: str = DEFAULT_PREFIX) -> str:
    """A fresh segment name: ``<prefix>_<pid>_<random>`` (short enough for every platform)."""
    return f"{prefix}_{os.getpid()}_{secrets.token_hex(5)}"


def list_segments(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Names of the segments under ``/dev/shm`` that start with ``prefix`` (for leak checks)."""
    try:
        return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lies in a flat float32 buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int  # in elements
    numel: int


@dataclass(frozen=True)
class ParamLayout:
    """Tensors' names, shapes and offsets in one flat float32 buffer (picklable, immutable)."""

    slots: tuple[TensorSlot, ...]
    numel: int  # total elements, padding included

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> ParamLayout:
        """Lay out ``name -> shape`` in the mapping's order, each tensor 64-byte aligned."""
        slots, offset = [], 0
        for name, shape in shapes.items():
            dims = tuple(int(d) for d in shape)
            if any(d < 0 for d in dims):
                raise ValueError(f"tensor {name!r}: shape {dims} has a negative dimension")
            numel = math.prod(dims)
            slots.append(TensorSlot(name, dims, offset, numel))
            offset += -(-numel // ALIGN_ELEMENTS) * ALIGN_ELEMENTS
        return cls(tuple(slots), offset)

    @classmethod
    def from_arrays(cls, params: Mapping[str, np.ndarray]) -> ParamLayout:
        return cls.from_shapes({name: np.shape(x) for name, x in params.items()})

    @property
    def nbytes(self) -> int:
        return 4 * self.numel

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.slots)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {s.name: s.shape for s in self.slots}

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Each tensor as a view into ``flat`` (a 1-d float32 array of ``numel`` elements)."""
        if flat.shape != (self.numel,) or flat.dtype != np.float32:
            raise ValueError(
                f"layout needs a flat float32 array of {self.numel} elements, "
                f"got {flat.dtype} {flat.shape}"
            )
        return {s.name: flat[s.offset : s.offset + s.numel].reshape(s.shape) for s in self.slots}


# ---------------------------------------------------------------- segments


def _open(name: str | None, size: int) -> shared_memory.SharedMemory:
    if name is None:
        raise ValueError("a shared-memory segment needs a name to attach to")
    return shared_memory.SharedMemory(name=name, create=False, size=size)


class _Segment:
    """Common lifetime of a segment: close once, unlink once (owner only)."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool):
        self._shm: shared_memory.SharedMemory | None = shm
        self.name = shm.name
        self.owner = owner
        self._unlinked = False

    def _release_views(self) -> None:  # subclasses drop their numpy / memoryview handles
        pass

    def close(self) -> None:
        """Unmap the segment in this process (idempotent); the segment itself stays."""
        if self._shm is None:
            return
        self._release_views()
        try:
            self._shm.close()
        except BufferError as e:
            raise BufferError(
                f"cannot close shared-memory segment {self.name!r}: views of it are still in "
                "use; drop every array or memoryview taken from it first"
            ) from e
        self._shm = None

    def unlink(self) -> None:
        """Remove the segment's name (owner only, idempotent); mappings stay valid until closed."""
        if not self.owner:
            raise PermissionError(
                f"segment {self.name!r} was attached, not created: its owner unlinks it"
            )
        if self._unlinked:
            return
        self._unlinked = True
        if self._shm is not None:
            self._shm.unlink()
        else:
            reopened = shared_memory.SharedMemory(name=self.name)
            reopened.close()
            reopened.unlink()

    def destroy(self) -> None:
        """``close`` then, for the owner, ``unlink``."""
        self.close()
        if self.owner:
            self.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()


class SharedParams(_Segment):
    """A model's float32 parameters in one shared-memory segment, as numpy views."""

    def __init__(self, layout: ParamLayout, shm: shared_memory.SharedMemory, owner: bool):
        super().__init__(shm, owner)
        self.layout = layout
        # frombuffer holds a buffer export (np.ndarray(buffer=...) would not), so close()
        # refuses while any view is alive instead of leaving it dangling.
        self.flat: np.ndarray | None = np.frombuffer(shm.buf, dtype=np.float32, count=layout.numel)
        self.arrays: dict[str, np.ndarray] = layout.views(self.flat)

    @classmethod
    def create(cls, layout: ParamLayout, prefix: str = DEFAULT_PREFIX) -> SharedParams:
        """A new zero-filled segment sized for ``layout``."""
        shm = shared_memory.SharedMemory(
            name=segment_name(prefix), create=True, size=max(layout.nbytes, 64)
        )
        return cls(layout, shm, owner=True)

    @classmethod
    def attach(cls, layout: ParamLayout, name: str) -> SharedParams:
        """Map an existing segment made by ``create`` with the same layout."""
        shm = _open(name, 0)
        if shm.size < layout.nbytes:
            shm.close()
            raise ValueError(
                f"segment {name!r} holds {shm.size} bytes; the layout needs {layout.nbytes}"
            )
        return cls(layout, shm, owner=False)

    def _release_views(self) -> None:
        self.arrays = {}
        self.flat = None


@dataclass(frozen=True)
class BlobRef:
    """A reference to bytes in a shared-memory segment: what travels instead of the bytes."""

    name: str
    size: int


class SharedBlob(_Segment):
    """Opaque bytes (an envelope as received) in their own shared-memory segment."""

    def __init__(self, shm: shared_memory.SharedMemory, size: int, owner: bool):
        super().__init__(shm, owner)
        self.size = size
        self._view: memoryview | None = shm.buf[:size]

    @classmethod
    def create(cls, size: int, prefix: str = DEFAULT_PREFIX) -> SharedBlob:
        """A new writable segment of ``size`` bytes (fill it through :attr:`view`)."""
        if size < 0:
            raise ValueError(f"blob size must be >= 0, got {size}")
        shm = shared_memory.SharedMemory(name=segment_name(prefix), create=True, size=max(size, 1))
        return cls(shm, size, owner=True)

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, prefix: str = DEFAULT_PREFIX
    ) -> SharedBlob:
        """A new segment holding a copy of ``data``."""
        src = memoryview(data).cast("B")
        blob = cls.create(src.nbytes, prefix)
        blob.view[:] = src
        return blob

    @classmethod
    def attach(cls, ref: BlobRef) -> SharedBlob:
        shm = _open(ref.name, 0)
        if shm.size < ref.size:
            shm.close()
            raise ValueError(f"segment {ref.name!r} holds {shm.size} bytes, expected {ref.size}")
        return cls(shm, ref.size, owner=False)

    @property
    def ref(self) -> BlobRef:
        return BlobRef(self.name, self.size)

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise ValueError(f"blob {self.name!r} is closed")
        return self._view

    def _release_views(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
