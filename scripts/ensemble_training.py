"""Compute-matched training of a monolith and K experts, for ``scripts/bench_ensemble.py``.

The monolith trains ``S`` steps at batch ``B`` on all the data. The K experts train on their
clusters only, at batches that sum to ``B`` (Decentralized Diffusion Models' split of the
monolith's batch, McAllister et al. 2025), so every step of the experts together costs one
step of the monolith.

With ``branch_at = f > 0`` the experts do not start from scratch: the first ``f S`` steps are
a shared seed phase on all the data (Branch-Train-Merge, Li et al. 2022; c-BTM branches from
a pretrained seed too), which is the monolith's own first ``f S`` steps, so it costs nothing
extra. Each expert then copies the seed's weights and AdamW state and trains the remaining
``(1 - f) S`` steps on its cluster, continuing the same learning-rate schedule. Seed plus
experts still cost exactly the monolith's FLOPs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from island.workloads import Workload, get_workload


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warmup over the first 5% of steps, then cosine decay to 10% of ``peak``."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def train_steps(
    workload: Workload,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator,
    steps: range,
    total: int,
    lr: float,
) -> list[float]:
    """AdamW on ``workload.loss`` for the steps ``steps`` of a ``total``-step schedule (peak
    ``lr``); returns the training losses."""
    model.train()
    losses = []
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total, lr)
        loss = workload.loss(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def tail_mean(losses: Sequence[float]) -> float:
    """Mean of the last 10% of ``losses`` (at least one)."""
    return float(np.mean(losses[-max(1, len(losses) // 10) :]))


def split_batch(batch: int, shares: Sequence[float]) -> list[int]:
    """Split ``batch`` rows in proportion to ``shares`` (largest remainder), at least one row
    each, summing to ``batch``."""
    shares = np.asarray(shares, dtype=np.float64) / np.sum(shares)
    if batch < len(shares):
        raise ValueError(f"a batch of {batch} cannot give each of {len(shares)} experts a row")
    exact = 1 + shares * (batch - len(shares))
    sizes = np.floor(exact).astype(int)
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[: batch - sizes.sum()]] += 1
    return sizes.tolist()


def branch_step(steps: int, branch_at: float) -> int:
    """The step at which the experts branch off the shared seed (0: no seed phase)."""
    if not 0.0 <= branch_at < 1.0:
        raise ValueError(f"branch_at must be in [0, 1), got {branch_at}")
    return round(branch_at * steps)


@dataclasses.dataclass
class Trained:
    monolith: nn.Module
    experts: list[nn.Module]
    expert_batches: list[int]
    train_flops: dict[str, float]
    final_train_loss: dict[str, Any]
    branch_step: int = 0


def train_compute_matched(
    name: str,
    plan: Any,
    labels: np.ndarray,
    shares: Sequence[float],
    split: str,
    seed: int,
) -> Trained:
    """The monolith and K experts at equal total training FLOPs (see the module docstring).

    ``plan`` holds ``model``, ``batch``, ``steps``, ``lr`` and ``branch_at``.
    ``split="proportional"`` gives expert k the rows of the monolith's batch that come from
    cluster k on average (``B * shares[k]``); ``split="equal"`` gives every expert ``B / K``.
    """
    k = len(shares)
    batches = split_batch(plan.batch, shares if split == "proportional" else np.ones(k))
    monolith_wl = get_workload(name, batch_size=plan.batch, **plan.model)
    branch = branch_step(plan.steps, plan.branch_at)
    started = time.perf_counter()
    monolith = monolith_wl.build_model(seed)
    optimizer = make_optimizer(monolith, plan.lr)
    data = monolith_wl.train_batches(seed)
    losses = train_steps(monolith_wl, monolith, optimizer, data, range(branch), plan.steps, plan.lr)
    seed_state = None  # the experts' shared start: weights and AdamW state at the branch step
    if branch:
        seed_state = (copy.deepcopy(monolith.state_dict()), copy.deepcopy(optimizer.state_dict()))
    losses += train_steps(
        monolith_wl, monolith, optimizer, data, range(branch, plan.steps), plan.steps, plan.lr
    )
    print(f"  monolith trained in {time.perf_counter() - started:.0f} s", flush=True)
    if branch:
        print(f"  experts branch from the monolith at step {branch}", flush=True)
    experts, expert_loss = [], []
    expert_flops = monolith_wl.flops_per_step() * branch  # the shared seed phase
    for cluster, batch in enumerate(batches):
        started = time.perf_counter()
        expert_wl = get_workload(name, batch_size=batch, **plan.model)
        members = np.flatnonzero(labels == cluster).tolist()
        expert = expert_wl.build_model(seed)
        expert_opt = make_optimizer(expert, plan.lr)
        if seed_state is not None:
            expert.load_state_dict(seed_state[0])
            expert_opt.load_state_dict(seed_state[1])
        data = expert_wl.train_batches(seed + 1 + cluster, doc_indices=members)
        expert_losses = train_steps(
            expert_wl, expert, expert_opt, data, range(branch, plan.steps), plan.steps, plan.lr
        )
        expert_loss.append(tail_mean(expert_losses))
        experts.append(expert)
        expert_flops += expert_wl.flops_per_step() * (plan.steps - branch)
        print(
            f"  expert {cluster} (batch {batch}) trained in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    flops = {
        "monolith": monolith_wl.flops_per_step() * plan.steps,
        "experts": expert_flops,
        "seed": monolith_wl.flops_per_step() * branch,
    }
    train_losses = {"monolith": tail_mean(losses), "experts": expert_loss}
    return Trained(monolith, experts, batches, flops, train_losses, branch)
