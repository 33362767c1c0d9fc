"""Where the global model is heading: the root's outer step replayed on an island (lookahead).

In overlapped mode a round's delta reaches the global model one version late: the next round
starts before the version that merges it arrives. ``rebase = "eager"`` starts that round
from ``anchor - own delta`` (the raw delta, undamped); ``rebase = "lookahead"`` starts it
where the root's outer step will most likely put the model: the outer step applied to the
anchor with the island's own in-flight delta standing in for the mean of all islands' deltas
(the proxy of eager updates for overlapped DiLoCo, Kale et al. 2025). With DiLoCo's Nesterov
momentum 0.9 most of an outer update is momentum, which the island can know exactly.

The island reconstructs the root's momentum from the versions it adopts. The root's step
(:class:`aggregator.outer.NesterovSGD`, ``torch.optim.SGD(nesterov=True)``) is::

    m_v = mu * m_{v-1} + g_v,        u_v = -lr * (g_v + mu * m_v)
        = -lr * ((1 + mu) * g_v + mu^2 * m_{v-1})

so from each published ``u_v`` and the previous momentum::

    g_v = (-u_v / lr - mu^2 * m_{v-1}) / (1 + mu),    m_v = mu * m_{v-1} + g_v.

A version the root took as the share ``f < 1`` of a step (fewer updates than its
``buffer_k``; meta ``fraction``) has ``m_v = mu^f m_{v-1} + f g_v`` and
``u_v = -lr f (g_v + mu m_v)``, so ``m_v = (-u_v / lr + mu^f m_{v-1}) / (1 + f mu)``
(``f = 1`` is the line above).

An error in ``m`` (the codec's rounding of ``u_v``, or a momentum unknown after a snapshot
download, taken as zero) shrinks by ``mu / (1 + mu)`` (0.47 at mu = 0.9) at every version, so
the replica is exact up to codec noise a few versions after any join (or a restart: the
replica is not saved in snapshots, it is rebuilt). Plain SGD (``mu = 0``) needs no state. The
island cannot see which outer step the root runs: lookahead assumes Nesterov with the
configured ``outer_lr`` / ``outer_momentum``; with another outer optimizer (CO2) use eager.

Pure numpy, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

Params = dict[str, np.ndarray]


class NesterovReplay:
    """The root's Nesterov momentum, rebuilt from the ``u_v`` an island adopts."""

    def __init__(self, lr: float, momentum: float):
        if not (lr > 0 and np.isfinite(lr)):
            raise ValueError(f"lookahead: outer lr must be a positive number, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"lookahead: outer momentum must be in [0, 1), got {momentum!r}")
        self.lr = np.float32(lr)
        self.mu = np.float32(momentum)
        self.momentum: Params = {}  # name -> m_v (float32); empty = zeros

    def reset(self) -> None:
        """Forget the momentum (after a snapshot download: unknown, taken as zero)."""
        self.momentum.clear()

    def observe(self, u: Mapping[str, np.ndarray], fraction: float = 1.0) -> None:
        """Advance the replica by one adopted version's update ``u_v``, which the root took
        as the share ``fraction`` of an outer step (its meta ``fraction``)."""
        if self.mu == 0:
            return
        if fraction != 1.0:
            self._observe_partial(u, float(fraction))
            return
        scale = np.float32(1) / (np.float32(1) + self.mu)
        for name, x in u.items():
            m = self.momentum.get(name)
            g = np.multiply(x, -1 / self.lr, dtype=np.float32)
            if m is not None:
                g -= self.mu * self.mu * m
            g *= scale
            if m is None:
                self.momentum[name] = g
            else:
                m *= self.mu
                m += g

    def _observe_partial(self, u: Mapping[str, np.ndarray], f: float) -> None:
        decay = np.float32(float(self.mu) ** f)
        scale = np.float32(1) / (np.float32(1) + np.float32(f) * self.mu)
        for name, x in u.items():
            m = np.multiply(x, -1 / self.lr, dtype=np.float32)  # -u / lr
            old = self.momentum.get(name)
            if old is not None:
                m += decay * old
            m *= scale
            self.momentum[name] = m

    def predict(self, anchor: Mapping[str, np.ndarray], proxies: Iterable[Params]) -> Params:
        """``anchor`` moved by one outer step per proxy pseudo-gradient, in order (the replica
        itself is not advanced): where the next versions will most likely be."""
        out = {name: np.array(a, dtype=np.float32, copy=True) for name, a in anchor.items()}
        momentum = {name: m.copy() for name, m in self.momentum.items()}
        for g in proxies:
            for name, x in g.items():
                m = momentum.get(name)
                m = np.array(x, dtype=np.float32, copy=True) if m is None else m * self.mu + x
                momentum[name] = m
                step = x + self.mu * m
                out[name] -= self.lr * step
        return out
