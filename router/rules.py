"""Ensemble rules: which experts run for each input, with what weight, and how outputs mix.

A router gives each input a probability over the K experts, ``w`` of shape (B, K). A rule keeps
some experts per row and renormalises their weights to sum to 1; the mixing functions combine
the kept experts' outputs:

- Flow experts (Decentralized Diffusion Models; McAllister et al. 2025, eq. 5): the ensemble
  velocity ``v(x_t, t) = sum_k w_k(x_t, t) v_k(x_t, t)``, exact for the full mixture; the paper's
  best rule is top-1 re-chosen at every sampling step (call ``select`` once per step).
- Language experts (c-BTM; Gururangan et al. 2023, eq. 2-3): ``p(x | prefix) = sum_k w_k
  p_k(x | prefix)`` with ``w = softmax(-||e(prefix) - c_k||^2 / T)`` over the cluster centroids,
  top-k renormalised. The mixture is returned as a log-probability computed by logsumexp of
  ``log w_k + log p_k``, so tiny probabilities neither underflow nor lose precision.

Rules are one small base class plus a registry by name: ``full``, ``top_k`` (param ``k``),
``top1`` and ``threshold`` (param ``tau``). Ties go to the lower expert index. All weights are
renormalised by their row sum, so a router output that is off by rounding is still a
distribution. ``experts_to_run`` gives the union of kept experts over the batch, so only those
experts run; the mixing functions take the outputs of just those experts via ``experts=``.

Pure functions on torch tensors (numpy arrays are accepted); no I/O, no state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class Selection:
    """The experts a rule keeps for each row of a batch, and their renormalised weights."""

    mask: torch.Tensor  # (B, K) bool: expert k is kept for row b
    weights: torch.Tensor  # (B, K) zero where not kept; each row sums to 1

    @property
    def indices(self) -> list[list[int]]:
        """Kept experts of each row, in ascending index order."""
        return [row.nonzero().flatten().tolist() for row in self.mask]

    def experts_to_run(self) -> list[int]:
        return experts_to_run(self.mask)


def as_router_weights(weights) -> torch.Tensor:
    """Check router weights: (B, K), finite, non-negative, every row with positive mass."""
    w = torch.as_tensor(weights)
    if not w.is_floating_point():
        w = w.to(torch.get_default_dtype())
    if w.ndim != 2 or w.shape[1] == 0:
        raise ValueError(f"router weights must have shape (batch, experts); got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("router weights contain NaN or Inf")
    if (w < 0).any():
        raise ValueError("router weights must be non-negative")
    if w.shape[0] and not (w.sum(dim=1) > 0).all():
        raise ValueError("every row of router weights needs positive total weight")
    return w


def renormalise(weights: torch.Tensor, mask: torch.Tensor) -> Selection:
    """Zero the weights outside ``mask`` and scale each row to sum to 1."""
    kept = torch.where(mask, weights, torch.zeros_like(weights))
    return Selection(mask=mask, weights=kept / kept.sum(dim=1, keepdim=True))


def argmax_mask(weights: torch.Tensor) -> torch.Tensor:
    """(B, K) bool, True at the first largest weight of each row."""
    mask = torch.zeros_like(weights, dtype=torch.bool)
    return mask.scatter_(1, weights.argmax(dim=1, keepdim=True), True)


class EnsembleRule:
    """Base of ensemble rules. Subclasses set ``name`` and implement ``keep``."""

    name: ClassVar[str]

    def keep(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, K) checked weights -> (B, K) bool mask of kept experts, at least one per row."""
        raise NotImplementedError

    def select(self, weights) -> Selection:
        w = as_router_weights(weights)
        return renormalise(w, self.keep(w))

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({params})"


class FullRule(EnsembleRule):
    """Every expert, weighted by the router: the exact mixture."""

    name = "full"

    def keep(self, weights: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(weights, dtype=torch.bool)


class TopKRule(EnsembleRule):
    """The ``k`` largest weights of each row (all experts when ``k >= K``)."""

    name = "top_k"

    def __init__(self, k: int = 2):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"top_k needs an integer k >= 1, got {k!r}")
        self.k = k

    def keep(self, weights: torch.Tensor) -> torch.Tensor:
        k = min(self.k, weights.shape[1])
        # Stable sort so ties go to the lower expert index (torch.topk leaves ties unspecified).
        order = torch.sort(weights, dim=1, descending=True, stable=True).indices[:, :k]
        return torch.zeros_like(weights, dtype=torch.bool).scatter_(1, order, True)


class Top1Rule(EnsembleRule):
    """The single most likely expert of each row, weight 1."""

    name = "top1"

    def keep(self, weights: torch.Tensor) -> torch.Tensor:
        return argmax_mask(weights)


class ThresholdRule(EnsembleRule):
    """Experts with weight >= ``tau``, and always the most likely one."""

    name = "threshold"

    def __init__(self, tau: float = 0.1):
        tau = float(tau)
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"threshold needs 0 <= tau <= 1, got {tau}")
        self.tau = tau

    def keep(self, weights: torch.Tensor) -> torch.Tensor:
        return (weights >= self.tau) | argmax_mask(weights)


RULES: dict[str, type[EnsembleRule]] = {
    rule.name: rule for rule in (FullRule, TopKRule, Top1Rule, ThresholdRule)
}
# Completeness check at import: every rule defined here is registered under its own name.
assert set(RULES) == {rule.name for rule in EnsembleRule.__subclasses__()}, "unregistered rule"


def make_rule(name: str, **params) -> EnsembleRule:
    """Build a rule by registry name, e.g. ``make_rule("top_k", k=2)``."""
    if name not in RULES:
        raise ValueError(f"unknown ensemble rule {name!r}; known rules: {', '.join(RULES)}")
    try:
        return RULES[name](**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters {params} for ensemble rule {name!r}: {exc}") from exc


def parse_rule(spec: str) -> EnsembleRule:
    """Build a rule from a short spec: ``full``, ``top1``, ``top_k:2``, ``threshold:0.2``."""
    name, _, arg = spec.strip().partition(":")
    if not arg:
        return make_rule(name)
    if name == "top_k":
        try:
            return make_rule(name, k=int(arg))
        except ValueError as exc:
            raise ValueError(f"bad rule spec {spec!r}: {exc}") from exc
    if name == "threshold":
        try:
            return make_rule(name, tau=float(arg))
        except ValueError as exc:
            raise ValueError(f"bad rule spec {spec!r}: {exc}") from exc
    raise ValueError(f"bad rule spec {spec!r}; use full, top1, top_k:K or threshold:TAU")


def experts_to_run(selection: Selection | torch.Tensor) -> list[int]:
    """Experts kept for at least one row of the batch, ascending: the only ones that must run."""
    mask = selection.mask if isinstance(selection, Selection) else torch.as_tensor(selection)
    return mask.any(dim=0).nonzero().flatten().tolist()


def _weights_of_run_experts(
    weights, outputs: torch.Tensor, experts: Sequence[int] | None
) -> torch.Tensor:
    """(B, K) weights -> (E, B) weights of the E experts whose outputs are given."""
    w = torch.as_tensor(weights)
    if w.ndim != 2:
        raise ValueError(f"weights must have shape (batch, experts); got {tuple(w.shape)}")
    if experts is None:
        experts = range(w.shape[1])
    experts = [int(k) for k in experts]
    if len(set(experts)) != len(experts) or not all(0 <= k < w.shape[1] for k in experts):
        raise ValueError(f"experts must be distinct indices in [0, {w.shape[1]}); got {experts}")
    if outputs.ndim < 2 or outputs.shape[0] != len(experts) or outputs.shape[1] != w.shape[0]:
        raise ValueError(
            f"expert outputs have shape {tuple(outputs.shape)}; expected "
            f"({len(experts)} experts, {w.shape[0]} rows, ...)"
        )
    not_run = torch.ones(w.shape[1], dtype=torch.bool)
    not_run[experts] = False
    not_run = not_run.nonzero().flatten()
    missing = not_run[(w[:, not_run] != 0).any(dim=0)].tolist()
    if missing:
        raise ValueError(f"rows give weight to experts {missing} whose outputs were not given")
    return w[:, experts].T.to(outputs.dtype)


def _broadcast(w: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """(E, B) -> (E, B, 1, ...) matching the rank of ``outputs``."""
    return w.reshape(*w.shape, *([1] * (outputs.ndim - 2)))


def mix_velocities(weights, velocities, experts: Sequence[int] | None = None) -> torch.Tensor:
    """``v = sum_k w_k v_k``: (B, K) weights, (E, B, ...) velocities -> (B, ...).

    ``experts`` lists which expert each of the E velocity slices came from (default: all K, in
    order); rows must give zero weight to experts not listed.
    """
    v = torch.as_tensor(velocities)
    w = _weights_of_run_experts(weights, v, experts)
    return (_broadcast(w, v) * v).sum(dim=0)


def mix_log_probabilities(weights, log_probs, experts: Sequence[int] | None = None) -> torch.Tensor:
    """``log sum_k w_k p_k`` from (B, K) weights and (E, B, ..., V) log-probs -> (B, ..., V)."""
    lp = torch.as_tensor(log_probs)
    w = _weights_of_run_experts(weights, lp, experts)
    return torch.logsumexp(_broadcast(torch.log(w), lp) + lp, dim=0)


def mix_probabilities(weights, probs, experts: Sequence[int] | None = None) -> torch.Tensor:
    """Log of the mixture ``sum_k w_k p_k`` from (E, B, ..., V) probabilities -> (B, ..., V)."""
    return mix_log_probabilities(weights, torch.log(torch.as_tensor(probs)), experts)


def cbtm_router_weights(embeddings, centroids, temperature: float = 0.1) -> torch.Tensor:
    """c-BTM ensemble weights ``softmax(-||e - c_k||^2 / T)``: (B, D), (K, D) -> (B, K).

    Distances are taken from differences, not the ``|e|^2 - 2 e.c + |c|^2`` expansion, so close
    points keep their precision; softmax subtracts the row maximum, so large distances at a
    small temperature do not underflow to an all-zero row.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    e, c = torch.as_tensor(embeddings), torch.as_tensor(centroids)
    dtype = torch.promote_types(e.dtype, c.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    e, c = e.to(dtype), c.to(dtype)
    if e.ndim != 2 or c.ndim != 2 or e.shape[1] != c.shape[1]:
        raise ValueError(
            f"need embeddings (B, D) and centroids (K, D); got {tuple(e.shape)} and "
            f"{tuple(c.shape)}"
        )
    sq = torch.cdist(e, c, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # (B, K)
    return torch.softmax(-sq / temperature, dim=1)
