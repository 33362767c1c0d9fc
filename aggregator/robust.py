"""Robust aggregation rules, split by whether they compose across the merge tree.

Composable (a tree of partial sums gives the flat result):

- :func:`clip_by_norm`: each update is scaled to L2 norm at most ``max_norm``, the norm taken
  over all its tensors together: ``x <- x * min(1, max_norm / ||x||)``. It acts on one update
  before it is accumulated, so any tree of sums of clipped updates is exact.
- Centered clipping (Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
  Optimization", ICML 2021, eq. (CC))::

      v <- v + (1/n) sum_i clip_tau(x_i - v),   clip_tau(z) = z * min(1, tau / ||z||)

  from a reference ``v`` such as the previous aggregate. With a reference every node knows,
  one iteration is a mean of per-update residuals: a leaf accumulates
  :func:`centered_clip_residual` of each update into a ``PartialAggregate`` (weights as usual),
  parents combine, and the root returns ``recenter(v, finalize(partial))``. That is exact
  across a tree. More iterations re-center on the new ``v`` and need every update in one place:
  :func:`centered_clip` with ``iterations > 1`` is a leaf-only rule.

Leaf-only (they take the list of raw updates, never partial sums, and refuse a
``PartialAggregate``): :func:`coordinate_median` and :func:`trimmed_mean`. They do NOT compose
across levels: a median of medians is not the median of all updates (e.g. medians of
{0, 0, 9} and {1, 9, 9} are 0 and 9, whose median is 4.5, while the median of all six is 5),
and a trimmed mean of trimmed means drops different points than one trim over all updates.
Use them at a leaf over its own islands, and pass the result up as one update.

Pure numpy, float32 results (norms are accumulated in float64), no I/O, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from aggregator.merge import PartialAggregate, scale_tensor
from comms.codecs.base import SparseTensor
from comms.errors import NonFiniteError, ShapeMismatchError

Params = dict[str, np.ndarray]

# The rules that may run at any level of the tree, and those that belong at a leaf.
TREE_COMPOSABLE = frozenset({"clip_by_norm", "centered_clip_residual"})
LEAF_ONLY = frozenset({"centered_clip", "coordinate_median", "trimmed_mean"})

_BLOCK = 1 << 16


def sum_of_squares(x: np.ndarray) -> float:
    """``sum(x**2)`` accumulated in float64, block by block (no model-sized temporary).

    ``einsum``, not ``np.dot``: a dot goes to a multithreaded BLAS, whose threads cost 25 ms
    per 64 Ki block on a busy two-core machine (0.03 ms here).
    """
    if isinstance(x, SparseTensor):  # the zeros add nothing
        values = x.values.astype(np.float64)
        return float(np.einsum("i,i->", values, values))
    flat = x.reshape(-1)
    total = 0.0
    for start in range(0, flat.size, _BLOCK):
        block = flat[start : start + _BLOCK].astype(np.float64)
        total += float(np.einsum("i,i->", block, block))
    return total


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of an update, over all its tensors together (accumulated in float64)."""
    return math.sqrt(sum(sum_of_squares(x) for x in delta.values()))


def clip_scale(norm: float, max_norm: float) -> float:
    """``min(1, max_norm / norm)``: the factor that brings an update of ``norm`` under the bound."""
    if not math.isfinite(norm):
        raise NonFiniteError(f"update norm is {norm}; the update holds NaN or Inf")
    return 1.0 if norm <= max_norm else max_norm / norm


def _check_max_norm(max_norm: float, what: str) -> None:
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"{what} must be a finite positive number, got {max_norm!r}")


def clip_by_norm(delta: Mapping[str, np.ndarray], max_norm: float) -> Params:
    """``delta`` scaled so that its global L2 norm is at most ``max_norm``.

    Returns a new dict; when no scaling is needed its arrays are the input arrays themselves
    (not copies), otherwise new float32 arrays.
    """
    _check_max_norm(max_norm, "max_norm")
    scale = clip_scale(update_norm(delta), max_norm)
    if scale == 1.0:
        return dict(delta)
    s = np.float32(scale)
    return {name: scale_tensor(x, s) for name, x in delta.items()}


def _residual(x: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Params:
    if x.keys() != reference.keys():
        raise ShapeMismatchError(
            f"update names differ from the reference's: {sorted(x.keys() ^ reference.keys())}"
        )
    out = {}
    for name, ref in reference.items():
        if x[name].shape != ref.shape:
            raise ShapeMismatchError(
                f"tensor {name!r}: shape {x[name].shape}, expected {ref.shape}"
            )
        out[name] = np.subtract(x[name], ref, dtype=np.float32)
    return out


def centered_clip_residual(
    x: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], tau: float
) -> Params:
    """``clip_tau(x - reference)``: one update's term of centered clipping (composable)."""
    _check_max_norm(tau, "tau")
    return clip_by_norm(_residual(x, reference), tau)


def recenter(
    reference: Mapping[str, np.ndarray], mean_residual: Mapping[str, np.ndarray]
) -> Params:
    """``reference + mean_residual``: the root's last step of tree-wide centered clipping."""
    return {
        name: np.add(ref, mean_residual[name], dtype=np.float32) for name, ref in reference.items()
    }


def _require_raw_updates(updates: Sequence[Mapping[str, np.ndarray]], rule: str) -> None:
    if isinstance(updates, PartialAggregate) or any(
        isinstance(u, PartialAggregate) for u in updates
    ):
        raise TypeError(
            f"{rule} needs the raw updates, not partial aggregates: it does not compose across "
            "the merge tree; run it at a leaf over that leaf's own updates"
        )
    if len(updates) == 0:
        raise ValueError(f"{rule}: no update to aggregate")
    first = updates[0]
    for i, u in enumerate(updates[1:], start=1):
        if u.keys() != first.keys():
            raise ShapeMismatchError(f"{rule}: update {i} has other tensor names than update 0")
        for name, x in u.items():
            if x.shape != first[name].shape:
                raise ShapeMismatchError(
                    f"{rule}: update {i} tensor {name!r} has shape {x.shape}, "
                    f"update 0 has {first[name].shape}"
                )


def centered_clip(
    updates: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    tau: float,
    iterations: int = 1,
) -> Params:
    """Centered clipping over raw updates: ``iterations`` rounds of
    ``v <- v + mean_i clip_tau(x_i - v)`` starting at ``v = reference``.

    With ``iterations == 1`` this equals the tree-wide form (residuals accumulated with equal
    weights, then :func:`recenter`); with more it is a leaf-only rule.
    """
    _require_raw_updates(updates, "centered_clip")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    n = np.float32(len(updates))
    v = {name: np.asarray(x, dtype=np.float32).copy() for name, x in reference.items()}
    for _ in range(iterations):
        total = {name: np.zeros_like(x) for name, x in v.items()}
        for x in updates:
            for name, r in centered_clip_residual(x, v, tau).items():
                np.add(total[name], r, out=total[name])
        for name in v:
            np.add(v[name], np.divide(total[name], n, dtype=np.float32), out=v[name])
    return v


def _stack(updates: Sequence[Mapping[str, np.ndarray]], name: str) -> np.ndarray:
    return np.stack([np.asarray(u[name], dtype=np.float32) for u in updates])  # (n, *shape)


def coordinate_median(updates: Sequence[Mapping[str, np.ndarray]]) -> Params:
    """The coordinate-wise median of raw updates (mean of the two middle values when the
    count is even). Leaf-only: it does not compose across the merge tree."""
    _require_raw_updates(updates, "coordinate_median")
    return {
        name: np.median(_stack(updates, name), axis=0).astype(np.float32, copy=False)
        for name in updates[0]
    }


def trimmed_mean(updates: Sequence[Mapping[str, np.ndarray]], trim_fraction: float) -> Params:
    """The coordinate-wise mean after dropping the ``floor(trim_fraction * n)`` largest and as
    many smallest values of each coordinate. Leaf-only: it does not compose across the tree."""
    _require_raw_updates(updates, "trimmed_mean")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    n = len(updates)
    k = math.floor(trim_fraction * n)
    out = {}
    for name in updates[0]:
        stacked = np.sort(_stack(updates, name), axis=0)  # (n, *shape)
        out[name] = np.mean(stacked[k : n - k], axis=0, dtype=np.float32)
    return out
