"""Blockwise absmax quantization: ``int8`` and ``int4`` codecs.

Symmetric, round to nearest, one float32 scale per block, as in Dettmers et al., "8-bit
Optimizers via Block-wise Quantization" (2022): ``q = rint(x * qmax / absmax(block))``,
``x' = q * absmax(block) / qmax``. Blocks whose absmax is below ``FLUSH_BELOW`` are sent as
zeros.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np

from comms.codecs.base import (
    _CHUNK_ELEMS,
    _F32,
    _FLT_MAX,
    Codec,
    _block_absmax_bound,
    _check_int_param,
    _flat_f32,
    _raise_nonfinite,
    as_float_array,
    register_codec,
)
from comms.errors import MalformedError

# Blocks whose absmax is below this are sent as zeros: qmax / absmax would overflow float32.
FLUSH_BELOW = 2.0**-120


class _BlockwiseAbsmax(Codec):
    """Shared machinery: payload = float32 scale per block, then the packed codes.

    The tensor is flattened and cut into blocks of ``block`` elements (the last one may be
    short). Per block, ``scale = absmax / qmax`` and ``q = rint(x / scale)`` in
    ``[-qmax, qmax]``; decode is ``q * scale``. Work runs over chunks of whole blocks so the
    float32 scratch stays in cache; no Python loop runs per block.
    """

    qmax: ClassVar[int]
    default_block: ClassVar[int]

    def __init__(self, block: int | None = None):
        block = self.default_block if block is None else block
        self.block = _check_int_param(self.name, "block", block, 2, 1 << 20)
        # Decoded codes are at most qmax + 1 in magnitude (a crafted payload may hold one
        # more than the encoder ever writes), so scales up to this bound decode finite.
        self.max_scale = float(np.float32(_FLT_MAX / (self.qmax + 1)))
        self.max_input = self.qmax * self.max_scale * (1 - 2.0**-20)

    def params(self) -> dict[str, Any]:
        return {"block": self.block}

    def _num_blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    @abstractmethod
    def _codes_nbytes(self, numel: int) -> int: ...

    @abstractmethod
    def _store_codes(self, rounded: np.ndarray, dst: np.ndarray) -> None:
        """Write the integer-valued float32 rows ``rounded`` as packed codes into ``dst``."""

    @abstractmethod
    def _load_codes(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Unpack the codes ``src`` into the int8 rows ``dst``."""

    def encoded_nbytes(self, numel: int) -> int:
        return 4 * self._num_blocks(numel) + self._codes_nbytes(numel)

    def _chunks(self, n_full: int) -> range:
        """Start rows of the chunks of whole blocks the work is cut into."""
        return range(0, n_full, max(1, _CHUNK_ELEMS // self.block))

    def encode(self, x: Any) -> bytes:
        flat = _flat_f32(as_float_array(x, self.name))
        n, b, cb = flat.size, self.block, self._codes_nbytes
        n_blocks, n_full = self._num_blocks(n), flat.size // self.block
        payload = np.empty(self.encoded_nbytes(n), dtype=np.uint8)
        scales, codes = payload[: 4 * n_blocks].view(_F32), payload[4 * n_blocks :]
        rows = flat[: n_full * b].reshape(n_full, b)
        step = max(1, _CHUNK_ELEMS // b)
        scratch = np.empty((min(step, n_blocks), b), dtype=np.float32)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for start in self._chunks(n_full):
                stop = min(n_full, start + step)
                top = self._quantize(rows[start:stop], scales[start:stop], scratch)
                self._check_range(top, flat)
                self._store_codes(scratch[: stop - start], codes[cb(start * b) : cb(stop * b)])
            if n_full < n_blocks:  # short last block, zero-padded (padding never moves absmax)
                tail = np.zeros((1, b), dtype=np.float32)
                tail[0, : n - n_full * b] = flat[n_full * b :]
                self._check_range(self._quantize(tail, scales[n_full:], scratch), flat)
                tail_codes = np.empty(cb(b), dtype=np.uint8)
                self._store_codes(scratch[:1], tail_codes)
                codes[cb(n_full * b) :] = tail_codes[: cb(n) - cb(n_full * b)]
        return payload.tobytes()

    def _quantize(self, rows: np.ndarray, scales: np.ndarray, scratch: np.ndarray) -> float:
        """Write the (m, block) ``rows``' scales, leave ``rint(x / scale)`` in ``scratch[:m]``
        and return the largest absmax (NaN if the rows hold NaN)."""
        work = scratch[: rows.shape[0]]
        np.abs(rows, out=work)
        np.max(work, axis=1, out=scales)  # absmax per block; NaN propagates
        top = float(scales.max())
        inv = np.divide(np.float32(self.qmax), scales)
        flushed = scales < FLUSH_BELOW
        inv[flushed] = 0.0
        scales /= np.float32(self.qmax)
        scales[flushed] = 0.0
        np.multiply(rows, inv[:, None], out=work)
        np.rint(work, out=work)
        return top

    def _check_range(self, top: float, flat: np.ndarray) -> None:
        if top <= self.max_input:
            return
        if not math.isfinite(top):
            _raise_nonfinite(flat, self.name)
        raise ValueError(
            f"{self.name}: |x| reaches {top:.6g}, beyond this codec's range "
            f"+-{self.max_input:.6g}; scale the tensor down or use 'none'"
        )

    def decode(self, payload: bytes, shape: tuple[int, ...]) -> np.ndarray:
        view, dims = self._payload_view(payload, shape)
        n, b, cb = math.prod(dims), self.block, self._codes_nbytes
        n_blocks, n_full = self._num_blocks(n), n // b
        raw = np.frombuffer(view, dtype=np.uint8)
        scales, codes = raw[: 4 * n_blocks].view(_F32).astype(np.float32), raw[4 * n_blocks :]
        self._check_scales(scales)
        out = np.empty(n, dtype=np.float32)
        rows = out[: n_full * b].reshape(n_full, b)
        step = max(1, _CHUNK_ELEMS // b)
        q = np.empty((min(step, n_blocks), b), dtype=np.int8)
        for start in self._chunks(n_full):
            stop = min(n_full, start + step)
            self._load_codes(codes[cb(start * b) : cb(stop * b)], q[: stop - start])
            dst = rows[start:stop]
            dst[...] = q[: stop - start]
            np.multiply(dst, scales[start:stop, None], out=dst)
        if n_full < n_blocks:
            src = np.zeros(cb(b), dtype=np.uint8)
            rest = codes[cb(n_full * b) :]
            src[: rest.size] = rest
            self._load_codes(src, q[:1])
            np.multiply(q[0, : n - n_full * b], scales[n_full], out=out[n_full * b :])
        return out.reshape(dims)

    def validate(self, payload: bytes, shape: tuple[int, ...]) -> None:
        # Codes are small integers, so a payload decodes finite iff its scales are valid.
        view, dims = self._payload_view(payload, shape)
        n_blocks = self._num_blocks(math.prod(dims))
        self._check_scales(np.frombuffer(view, dtype=np.uint8)[: 4 * n_blocks].view(_F32))

    def _check_scales(self, scales: np.ndarray) -> None:
        if scales.size == 0:
            return
        if not np.isfinite(scales).all():
            _raise_nonfinite(scales, self.name, "payload's block scales")
        top = float(np.abs(scales).max())
        if top > self.max_scale:
            raise MalformedError(
                f"{self.name}: payload holds a block scale of {top:.6g}, beyond the largest "
                f"valid scale {self.max_scale:.6g}"
            )

    # error bound ----------------------------------------------------------------------------

    def error_bound(self, x: Any) -> np.ndarray:
        def per_block(absmax: np.ndarray) -> np.ndarray:
            bound = absmax / (2 * self.qmax) + absmax * 2.0**-20
            bound[absmax < FLUSH_BELOW] = FLUSH_BELOW
            return bound

        return _block_absmax_bound(x, self.name, self.block, per_block)


@register_codec
class Int8Codec(_BlockwiseAbsmax):
    """Blockwise absmax int8: ``4 * ceil(n / block) + n`` bytes (float32 scale per block).

    Error bound per element: ``absmax(block) / 254 + absmax(block) * 2**-20`` (half a
    quantization step plus float32 rounding), plus the float32 conversion of float64 input;
    blocks with absmax below ``FLUSH_BELOW`` (2**-120) are sent as zeros. Relative L2 error on
    Gaussian data with the default block of 256 is about 0.65%.
    """

    name = "int8"
    qmax = 127
    default_block = 256

    def _codes_nbytes(self, numel: int) -> int:
        return numel

    def _store_codes(self, rounded, dst) -> None:
        dst.view(np.int8).reshape(rounded.shape)[...] = rounded

    def _load_codes(self, src, dst) -> None:
        dst[...] = src.view(np.int8).reshape(dst.shape)


@register_codec
class Int4Codec(_BlockwiseAbsmax):
    """Blockwise absmax int4: codes in -7..7, two per byte (element 2i in the low nibble,
    two's complement), ``4 * ceil(n / block) + ceil(n / 2)`` bytes; block must be even.

    Error bound per element: ``absmax(block) / 14 + absmax(block) * 2**-20``, plus the
    float32 conversion of float64 input; blocks below ``FLUSH_BELOW`` are sent as zeros.
    Relative L2 error on Gaussian data with the default block of 64 is about 10%.
    """

    name = "int4"
    qmax = 7
    default_block = 64

    def __init__(self, block: int | None = None):
        super().__init__(block)
        if self.block % 2:
            raise ValueError(f"int4: block must be even (two codes per byte), got {self.block}")

    def _codes_nbytes(self, numel: int) -> int:
        return (numel + 1) // 2

    def _store_codes(self, rounded, dst) -> None:
        q = rounded.reshape(-1).astype(np.int8).view(np.uint8)
        np.bitwise_and(q[0::2], 0x0F, out=dst)
        dst |= np.left_shift(q[1::2], 4)

    def _load_codes(self, src, dst) -> None:
        signed, flat = src.view(np.int8), dst.reshape(-1)
        # Shift the low nibble up then arithmetic-shift back down to sign-extend it.
        np.right_shift(np.left_shift(signed, 4), 4, out=flat[0::2])
        np.right_shift(signed, 4, out=flat[1::2])
