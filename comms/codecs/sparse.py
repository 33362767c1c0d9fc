"""Chunked top-k at 2 bits: the ``sparse2`` codec.

The pseudo-gradient compressor of SparseLoCo (Sarfi, Thérien, Lidin, Belilovsky,
"Communication Efficient LLM Pre-training with SparseLoCo", arXiv:2508.15706, 2025): top-k
chosen per chunk of the flattened tensor (so an index is an offset within its chunk and stays
small), each kept value quantized to 2 bits, and error feedback on the sender so what is not
sent this round is sent later. What is taken from the paper: top-k chosen per chunk, density
1-3%, 2-bit values, a residual kept by each sender. The paper's error feedback decays its
residual (``e <- beta * e + delta``); ``ErrorFeedback`` keeps it whole by default (``beta = 1``)
and decays it with ``decay`` (an island's ``[sync] ef_decay``).
The chunk of 4096 entries is this codec's default, and the 2-bit scheme below is its own.

Selection. The flattened tensor is cut into chunks of ``chunk`` entries (the last may be
short). A chunk of ``L`` entries keeps its ``k(L) = ceil(density * L)`` largest ``|x|``
(at least 1, at most ``L``; computed as ``ceil(density * L - 1e-9)`` so that a product like
``0.03 * 100 = 3.0000000000000004`` keeps 3).

Quantization (2 bits per kept value: sign, and one magnitude bit). Let ``lo`` and ``hi`` be
the smallest and largest kept ``|x|`` of a chunk. The chunk sends two float32 magnitudes,
``m0 = lo + (hi - lo) / 4`` and ``m1 = lo + 3 * (hi - lo) / 4``, and each kept value decodes
to ``+-m0`` or ``+-m1``, whichever is nearer to ``|x|``. Kept values sit far from zero (they
are the chunk's largest), so a sign bit plus levels spread over ``[lo, hi]`` beat levels
spread over ``[-hi, hi]``: the error is at most ``(hi - lo) / 4`` against ``hi / 4`` for sign
plus levels ``{1/4, 3/4} * hi`` and ``hi / 3`` for four symmetric levels ``{-3, -1, 1, 3} *
hi / 3``. On Gaussian chunks at density 0.02 (``lo`` about 2.3 sigma, ``hi`` about 3.8 sigma)
that is about 0.37 sigma against 0.95 and 1.27 sigma; the relative L2 error on the kept
entries is about 9%. Decoding is a table lookup, with no arithmetic, so it is exact.

Error bound per element: kept entries ``(hi - lo) / 4 + 2**-23 * hi + 2**-149`` (the
rounding of ``m0`` and ``m1`` to float32); dropped entries decode to 0 and are no larger than
``lo`` (the chunk's k-th largest ``|x|``); plus the float32 conversion of float64 input.

Error feedback. ``ErrorFeedback`` sends ``d = Q(c)`` for ``c = x + e`` and keeps
``e' = c - d``. That subtraction is exact for every dropped entry (``d = 0``) and, by
Sterbenz's lemma, for every kept entry with ``m / 2 <= |c| <= 2 m``, which holds for all kept
entries of a chunk whose ``hi <= 5 lo`` (Gaussian chunks: ``hi / lo`` about 1.6, at most 2.2
in 256 chunks). So the residual plus everything sent equals the sum of the corrected inputs
``c_t - e_t`` exactly, and differs from the sum of the inputs only by the float32 rounding of
``x + e``: at most ``2**-24 * sum_t |c_t|`` per element over the rounds (plus ``2**-24 *
|e_{t+1}|`` in rounds where a chunk's kept values span more than 5x).

Payload, little-endian: ``2 * n_chunks`` float32 magnitudes (``m0, m1`` per chunk), then
``K`` uint16 offsets (each chunk's ``k`` offsets, strictly increasing, below the chunk's
length), then ``ceil(K / 4)`` bytes of 2-bit codes (code ``j`` in bits ``2 * (j % 4)`` of byte
``j // 4``; bit 0 the sign, 1 for negative; bit 1 the level, 1 for ``m1``; unused bits zero).
``K`` is the sum of ``k`` over chunks, so the size follows from the shape and the spec:
``8 * n_chunks + 2 * K + ceil(K / 4)`` bytes, about ``(8 + 2.25 * k) / chunk`` bytes per
parameter (0.047 at density 0.02, chunk 4096: 85x smaller than float32).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from comms.codecs.base import (
    _CHUNK_ELEMS,
    _F32,
    Codec,
    SparseTensor,
    _check_int_param,
    _f32_rounding_bound,
    _finite_abs_max,
    _flat_f32,
    _raise_nonfinite,
    as_float_array,
    register_codec,
)
from comms.errors import MalformedError

_U16 = np.dtype("<u2")
MAX_CHUNK = 1 << 16  # offsets within a chunk are uint16


@register_codec
class Sparse2Codec(Codec):
    """Per-chunk top-k (``density`` of each ``chunk``), 2 bits per kept value plus two
    float32 magnitudes per chunk; uint16 offsets within the chunk. See the module docstring
    for the layout, the quantizer and its error bound."""

    name = "sparse2"

    def __init__(self, density: float = 0.02, chunk: int = 4096):
        if isinstance(density, bool) or not isinstance(density, int | float):
            raise ValueError(f"sparse2: density must be a number in (0, 1], got {density!r}")
        if not 0.0 < float(density) <= 1.0:
            raise ValueError(f"sparse2: density must be in (0, 1], got {density!r}")
        self.density = float(density)
        self.chunk = _check_int_param(self.name, "chunk", chunk, 1, MAX_CHUNK)

    def params(self) -> dict[str, Any]:
        return {"density": self.density, "chunk": self.chunk}

    # sizes ----------------------------------------------------------------------------------

    def kept_per_chunk(self, length: int) -> int:
        """Entries kept from a chunk of ``length`` entries."""
        if length <= 0:
            return 0
        return min(length, max(1, math.ceil(self.density * length - 1e-9)))

    def _layout(self, numel: int) -> tuple[int, int, int, int]:
        """(full chunks, tail length, kept per full chunk, kept in the tail)."""
        n_full, tail = divmod(numel, self.chunk)
        return n_full, tail, self.kept_per_chunk(self.chunk), self.kept_per_chunk(tail)

    def num_kept(self, numel: int) -> int:
        n_full, _, k, k_tail = self._layout(numel)
        return n_full * k + k_tail

    def num_chunks(self, numel: int) -> int:
        return -(-numel // self.chunk)

    def encoded_nbytes(self, numel: int) -> int:
        kept = self.num_kept(numel)
        return 8 * self.num_chunks(numel) + 2 * kept + (kept + 3) // 4

    # encode ---------------------------------------------------------------------------------

    def encode(self, x: Any) -> bytes:
        flat = _flat_f32(as_float_array(x, self.name))
        _finite_abs_max(flat, self.name)
        n = flat.size
        n_full, tail, k, k_tail = self._layout(n)
        kept, n_chunks = self.num_kept(n), self.num_chunks(n)
        mags = np.empty((n_chunks, 2), dtype=_F32)
        offsets = np.empty(kept, dtype=_U16)
        codes = np.empty(kept, dtype=np.uint8)
        rows = flat[: n_full * self.chunk].reshape(n_full, self.chunk)
        step = max(1, _CHUNK_ELEMS // self.chunk)
        for start in range(0, n_full, step):
            stop = min(n_full, start + step)
            self._encode_rows(
                rows[start:stop],
                k,
                mags[start:stop],
                offsets[start * k : stop * k].reshape(-1, k),
                codes[start * k : stop * k].reshape(-1, k),
            )
        if tail:
            self._encode_rows(
                flat[n_full * self.chunk :].reshape(1, tail),
                k_tail,
                mags[n_full:],
                offsets[n_full * k :].reshape(1, k_tail),
                codes[n_full * k :].reshape(1, k_tail),
            )
        return mags.tobytes() + offsets.tobytes() + _pack_codes(codes)

    @staticmethod
    def _encode_rows(rows, k, mags, offsets, codes) -> None:
        """Top-``k`` of each row of ``rows`` (m, L): write the rows' two magnitudes, sorted
        offsets and 2-bit codes into ``mags`` (m, 2), ``offsets`` and ``codes`` (m, k)."""
        length = rows.shape[1]
        magnitude = np.abs(rows)
        if k < length:
            picked = np.argpartition(magnitude, length - k, axis=1)[:, length - k :]
            picked.sort(axis=1)
        else:
            picked = np.broadcast_to(np.arange(length), rows.shape)
        values = np.take_along_axis(rows, picked, axis=1)
        kept = np.abs(values).astype(np.float64)
        lo, hi = kept.min(axis=1, keepdims=True), kept.max(axis=1, keepdims=True)
        m0 = (lo + (hi - lo) / 4).astype(_F32)
        m1 = (lo + 3 * (hi - lo) / 4).astype(_F32)
        upper = np.abs(kept - m1) < np.abs(kept - m0)
        mags[:, 0], mags[:, 1] = m0[:, 0], m1[:, 0]
        offsets[...] = picked
        codes[...] = np.signbit(values) | (upper << 1)

    # decode ---------------------------------------------------------------------------------

    def _entries(self, payload: bytes, shape: Any):
        """The payload checked and split: (numel, dims, magnitudes (chunks, 2), offsets,
        codes). Offsets are checked per chunk: below the chunk's length, strictly increasing."""
        view, dims = self._payload_view(payload, shape)
        n = math.prod(dims)
        n_full, tail, k, k_tail = self._layout(n)
        kept, n_chunks = self.num_kept(n), self.num_chunks(n)
        raw = np.frombuffer(view, dtype=np.uint8)
        mags = raw[: 8 * n_chunks].view(_F32).reshape(n_chunks, 2)
        offsets = raw[8 * n_chunks : 8 * n_chunks + 2 * kept].view(_U16)
        packed = raw[8 * n_chunks + 2 * kept :]
        if mags.size:
            if not np.isfinite(mags).all():
                _raise_nonfinite(mags, self.name, "payload's chunk magnitudes")
            if (mags < 0).any():
                bad = int(np.flatnonzero((mags < 0).any(axis=1))[0])
                raise MalformedError(
                    f"sparse2: payload's chunk {bad} has a negative magnitude "
                    f"{mags[bad].tolist()}; magnitudes are >= 0 (the sign is in the codes)"
                )
        self._check_offsets(offsets[: n_full * k].reshape(n_full, k), self.chunk, 0)
        if tail:
            self._check_offsets(offsets[n_full * k :].reshape(1, k_tail), tail, n_full)
        codes = _unpack_codes(packed, kept)
        return n, dims, mags, offsets, codes

    def _check_offsets(self, offsets: np.ndarray, length: int, first_chunk: int) -> None:
        """Refuse offsets (m, k) that are out of range, duplicated or unsorted."""
        if offsets.size == 0:
            return
        if int(offsets.max()) >= length:
            row = first_chunk + int(np.flatnonzero((offsets >= length).any(axis=1))[0])
            raise MalformedError(
                f"sparse2: payload offset {int(offsets.max())} is out of range in chunk {row} "
                f"of {length} entries"
            )
        step = np.diff(offsets.astype(np.int32), axis=1)
        for bad, what in ((step == 0, "duplicated"), (step < 0, "not sorted ascending")):
            if bad.any():
                row = first_chunk + int(np.flatnonzero(bad.any(axis=1))[0])
                raise MalformedError(
                    f"sparse2: payload offsets in chunk {row} are {what}; each chunk's "
                    "offsets must be strictly increasing"
                )

    def decode_sparse(self, payload: bytes, shape: tuple[int, ...]) -> SparseTensor:
        n, dims, mags, offsets, codes = self._entries(payload, shape)
        n_full, _, k, k_tail = self._layout(n)
        chunk_of = np.concatenate(
            [np.repeat(np.arange(n_full), k), np.full(k_tail, n_full, dtype=np.int64)]
        )
        values = mags[chunk_of, codes >> 1]
        np.negative(values, out=values, where=(codes & 1).astype(bool))
        return SparseTensor(dims, chunk_of * self.chunk + offsets, values)

    def decode(self, payload: bytes, shape: tuple[int, ...]) -> np.ndarray:
        return self.decode_sparse(payload, shape).dense()

    def validate(self, payload: bytes, shape: tuple[int, ...]) -> None:
        # The same checks as decode, without the dense array.
        self._entries(payload, shape)

    # error bound ----------------------------------------------------------------------------

    def error_bound(self, x: Any) -> np.ndarray:
        """Per chunk, ``max(lo, (hi - lo) / 4 + 2**-23 * hi + 2**-149)`` for every entry: it
        covers both a kept entry and a dropped one without knowing which ties were kept."""
        arr = as_float_array(x, self.name)
        a32 = np.abs(_flat_f32(arr)).astype(np.float64)
        n_full, tail, k, k_tail = self._layout(a32.size)
        parts = [(a32[: n_full * self.chunk].reshape(n_full, self.chunk), k)]
        if tail:
            parts.append((a32[n_full * self.chunk :].reshape(1, tail), k_tail))
        bounds = []
        for rows, kept in parts:
            length = rows.shape[1]
            hi = rows.max(axis=1, initial=0.0)
            lo = np.partition(rows, length - kept, axis=1)[:, length - kept]
            per_chunk = np.maximum(lo, (hi - lo) / 4 + 2.0**-23 * hi + 2.0**-149)
            bounds.append(np.repeat(per_chunk, length))
        bound = np.concatenate(bounds)[: a32.size]
        return bound.reshape(arr.shape) + _f32_rounding_bound(arr.astype(np.float64))


def _pack_codes(codes: np.ndarray) -> bytes:
    """2-bit codes, four per byte, code ``j`` in bits ``2 * (j % 4)`` of byte ``j // 4``."""
    padded = np.zeros(-(-codes.size // 4) * 4, dtype=np.uint8)
    padded[: codes.size] = codes
    quads = padded.reshape(-1, 4)
    packed = quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)
    return packed.astype(np.uint8).tobytes()


def _unpack_codes(packed: np.ndarray, count: int) -> np.ndarray:
    codes = np.empty((packed.size, 4), dtype=np.uint8)
    for j in range(4):
        np.bitwise_and(np.right_shift(packed, 2 * j), 3, out=codes[:, j])
    codes = codes.reshape(-1)
    if codes[count:].any():
        raise MalformedError(
            f"sparse2: payload's unused code bits after the last of {count} codes are not zero"
        )
    return codes[:count]
