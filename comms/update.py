"""Named tensors in and out of envelopes: the one place codecs meet the envelope.

``encode_update`` compresses a dict of arrays with a codec (and error feedback, for a sender
that keeps what the codec lost), lays them into an ``Envelope`` and signs it.
``decode_update`` checks an envelope against a ``Manifest`` (names, shapes, dtypes) and
returns float32 arrays, refusing non-finite values. A ``Manifest`` describes one model's
parameters; the aggregator keeps one per ``model_id`` and refuses updates that disagree.

Pure functions (numpy only; torch tensors are accepted by duck typing, never imported).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from comms.codecs import (
    Codec,
    ErrorFeedback,
    SparseTensor,
    as_float_array,
    codec_from_spec,
    get_codec,
)
from comms.envelope import Envelope, TensorSpec
from comms.errors import ConfigError, MalformedError, NonFiniteError, ShapeMismatchError
from comms.identity import Identity


@dataclass(frozen=True)
class Manifest:
    """Names, shapes and source dtypes of one model's parameters, in a fixed order."""

    tensors: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def from_arrays(cls, params: Mapping[str, Any]) -> Manifest:
        items = []
        for name, value in params.items():
            dtype = str(getattr(value, "dtype", "float32")).removeprefix("torch.")
            items.append((name, tuple(int(d) for d in value.shape), dtype))
        return cls(tuple(items))

    @property
    def names(self) -> list[str]:
        return [t[0] for t in self.tensors]

    @property
    def numel(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _ in self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        for n, shape, _ in self.tensors:
            if n == name:
                return shape
        raise ShapeMismatchError(f"tensor {name!r} is not in the model's manifest")

    def to_dict(self) -> dict:
        return {"tensors": [[n, list(s), d] for n, s, d in self.tensors]}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Manifest:
        try:
            return cls(
                tuple((str(n), tuple(int(x) for x in s), str(d)) for n, s, d in doc["tensors"])
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"bad manifest: {e}") from e

    def check(self, specs: tuple[TensorSpec, ...], model_id: str = "") -> None:
        """Refuse an envelope whose tensors are not exactly this manifest's."""
        got = {s.name: s for s in specs}
        want = {n: (shape, dtype) for n, shape, dtype in self.tensors}
        where = f" for model {model_id!r}" if model_id else ""
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        if missing or extra:
            raise ShapeMismatchError(
                f"update{where} does not match the manifest: missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        for name, (shape, dtype) in want.items():
            spec = got[name]
            if tuple(spec.shape) != shape:
                raise ShapeMismatchError(
                    f"tensor {name!r}{where} has shape {tuple(spec.shape)}; expected {shape}"
                )
            if spec.dtype != dtype:
                raise ShapeMismatchError(
                    f"tensor {name!r}{where} has dtype {spec.dtype}; expected {dtype}"
                )


def expected_nbytes(codec_spec: dict, shape: tuple[int, ...]) -> int:
    """The payload size a codec spec implies for a shape (the envelope's size hook)."""
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return codec_from_spec(codec_spec).encoded_nbytes(numel)


def encode_update(
    tensors: Mapping[str, Any],
    *,
    codec: Codec | str | dict,
    model_id: str,
    kind: str,
    sender: str,
    sequence: int,
    base_version: int = 0,
    meta: dict | None = None,
    error_feedback: ErrorFeedback | None = None,
    identity: Identity | None = None,
) -> Envelope:
    """Compress ``tensors`` with ``codec`` into an envelope, signed when ``identity`` is given."""
    codec = codec if isinstance(codec, Codec) else get_codec(codec)
    parts = []
    for name, value in tensors.items():
        dtype = str(getattr(value, "dtype", "float32")).removeprefix("torch.")
        if error_feedback is not None:
            payload = error_feedback.compress(name, value, codec)
        else:
            payload = codec.encode(value)
        parts.append((name, tuple(int(d) for d in value.shape), dtype, codec.spec(), payload))
    env = Envelope.build(
        model_id=model_id,
        kind=kind,
        sender=sender,
        sequence=sequence,
        tensors=parts,
        base_version=base_version,
        meta=meta,
    )
    return env.sign(identity) if identity is not None else env


def decode_update(
    env: Envelope, manifest: Manifest | None = None, sparse: bool = False
) -> dict[str, np.ndarray | SparseTensor]:
    """The envelope's tensors as float32 arrays, checked against ``manifest`` if given. With
    ``sparse``, a tensor of a sparse codec comes as a :class:`~comms.codecs.SparseTensor`
    (for a merge, which adds it without densifying it)."""
    if manifest is not None:
        manifest.check(env.header.tensors, env.header.model_id)
    out = {}
    for spec, payload in env.tensors():
        try:
            codec = codec_from_spec(spec.codec)
        except ConfigError as e:
            raise MalformedError(f"tensor {spec.name!r}: {e}") from e
        array = codec.decode_sparse(payload, tuple(spec.shape)) if sparse else None
        if array is None:
            array = codec.decode(payload, tuple(spec.shape))
        values = array.values if isinstance(array, SparseTensor) else array
        if not np.isfinite(values).all():  # codecs refuse this already; never let one through
            raise NonFiniteError(f"tensor {spec.name!r} decodes to non-finite values")
        out[spec.name] = array
    return out


def check_same_layout(want: Mapping[str, Any], got: Mapping[str, Any], what: str) -> None:
    """Raise ShapeMismatchError unless ``got`` has exactly ``want``'s names and shapes."""
    if want.keys() != got.keys():
        missing = sorted(want.keys() - got.keys())
        extra = sorted(got.keys() - want.keys())
        raise ShapeMismatchError(
            f"{what}: tensor names differ from the model's: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    for name, value in got.items():
        if tuple(value.shape) != tuple(want[name].shape):
            raise ShapeMismatchError(
                f"{what}: tensor {name!r} has shape {tuple(value.shape)}, "
                f"the model has {tuple(want[name].shape)}"
            )


def apply_update(
    theta: dict[str, np.ndarray], u: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``theta <- theta + u`` in place, in float32, tensor by tensor in sorted-name order.

    The replica rule: the root, every aggregator's replica and every island's anchor apply the
    same decoded ``u_v`` to the same ``theta_v`` with this one function and so hold the same
    bits for ``theta_{v+1}``. ``theta``'s arrays must be writable float32 numpy arrays and
    ``u`` must have exactly ``theta``'s names and shapes (a partial update would split the
    replicas); nothing is written unless every check passes. Returns ``theta``.
    """
    check_same_layout(theta, u, "update")
    for name in sorted(theta):
        p = theta[name]
        if not isinstance(p, np.ndarray) or p.dtype != np.float32 or not p.flags.writeable:
            raise ValueError(f"model tensor {name!r} must be a writable float32 numpy array")
    for name in sorted(theta):
        np.add(theta[name], u[name], out=theta[name], dtype=np.float32)
    return theta


def to_numpy(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """float32 numpy copies of a dict of arrays or torch tensors."""
    return {n: np.array(as_float_array(v, "to_numpy"), dtype=np.float32) for n, v in params.items()}
