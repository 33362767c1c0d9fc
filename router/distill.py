"""Distil an ensemble of experts into one dense student, so one model serves in one forward.

Decentralized Diffusion Models (McAllister et al. 2025, section 5) distil their ensemble of
flow experts into a single dense model to serve it at the cost of one; c-BTM's mixture of
language experts (Gururangan et al. 2023, eq. 2) distils the same way. The teacher is the
``EnsembleModel`` under one rule (``full`` is the exact mixture, ``top_k:2`` or ``top1`` its
sparse approximations); the student is an ordinary workload model (by default the experts'
architecture), trained from scratch on the teacher's outputs at inputs drawn exactly as the
experts were trained:

- flow: ``(x_t, t)`` from the workload's training stream (x_t on the linear path from noise
  to a training digit, t ~ U(0, 1)); the loss is the mean squared error between the student's
  velocity and the ensemble's, ``|| v_s(x_t, t) - sum_k w_k(x_t, t) v_k(x_t, t) ||^2``.
- bytelm: windows from the training stream; the loss is ``KL(p_ensemble || p_student)`` of the
  next-byte distribution at every position, the mixture taken in log space as the ensemble
  does (the cross-entropy to the mixture less its constant entropy).

AdamW with a linear warmup over the first 5% of steps and a cosine decay to 10% of ``lr``.
``teacher_gap`` measures the same loss on draws the student never trained on (another seed),
so a trained student can be compared with an untrained one.

Compute is counted as 2 FLOPs per parameter per input (per image, or per byte of a window;
attention scores ignored) for a forward and 3 forwards for a training step: the student's
training, the experts' forwards the teacher made (counted per row by forward hooks, so a sparse
rule costs less) and the router's.

Synchronous, single-threaded; no I/O (``router.cli`` loads and saves).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DistillMetrics",
    "distill",
    "distillation_loss",
    "forward_flops",
    "inference_flops",
    "teacher_gap",
]


@dataclasses.dataclass
class DistillMetrics:
    steps: int
    batch_size: int
    final_loss: float  # mean distillation loss over the last 10% of steps
    losses: list[float]  # the distillation loss of every step
    student_flops: float  # the student's forwards and backwards
    teacher_flops: float  # the experts' and the router's forwards that made the targets
    seconds: float

    @property
    def flops(self) -> float:
        return self.student_flops + self.teacher_flops


def forward_flops(model: nn.Module, inputs: int = 1) -> float:
    """2 FLOPs per parameter for each of ``inputs`` images or bytes through ``model``."""
    return 2.0 * sum(p.numel() for p in model.parameters()) * inputs


def distillation_loss(workload_name: str, student_out, teacher_out) -> torch.Tensor:
    """flow: MSE of velocities (B, 64); bytelm: mean KL(teacher || student) per position from
    the student's logits and the teacher's log-probabilities (B, T, 256)."""
    if workload_name == "flow":
        return F.mse_loss(student_out.float(), teacher_out.float())
    if workload_name == "bytelm":
        log_q = torch.log_softmax(student_out.float(), dim=-1)
        log_p = teacher_out.float()
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
    raise ValueError(f"no distillation loss for workload {workload_name!r}")


def _inputs(workload_name: str, batch) -> tuple[torch.Tensor, ...]:
    return (batch.x_t, batch.t) if workload_name == "flow" else (batch.inputs,)


class _RowCounter:
    """Forward hooks on the ensemble's experts and router that add up the FLOPs of the rows
    (images, or windows times their length) each one is called on."""

    def __init__(self, ensemble: nn.Module):
        self.flops = 0.0
        self.handles = [
            module.register_forward_hook(self._hook(forward_flops(module)))
            for module in list(ensemble.experts.values())
        ]
        router_flops = getattr(ensemble.router, "flops_per_forward", None)
        if router_flops is not None:
            per_input = float(router_flops())
            self.handles.append(ensemble.router.register_forward_hook(self._hook(per_input)))

    def _hook(self, per_input: float) -> Callable:
        def count(module, args, output):
            x = args[0]
            inputs = x.shape[0] * (x.shape[1] if not x.is_floating_point() else 1)
            self.flops += per_input * inputs

        return count

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def inference_flops(model: nn.Module, *inputs: torch.Tensor) -> float:
    """FLOPs per input (an image, or a byte position) of one forward of ``model`` on
    ``inputs``: for an ensemble, the rows its router and experts actually ran (a sparse rule
    runs fewer), counted by the same hooks as distillation's teacher; for a plain model,
    one forward of its parameters."""
    x = inputs[0]
    count = x.shape[0] * (x.shape[1] if not x.is_floating_point() else 1)
    if not hasattr(model, "experts"):
        return forward_flops(model)
    counter = _RowCounter(model)
    was_training = model.training
    model.eval()
    try:
        model(*inputs)
    finally:
        counter.close()
        model.train(was_training)
    return counter.flops / count


def _schedule(steps: int) -> Callable[[int], float]:
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def distill(
    student: nn.Module,
    ensemble: nn.Module,
    batches: Iterator,
    steps: int,
    lr: float = 1e-3,
    *,
    weight_decay: float = 0.0,
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> DistillMetrics:
    """Train ``student`` in place for ``steps`` on the ensemble's outputs at the inputs of
    ``batches`` (the workload's own batches: flow ``FlowBatch``, bytelm ``TextBatch``)."""
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    name = ensemble.workload_name
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps))
    counter = _RowCounter(ensemble)
    losses: list[float] = []
    student_flops, batch_size = 0.0, 0
    was_training = student.training
    ensemble.eval()
    student.train()
    started = time.perf_counter()
    try:
        for step in range(steps):
            inputs = _inputs(name, next(batches))
            with torch.no_grad():
                target = ensemble(*inputs)
            loss = distillation_loss(name, student(*inputs), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            batch_size = inputs[0].shape[0]
            per_row = inputs[0].shape[1] if name == "bytelm" else 1
            student_flops += 3.0 * forward_flops(student, batch_size * per_row)
            if log_every and (step + 1) % log_every == 0:
                log(f"  distill step {step + 1}/{steps}: loss {loss.item():.4f}")
    finally:
        counter.close()
        student.train(was_training)
    tail = max(1, steps // 10)
    return DistillMetrics(
        steps=steps,
        batch_size=batch_size,
        final_loss=float(sum(losses[-tail:]) / tail),
        losses=losses,
        student_flops=student_flops,
        teacher_flops=counter.flops,
        seconds=time.perf_counter() - started,
    )


@torch.no_grad()
def teacher_gap(student: nn.Module, ensemble: nn.Module, batches: Iterator, n: int = 4) -> float:
    """The mean distillation loss of ``student`` over ``n`` batches (flow: velocity MSE to the
    ensemble; bytelm: KL from the ensemble, nats per byte)."""
    name = ensemble.workload_name
    was_training = student.training
    student.eval()
    ensemble.eval()
    try:
        total = 0.0
        for _ in range(n):
            inputs = _inputs(name, next(batches))
            total += distillation_loss(name, student(*inputs), ensemble(*inputs)).item()
    finally:
        student.train(was_training)
    return total / n
