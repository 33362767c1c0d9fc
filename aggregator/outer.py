"""Outer optimizers at the root, and the rule that keeps every replica bit-identical.

Convention. The pseudo-gradient is the merged delta ``g = mean_i (anchor - params_i)``
(DiLoCo, Douillard et al. 2023, Algorithm 1, line 12: ``Delta = theta^(t-1) - theta_i^(t)``).
It points like a gradient: *subtracting* it moves the model toward the islands' parameters.
So ``SGD(lr=1)`` gives ``theta - g = mean_i params_i``, which is FedAvg.

Each optimizer's :meth:`~OuterOptimizer.step` takes ``theta`` (read only: names and shapes are
checked, values are not used) and ``g``, advances its own state, and **returns the update**
``u = theta_new - theta_old`` as new float32 arrays. It does not touch ``theta``. The root
encodes ``u``, decodes it again and applies the *decoded* ``u`` with :func:`apply_update`, as
every island does; a float32 add per element in a fixed order gives the same bits everywhere.

- :class:`SGD`: ``u = -lr * g``.
- :class:`NesterovSGD` (DiLoCo's outer step, lr 0.7, momentum 0.9), exactly
  ``torch.optim.SGD(lr, momentum=mu, nesterov=True)`` with no dampening or weight decay::

      m <- mu * m + g          (m = 0 before the first step, so the first m is g)
      u  = -lr * (g + mu * m)

  Same formula and float32 scalars as torch; the bits can differ by an ulp or two because
  torch's CPU kernels fuse each ``a + alpha * b`` into one FMA while numpy rounds the multiply
  and the add separately. Replicas stay identical regardless: they all apply the same ``u``.

- :class:`DelayedNesterov` (Liu et al., "Asynchronous Local-SGD Training for Language
  Modeling", 2024, arXiv 2401.09135, Algorithm 3 with momentum activation ``c = 0``): the
  momentum is updated and applied once per ``N`` outer steps (a *period*), on the mean of the
  period's pseudo-gradients; in between, plain gradient steps of ``1/N`` each::

      every step:           d <- d + g                       (d = 0 at a period's start)
      not a period's end:   u  = -lr * g / N
      a period's end:       m <- mu * m + d / N ;  u = -lr * (g / N + mu * m) ;  d <- 0

  Over a period the model moves by ``-lr * (mean g + mu * m)``: one Nesterov step on the
  period's mean, with each update applied as soon as it arrives. A burst of stale updates
  therefore moves the momentum once, by their mean, instead of once each. ``N = 1`` is
  :class:`NesterovSGD` bit for bit. The paper takes ``N`` = the number of workers, each
  worker's update applied alone (at our root: ``buffer_k = 1``).

- :class:`CO2` (Sun et al., "CO2: Efficient Distributed Training with Full
  Communication-Computation Overlap", ICLR 2024, outer update with gap penalty ``Lambda`` and
  element-wise outer-momentum clipping ``phi``)::

      m <- beta * m + g / Lambda
      m <- clamp(m, -phi, +phi)   (in place; applied for real)
      u  = -alpha * m

**A partial step.** A version merging less island work than the root's ``buffer_k`` full
rounds (its deadline closed it, or a slow island's last short round came alone) carries a
share ``f = work / buffer_k`` of a full step's evidence, each island update counting
``min(1, steps / every)`` of a round (its meta; ``aggregator.gateway.update_work``). With
``merge.partial_step = "scaled"`` the root calls ``step(theta, g, fraction=f)`` and each
optimizer takes ``f`` of a step, as if time advanced by ``f``: Nesterov ``m <- mu^f * m + f * g``,
``u = -lr * f * (g + mu * m)``; SGD ``u = -lr * f * g``; CO2 ``m <- beta^f * m + f * g /
Lambda`` (clamped), ``u = -alpha * f * m``; Delayed Nesterov ``d <- d + f * g``, ``u = -lr * f *
g / N`` and, at a period's end, ``m <- mu^f * m + d / N``, ``u = -lr * f * (g / N + mu * m)``
(the version closing a period scales its momentum step like Nesterov's; periods count
versions). ``f = 1`` is the plain step above, bit for bit.
Without it every version moves by a full momentum step however little it merged: a lone
20-step round at the end of a run moved the model by ~0.9 of the accumulated momentum
and undid the last version's progress (docs/architecture.md, "Outer step"). This is the
problem Delayed Nesterov addresses in asynchronous Local-SGD (Liu et al., "Asynchronous
Local-SGD Training for Language Modeling", 2024: momentum applied once per N worker updates,
plain gradient steps between); the fractional step spreads it smoothly over versions of any
size instead of counting to N.

**Deferred momentum** (``merge.partial_step = "deferred"``, the default). Scaled, a lone
short version still moves the model along ``lr * f * mu * m``: at the end of a run, where the
accumulated momentum has already carried the model to where it points, that part alone made
the demo's last version worse than the one before it in three runs out of three, while its
gradient part alone made it better (docs/architecture.md, "Outer step"). Deferred,
:class:`NesterovSGD` moves its momentum only once a full step's share of work has arrived,
as Delayed Nesterov does once per ``N`` updates (Liu et al. 2024), counting work instead of
versions::

    bank short of a step (F + f < 1):  u = -lr * f * g ;  D <- D + f * g ;  F <- F + f
    a step's share reached:            m <- mu * m + (D + f * g) / (F + f)
                                       u = -lr * (f * g + mu * m) ;  D <- 0 ;  F <- 0

Over a bank that adds up to one step the model moves by one Nesterov step on the bank's mean;
a full version with an empty bank is the plain step, bit for bit. The bank (``pending/`` and
``pending_work``) is part of the state. :class:`DelayedNesterov` already defers by its
period, :class:`CO2`'s step is its momentum and :class:`SGD` keeps none: they take the scaled
step.

All arithmetic is float32 with float32 scalars. State (momentum, step count) round-trips
through :meth:`~OuterOptimizer.state_dict` / :meth:`~OuterOptimizer.load_state_dict` as plain
numpy arrays, for the root's checkpoints. No I/O, no threads (one instance per model, driven
by the root's single merge loop), no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from comms.errors import ConfigError, NonFiniteError

# apply_update is the replica rule, shared with every island; re-exported here for the root
from comms.update import apply_update, check_same_layout  # noqa: F401

Params = dict[str, np.ndarray]
_MOMENTUM = "momentum/"
_PENDING = "pending/"  # DelayedNesterov: the period's sum so far; Nesterov: the deferred bank
_PENDING_WORK = "pending_work"  # NesterovSGD: the share of a step the deferred bank holds
# A bank of partial steps counts as a full step from 1 - this on (fractions such as ten
# tenths do not add up to exactly 1 in floating point)
FULL_STEP_TOLERANCE = 1e-6
_STEP = "step"


def _pending_of(state: Mapping[str, np.ndarray]) -> Params:
    """The ``pending/<name>`` sums of a saved state, as new float32 arrays."""
    return {
        k[len(_PENDING) :]: np.array(v, dtype=np.float32)
        for k, v in state.items()
        if k.startswith(_PENDING)
    }


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


class OuterOptimizer:
    """Base class: ``step`` returns the update ``u``; ``state_dict`` holds what must persist."""

    name: ClassVar[str] = ""
    uses_momentum: ClassVar[bool] = True

    def __init__(self) -> None:
        self.steps = 0
        self.momentum: Params = {}

    def hyperparams(self) -> dict[str, Any]:
        raise NotImplementedError

    def _update(self, g: Mapping[str, np.ndarray], f: float) -> Params:
        """Advance the state on float32 ``g`` by the share ``0 < f <= 1`` of a step and
        return ``u``; ``f = 1`` must run exactly the plain step's float32 operations."""
        raise NotImplementedError

    def step(
        self,
        theta: Mapping[str, np.ndarray],
        pseudo_grad: Mapping[str, np.ndarray],
        fraction: float = 1.0,
        *,
        defer: bool = False,
    ) -> Params:
        """Advance one outer step on ``pseudo_grad`` and return ``u = theta_new - theta_old``.

        ``fraction`` in (0, 1] is the share of a full outer step this one stands for (a
        version merged from fewer updates than the root's ``buffer_k``; see the module doc);
        1 is the optimizer's plain step, bit for bit. ``defer``: a partial step's momentum
        waits until a full step's share has arrived (module doc, "Deferred momentum"), for
        the optimizers that have such a rule; the others take the scaled step.
        ``theta`` is not modified. A pseudo-gradient holding NaN or Inf raises
        :class:`~comms.errors.NonFiniteError` before any state changes.
        """
        if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        check_same_layout(theta, pseudo_grad, "pseudo-gradient")
        g = {name: np.asarray(x, dtype=np.float32) for name, x in pseudo_grad.items()}
        for name, x in g.items():
            if not np.isfinite(x).all():
                raise NonFiniteError(f"pseudo-gradient tensor {name!r} holds NaN or Inf")
        if self.momentum:
            check_same_layout(self.momentum, g, "pseudo-gradient (vs momentum)")
        u = (self._deferred if defer else self._update)(g, float(fraction))
        self.steps += 1
        return u

    def _deferred(self, g: Mapping[str, np.ndarray], f: float) -> Params:
        """The step with deferred momentum; an optimizer without such a rule scales."""
        return self._update(g, f)

    def _momentum_buffer(self, name: str, like: np.ndarray) -> np.ndarray:
        if name not in self.momentum:
            self.momentum[name] = np.zeros(like.shape, dtype=np.float32)
        return self.momentum[name]

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the state: ``"step"`` (int64 scalar) and ``"momentum/<name>"`` arrays."""
        state = {_STEP: np.array(self.steps, dtype=np.int64)}
        for name, m in self.momentum.items():
            state[_MOMENTUM + name] = m.copy()
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the state saved by :meth:`state_dict` (arrays are copied)."""
        if _STEP not in state:
            raise ValueError(f"{self.name} state: missing key {_STEP!r}")
        unknown = [k for k in state if k != _STEP and not k.startswith(_MOMENTUM)]
        if unknown:
            raise ValueError(f"{self.name} state: unexpected keys {sorted(unknown)}")
        momentum = {
            k[len(_MOMENTUM) :]: np.array(v, dtype=np.float32)
            for k, v in state.items()
            if k.startswith(_MOMENTUM)
        }
        if momentum and not self.uses_momentum:
            raise ValueError(f"{self.name} keeps no momentum, but the state holds momentum")
        self.steps = int(np.asarray(state[_STEP]).reshape(-1)[0])  # 0-d or (1,) after a file
        self.momentum = momentum

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams().items())
        return f"{type(self).__name__}({args})"


class SGD(OuterOptimizer):
    """``u = -lr * g``; ``lr=1`` is FedAvg (the new model is the mean of the islands')."""

    name = "sgd"
    uses_momentum = False

    def __init__(self, lr: float = 1.0):
        super().__init__()
        _require(math.isfinite(lr) and lr > 0, f"sgd: lr must be a positive number, got {lr!r}")
        self.lr = float(lr)

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr}

    def _update(self, g: Mapping[str, np.ndarray], f: float) -> Params:
        neg = np.float32(-self.lr * f)  # -lr itself when f = 1
        return {name: np.multiply(x, neg, dtype=np.float32) for name, x in g.items()}


class NesterovSGD(OuterOptimizer):
    """DiLoCo's outer step, matching ``torch.optim.SGD(nesterov=True)``; see the module doc."""

    name = "nesterov"

    def __init__(self, lr: float = 0.7, momentum: float = 0.9):
        super().__init__()
        _require(
            math.isfinite(lr) and lr > 0, f"nesterov: lr must be a positive number, got {lr!r}"
        )
        _require(0 < momentum < 1, f"nesterov: momentum must be in (0, 1), got {momentum!r}")
        self.lr = float(lr)
        self.mu = float(momentum)
        self.pending: Params = {}  # deferred momentum: the banked sum of f * g
        self.pending_work = 0.0  # ... and the share of a step it holds, below 1

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.mu}

    def _update(self, g: Mapping[str, np.ndarray], f: float) -> Params:
        mu, neg = np.float32(self.mu), np.float32(-self.lr * f)  # -lr itself when f = 1
        decay = mu if f == 1.0 else np.float32(self.mu**f)
        out = {}
        for name, x in g.items():
            m = self._momentum_buffer(name, x)
            np.multiply(m, decay, out=m)  # m <- mu^f * m
            np.add(m, x if f == 1.0 else np.multiply(x, np.float32(f)), out=m)  # + f * g
            u = np.multiply(m, mu)  #     u  = mu * m
            np.add(x, u, out=u)  #        u  = g + mu * m
            np.multiply(u, neg, out=u)  # u = -lr * f * (g + mu * m)
            out[name] = u
        return out

    def _deferred(self, g: Mapping[str, np.ndarray], f: float) -> Params:
        """Deferred momentum (module doc): a step short of a full one is ``-lr * f * g`` and
        banks ``f * g``; the step that completes a full share takes one momentum step on the
        mean of the bank and itself. An empty bank and ``f = 1``: the plain step, bit for bit."""
        banked = self.pending_work
        if banked == 0.0 and f == 1.0:
            return self._update(g, f)
        fg = {name: x if f == 1.0 else np.multiply(x, np.float32(f)) for name, x in g.items()}
        out = {}
        if banked + f < 1.0 - FULL_STEP_TOLERANCE:  # still short of a full step: no momentum
            neg = np.float32(-self.lr * f)
            for name, x in g.items():
                self._momentum_buffer(name, x)  # made at the first step: layout checks see it
                if name in self.pending:
                    np.add(self.pending[name], fg[name], out=self.pending[name])  # d <- d + f g
                else:
                    self.pending[name] = np.array(fg[name], dtype=np.float32)
                out[name] = np.multiply(x, neg)  # u = -lr * f * g
            self.pending_work = banked + f
            return out
        mu, neg, share = np.float32(self.mu), np.float32(-self.lr), np.float32(banked + f)
        for name, x in g.items():
            m = self._momentum_buffer(name, x)
            d = fg[name] if name not in self.pending else np.add(self.pending[name], fg[name])
            np.multiply(m, mu, out=m)  # m <- mu * m
            np.add(m, np.divide(d, share, dtype=np.float32), out=m)  # + (d + f g) / share
            u = np.multiply(m, mu)  #     u  = mu * m
            np.add(fg[name], u, out=u)  # u  = f * g + mu * m
            np.multiply(u, neg, out=u)  # u = -lr * (f * g + mu * m)
            out[name] = u
        self.pending, self.pending_work = {}, 0.0
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """The base state plus, while a deferred momentum step is pending, ``"pending/<name>"``
        (the banked ``f * g``) and ``"pending_work"`` (its share of a step)."""
        state = super().state_dict()
        if self.pending_work:
            state[_PENDING_WORK] = np.array(self.pending_work, dtype=np.float64)
            for name, d in self.pending.items():
                state[_PENDING + name] = d.copy()
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`'s state, a pending deferred step included."""
        base = {k: v for k, v in state.items() if k != _PENDING_WORK and not k.startswith(_PENDING)}
        super().load_state_dict(base)
        work = float(np.asarray(state.get(_PENDING_WORK, 0.0)).reshape(-1)[0])
        pending = _pending_of(state)
        if not (0.0 <= work < 1.0) or (work > 0) != bool(pending):
            raise ValueError(
                f"{self.name} state: a pending deferred step needs a share in (0, 1) and its "
                f"sums, got share {work} with {len(pending)} sum(s)"
            )
        if pending and set(pending) != set(self.momentum):
            raise ValueError(
                f"{self.name} state: pending sums for {sorted(pending)}, momentum for "
                f"{sorted(self.momentum)}"
            )
        self.pending, self.pending_work = pending, work


class DelayedNesterov(OuterOptimizer):
    """Delayed Nesterov (Liu et al. 2024, Algorithm 3, ``c = 0``): momentum updated and applied
    once per ``delay`` steps on the period's mean pseudo-gradient, plain ``g / delay`` steps in
    between; see the module doc. ``delay = 1`` is :class:`NesterovSGD` bit for bit.

    State: ``momentum/<name>`` and ``pending/<name>`` (the period's sum so far) next to
    ``step``; the position in the period is ``step % delay``, so a root restarted with the
    same ``delay`` continues the period it was in."""

    name = "delayed_nesterov"

    def __init__(self, lr: float = 0.7, momentum: float = 0.9, delay: int = 4):
        super().__init__()
        _require(
            math.isfinite(lr) and lr > 0,
            f"delayed_nesterov: lr must be a positive number, got {lr!r}",
        )
        _require(
            0 < momentum < 1, f"delayed_nesterov: momentum must be in (0, 1), got {momentum!r}"
        )
        # a TOML integer, or a whole float from a command line ("delay=4" parses as 4.0)
        whole = isinstance(delay, int | float) and not isinstance(delay, bool)
        _require(
            whole and math.isfinite(delay) and delay == int(delay) and delay >= 1,
            f"delayed_nesterov: delay must be a whole number of outer steps >= 1 (the steps "
            f"per momentum step; 1 is plain Nesterov), got {delay!r}",
        )
        self.lr = float(lr)
        self.mu = float(momentum)
        self.delay = int(delay)
        self.pending: Params = {}

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.mu, "delay": self.delay}

    def _update(self, g: Mapping[str, np.ndarray], f: float) -> Params:
        first = self.steps % self.delay == 0  # this step opens a period: d starts from it
        last = (self.steps + 1) % self.delay == 0  # this step closes it: momentum step
        n, mu, neg = np.float32(self.delay), np.float32(self.mu), np.float32(-self.lr * f)
        decay = mu if f == 1.0 else np.float32(self.mu**f)
        out = {}
        for name, x in g.items():
            m = self._momentum_buffer(name, x)  # made at the first step: layout checks see it
            fg = x if f == 1.0 else np.multiply(x, np.float32(f))  # f * g
            if first:  # a copy, not 0 + f * g: the sign of a zero stays that of NesterovSGD's
                self.pending[name] = np.array(fg, dtype=np.float32)
            else:
                np.add(self.pending[name], fg, out=self.pending[name])  # d <- d + f * g
            u = np.divide(x, n, dtype=np.float32)  # u = g / N (exact for N = 1)
            if last:
                np.multiply(m, decay, out=m)  # m <- mu^f * m
                np.add(m, np.divide(self.pending[name], n, dtype=np.float32), out=m)  # + d / N
                np.add(u, np.multiply(m, mu), out=u)  # u = g / N + mu * m
            np.multiply(u, neg, out=u)  # u = -lr * f * (g / N [+ mu * m])
            out[name] = u
        if last:
            self.pending = {}
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """The base state plus ``"pending/<name>"``: the period's sum so far (none at a
        period's boundary)."""
        state = super().state_dict()
        for name, d in self.pending.items():
            state[_PENDING + name] = d.copy()
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`'s state; a period in progress needs its pending sums."""
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith(_PENDING)})
        self.pending = _pending_of(state)
        in_period = self.steps % self.delay != 0
        if in_period and set(self.pending) != set(self.momentum):
            raise ValueError(
                f"{self.name} state: step {self.steps} is inside a period of {self.delay}, so "
                f"the state needs pending sums for {sorted(self.momentum)}, got "
                f"{sorted(self.pending)} (saved with another delay?)"
            )
        if not in_period and self.pending:
            raise ValueError(
                f"{self.name} state: step {self.steps} starts a period of {self.delay}, but "
                "the state holds pending sums (saved with another delay?)"
            )


class CO2(OuterOptimizer):
    """CO2's outer step with gap penalty and element-wise momentum clipping (``clip=None``
    turns the clip off); see the module doc."""

    name = "co2"

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.5,
        gap_penalty: float = 1.0,
        clip: float | None = 1.0,
    ):
        super().__init__()
        _require(math.isfinite(alpha) and alpha > 0, f"co2: alpha must be positive, got {alpha!r}")
        _require(0 <= beta < 1, f"co2: beta must be in [0, 1), got {beta!r}")
        _require(
            math.isfinite(gap_penalty) and gap_penalty > 0,
            f"co2: gap_penalty must be positive, got {gap_penalty!r}",
        )
        _require(
            clip is None or (math.isfinite(clip) and clip > 0),
            f"co2: clip must be positive or None, got {clip!r}",
        )
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gap_penalty = float(gap_penalty)
        self.clip = None if clip is None else float(clip)

    def hyperparams(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "gap_penalty": self.gap_penalty,
            "clip": self.clip,
        }

    def _update(self, g: Mapping[str, np.ndarray], f: float) -> Params:
        # f = 1: exactly beta, Lambda and -alpha (beta**1.0, gap / 1.0 and alpha * 1.0 are exact)
        beta, lam = np.float32(self.beta**f), np.float32(self.gap_penalty / f)
        neg_alpha = np.float32(-self.alpha * f)
        phi = None if self.clip is None else np.float32(self.clip)
        out = {}
        for name, x in g.items():
            m = self._momentum_buffer(name, x)
            u = np.divide(x, lam, dtype=np.float32)  # f * g / Lambda (u doubles as scratch)
            np.multiply(m, beta, out=m)
            np.add(m, u, out=m)  # m <- beta^f * m + f * g / Lambda
            if phi is not None:
                np.clip(m, -phi, phi, out=m)  # m <- clamp(m, -phi, phi), kept
            np.multiply(m, neg_alpha, out=u)  # u = -alpha * f * m
            out[name] = u
        return out


OUTER_OPTIMIZERS: dict[str, type[OuterOptimizer]] = {
    cls.name: cls for cls in (SGD, NesterovSGD, DelayedNesterov, CO2)
}
DEFAULT_OUTER_OPTIMIZER = "nesterov"

# Completeness: every optimizer defined here is registered under its own, unique name.
assert {c.name for c in OuterOptimizer.__subclasses__()} == set(OUTER_OPTIMIZERS)


def make_outer_optimizer(name: str = DEFAULT_OUTER_OPTIMIZER, **hyperparams: Any) -> OuterOptimizer:
    """An outer optimizer by registry name (``sgd``, ``nesterov``, ``delayed_nesterov``,
    ``co2``)."""
    cls = OUTER_OPTIMIZERS.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown outer optimizer {name!r}; choose one of {sorted(OUTER_OPTIMIZERS)}"
        )
    try:
        return cls(**hyperparams)
    except TypeError as e:
        raise ConfigError(
            f"outer optimizer {name!r}: bad hyperparameters {hyperparams}: {e}"
        ) from None
