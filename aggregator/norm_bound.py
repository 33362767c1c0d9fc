"""An adaptive bound on the L2 norm of island updates: ``c`` times the median of recent ones.

One island can send any finite bytes that pass its signature; a delta scaled by 1e6 would move
the global model by 1e6 times an honest step. The aggregator bounds each island update's
influence by clipping it to a radius learnt from the updates it accepted (norm bounding against
model replacement: Sun et al., "Can You Really Backdoor Federated Learning?", 2019; the radius
as a running quantile of update norms: Andrew et al., "Differentially Private Learning with
Adaptive Clipping", NeurIPS 2021)::

    bound = c * median(n_1 .. n_W)              the last W accepted norms of this model
    scale = min(1, bound / ||delta||)           delta <- scale * delta (its weight unchanged)
    n_new = ||delta|| * scale = min(||delta||, bound)   what enters the window

Only the clipped norm enters the window, so an attacker cannot raise the bound by sending large
updates: each of its updates adds at most ``bound`` itself, and the median moves only when more
than half of the window comes from it.

Warm-up: with fewer than ``min_count`` norms there is no median worth trusting; the bound is
relative to the model's own size instead, ``warmup_ratio * ||theta||`` (``theta``: the root's
model, a leaf's or mid's replica; every line holds one before it serves, so an aggregator
always knows it). Where ``||theta|| = 0`` (a model initialised to zeros) no relative bound
exists: the median of the norms seen so far is used if there are any, otherwise the update is
not bounded (:meth:`NormBound.bound` returns None and the caller logs it). A median of 0 (most
recent updates exactly zero) falls back the same way, so a bound of 0 never zeroes every
update.

Clipping is linear and happens to each update before it is summed, so it composes across the
merge tree (:mod:`aggregator.robust`): a leaf's partial is a sum of bounded updates and its
parent does not bound it again.

Pure Python, no I/O, not thread-safe: the service changes a line's bound under its lock.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable

# Defaults; the measurements of honest updates behind them: docs/reliability.md, "Adaptive norm
# bound".
DEFAULT_FACTOR = 2.0
DEFAULT_WINDOW = 32
DEFAULT_MIN_COUNT = 8
DEFAULT_WARMUP_RATIO = 0.5


class NormBound:
    """The running bound of one model at one aggregator.

    Call order: :meth:`bound` before admitting an update (with the current ``||theta||``
    when :attr:`needs_theta`), then :meth:`observe` with ``norm * scale`` once the update is
    logged. :meth:`state` and :meth:`load` carry the window across restarts.
    """

    def __init__(
        self,
        factor: float = DEFAULT_FACTOR,
        window: int = DEFAULT_WINDOW,
        min_count: int = DEFAULT_MIN_COUNT,
        warmup_ratio: float = DEFAULT_WARMUP_RATIO,
    ):
        if not (math.isfinite(factor) and factor > 1):
            raise ValueError(f"factor must be a finite number > 1, got {factor!r}")
        if window < 1 or not 1 <= min_count <= window:
            raise ValueError(f"need window >= 1 and 1 <= min_count <= window, got {window}, "
                             f"{min_count}")  # fmt: skip
        if not (math.isfinite(warmup_ratio) and warmup_ratio > 0):
            raise ValueError(f"warmup_ratio must be a finite positive number, got {warmup_ratio!r}")
        self.factor = float(factor)
        self.window = int(window)
        self.min_count = int(min_count)
        self.warmup_ratio = float(warmup_ratio)
        self._norms: deque[float] = deque(maxlen=self.window)

    def __len__(self) -> int:
        return len(self._norms)

    def median(self) -> float | None:
        """The median of the window (mean of the two middle ones for an even count)."""
        return statistics.median(self._norms) if self._norms else None

    @property
    def warming_up(self) -> bool:
        """Fewer than ``min_count`` norms, or a median of 0: the bound is ``theta``-relative."""
        return len(self._norms) < self.min_count or not self.median()

    @property
    def needs_theta(self) -> bool:
        """:meth:`bound` will use ``||theta||`` (the caller may skip computing it otherwise)."""
        return self.warming_up

    def bound(self, theta_norm: float | None = None) -> float | None:
        """The largest admitted norm now; None when nothing bounds it (see the module doc)."""
        median = self.median()
        if len(self._norms) >= self.min_count and median:
            return self.factor * median
        if theta_norm is not None and math.isfinite(theta_norm) and theta_norm > 0:
            return self.warmup_ratio * theta_norm
        if median:
            return self.factor * median
        return None

    def observe(self, norm: float) -> None:
        """Add an accepted update's clipped norm (``min(norm, bound)``) to the window."""
        if not (math.isfinite(norm) and norm >= 0):
            raise ValueError(f"an update norm must be finite and >= 0, got {norm!r}")
        self._norms.append(float(norm))

    def state(self) -> list[float]:
        """The window, oldest first (for a WAL note or the root's saved state)."""
        return list(self._norms)

    def load(self, norms: Iterable[float]) -> None:
        """Replace the window by ``norms`` (oldest first; only the last ``window`` are kept)."""
        self._norms.clear()
        for n in norms:
            self.observe(float(n))


def clipped_norm(norm: float, scale: float) -> float:
    """What enters the window for an update of ``norm`` scaled by ``scale``: ``norm * scale``,
    computed the same way at admission and at WAL replay (so the window is rebuilt exactly)."""
    return norm * scale
