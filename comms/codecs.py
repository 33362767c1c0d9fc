"""Tensor codecs: the bytes one tensor becomes on the wire, and error feedback.

A codec turns one floating-point array into a payload (``encode``) and back into a float32
array (``decode``). The payload holds values only: the tensor's shape and the codec's spec
travel outside it, in the envelope. Every codec knows its exact payload size
(``encoded_nbytes``), so a receiver checks the size before touching the bytes, and every codec
documents a per-element error bound (``error_bound``) that the tests check.

Codecs, by name:

- ``none``: raw float32.
- ``fp16``, ``bf16``: half-precision casts, round to nearest even; saturating at the format's
  largest finite value.
- ``int8``, ``int4``: blockwise absmax quantization (symmetric, round to nearest, one float32
  scale per block), as in Dettmers et al., "8-bit Optimizers via Block-wise Quantization"
  (2022): ``q = rint(x * qmax / absmax(block))``, ``x' = q * absmax(block) / qmax``.
- ``topk``: the largest-magnitude fraction of the entries, as (index, value) pairs; the rest
  are zero (Stich et al., "Sparsified SGD with Memory", 2018).

``ErrorFeedback`` keeps what a lossy codec dropped and adds it to the next tensor sent under the
same name (Seide et al., "1-bit SGD", 2014; Karimireddy et al., "Error Feedback Fixes SignSGD",
2019): ``c_t = x_t + e_t``, ``send Q(c_t)``, ``e_{t+1} = c_t - Q(c_t)``. Summed over rounds,
what was sent plus the final residual equals what was put in.

Wire byte order is little-endian. Only numpy is imported here (no torch), so a cold process that
merges updates starts fast; torch tensors are accepted by duck typing. Codecs are stateless and
safe to share between threads; an ``ErrorFeedback`` belongs to one thread.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from comms.errors import ConfigError, MalformedError, NonFiniteError

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_U16 = np.dtype("<u2")
_U32 = np.dtype("<u4")
_FLT_MAX = float(np.finfo(np.float32).max)
_FP16_MAX = 65504.0
_BF16_MAX = float(np.array([0x7F7F0000], dtype=np.uint32).view(np.float32)[0])
# Elements per working chunk: big enough that Python overhead vanishes, small enough that the
# float32 scratch buffer stays in the L2 cache.
_CHUNK_ELEMS = 1 << 17
# Blocks whose absmax is below this are sent as zeros: qmax / absmax would overflow float32.
FLUSH_BELOW = 2.0**-120

REQUIRED_CODECS = ("none", "fp16", "bf16", "int8", "int4", "topk")


# --- Input handling -------------------------------------------------------------------------------


def as_float_array(x: Any, codec_name: str = "codec") -> np.ndarray:
    """Return ``x`` as a numpy float16/32/64 array (no copy when it already is one).

    Accepts numpy arrays, Python scalars and sequences, and torch tensors (by duck typing: any
    object with ``.detach``); bfloat16 tensors go through float32. Integer, bool and complex
    inputs are refused with a TypeError.
    """
    if hasattr(x, "detach"):
        tensor = x.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        x = tensor.numpy()
    arr = np.asarray(x)
    if arr.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(
            f"{codec_name}: cannot encode an array of dtype {arr.dtype}; codecs take float16, "
            "float32, float64 or bfloat16 tensors (cast integer tensors explicitly)"
        )
    return arr


def _flat_f32(arr: np.ndarray) -> np.ndarray:
    """A C-contiguous 1-d float32 array with ``arr``'s values (a view when possible).

    float64 values beyond float32's range become Inf here and are refused as non-finite.
    """
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)


def _raise_nonfinite(x: np.ndarray, codec_name: str, what: str = "input") -> None:
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    hint = "find where it comes from, or skip this update" if what == "input" else "refused"
    raise NonFiniteError(
        f"{codec_name}: {what} holds {bad} non-finite value(s) (NaN or Inf) out of {x.size}; "
        + hint
    )


def _finite_abs_max(x: np.ndarray, codec_name: str, what: str = "input") -> float:
    """Largest ``|x|``; raises NonFiniteError if ``x`` holds NaN or Inf. 0.0 when empty."""
    if x.size == 0:
        return 0.0
    hi, lo = float(np.max(x)), float(np.min(x))  # NaN propagates through both
    if not (math.isfinite(hi) and math.isfinite(lo)):
        _raise_nonfinite(x, codec_name, what)
    return max(hi, -lo)


def _check_shape(shape: Any, codec_name: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError) as exc:
        raise MalformedError(f"{codec_name}: shape {shape!r} is not a sequence of ints") from exc
    if any(d < 0 for d in dims):
        raise MalformedError(f"{codec_name}: shape {dims} has a negative dimension")
    return dims


# --- Base class and registry ----------------------------------------------------------------------


class Codec(ABC):
    """Encodes one float tensor to bytes and back. Subclasses set ``name`` and implement the
    abstract methods; ``decode`` always returns a fresh, writable, C-contiguous float32 array.
    """

    name: ClassVar[str]

    def params(self) -> dict[str, Any]:
        """The codec's parameters (beyond its name), msgpack-serialisable."""
        return {}

    def spec(self) -> dict[str, Any]:
        """Name and parameters, e.g. ``{"name": "int8", "block": 256}``."""
        return {"name": self.name, **self.params()}

    @abstractmethod
    def encoded_nbytes(self, numel: int) -> int:
        """Exact payload size in bytes for a tensor of ``numel`` elements."""

    @abstractmethod
    def encode(self, x: Any) -> bytes:
        """The payload for one tensor (any shape; float16/32/64 or torch bf16)."""

    @abstractmethod
    def decode(self, payload: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """Rebuild a float32 array of ``shape`` from ``payload``."""

    @abstractmethod
    def error_bound(self, x: Any) -> np.ndarray:
        """Per-element bound (float64, shape of ``x``) on ``|x - decode(encode(x))|``."""

    def bytes_per_param(self, numel: int = 1 << 20) -> float:
        return self.encoded_nbytes(numel) / numel

    def validate(self, payload: bytes, shape: tuple[int, ...]) -> None:
        """Raise exactly what ``decode`` would (``MalformedError``, ``NonFiniteError``) without
        keeping the result; codecs override it with a cheaper check where they can (a gateway
        validates before it acknowledges and leaves decoding to the merge workers)."""
        self.decode(payload, shape)

    def _payload_view(self, payload: bytes, shape: Any) -> tuple[memoryview, tuple[int, ...]]:
        dims = _check_shape(shape, self.name)
        view = memoryview(payload).cast("B")
        expected = self.encoded_nbytes(math.prod(dims))
        if view.nbytes != expected:
            raise MalformedError(
                f"{self.name}: payload is {view.nbytes} bytes but a tensor of shape {dims} "
                f"encodes to {expected} bytes with spec {self.spec()}"
            )
        return view, dims

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.spec().items())))


CODECS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` available by ``cls.name``."""
    if cls.name in CODECS and CODECS[cls.name] is not cls:
        raise ValueError(f"codec name {cls.name!r} is already registered by {CODECS[cls.name]}")
    CODECS[cls.name] = cls
    return cls


def get_codec(name_or_spec: str | dict[str, Any], **params: Any) -> Codec:
    """A codec from a name plus parameters (``get_codec("int8", block=128)``) or from a spec.

    Raises ConfigError for an unknown name or bad parameters (this is the local-config path;
    specs received from peers go through ``codec_from_spec``).
    """
    if isinstance(name_or_spec, dict):
        return codec_from_spec({**name_or_spec, **params})
    cls = CODECS.get(name_or_spec)
    if cls is None:
        raise ConfigError(f"unknown codec {name_or_spec!r}; known codecs: {sorted(CODECS)}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"codec {name_or_spec!r}: bad parameters {params}: {exc}") from exc


def codec_from_spec(spec: dict[str, Any]) -> Codec:
    """The codec a spec (as sent on the wire) names; MalformedError if it makes no sense."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise MalformedError(f"codec spec must be a dict with a string 'name', got {spec!r}")
    params = {k: v for k, v in spec.items() if k != "name"}
    cls = CODECS.get(spec["name"])
    if cls is None:
        raise MalformedError(f"unknown codec {spec['name']!r}; known codecs: {sorted(CODECS)}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise MalformedError(f"codec spec {spec!r} is invalid: {exc}") from exc


def _check_int_param(codec: str, key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not lo <= value <= hi:
        raise ValueError(f"{codec}: {key} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


# --- Casts: none, fp16, bf16 ----------------------------------------------------------------------


def _f32_rounding_bound(x64: np.ndarray) -> np.ndarray:
    """Error of the float64 -> float32 conversion every codec starts with."""
    return np.abs(x64) * 2.0**-24 + 2.0**-150


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


# --- Blockwise absmax quantization: int8, int4 ----------------------------------------------------


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
        arr = as_float_array(x, self.name)
        x64 = arr.astype(np.float64).reshape(-1)
        a32 = np.abs(_flat_f32(arr)).astype(np.float64)
        n, b = x64.size, self.block
        padded = np.zeros(self._num_blocks(n) * b)
        padded[:n] = a32
        absmax = padded.reshape(-1, b).max(axis=1) if n else padded
        per_block = absmax / (2 * self.qmax) + absmax * 2.0**-20
        per_block[absmax < FLUSH_BELOW] = FLUSH_BELOW
        bound = np.repeat(per_block, b)[:n] + _f32_rounding_bound(x64)
        return bound.reshape(arr.shape)


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


# --- Top-k sparsification -------------------------------------------------------------------------


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
    indices then float32 values: ``8 * k`` bytes; every other entry decodes to zero.

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
        if flat.size >= 1 << 32:
            raise ValueError(f"topk: tensors of {flat.size} elements exceed uint32 indices")
        _finite_abs_max(flat, self.name)
        k = self.num_kept(flat.size)
        indices = top_k_indices(np.abs(flat), k)
        return indices.astype(_U32).tobytes() + flat[indices].astype(_F32).tobytes()

    def decode(self, payload: bytes, shape: tuple[int, ...]) -> np.ndarray:
        view, dims = self._payload_view(payload, shape)
        n = math.prod(dims)
        k = self.num_kept(n)
        raw = np.frombuffer(view, dtype=np.uint8)
        indices = raw[: 4 * k].view(_U32).astype(np.int64)
        values = raw[4 * k :].view(_F32).astype(np.float32)
        if k and (indices[-1] >= n or np.any(indices[1:] <= indices[:-1])):
            raise MalformedError(f"topk: payload indices must be strictly increasing and below {n}")
        _finite_abs_max(values, self.name, "payload")
        out = np.zeros(n, dtype=np.float32)
        out[indices] = values
        return out.reshape(dims)

    def error_bound(self, x: Any) -> np.ndarray:
        arr = as_float_array(x, self.name)
        x64 = arr.astype(np.float64)
        a32 = np.abs(_flat_f32(arr))
        k = self.num_kept(a32.size)
        kth = 0.0 if k in (0, a32.size) else float(np.partition(a32, a32.size - k)[a32.size - k])
        return kth + _f32_rounding_bound(x64)


_missing = [name for name in REQUIRED_CODECS if name not in CODECS]
if _missing:  # pragma: no cover - guards against a codec class losing its registration
    raise ImportError(f"comms.codecs: required codecs not registered: {_missing}")


# --- Error feedback -------------------------------------------------------------------------------


class ErrorFeedback:
    """Per-tensor residuals of a lossy codec, carried into the next round.

    ``compress(name, x, codec)`` sends ``Q(x + e)`` and keeps ``e' = (x + e) - Q(x + e)``, so
    over any number of rounds ``sum(decoded) + residual == sum(inputs)`` up to float32
    rounding. If encoding raises (NaN input, say), the residual is left as it was.
    Not thread-safe: one instance belongs to one sender.
    """

    def __init__(self) -> None:
        self._residuals: dict[str, np.ndarray] = {}

    def compress(self, name: str, x: Any, codec: Codec) -> bytes:
        arr = as_float_array(x, codec.name)
        corrected = np.array(arr, dtype=np.float32, order="C")  # always a fresh copy
        residual = self._residuals.get(name)
        if residual is not None:
            if residual.shape != corrected.shape:
                raise ValueError(
                    f"error feedback: tensor {name!r} has shape {corrected.shape} but its "
                    f"residual has shape {residual.shape}; call reset() when the model changes"
                )
            corrected += residual
        payload = codec.encode(corrected)
        decoded = codec.decode(payload, corrected.shape)
        np.subtract(corrected, decoded, out=corrected)
        self._residuals[name] = corrected
        return payload

    def residuals(self) -> dict[str, np.ndarray]:
        """A copy of every residual, for snapshots."""
        return {name: r.copy() for name, r in self._residuals.items()}

    def load_residuals(self, residuals: dict[str, Any]) -> None:
        """Replace the residuals with ``residuals`` (as saved by ``residuals()``)."""
        loaded = {}
        for name, value in residuals.items():
            arr = np.array(as_float_array(value, "error feedback"), dtype=np.float32, order="C")
            _finite_abs_max(arr, "error feedback", f"residual {name!r}")
            loaded[name] = arr
        self._residuals = loaded

    def reset(self) -> None:
        self._residuals.clear()
