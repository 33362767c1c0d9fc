"""The ``Codec`` base class, the registry by name, and the input checks every codec shares.

A codec turns one floating-point array into a payload (``encode``) and back into a float32
array (``decode``); it knows its exact payload size (``encoded_nbytes``) and a per-element
error bound (``error_bound``). ``register_codec`` adds a class to ``CODECS``; ``get_codec``
builds one from local config (ConfigError), ``codec_from_spec`` from a peer's spec
(MalformedError). Inputs are numpy arrays or torch tensors (duck typing; torch is never
imported); NaN and Inf are refused.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from comms.errors import ConfigError, MalformedError, NonFiniteError

_F32 = np.dtype("<f4")
_FLT_MAX = float(np.finfo(np.float32).max)
# Elements per working chunk: big enough that Python overhead vanishes, small enough that the
# float32 scratch buffer stays in the L2 cache.
_CHUNK_ELEMS = 1 << 17


REQUIRED_CODECS = ("none", "fp16", "bf16", "int8", "int4", "topk", "sparse2", "sign1")
# codecs that send a few entries and leave the rest to error feedback (decode_sparse works)
SPARSE_CODECS = frozenset({"topk", "sparse2"})


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


@dataclass(frozen=True)
class SparseTensor:
    """A decoded tensor held as its nonzero entries: ``values`` (float32) at the flat,
    strictly increasing ``indices`` (int64) of an array of ``shape``; every other entry is 0.
    What a sparse codec decodes to when the receiver can use it (:meth:`Codec.decode_sparse`):
    a merge adds it into an accumulator in ``O(k)``, with no dense temporary."""

    shape: tuple[int, ...]
    indices: np.ndarray
    values: np.ndarray
    dtype: ClassVar[np.dtype] = _F32

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def dense(self) -> np.ndarray:
        out = np.zeros(self.size, dtype=np.float32)
        out[self.indices] = self.values
        return out.reshape(self.shape)

    def scaled(self, factor: float | np.float32) -> SparseTensor:
        """``factor * self``, the product rounded to float32 as a dense multiply rounds it."""
        return SparseTensor(self.shape, self.indices, np.multiply(self.values, factor, dtype=_F32))


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

    def decode_sparse(self, payload: bytes, shape: tuple[int, ...]) -> SparseTensor | None:
        """The decoded tensor as its nonzero entries (sparse codecs), or None (dense codecs:
        use :meth:`decode`). Refuses exactly what ``decode`` refuses; ``decode_sparse(...).
        dense()`` is bit-identical to ``decode(...)``."""
        return None

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


def _block_absmax_bound(x: Any, codec_name: str, block: int, per_block) -> np.ndarray:
    """An error bound built per block: ``per_block(absmax)`` (float64, one per block of
    ``block`` elements of the float32-rounded ``|x|``) repeated over each block's elements,
    plus the float64 -> float32 conversion bound; shaped as ``x``."""
    arr = as_float_array(x, codec_name)
    x64 = arr.astype(np.float64).reshape(-1)
    n = x64.size
    padded = np.zeros(-(-n // block) * block)
    padded[:n] = np.abs(_flat_f32(arr))
    absmax = padded.reshape(-1, block).max(axis=1) if n else padded
    bound = np.repeat(per_block(absmax), block)[:n] + _f32_rounding_bound(x64)
    return bound.reshape(arr.shape)


def _f32_rounding_bound(x64: np.ndarray) -> np.ndarray:
    """Error of the float64 -> float32 conversion every codec starts with."""
    return np.abs(x64) * 2.0**-24 + 2.0**-150
