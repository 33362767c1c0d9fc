"""A direction check on island updates: refuse a delta that points against the last merged step.

The norm bound (:mod:`aggregator.norm_bound`) limits how far one island moves the model, not
where: an island that pushes its honest update reversed (``-delta``, a sign-flip attacker)
sends an ordinary norm, cancels its own progress and subtracts as much again, so the merged
step of four islands is about half an honest one (docs/reliability.md, "Attacker table").

Every aggregator that admits island deltas holds, bit for bit, the last published update
``u_v`` (the root applies it, every replica adopts it). An island delta is a pseudo-gradient,
``anchor - params``, and ``u_v`` is a step applied to theta, so an honest delta points along
``-u_v``: its *agreement* (the cosine with the reference ``-u_v``, as in the direction tests of
Byzantine-robust learning that score updates against a trusted reference, e.g. Zeno, Xie et
al. ICML 2019, and FLTrust, Cao et al. NDSS 2021) is positive::

    agreement(delta) = <delta, -u_v> / (||delta|| ||u_v||)
    refuse  <=>  agreement < min_cos          (default 0: points against the last step)

measured on the attacker table's runs: honest deltas +0.09 to +0.71, a sign-flipped one
-0.70 to -0.08 (docs/reliability.md, "Direction check"). A refusal is a typed
``DirectionError``; an admitted delta is merged unchanged, so a WAL replay needs nothing new.

No reference (version 0, ``||u_v|| = 0``) or a zero delta: no check. At most
:func:`max_refusals` refusals per version (a minority of ``buffer_k``): if every island's
update turned against the last step (an overshooting outer optimizer), refusing them all
would keep the reference, and the model, where they are forever; past the cap they are
admitted and counted.

Pure numpy, float64 accumulation, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np

from aggregator.robust import update_norm
from comms.codecs.base import SparseTensor
from comms.errors import ShapeMismatchError

DEFAULT_MIN_COS = 0.0  # docs/reliability.md, "Direction check": the measured honest minimum
ACTIONS = ("reject", "off")
_BLOCK = 1 << 16


class Reference(NamedTuple):
    """The last published update of one model line, against which deltas are scored."""

    version: int
    update: dict[str, np.ndarray]  # u_v as every replica applies it, float32
    norm: float  # ||u_v||, accumulated in float64


def reference_from_update(version: int, update: Mapping[str, np.ndarray]) -> Reference:
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in update.items()}
    return Reference(version, arrays, update_norm(arrays))


def dot(x: np.ndarray, y: np.ndarray) -> float:
    """``<x, y>`` accumulated in float64, block by block (no model-sized temporary)."""
    if isinstance(x, SparseTensor):  # only the kept entries of x count
        if x.size != y.size:
            raise ShapeMismatchError(f"cannot score a tensor of {x.size} values against {y.size}")
        return float(np.einsum("i,i->", x.values.astype(np.float64), y.reshape(-1)[x.indices]))
    a, b = x.reshape(-1), y.reshape(-1)
    if a.size != b.size:
        raise ShapeMismatchError(f"cannot score a tensor of {a.size} values against {b.size}")
    total = 0.0
    for start in range(0, a.size, _BLOCK):
        stop = start + _BLOCK
        total += float(np.einsum("i,i->", a[start:stop].astype(np.float64), b[start:stop]))
    return total


def update_dot(delta: Mapping[str, np.ndarray], reference: Reference) -> float:
    """``<delta, u_v>`` over all tensors (the names must be the reference's)."""
    if delta.keys() != reference.update.keys():
        raise ShapeMismatchError(
            f"update names differ from the reference's: {sorted(delta.keys() ^ reference.update)}"
        )
    return sum(dot(x, reference.update[name]) for name, x in sorted(delta.items()))


def agreement(dot_with_u: float, delta_norm: float, reference_norm: float) -> float | None:
    """The cosine of a delta with ``-u_v`` from ``<delta, u_v>`` and both norms; None where
    it is undefined (either norm 0) or not finite."""
    if not (delta_norm > 0 and reference_norm > 0):
        return None
    cos = -dot_with_u / (delta_norm * reference_norm)
    if not math.isfinite(cos):
        return None
    return max(-1.0, min(1.0, cos))  # rounding may step just outside [-1, 1]


def max_refusals(buffer_k: int) -> int:
    """Most refusals per version: a minority of the ``buffer_k`` updates a version merges
    (1 for K = 3 or 4), and at least 1."""
    return max(1, (buffer_k - 1) // 2)


def decide(cos: float | None, min_cos: float, refused_this_version: int, cap: int) -> str:
    """``"admit"``, ``"refused"`` (below ``min_cos``), or ``"over_cap"`` (below it, but this
    version already refused ``cap``: admitted and counted)."""
    if cos is None or cos >= min_cos:
        return "admit"
    return "refused" if refused_this_version < cap else "over_cap"


def check_min_cos(min_cos: float) -> None:
    if not (math.isfinite(min_cos) and -1.0 <= min_cos < 1.0):
        raise ValueError(f"min_cos must be in [-1, 1), got {min_cos!r}")


def quantiles(values: Iterable[float]) -> dict[str, float]:
    """min, median and max of recent agreements, for ``/status``."""
    v = sorted(values)
    if not v:
        return {}
    return {"min": v[0], "median": float(np.median(v)), "max": v[-1], "count": len(v)}
