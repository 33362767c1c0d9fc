"""Top-k sparsification: the ``topk`` codec and ``top_k_indices``.

The largest-magnitude fraction of the entries, as (index, value) pairs; the rest decode to
zero (Stich et al., "Sparsified SGD with Memory", 2018).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from comms.codecs.base import (
    _F32,
    Codec,
    SparseTensor,
    _check_shape,
    _f32_rounding_bound,
    _finite_abs_max,
    _flat_f32,
    as_float_array,
    register_codec,
)
from comms.errors import MalformedError

_U32 = np.dtype("<u4")
MAX_ELEMENTS = 1 << 32  # the indices are uint32: encode and decode refuse larger tensors


def top_k_indices(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` largest entries of the 1-d array ``magnitude``.

    On large arrays a strided sample gives a threshold that keeps a few times ``k``
    candidates, and the exact selection runs on those only (falling back to the full array
    when the sample guessed too high); the result is the same as a full argpartition.
    """
    n = magnitude.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if n >= 1 << 18 and k <= n // 16:
        sample = magnitude[:: n // (1 << 16)]
        keep = min(sample.size, 3 * -(-k * sample.size // n) + 16)
        threshold = np.partition(sample, sample.size - keep)[sample.size - keep]
        candidates = np.flatnonzero(magnitude >= threshold)
        if candidates.size >= k:
            picked = np.argpartition(magnitude[candidates], candidates.size - k)
            indices = candidates[picked[candidates.size - k :]]
            indices.sort()
            return indices
    indices = np.argpartition(magnitude, n - k)[n - k :]
    indices.sort()
    return indices


@register_codec
class TopKCodec(Codec):
    """The ``k = max(1, round(fraction * n))`` largest-magnitude entries as sorted uint32
    indices then float32 values: ``8 * k`` bytes; every other entry decodes to zero. Tensors
    hold fewer than 2**32 elements. Decoding allocates the whole declared shape (about
    ``1 / (2 * fraction)`` times the payload), so receivers check shapes against the model's
    manifest first (``comms.update.decode_update``); ``validate`` allocates no dense array.

    Error bound per element: the k-th largest ``|x|`` (kept entries are exact, dropped ones
    are no larger than it), plus the float32 conversion of float64 input.
    """

    name = "topk"

    def __init__(self, fraction: float = 0.01):
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise ValueError(f"topk: fraction must be a number in (0, 1], got {fraction!r}")
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"topk: fraction must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)

    def params(self) -> dict[str, Any]:
        return {"fraction": self.fraction}

    def num_kept(self, numel: int) -> int:
        if numel == 0:
            return 0
        return min(numel, max(1, round(self.fraction * numel)))

    def encoded_nbytes(self, numel: int) -> int:
        return 8 * self.num_kept(numel)

    def encode(self, x: Any) -> bytes:
        flat = _flat_f32(as_float_array(x, self.name))
        if flat.size >= MAX_ELEMENTS:
            raise ValueError(f"topk: tensors of {flat.size} elements exceed uint32 indices")
        _finite_abs_max(flat, self.name)
        k = self.num_kept(flat.size)
        indices = top_k_indices(np.abs(flat), k)
        return indices.astype(_U32).tobytes() + flat[indices].astype(_F32).tobytes()

    def _payload_view(self, payload: bytes, shape: Any) -> tuple[memoryview, tuple[int, ...]]:
        dims = _check_shape(shape, self.name)
        n = math.prod(dims)
        if n >= MAX_ELEMENTS:  # refused before anything of that size is allocated
            raise MalformedError(
                f"topk: a tensor of shape {dims} has {n} elements; topk's uint32 indices "
                f"address fewer than 2**32"
            )
        return super()._payload_view(payload, dims)

    def _entries(self, view: memoryview, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The payload's (indices, values), checked: indices strictly increasing and below
        ``n``, values finite."""
        k = self.num_kept(n)
        raw = np.frombuffer(view, dtype=np.uint8)
        indices = raw[: 4 * k].view(_U32).astype(np.int64)
        values = raw[4 * k :].view(_F32).astype(np.float32)
        if k and (indices[-1] >= n or np.any(indices[1:] <= indices[:-1])):
            raise MalformedError(f"topk: payload indices must be strictly increasing and below {n}")
        _finite_abs_max(values, self.name, "payload")
        return indices, values

    def decode_sparse(self, payload: bytes, shape: tuple[int, ...]) -> SparseTensor:
        view, dims = self._payload_view(payload, shape)
        indices, values = self._entries(view, math.prod(dims))
        return SparseTensor(dims, indices, values)

    def decode(self, payload: bytes, shape: tuple[int, ...]) -> np.ndarray:
        return self.decode_sparse(payload, shape).dense()

    def validate(self, payload: bytes, shape: tuple[int, ...]) -> None:
        # The same checks as decode, without the dense array.
        view, dims = self._payload_view(payload, shape)
        self._entries(view, math.prod(dims))

    def error_bound(self, x: Any) -> np.ndarray:
        arr = as_float_array(x, self.name)
        x64 = arr.astype(np.float64)
        a32 = np.abs(_flat_f32(arr))
        k = self.num_kept(a32.size)
        kth = 0.0 if k in (0, a32.size) else float(np.partition(a32, a32.size - k)[a32.size - k])
        return kth + _f32_rounding_bound(x64)
