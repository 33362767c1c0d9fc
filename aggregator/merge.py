"""Staleness-weighted merging of pseudo-gradients, flat or as a tree of partial sums.

A merge computes the weighted mean of the admitted deltas (FedBuff, Nguyen et al. 2022,
Algorithm 1, server side; FedAsync, Xie et al. 2019, for the staleness weights)::

    mean = sum_i w_i * delta_i / sum_i w_i,    w_i = f(s_i) [* n_i]

where ``f`` is a staleness function (:mod:`aggregator.staleness`) and ``n_i`` an optional
number of samples or inner steps behind update ``i``. The root hands ``mean`` to the outer
optimizer as the pseudo-gradient (DiLoCo, Douillard et al. 2023, Algorithm 1, line 12).

Both sums are additive, so the merge is done as a tree (LIFL, Qi et al., MLSys 2024: leaf /
middle / top aggregators with eager aggregation): a leaf :func:`accumulate`-s raw deltas into a
:class:`PartialAggregate`, a parent :func:`combine`-s its children's partials, and the root
:func:`finalize`-s once. A tree gives the flat result up to float32 summation order. Each
partial carries the ``(sender, sequence)`` ids it holds, so a parent can prove every update
was counted exactly once (an id seen twice raises :class:`~comms.errors.ReplayError`).

:class:`FedBuffBuffer` is the leaf's buffering rule as a pure state machine: it flushes after
``K`` updates or when its oldest update has waited ``deadline_s``, whichever comes first. Time
is passed in (``now``), there is no clock inside.

Arithmetic is float32, in place; the weighted add runs block by block with one small scratch
buffer, so merging a delta allocates no model-sized temporary. The first delta of a partial is
scaled straight into its buffer (one pass; a flushed partial's buffers can be handed on as
``spare``, so a service reuses them instead of faulting in fresh pages every flush), and a
weight of exactly 1 (a fresh update under FedBuff's weights) is a plain add; both give the
same bits as the general path. A delta from a sparse codec may be a
:class:`~comms.codecs.SparseTensor` (its nonzero entries): it is added at its indices only, in
``O(k)`` with no dense copy, and the sum equals that of its dense form (adding 0 leaves an entry
as it was, up to the sign of a zero). No I/O, no threads, no torch: a caller that shares a partial between threads holds its own lock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from aggregator.staleness import (
    DEFAULT_STALENESS_FUNCTION,
    Admission,
    StalenessFunction,
    admit,
    get_staleness_function,
)
from comms.codecs.base import SparseTensor
from comms.errors import ReplayError, ShapeMismatchError

Params = dict[str, np.ndarray]
UpdateId = tuple[str, int]  # (sender peer id, sender's sequence number)

# Elements per block of the scaled add: 256 Ki float32 = 1 MiB of scratch. Measured on a 2-core
# EPYC (1 MiB L2 per core), 4 adds of 64 MiB: 128 Ki blocks ran at 0.63x numpy's plain a += b,
# 256 Ki at 0.72x, 512 Ki and 1 Mi no better; smaller blocks pay numpy's per-call overhead.
_BLOCK = 1 << 18


class EmptyAggregateError(ValueError):
    """A partial aggregate with no contribution was finalized or flushed."""


class NonFiniteMergeError(ValueError):
    """Finite updates whose float32 merge is not finite: a weighted sum (or the outer step
    on it) overflowed. Nothing built on it may be published."""


def nonfinite_tensors(params: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the tensors holding NaN or Inf (min and max: no model-sized temporary)."""
    return sorted(
        name
        for name, x in params.items()
        if x.size and not (np.isfinite(x.max()) and np.isfinite(x.min()))
    )


def check_finite(params: Mapping[str, np.ndarray], what: str) -> None:
    """Raise :class:`NonFiniteMergeError` naming the tensors of ``params`` that are not finite."""
    bad = nonfinite_tensors(params)
    if bad:
        raise NonFiniteMergeError(
            f"{what} is not finite in {len(bad)} tensor(s) ({', '.join(bad[:5])}): a float32 "
            "overflow of finite updates"
        )


@dataclass
class PartialAggregate:
    """A weighted sum of deltas not yet divided by its weight (one node of the merge tree)."""

    weight_sum: float = 0.0
    weighted_sum: Params = field(default_factory=dict)  # name -> float32 array, sum_i w_i*d_i
    count: int = 0
    max_staleness: int = 0
    contributors: set[UpdateId] = field(default_factory=set)
    # island work merged: each update min(1, steps / every) of a full round (1 when its meta
    # does not say); the root takes work / buffer_k of an outer step (aggregator.root)
    work: float = 0.0
    # Buffers of a finished partial, reused by the first delta merged here (no page faults on
    # a fresh model-sized buffer at every flush); not part of the value.
    spare: Params = field(default_factory=dict, repr=False, compare=False)

    @property
    def empty(self) -> bool:
        return self.count == 0

    def buffer_for(self, name: str, like: np.ndarray) -> np.ndarray | None:
        """A spare float32 buffer shaped like ``like`` for tensor ``name``, or None."""
        buf = self.spare.pop(name, None)
        if buf is not None and buf.shape == like.shape and buf.flags.writeable:
            return buf
        return None


@dataclass(frozen=True)
class Update:
    """A decoded, verified delta as the merge sees it."""

    sender: str
    sequence: int
    base_version: int
    delta: Mapping[str, np.ndarray]
    num_samples: int | None = None  # samples (or inner steps) behind the delta, if weighted by it

    @property
    def update_id(self) -> UpdateId:
        return (self.sender, self.sequence)


def update_weight(staleness_weight: float, num_samples: int | None = None) -> float:
    """The merge weight of one update: its staleness weight, times ``num_samples`` if given."""
    if num_samples is None:
        return float(staleness_weight)
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive when given, got {num_samples}")
    return float(staleness_weight) * num_samples


def scaled_add_(acc: np.ndarray, x: np.ndarray, weight: np.float32) -> None:
    """``acc += weight * x`` in float32, in place, block by block (no full-size temporary).

    ``acc`` must be a C-contiguous float32 array; ``x`` any floating array of the same shape
    (cast to float32 block by block). A weight of exactly 1 is one plain add (same bits).
    """
    if acc.dtype != np.float32 or not acc.flags.c_contiguous or not acc.flags.writeable:
        raise ValueError("scaled_add_: acc must be a writable C-contiguous float32 array")
    flat_acc = acc.reshape(-1)  # a view: acc is contiguous
    if isinstance(x, SparseTensor):  # only the kept entries: the rest add 0
        _check_sparse(x, flat_acc.size)
        flat_acc[x.indices] += np.multiply(x.values, weight, dtype=np.float32)
        return
    flat_x = x.reshape(-1)  # a view unless x is not contiguous
    if weight == 1:  # 1 * x is x exactly: one add, no scratch
        np.add(flat_acc, flat_x, out=flat_acc, dtype=np.float32)
        return
    n = flat_acc.size
    scratch = np.empty(min(n, _BLOCK), dtype=np.float32)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        buf = scratch[: stop - start]
        acc_block = flat_acc[start:stop]
        np.multiply(flat_x[start:stop], weight, out=buf, dtype=np.float32)
        np.add(acc_block, buf, out=acc_block)


def scaled_copy(x: np.ndarray, weight: np.float32, out: np.ndarray | None = None) -> np.ndarray:
    """``weight * x`` as a C-contiguous float32 array (``out`` when given, else a new one), in
    one pass (``0 + weight * x`` without the zero fill: the bits :func:`scaled_add_` gives into
    zeros, up to the sign of a zero)."""
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    if isinstance(x, SparseTensor):
        _check_sparse(x, out.size)
        out.fill(0)
        out.reshape(-1)[x.indices] = np.multiply(x.values, weight, dtype=np.float32)
    elif weight == 1:
        np.copyto(out, x, casting="same_kind")
    else:
        np.multiply(x, weight, out=out, dtype=np.float32)
    return out


def scale_tensor(x: np.ndarray | SparseTensor, scale: float | np.float32):
    """``scale * x`` as a new float32 tensor of the same kind (a clipped update's data)."""
    if isinstance(x, SparseTensor):
        return x.scaled(scale)
    return np.multiply(x, scale, dtype=np.float32)


def _check_sparse(x: SparseTensor, size: int) -> None:
    """A :class:`SparseTensor` from a codec holds distinct indices in range (its decoder checked
    them); one built elsewhere is checked here, since a repeated index would be added once."""
    idx = x.indices
    if idx.ndim != 1 or idx.shape != x.values.shape:
        raise ShapeMismatchError(f"sparse tensor: {idx.shape} indices for {x.values.shape} values")
    if idx.size and (idx[0] < 0 or idx[-1] >= size or np.any(idx[1:] <= idx[:-1])):
        raise ShapeMismatchError(
            f"sparse tensor: indices must be strictly increasing and in [0, {size})"
        )


def _check_weight(weight: float) -> np.float32:
    w = np.float32(weight)
    if not (math.isfinite(weight) and np.isfinite(w) and w > 0):
        raise ValueError(f"merge weight must be a finite positive number, got {weight!r}")
    return w


def _check_like(partial: PartialAggregate, delta: Mapping[str, np.ndarray]) -> None:
    if not partial.weighted_sum:
        for name, x in delta.items():
            if not np.issubdtype(x.dtype, np.floating):
                raise ShapeMismatchError(f"tensor {name!r}: expected floating dtype, got {x.dtype}")
        return
    if delta.keys() != partial.weighted_sum.keys():
        missing = sorted(partial.weighted_sum.keys() - delta.keys())
        extra = sorted(delta.keys() - partial.weighted_sum.keys())
        raise ShapeMismatchError(
            f"delta's tensor names differ from the aggregate's: missing {missing}, extra {extra}"
        )
    for name, x in delta.items():
        want = partial.weighted_sum[name].shape
        if x.shape != want:
            raise ShapeMismatchError(f"tensor {name!r}: shape {x.shape}, expected {want}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ShapeMismatchError(f"tensor {name!r}: expected floating dtype, got {x.dtype}")


def accumulate(
    partial: PartialAggregate,
    delta: Mapping[str, np.ndarray],
    weight: float,
    *,
    update_id: UpdateId | None = None,
    staleness: int = 0,
    work: float = 1.0,
) -> PartialAggregate:
    """Add ``weight * delta`` into ``partial`` in place (float32) and return ``partial``.

    The first delta fixes the tensor names and shapes; later ones must match them
    (:class:`~comms.errors.ShapeMismatchError`). ``update_id`` is recorded for the exactly-once
    check; an id already in ``partial`` raises :class:`~comms.errors.ReplayError` and leaves
    ``partial`` unchanged.
    """
    w = _check_weight(weight)
    if update_id is not None and update_id in partial.contributors:
        raise ReplayError(f"update {update_id} is already in this aggregate", reason="duplicate")
    _check_like(partial, delta)
    if not partial.weighted_sum:
        partial.weighted_sum = {
            name: scaled_copy(x, w, partial.buffer_for(name, x)) for name, x in delta.items()
        }
        partial.spare.clear()
    else:
        for name, x in delta.items():
            scaled_add_(partial.weighted_sum[name], x, w)
    # Sum the weights as rounded to float32, the factor each delta was really scaled by.
    partial.weight_sum += float(w)
    partial.count += 1
    partial.work += float(work)
    partial.max_staleness = max(partial.max_staleness, int(staleness))
    if update_id is not None:
        partial.contributors.add(update_id)
    return partial


def merge_into(target: PartialAggregate, source: PartialAggregate) -> PartialAggregate:
    """Add ``source`` into ``target`` in place and return ``target`` (``source`` is unchanged).

    Raises :class:`~comms.errors.ReplayError` if both hold the same update id (an update that
    would be counted twice) and leaves ``target`` unchanged.
    """
    if source.empty:
        return target
    twice = target.contributors & source.contributors
    if twice:
        raise ReplayError(
            f"{len(twice)} update(s) present in both partial aggregates, e.g. {min(twice)}; "
            "each update must reach the root exactly once",
            reason="duplicate",
        )
    _check_like(target, source.weighted_sum)
    if not target.weighted_sum:
        target.weighted_sum = {
            name: scaled_copy(x, np.float32(1), target.buffer_for(name, x))
            for name, x in source.weighted_sum.items()
        }
        target.spare.clear()
    else:
        for name, x in source.weighted_sum.items():
            np.add(target.weighted_sum[name], x, out=target.weighted_sum[name])
    target.weight_sum += source.weight_sum
    target.count += source.count
    target.work += source.work
    target.max_staleness = max(target.max_staleness, source.max_staleness)
    target.contributors |= source.contributors
    return target


def combine(a: PartialAggregate, b: PartialAggregate) -> PartialAggregate:
    """A new partial holding both ``a`` and ``b`` (what a parent does with its children's)."""
    return merge_into(merge_into(PartialAggregate(), a), b)


def combine_all(partials: Iterable[PartialAggregate]) -> PartialAggregate:
    """A new partial holding every partial in ``partials``."""
    out = PartialAggregate()
    for p in partials:
        merge_into(out, p)
    return out


def finalize(partial: PartialAggregate) -> Params:
    """The weighted mean ``weighted_sum / weight_sum`` as new float32 arrays.

    Raises :class:`NonFiniteMergeError` if the mean is not finite: the deltas were admitted
    finite, so their float32 weighted sum overflowed (large-but-finite updates)."""
    if partial.empty or partial.weight_sum <= 0:
        raise EmptyAggregateError(
            "cannot finalize an empty partial aggregate: no update was merged "
            "(wait for updates, or skip this round)"
        )
    denom = np.float32(partial.weight_sum)
    mean = {name: np.divide(x, denom, dtype=np.float32) for name, x in partial.weighted_sum.items()}
    check_finite(mean, f"the weighted mean of {partial.count} update(s)")
    return mean


class FedBuffBuffer:
    """A leaf's buffer: admits updates, merges them eagerly, flushes every K or on a deadline.

    Call order: ``add`` each verified update; after each ``add`` (and on a timer that wakes at
    :meth:`next_deadline`), ask :meth:`should_flush`; when true, :meth:`flush` and send the
    partial up the tree. ``now`` is any monotonic clock in seconds, supplied by the caller.
    """

    def __init__(
        self,
        k: int,
        deadline_s: float | None = None,
        *,
        staleness_fn: str | StalenessFunction = DEFAULT_STALENESS_FUNCTION,
        max_staleness: int | None = None,
        weight_by_samples: bool = False,
    ):
        if k < 1:
            raise ValueError(f"FedBuff buffer size k must be at least 1, got {k}")
        if deadline_s is not None and not deadline_s > 0:
            raise ValueError(f"deadline_s must be positive or None, got {deadline_s}")
        self.k = int(k)
        self.deadline_s = deadline_s
        self.staleness_fn = get_staleness_function(staleness_fn)
        self.max_staleness = max_staleness
        self.weight_by_samples = weight_by_samples
        self._partial = PartialAggregate()
        self._oldest_at: float | None = None

    def __len__(self) -> int:
        return self._partial.count

    @property
    def oldest_at(self) -> float | None:
        """When the oldest buffered update arrived (``None`` when empty)."""
        return self._oldest_at

    def add(self, update: Update, *, now: float, v_now: int) -> Admission:
        """Merge ``update`` if it is fresh enough; returns the admission (reason when dropped).

        Raises :class:`~aggregator.staleness.FutureBaseVersionError`,
        :class:`~comms.errors.ReplayError` or :class:`~comms.errors.ShapeMismatchError` on bad
        input, leaving the buffer unchanged.
        """
        verdict = admit(update.base_version, v_now, self.max_staleness)
        if not verdict.ok:
            return verdict
        samples = update.num_samples if self.weight_by_samples else None
        weight = update_weight(self.staleness_fn(verdict.staleness), samples)
        accumulate(
            self._partial,
            update.delta,
            weight,
            update_id=update.update_id,
            staleness=verdict.staleness,
        )
        if self._oldest_at is None:
            self._oldest_at = now
        return verdict

    def next_deadline(self) -> float | None:
        """The time at which the deadline forces a flush (``None``: empty or no deadline)."""
        if self._oldest_at is None or self.deadline_s is None:
            return None
        return self._oldest_at + self.deadline_s

    def should_flush(self, now: float) -> bool:
        """True when K updates are buffered or the oldest one has waited ``deadline_s``."""
        if self._partial.count >= self.k:
            return True
        deadline = self.next_deadline()
        return deadline is not None and now >= deadline

    def flush(self) -> PartialAggregate:
        """Hand over the buffered partial aggregate and start an empty one."""
        if self._partial.empty:
            raise EmptyAggregateError("nothing to flush: the buffer holds no update")
        out, self._partial, self._oldest_at = self._partial, PartialAggregate(), None
        return out
