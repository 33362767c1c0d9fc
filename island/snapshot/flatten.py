"""Flattening a nested training state into named tensors plus a JSON tree, and back (pure).

Tensors and numpy arrays go to a flat ``{name: tensor}`` map under path-like names such as
``optimizer/state/3/exp_avg`` (tied tensors stored once); everything else stays in a JSON
tree where each tensor is a ``{"$tensor": name}`` reference and tuples, non-string keys, bytes
and numpy values are tagged with ``$`` keys, so the structure rebuilds exactly.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

# numpy dtypes stored as themselves (others as raw bytes); also the torch dtypes copied by numpy.
NATIVE_NUMPY = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"}
)


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


class Flattener:
    """Walks a nested state: tensors go to ``tensors`` (through ``store``), the rest to a JSON
    tree where tuples, non-string keys, bytes and numpy values are tagged with ``$`` keys."""

    def __init__(self, store):
        self.store = store  # (name, tensor) -> tensor kept for writing
        self.tensors: dict[str, torch.Tensor] = {}
        self._aliases: dict[tuple, str] = {}

    def _name(self, path: str) -> str:
        name, n = path, 1
        while name in self.tensors:
            name, n = f"{path}#{n}", n + 1
        return name

    def _tensor(self, t: torch.Tensor, path: str) -> dict[str, Any]:
        if t.layout != torch.strided:
            raise TypeError(f"snapshot: {path!r} is a {t.layout} tensor; only dense ones are kept")
        t = t.detach()
        storage = t.untyped_storage().data_ptr()
        key = (t.device, storage, t.storage_offset(), t.shape, t.stride(), t.dtype)
        if key in self._aliases:  # a tied weight: one copy, two references
            return {"$tensor": self._aliases[key]}
        name = self._name(path)
        self.tensors[name] = self.store(name, t)
        self._aliases[key] = name
        return {"$tensor": name}

    def _array(self, a: np.ndarray, path: str) -> dict[str, Any]:
        if a.dtype.hasobject:
            raise TypeError(f"snapshot: {path!r} is a numpy array of objects; cannot store it")
        a = np.ascontiguousarray(a)
        native = a.dtype.isnative and a.dtype.name in NATIVE_NUMPY
        t = torch.from_numpy(a if native else a.reshape(-1).view(np.uint8))
        name = self._name(path)
        self.tensors[name] = self.store(name, t)
        return {"$ndarray": name, "dtype": a.dtype.str, "shape": list(a.shape), "raw": not native}

    def encode(self, value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path)
        if isinstance(value, np.ndarray):
            return self._array(value, path)
        if isinstance(value, np.generic):
            return {**self._array(np.asarray(value), path), "scalar": True}
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, bytes):
            return {"$bytes": base64.b64encode(value).decode("ascii")}
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(v, _join(path, i)) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, _join(path, i)) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            if all(isinstance(k, str) and not k.startswith("$") for k in value):
                return {k: self.encode(v, _join(path, k)) for k, v in value.items()}
            pairs = [
                [self.encode(k, _join(path, "key")), self.encode(v, _join(path, k))]
                for k, v in value.items()
            ]
            return {"$dict": pairs}
        raise TypeError(
            f"snapshot: cannot store {type(value).__name__} at {path!r}; use tensors, numpy "
            "arrays, JSON scalars, lists, tuples and dicts"
        )


def unflatten(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild the structure :class:`Flattener` encoded, from the loaded tensors."""
    if isinstance(node, list):
        return [unflatten(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "$tensor" in node:
        return tensors[node["$tensor"]]
    if "$ndarray" in node:
        arr = tensors[node["$ndarray"]].numpy()
        if node["raw"]:
            arr = arr.view(np.dtype(node["dtype"]))
        arr = arr.reshape(node["shape"])
        return arr[()] if node.get("scalar") else arr
    if "$bytes" in node:
        return base64.b64decode(node["$bytes"])
    if "$tuple" in node:
        return tuple(unflatten(v, tensors) for v in node["$tuple"])
    if "$dict" in node:
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in node["$dict"]}
    return {k: unflatten(v, tensors) for k, v in node.items()}
