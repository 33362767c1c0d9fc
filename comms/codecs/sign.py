"""One bit per element: the ``sign1`` codec.

Scaled sign compression as in Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes
SignSGD and other Gradient Compression Schemes" (ICML 2019): each element is sent as its sign
and a block of elements shares one magnitude, the mean of their ``|x|``, so a block decodes to
``+-mean|x|``. Alone it is a biased compressor (the relative L2 error on Gaussian data is
``sqrt(1 - 2 / pi)``, about 60%); with error feedback on the sender (``ErrorFeedback``, which
every island runs for a lossy codec) what a round gets wrong is sent in the next ones. The
block of 256 elements is this codec's default; the mean of ``|x|`` is the scale that
minimizes a block's squared error among sign codes.

Encoding. The flattened tensor is cut into blocks of ``block`` elements (the last may be
short). A block's scale is ``float32(sum|x| / L)`` over its ``L`` elements, the sum taken in
float64. Element ``i`` gets bit 1 when ``x_i < 0`` (so 0 and -0.0 decode positive) and
decodes to ``-s`` or ``+s`` (the scale with its sign bit set or not: exact, so replicas agree
bit for bit).

Error bound per element: ``absmax(block) * (1 + 2**-20)`` (``||x| - s| <= max(|x|, s)`` and
``s <= absmax``, plus the rounding of ``s`` to float32), plus the float32 conversion of
float64 input.

Payload, little-endian: ``ceil(n / block)`` float32 scales, then ``ceil(n / 8)`` bytes of
sign bits (element ``i`` in bit ``i % 8`` of byte ``i // 8``; the unused high bits of the
last byte are zero). Size ``4 * ceil(n / block) + ceil(n / 8)`` bytes, about 0.141 bytes per
parameter at the default block (28x smaller than float32, 4x smaller than ``int4``). A scale
that is negative or not finite, and a set unused bit, are refused.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from comms.codecs.base import (
    _F32,
    Codec,
    _block_absmax_bound,
    _check_int_param,
    _finite_abs_max,
    _flat_f32,
    _raise_nonfinite,
    as_float_array,
    register_codec,
)
from comms.errors import MalformedError


@register_codec
class Sign1Codec(Codec):
    """Sign per element, mean ``|x|`` per block of ``block`` elements (see the module)."""

    name = "sign1"
    default_block = 256

    def __init__(self, block: int | None = None):
        block = self.default_block if block is None else block
        self.block = _check_int_param(self.name, "block", block, 8, 1 << 20)

    def params(self) -> dict[str, Any]:
        return {"block": self.block}

    def _num_blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def encoded_nbytes(self, numel: int) -> int:
        return 4 * self._num_blocks(numel) + (numel + 7) // 8

    def _block_scales(self, flat: np.ndarray) -> np.ndarray:
        """float32(mean |x|) per block, the sum in float64."""
        n, b = flat.size, self.block
        n_blocks, n_full = self._num_blocks(n), n // b
        sums = np.empty(n_blocks, dtype=np.float64)
        if n_full:
            sums[:n_full] = np.abs(flat[: n_full * b].reshape(n_full, b)).sum(
                axis=1, dtype=np.float64
            )
        lengths = np.full(n_blocks, float(b))
        if n_full < n_blocks:
            sums[n_full] = np.abs(flat[n_full * b :]).sum(dtype=np.float64)
            lengths[n_full] = n - n_full * b
        return (sums / lengths).astype(_F32)

    def encode(self, x: Any) -> bytes:
        flat = _flat_f32(as_float_array(x, self.name))
        _finite_abs_max(flat, self.name)  # NonFiniteError for NaN / Inf
        scales = self._block_scales(flat)
        bits = np.packbits(np.signbit(flat) & (flat != 0), bitorder="little")
        return scales.tobytes() + bits.tobytes()

    def _parts(self, payload: bytes, shape: Any) -> tuple[np.ndarray, np.ndarray, tuple, int]:
        view, dims = self._payload_view(payload, shape)
        n = math.prod(dims)
        n_blocks = self._num_blocks(n)
        raw = np.frombuffer(view, dtype=np.uint8)
        scales, bits = raw[: 4 * n_blocks].view(_F32), raw[4 * n_blocks :]
        if scales.size and not np.isfinite(scales).all():
            _raise_nonfinite(scales, self.name, "payload's block scales")
        if scales.size and bool((scales < 0).any()):
            block = int(np.argmax(scales < 0))
            raise MalformedError(
                f"{self.name}: block {block}'s scale is {float(scales[block]):.6g}; a scale is "
                "a mean of |x| and never negative"
            )
        if n % 8 and bits[-1] >> (n % 8):
            raise MalformedError(
                f"{self.name}: the last byte of sign bits sets bits beyond the tensor's "
                f"{n} elements (unused bits must be zero)"
            )
        return scales, bits, dims, n

    def decode(self, payload: bytes, shape: tuple[int, ...]) -> np.ndarray:
        scales, bits, dims, n = self._parts(payload, shape)
        out = np.repeat(scales.astype(np.float32), self.block)[:n]
        negative = np.unpackbits(bits, count=n, bitorder="little").astype(np.uint32)
        out.view(np.uint32)[...] ^= negative << np.uint32(31)  # flip the sign bit: exact
        return out.reshape(dims)

    def validate(self, payload: bytes, shape: tuple[int, ...]) -> None:
        self._parts(payload, shape)  # bits are bits: a payload decodes iff its parts check

    def error_bound(self, x: Any) -> np.ndarray:
        return _block_absmax_bound(x, self.name, self.block, lambda a: a * (1 + 2.0**-20))
