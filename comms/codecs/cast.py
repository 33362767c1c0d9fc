"""Cast codecs: ``none`` (raw float32), ``fp16`` and ``bf16`` (round to nearest even).

Element-wise casts that saturate at the format's largest finite value; bf16 is rounded on
the float32 bit pattern in numpy, over cache-sized chunks.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from comms.codecs.base import (
    _CHUNK_ELEMS,
    _F32,
    _FLT_MAX,
    Codec,
    _finite_abs_max,
    _flat_f32,
    _raise_nonfinite,
    as_float_array,
    register_codec,
)

_F16 = np.dtype("<f2")
_U16 = np.dtype("<u2")
_FP16_MAX = 65504.0
_BF16_MAX = float(np.array([0x7F7F0000], dtype=np.uint32).view(np.float32)[0])


class _CastCodec(Codec):
    """Element-wise casts: values beyond ``max_finite`` saturate to it, and the error bound is
    ``max(|x| - max_finite, 0) + |x| * rel_bound + abs_bound`` per element."""

    wire_dtype: ClassVar[np.dtype]
    max_finite: ClassVar[float]
    rel_bound: ClassVar[float]
    abs_bound: ClassVar[float]

    def encoded_nbytes(self, numel: int) -> int:
        return self.wire_dtype.itemsize * numel

    def encode(self, x: Any) -> bytes:
        flat = _flat_f32(as_float_array(x, self.name))
        if _finite_abs_max(flat, self.name) > self.max_finite:
            flat = np.clip(flat, -self.max_finite, self.max_finite)
        return self._to_wire(flat).tobytes()

    def decode(self, payload: bytes, shape: tuple[int, ...]) -> np.ndarray:
        view, dims = self._payload_view(payload, shape)
        out = self._from_wire(np.frombuffer(view, dtype=self.wire_dtype))
        _finite_abs_max(out, self.name, "payload")
        return out.reshape(dims)

    def validate(self, payload: bytes, shape: tuple[int, ...]) -> None:
        if self.wire_dtype.kind != "f":  # bf16 travels as uint16: decode to check
            return super().validate(payload, shape)
        view, _ = self._payload_view(payload, shape)
        wire = np.frombuffer(view, dtype=self.wire_dtype)
        if not np.isfinite(wire).all():
            _raise_nonfinite(wire, self.name, "payload")

    def _to_wire(self, flat: np.ndarray) -> np.ndarray:
        return flat.astype(self.wire_dtype, copy=False)

    def _from_wire(self, wire: np.ndarray) -> np.ndarray:
        return wire.astype(np.float32)

    def error_bound(self, x: Any) -> np.ndarray:
        a = np.abs(as_float_array(x, self.name).astype(np.float64))
        return np.maximum(a - self.max_finite, 0.0) + a * self.rel_bound + self.abs_bound


@register_codec
class NoneCodec(_CastCodec):
    """Raw little-endian float32, 4 bytes per element.

    Error bound: exact for float16/float32 input; float64 input is rounded to float32
    (``|x| * 2**-24 + 2**-150``).
    """

    name = "none"
    wire_dtype, max_finite, rel_bound, abs_bound = _F32, _FLT_MAX, 2.0**-24, 2.0**-150


@register_codec
class Fp16Codec(_CastCodec):
    """IEEE half precision, 2 bytes per element, round to nearest even.

    Error bound: ``|x| * (2**-11 + 2**-23) + 2**-25``; values beyond +-65504 (the largest
    finite half) saturate to +-65504, adding ``|x| - 65504`` for those elements.
    """

    name = "fp16"
    wire_dtype, max_finite, rel_bound, abs_bound = _F16, _FP16_MAX, 2.0**-11 + 2.0**-23, 2.0**-25


@register_codec
class Bf16Codec(_CastCodec):
    """bfloat16 (the top 16 bits of a float32), 2 bytes per element, round to nearest even
    (done on the bit pattern in numpy).

    Error bound: ``|x| * (2**-8 + 2**-23) + 2**-133``; values beyond the largest finite
    bfloat16 (about +-3.39e38) saturate to it, adding ``|x| - max`` for those elements.
    """

    name = "bf16"
    wire_dtype, max_finite, rel_bound, abs_bound = _U16, _BF16_MAX, 2.0**-8 + 2.0**-23, 2.0**-133

    def _to_wire(self, flat: np.ndarray) -> np.ndarray:
        bits = flat.view(np.uint32)
        out = np.empty(flat.size, dtype=_U16)
        scratch = np.empty(min(flat.size, _CHUNK_ELEMS), dtype=np.uint32)
        for start in range(0, flat.size, _CHUNK_ELEMS):
            u = bits[start : start + _CHUNK_ELEMS]
            t = scratch[: u.size]
            # Round to nearest even on the bit pattern: add 0x7FFF plus the lowest kept bit.
            np.right_shift(u, 16, out=t)
            np.bitwise_and(t, 1, out=t)
            t += 0x7FFF
            t += u
            t >>= 16
            out[start : start + u.size] = t
        return out

    def _from_wire(self, wire: np.ndarray) -> np.ndarray:
        out = np.empty(wire.size, dtype=np.float32)
        bits = out.view(np.uint32)
        bits[...] = wire
        bits <<= 16
        return out
