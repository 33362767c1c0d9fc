"""Sizes of the main job's runs (``scripts/federation.py``): phase 1's model and schedule,
and phase 2's experts, router and monolith (``ExpertsPlan``), for ``--quick`` and the default;
phase 3 distils the ensemble into one dense student (``router distill``) of the experts' size.

The flow experts use ``scripts/bench_ensemble.py``'s flow plan, where the experts beat a
compute-matched monolith (Decentralized Diffusion Models, McAllister et al. 2025). Pure data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from island.config import OptimConfig

# --quick without --data trains on these standard-library packages only (about 1.5 MB).
QUICK_PACKAGES = ("asyncio", "email", "xml", "http", "urllib", "json", "logging", "concurrent")


@dataclass
class ExpertsPlan:
    """Sizes of phase 2 (experts, router, monolith) and of phase 3's samples.

    flow matches compute as Decentralized Diffusion Models does: the monolith trains ``steps``
    at ``batch``, and each expert as many steps at its cluster's share of that batch
    (``ensemble_training.split_batch``). bytelm (``batch = 0``): every model at the model
    config's batch, the monolith for ``islands * steps``."""

    workload: str
    model: dict[str, Any]  # every expert's and the monolith's workload config
    steps: int  # per expert
    batch: int  # flow: the monolith's batch, split across the experts; 0: see above
    optim: OptimConfig
    router_model: dict[str, Any]
    router_steps: int
    router_batch: int
    router_lr: float
    partition: dict[str, Any]
    eval_batches: int  # held-out batches of each loss of ``router eval``
    samples: int = 0  # flow: images per method for the Frechet distances
    sample_steps: int = 0  # flow: Euler steps per sample
    classifier_steps: int = 0  # flow: steps of the digit classifier behind the distances
    max_bytes: int = 0  # bytelm: bytes generated per prompt
    distill_steps: int = 0  # the dense student distilled from the ensemble (0: none)
    distill_batch: int = 0  # its images or windows per step
    distill_lr: float = 2e-3
    distill_rule: str = "top_k:2"  # the teacher: the ensemble under this rule


@dataclass
class Plan:
    """Sizes of one run. The federation's bytelm is smaller than the workload's default
    (0.8 M parameters) so that N islands and the aggregators share two cores."""

    workload: str
    model: dict[str, Any]
    steps: int  # local-update inner steps of a full-speed island
    every: int  # H: inner steps per round
    slowdown: float  # the last island is this many times slower (and does steps / slowdown)
    warmup: int
    lr: float
    experts: ExpertsPlan
    eval_batches: int  # held-out batches of every validation loss in the run
    deadline_s: float  # aggregator merge deadline
    codec: str = "int8"  # of the islands' pushes (the root publishes u_v in int8 too)
    outer: str = "nesterov"  # the root's outer optimizer, with DiLoCo's lr and momentum
    outer_params: dict[str, float] = field(default_factory=lambda: {"lr": 0.7, "momentum": 0.9})
    rate_mbit: float = 10.0
    latency_ms: float = 50.0
    data: list[str] = field(default_factory=list)


def quick_corpus() -> list[str]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [str(stdlib / p) for p in QUICK_PACKAGES if (stdlib / p).is_dir()]


def model_config(workload: str, quick: bool, data: list[str]) -> dict[str, Any]:
    """One model config per workload and run size: phase 1 and the experts share it, so
    experts of phase 1's workload can branch from its global model."""
    if workload == "bytelm":
        model = (
            {"d_model": 32, "n_layer": 1, "n_head": 2, "context": 32, "batch_size": 8}
            if quick
            else {"d_model": 64, "n_layer": 2, "n_head": 4, "context": 64, "batch_size": 16}
        )
        return {**model, "data": data or (quick_corpus() if quick else [])}
    # flow: the digits model of scripts/bench_ensemble.py, where the experts beat the monolith
    return (
        {"hidden": 64, "n_blocks": 1, "time_dim": 16} if quick else {"hidden": 512, "n_blocks": 3}
    )


def experts_plan(workload: str, quick: bool, model: dict[str, Any], lr: float) -> ExpertsPlan:
    if workload == "bytelm":
        router = {
            "d_model": 16 if quick else 32,
            "n_layers": 1 if quick else 2,
            "context": model["context"],
        }
        part = {"svd_dims": 32, "n_init": 2, "max_features": 5000} if quick else {"n_init": 4}
        return ExpertsPlan("bytelm", model, steps=150 if quick else 500, batch=0,
                           optim=OptimConfig(lr=lr, warmup_steps=20 if quick else 50),
                           router_model=router, router_steps=80 if quick else 400,
                           router_batch=64, router_lr=1e-3, partition=part,
                           eval_batches=2 if quick else 4, max_bytes=32 if quick else 96,
                           distill_steps=40 if quick else 300, distill_batch=model["batch_size"])  # fmt: skip
    # flow: bench_ensemble's flow plan (AdamW 1e-3, weight decay 0.01, 5% warmup, cosine to 10%)
    steps = 120 if quick else 800
    optim = OptimConfig(lr=1e-3, weight_decay=0.01, betas=[0.9, 0.999], schedule="cosine",
                        warmup_steps=max(1, steps // 20), min_lr_ratio=0.1)  # fmt: skip
    if quick:
        return ExpertsPlan("flow", model, steps=steps, batch=64, optim=optim,
                           router_model={"hidden": 32, "depth": 2}, router_steps=40,
                           router_batch=64, router_lr=2e-3, partition={"n_init": 2},
                           eval_batches=2, samples=200, sample_steps=10, classifier_steps=100,
                           distill_steps=60, distill_batch=64)  # fmt: skip
    return ExpertsPlan("flow", model, steps=steps, batch=256, optim=optim,
                       router_model={"hidden": 128, "depth": 3}, router_steps=2500,
                       router_batch=256, router_lr=2e-3, partition={"n_init": 4},
                       eval_batches=8, samples=1000, sample_steps=40, classifier_steps=1500,
                       distill_steps=600, distill_batch=256)  # fmt: skip


def make_plan(workload: str, quick: bool, data: list[str], experts: str = "flow") -> Plan:
    model = model_config(workload, quick, data)
    lr = 3e-3
    ex_model = model if experts == workload else model_config(experts, quick, data)
    ex = experts_plan(experts, quick, ex_model, lr)
    if quick:
        return Plan(workload, model, steps=150, every=25, slowdown=2.5, warmup=20, lr=lr,
                    experts=ex, eval_batches=2, deadline_s=1.5, data=data)  # fmt: skip
    return Plan(workload, model, steps=800, every=50, slowdown=2.5, warmup=50, lr=lr,
                experts=ex, eval_batches=4, deadline_s=4.0, data=data)  # fmt: skip
