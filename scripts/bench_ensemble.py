"""Benchmark expert mode: K experts plus a learned router against a compute-matched monolith.

For each workload (``bytelm`` and ``flow``), at equal total training FLOPs:

1. Partition the training data into K clusters (bytelm: c-BTM's TF-IDF -> SVD -> L2 ->
   balanced k-means over files; flow: balanced k-means on the pixels) and assign every
   held-out document or image to its nearest centroid.
2. Train a monolith on all the data at batch ``B`` for ``S`` steps, and K experts in isolation,
   each on its cluster only for the same ``S`` steps at batches that sum to ``B``: Decentralized
   Diffusion Models' split of the monolith's batch across the experts (McAllister et al. 2025),
   so the experts' FLOPs sum to the monolith's. By default (``--split proportional``) expert k
   gets the share of the batch that comes from cluster k in the monolith's draws (its share of
   the bytes for text, of the images for flow); ``--split equal`` gives each ``B / K``.
   With a plan's ``branch_at = f > 0`` the experts branch (weights and AdamW state) from the
   monolith at step ``f S``, a shared seed phase as in Branch-Train-Merge (Li et al. 2022),
   and train the remaining steps on their clusters: still equal FLOPs
   (``scripts/ensemble_training.py``).
3. Train the router by cross-entropy against the cluster label (bytelm: ``PrefixRouter`` on
   the bytes so far, with c-BTM's non-parametric router as a baseline; flow: ``FlowRouter`` on
   ``(x_t, t)``), and measure its held-out accuracy (bytelm by position in the window; flow by
   noise level ``t``).
4. Held-out loss of the monolith, of each expert alone on all held-out data, and of the
   ensemble under ``full``, ``top_k:2`` and ``top1`` (bytelm: mean next-byte NLL in nats per
   byte over fixed validation windows; flow: flow-matching MSE at fixed noise draws).
5. flow only: sample quality as a Frechet distance (the FID formula of Heusel et al. 2017)
   between generated samples and the held-out digits, in the penultimate-layer features of a
   small MLP digit classifier trained here; the train-versus-held-out distance is the floor.
   Every method samples the same number of images from the same noise with the same Euler
   steps.
6. Router overhead: wall time of one router forward over one expert forward on the same batch
   (best of several repeats, no_grad), and the same ratio in FLOPs.
7. Distillation (``router.distill``, as Decentralized Diffusion Models serves one model): a
   dense student of the experts' architecture, trained from scratch on the ``top_k:2``
   ensemble's outputs (flow: its velocity at the training stream's ``(x_t, t)``; bytelm: its
   next-byte distribution on training windows) at the monolith's batch for as many steps,
   scored like the others (held-out loss; flow: Frechet from the same noise). Its training
   compute (the student's steps and the teacher's forwards) is counted on top of the
   experts' and the router's. Inference cost of each way to serve: FLOPs per input of one
   forward (for an ensemble, the rows its router and experts actually ran) and the wall time
   of one batch (best of several repeats).

Targets (the experts-and-router issue): a sparse ensemble (top-1 or top-2) beats the
monolith (lower held-out loss on bytelm, lower Frechet distance on flow); router overhead at
most 5%. Each workload's ``targets`` entry says whether they were met.

With ``--hybrid`` it compares instead, at equal total compute, 8 islands spent four ways on
4 clusters: experts trained by one island each, experts trained by groups of 2 local-update
islands, one global local-update model, and the monolith (``scripts/ensemble_hybrid.py``;
flow unless ``--only bytelm``).

Everything runs in this process, on one CPU thread by default (``--threads``)::

    python scripts/bench_ensemble.py [--quick] [--hybrid] [--only bytelm|flow] [--json PATH]
"""

from __future__ import annotations

import os

# One thread for numpy/scikit-learn as well: set before they load their thread pools.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import timeit  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import format_table, write_json  # noqa: E402
from ensemble_training import Trained, train_compute_matched  # noqa: E402
from frechet import DigitFrechet  # noqa: E402

from island.workloads import Workload, get_workload  # noqa: E402
from island.workloads.flow import model_velocity  # noqa: E402
from island.workloads.flow import sample as flow_sample  # noqa: E402
from router.distill import distill, inference_flops, teacher_gap  # noqa: E402
from router.ensemble import EnsembleModel  # noqa: E402
from router.models import CbtmRouter, FlowRouter, PrefixRouter, expert_forward_flops  # noqa: E402
from router.partition import Partition, TextPartitioner, VectorPartitioner  # noqa: E402
from router.training import (  # noqa: E402
    accuracy_by_noise,
    held_out_labels,
    pack_texts,
    router_accuracy,
    sample_document_windows,
    train_router,
)

RULES = {"full": "full", "top2": "top_k:2", "top1": "top1"}
OVERHEAD_TARGET = 0.05
POSITION_EDGES = (0, 4, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and step counts of one workload's run (identical for monolith and experts)."""

    model: dict[str, Any]  # workload config keys for every model (monolith and experts)
    batch: int  # monolith batch; the experts' batches sum to it
    steps: int  # optimizer steps of the monolith and of each expert
    lr: float  # AdamW peak learning rate (linear warmup, cosine decay to 10%)
    router: dict[str, Any]  # router constructor keywords
    router_steps: int
    router_batch: int
    router_lr: float
    eval_batch: int  # validation windows or images per batch
    eval_batches: int
    overhead_batch: int  # rows of the batch timed for the router overhead
    samples: int = 0  # flow: images generated per method (0: as many as training images)
    sample_steps: int = 0  # flow: Euler steps per sample
    classifier_steps: int = 0  # flow: steps of the digit classifier for the Frechet features
    balance_by: str = "documents"  # bytelm: balanced k-means caps files, or bytes, per cluster
    branch_at: float = 0.0  # fraction of the steps trained as a shared seed (0: from scratch)
    every: int = 50  # --hybrid: H, inner steps per local-update round
    distill_steps: int = 0  # the dense student distilled from the ensemble (0: as ``steps``)
    distill_lr: float = 2e-3  # its AdamW peak learning rate
    distill_rule: str = "top_k:2"  # the teacher: the ensemble under this rule


# fmt: off
FULL_PLANS = {
    "bytelm": Plan(
        model={"d_model": 128, "n_layer": 2, "n_head": 4, "context": 64}, batch=32, steps=600,
        lr=2e-3, router={"d_model": 32, "n_layers": 1, "kernel_size": 4, "context": 64},
        router_steps=1500, router_batch=64, router_lr=3e-3, eval_batch=32, eval_batches=8,
        overhead_batch=32, branch_at=0.75,
    ),
    "flow": Plan(
        model={"hidden": 512, "n_blocks": 3}, batch=256, steps=800, lr=1e-3,
        router={"hidden": 128, "depth": 3}, router_steps=2500, router_batch=256, router_lr=2e-3,
        eval_batch=256, eval_batches=8, overhead_batch=512, samples=1000, sample_steps=40,
        classifier_steps=1500,
    ),
}
QUICK_PLANS = {
    "bytelm": Plan(
        model={"d_model": 32, "n_layer": 1, "n_head": 2, "context": 32}, batch=8, steps=15,
        lr=2e-3, router={"d_model": 16, "n_layers": 1, "kernel_size": 4, "context": 32},
        router_steps=15, router_batch=16, router_lr=3e-3, eval_batch=8, eval_batches=2,
        overhead_batch=8, branch_at=0.75, every=5,
    ),
    "flow": Plan(
        model={"hidden": 32, "n_blocks": 1}, batch=32, steps=30, lr=1e-3,
        router={"hidden": 32, "depth": 2}, router_steps=30, router_batch=64, router_lr=2e-3,
        eval_batch=64, eval_batches=2, overhead_batch=64, samples=200, sample_steps=8,
        classifier_steps=100, every=10,
    ),
}
# fmt: on


# --- evaluation -------------------------------------------------------------------------------


def ensemble_of(name: str, experts: Sequence[nn.Module], router: nn.Module, rule: str):
    parts = {f"expert{i}": m for i, m in enumerate(experts)}
    return EnsembleModel.from_parts(name, parts, router, rule).eval()


def ensemble_losses(eval_wl: Workload, experts, router, batches: int) -> dict[str, float]:
    """Held-out loss of the ensemble under each rule (``workload.loss`` of an ensemble is its
    NLL for bytelm, whose forward gives normalised log-probabilities, and its velocity MSE for
    flow)."""
    return {
        key: eval_wl.validation_loss(ensemble_of(eval_wl.name, experts, router, rule), batches)
        for key, rule in RULES.items()
    }


def own_cluster_losses(eval_wl: Workload, models: list, val_labels, batches: int) -> list:
    """Model ``i`` on the held-out documents of cluster ``i`` (None where there are none)."""
    out = []
    for cluster, model in enumerate(models):
        docs = np.flatnonzero(val_labels == cluster).tolist()
        out.append(eval_wl.validation_loss(model, batches, doc_indices=docs) if docs else None)
    return out


def best_seconds(fn: Callable[[], Any], repeats: int = 7, number: int = 5) -> float:
    """Best-of-``repeats`` wall seconds of one call (each repeat averages ``number`` calls)."""
    with torch.no_grad():
        fn()  # warm up
        return min(timeit.repeat(fn, number=number, repeat=repeats)) / number


def overhead(router_fn: Callable[[], Any], expert_fn: Callable[[], Any]) -> dict[str, float]:
    router_s, expert_s = best_seconds(router_fn), best_seconds(expert_fn)
    return {"fraction": router_s / expert_s, "router_s": router_s, "expert_s": expert_s}


@torch.no_grad()
def prefix_accuracy(router: nn.Module, documents, labels, length: int, samples: int, seed: int):
    """Held-out accuracy of a prefix router: overall, and by position in a window of
    ``length`` bytes drawn inside one document (position i has seen i + 1 bytes)."""
    data, offsets = pack_texts([bytes(d.content) for d in documents])
    rng = np.random.default_rng([seed, 13])
    windows, mask, docs = sample_document_windows(rng, data, offsets, samples, length)
    hits = np.zeros_like(mask)
    for start in range(0, samples, 128):
        chunk = torch.from_numpy(windows[start : start + 128])
        predicted = router.prefix_probabilities(chunk).argmax(dim=-1).cpu().numpy()
        hits[start : start + 128] = predicted == np.asarray(labels)[docs[start : start + 128], None]
    hits &= mask
    bands = []
    edges = [e for e in POSITION_EDGES if e < length] + [length]
    for lo, hi in itertools.pairwise(edges):
        bands.append(
            {
                "pos_lo": lo,
                "pos_hi": hi,
                "accuracy": float(hits[:, lo:hi].sum()) / max(1, int(mask[:, lo:hi].sum())),
            }
        )
    return {"overall": float(hits.sum() / mask.sum()), "by_position": bands}


# --- the dense student ------------------------------------------------------------------------


def distill_student(name: str, trained: Trained, router, plan: Plan, seed: int):
    """A student of the experts' architecture, trained from scratch on the ensemble's outputs
    at the training stream's inputs, at the monolith's batch (see the module docstring, 7)."""
    train_wl = get_workload(name, batch_size=plan.batch, **plan.model)
    student = train_wl.build_model(seed + 31)
    teacher = ensemble_of(name, trained.experts, router, plan.distill_rule)
    steps = plan.distill_steps or plan.steps
    metrics = distill(student, teacher, train_wl.train_batches(seed + 31), steps, plan.distill_lr)
    gap = teacher_gap(student, teacher, train_wl.train_batches(seed + 977))
    print(f"  student distilled in {metrics.seconds:.0f} s (gap to teacher {gap:.4f})", flush=True)
    return student.eval(), metrics, gap


def serving_costs(models: dict[str, nn.Module], inputs: tuple[torch.Tensor, ...]) -> dict:
    """Per way to serve: FLOPs per input of one forward and the wall seconds of one batch."""
    out = {}
    for key, model in models.items():
        out[key] = {
            "flops_per_input": inference_flops(model, *inputs),
            "batch_s": best_seconds(lambda model=model: model(*inputs), repeats=5, number=3),
        }
    return out


def student_figures(
    eval_wl, trained: Trained, router, plan: Plan, student, metrics, gap, inputs
) -> dict[str, Any]:
    """The student's held-out loss, its compute on top of the experts', and what each way to
    serve costs per input (the student and the monolith one forward; an ensemble its rows)."""
    serve = {"monolith": trained.monolith, "student": student}
    serve.update({key: ensemble_of(eval_wl.name, trained.experts, router, rule)
                  for key, rule in RULES.items()})  # fmt: skip
    return {
        "loss": eval_wl.validation_loss(student, plan.eval_batches),
        "teacher_rule": plan.distill_rule,
        "teacher_gap": gap,
        "steps": metrics.steps,
        "batch": metrics.batch_size,
        "final_distill_loss": metrics.final_loss,
        "student_flops": metrics.student_flops,
        "teacher_flops": metrics.teacher_flops,
        "seconds": metrics.seconds,
        "serving": serving_costs(serve, inputs),
        "serving_batch": list(inputs[0].shape),
    }


# --- the two workloads ------------------------------------------------------------------------


def common_figures(eval_wl, trained: Trained, router, val_labels, plan: Plan) -> dict:
    """Held-out losses of the monolith, each expert alone, each ensemble rule, and per cluster."""
    n = plan.eval_batches
    return {
        "monolith_loss": eval_wl.validation_loss(trained.monolith, n),
        "expert_losses": [eval_wl.validation_loss(m, n) for m in trained.experts],
        "ensemble": ensemble_losses(eval_wl, trained.experts, router, n),
        "expert_own_cluster_losses": own_cluster_losses(eval_wl, trained.experts, val_labels, n),
        "monolith_cluster_losses": own_cluster_losses(
            eval_wl, [trained.monolith] * len(trained.experts), val_labels, n
        ),
    }


def fit_router(router, eval_wl, labels, plan: Plan, seed: int, seconds: dict):
    clock = time.perf_counter()
    metrics = train_router(
        router, eval_wl, labels, plan.router_steps, plan.router_batch, plan.router_lr, seed
    )
    seconds["train_router"] = time.perf_counter() - clock
    print(f"  router trained in {seconds['train_router']:.0f} s", flush=True)
    return router.eval(), metrics


def bytelm_benchmark(plan: Plan, k: int, split: str, seed: int) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    eval_wl = get_workload("bytelm", batch_size=plan.eval_batch, **plan.model)
    train_docs, val_docs = eval_wl.documents(), eval_wl.validation_documents()
    partition = TextPartitioner(k, balanced=True, seed=seed, balance_by=plan.balance_by).fit(
        [d.content for d in train_docs]
    )
    val_labels = held_out_labels(partition, val_docs)
    print(partition.report([d.id for d in train_docs], examples=2), flush=True)
    # the monolith draws windows uniformly over bytes, so a cluster's share is its bytes
    sizes = np.array([len(d.content) for d in train_docs], dtype=np.float64)
    shares = np.bincount(partition.labels, weights=sizes, minlength=k)
    seconds["partition"] = time.perf_counter() - clock

    clock = time.perf_counter()
    trained = train_compute_matched("bytelm", plan, partition.labels, shares, split, seed)
    seconds["train_models"] = time.perf_counter() - clock
    torch.manual_seed(seed)
    router, metrics = fit_router(
        PrefixRouter(k, **plan.router), eval_wl, partition.labels, plan, seed, seconds
    )
    cbtm = CbtmRouter(partition)

    clock = time.perf_counter()
    length, samples = plan.model["context"], 4 * plan.eval_batch * plan.eval_batches
    accuracy = prefix_accuracy(router, val_docs, val_labels, length, samples, seed)
    result = {
        "loss_unit": "nats per byte (mean next-byte NLL over fixed held-out windows)",
        **common_figures(eval_wl, trained, router, val_labels, plan),
    }
    seconds["evaluate"] = time.perf_counter() - clock

    idx = next(eval_wl.train_batches(seed + 99)).inputs[: plan.overhead_batch]
    expert = trained.experts[0]
    timing = overhead(lambda: router.prefix_probabilities(idx), lambda: expert(idx))
    cbtm_timing = overhead(lambda: cbtm.prefix_probabilities(idx), lambda: expert(idx))
    clock = time.perf_counter()
    result["cbtm"] = {
        "ensemble": ensemble_losses(eval_wl, trained.experts, cbtm, plan.eval_batches),
        "router_accuracy": prefix_accuracy(cbtm, val_docs, val_labels, length, samples, seed),
        "router_overhead": cbtm_timing["fraction"],
    }
    seconds["evaluate_cbtm"] = time.perf_counter() - clock
    clock = time.perf_counter()
    student, distilled, gap = distill_student("bytelm", trained, router, plan, seed)
    result["student"] = student_figures(
        eval_wl, trained, router, plan, student, distilled, gap, (idx,)
    )
    seconds["distill"] = time.perf_counter() - clock
    timing.update(batch=list(idx.shape))
    timing.update(flops_fraction=router.flops_per_forward() / expert_forward_flops(eval_wl))
    extra = {"train_bytes": shares.astype(int).tolist()}
    return finish(
        result,
        trained,
        metrics,
        accuracy,
        timing,
        partition,
        val_labels,
        extra,
        plan,
        split,
        seconds,
    )


def flow_benchmark(plan: Plan, k: int, split: str, seed: int) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    eval_wl = get_workload("flow", batch_size=plan.eval_batch, **plan.model)
    partition = VectorPartitioner(k, balanced=True, seed=seed).fit(eval_wl.train_images)
    val_labels = held_out_labels(partition, eval_wl.validation_documents())
    seconds["partition"] = time.perf_counter() - clock

    clock = time.perf_counter()
    trained = train_compute_matched("flow", plan, partition.labels, partition.sizes, split, seed)
    seconds["train_models"] = time.perf_counter() - clock
    torch.manual_seed(seed)
    router, metrics = fit_router(
        FlowRouter(k, **plan.router), eval_wl, partition.labels, plan, seed, seconds
    )

    clock = time.perf_counter()
    per_bin = max(256, plan.eval_batch * plan.eval_batches // 2)
    bands = accuracy_by_noise(
        router, eval_wl, val_labels, bins=10, samples_per_bin=per_bin, seed=seed
    )
    accuracy = {
        "overall": router_accuracy(router, eval_wl, val_labels, samples=5 * per_bin, seed=seed),
        "by_noise": [{"t_lo": lo, "t_hi": hi, "accuracy": acc} for lo, hi, acc in bands],
    }
    result = {
        "loss_unit": "flow-matching MSE per pixel at fixed held-out noise draws and times",
        **common_figures(eval_wl, trained, router, val_labels, plan),
    }
    seconds["evaluate"] = time.perf_counter() - clock
    x = torch.from_numpy(eval_wl.train_images[: plan.overhead_batch].copy())
    x, t = x + torch.randn_like(x), torch.rand(len(x))
    clock = time.perf_counter()
    student, distilled, gap = distill_student("flow", trained, router, plan, seed)
    result["student"] = student_figures(
        eval_wl, trained, router, plan, student, distilled, gap, (x, t)
    )
    seconds["distill"] = time.perf_counter() - clock
    clock = time.perf_counter()
    result.update(frechet_figures(eval_wl, trained, router, partition, plan, seed, student))
    seconds["sample_and_frechet"] = time.perf_counter() - clock

    expert = trained.experts[0]
    timing = overhead(lambda: router.probabilities(x, t), lambda: expert(x, t))
    timing.update(batch=list(x.shape))
    timing.update(flops_fraction=router.flops_per_forward() / expert_forward_flops(eval_wl))
    extra = {
        "digit_classes_per_cluster": [
            np.bincount(eval_wl.train_labels[partition.labels == c], minlength=10).tolist()
            for c in range(k)
        ]
    }
    return finish(
        result,
        trained,
        metrics,
        accuracy,
        timing,
        partition,
        val_labels,
        extra,
        plan,
        split,
        seconds,
    )


def frechet_figures(
    eval_wl, trained: Trained, router, partition: Partition, plan: Plan, seed: int, student=None
) -> dict[str, Any]:
    """Sample every method (and the distilled ``student``, if given) from the same noise and
    score it against the held-out digits; the floor scores as many training digits (drawn
    once) against the same held-out set."""
    scorer = DigitFrechet(eval_wl, plan.classifier_steps, seed)
    n = min(plan.samples or len(eval_wl.train_images), len(eval_wl.train_images))
    shares: dict[str, list[float]] = {}

    def score(key: str, images: np.ndarray) -> float:
        flat = np.clip(images.reshape(len(images), -1), -1.0, 1.0)
        shares[key] = (np.bincount(partition.assign(flat), minlength=partition.k) / n).tolist()
        return scorer.score(flat)

    def sample_model(model: nn.Module) -> np.ndarray:
        return flow_sample(model_velocity(model), n, plan.sample_steps, seed)

    frechet = {"monolith": score("monolith", sample_model(trained.monolith))}
    calls = {}
    for key, rule in RULES.items():
        ensemble = ensemble_of("flow", trained.experts, router, rule)
        frechet[key] = score(key, ensemble.sample(n, plan.sample_steps, seed))
        calls[key] = ensemble.expert_calls / plan.sample_steps
    if student is not None:
        frechet["student"] = score("student", sample_model(student))
    frechet["floor"] = score("floor", scorer.floor_images(n))
    experts_alone = [score(f"expert{i}", sample_model(m)) for i, m in enumerate(trained.experts)]
    return {
        "frechet": frechet,
        "expert_frechet": experts_alone,
        "frechet_detail": {
            "samples": n,
            "euler_steps": plan.sample_steps,
            "held_out_images": len(eval_wl.val_images),
            "classifier_held_out_accuracy": scorer.held_out_accuracy(),
            "features": "penultimate layer (32 SiLU units) of a 64-128-32-10 MLP",
            "expert_calls_per_step": calls,
            "cluster_shares": shares,  # nearest-centroid cluster of each sample set
            "training_cluster_shares": (partition.sizes / partition.sizes.sum()).tolist(),
        },
    }


def finish(
    result, trained, metrics, accuracy, timing, partition, val_labels, extra, plan, split, seconds
) -> dict[str, Any]:
    """Add the router figures, the settings, the timings and whether the targets were met."""
    accuracy["train"] = metrics.train_accuracy
    result.update(
        router_overhead=timing["fraction"],
        router_overhead_detail=timing,
        train_flops={
            **trained.train_flops,
            "router": metrics.train_flops,
            **distill_flops(result.get("student")),
        },
        router_accuracy=accuracy,
        final_train_loss=trained.final_train_loss,
        expert_batches=trained.expert_batches,
        branch_step=trained.branch_step,
        partition={
            "sizes": partition.sizes.tolist(),
            "held_out_sizes": np.bincount(val_labels, minlength=partition.k).tolist(),
            **extra,
        },
    )
    if "frechet" in result:
        measure, monolith, sparse = "frechet", result["frechet"]["monolith"], result["frechet"]
    else:
        measure, monolith, sparse = "held-out loss", result["monolith_loss"], result["ensemble"]
    best_sparse = min(sparse["top1"], sparse["top2"])
    result["targets"] = {
        "measure": measure,
        "sparse_ensemble_beats_monolith": bool(best_sparse < monolith),
        "best_sparse_over_monolith": best_sparse / monolith,
        "router_overhead_at_most_5pct": bool(result["router_overhead"] <= OVERHEAD_TARGET),
    }
    result["settings"] = {**dataclasses.asdict(plan), "split": split}
    result["seconds"] = seconds
    return result


# --- output -----------------------------------------------------------------------------------


def distill_flops(student: dict | None) -> dict[str, float]:
    """The distillation's training compute (the student's steps and the teacher's forwards)."""
    if not student:
        return {}
    return {"distill": student["student_flops"] + student["teacher_flops"]}


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def branched(r: dict) -> str:
    step = r.get("branch_step", 0)
    return f" (experts branched from the monolith at step {step})" if step else ""


def print_tables(results: dict[str, dict], k: int, threads: int) -> None:
    for name, r in results.items():
        plan, flow = r["settings"], name == "flow"
        frechet = r.get("frechet", {})

        def fd(key: str, frechet=frechet) -> list:
            return [frechet[key]] if frechet else []

        rows = [["monolith", r["monolith_loss"], *fd("monolith")]]
        for i, loss in enumerate(r["expert_losses"]):
            rows.append([f"expert {i} alone", loss, *([r["expert_frechet"][i]] if flow else [])])
        router_name = "FlowRouter" if flow else "PrefixRouter"
        rows += [[f"ensemble {key} ({router_name})", r["ensemble"][key], *fd(key)] for key in RULES]
        if "student" in r:
            teacher = {rule: key for key, rule in RULES.items()}.get(r["student"]["teacher_rule"])
            rows.append([f"student distilled from {teacher}", r["student"]["loss"], *fd("student")])
        if flow:
            rows.append(["floor: train vs held-out digits", None, r["frechet"]["floor"]])
        else:
            rows += [
                [f"ensemble {key} (c-BTM router)", r["cbtm"]["ensemble"][key]] for key in RULES
            ]
        print(f"\n{name}: K={k} experts vs a compute-matched monolith ({r['loss_unit']})")
        print(format_table(["model", "held-out loss", *(["Frechet"] if flow else [])], rows))
        per_cluster = zip(r["monolith_cluster_losses"], r["expert_own_cluster_losses"], strict=True)
        print(
            "per held-out cluster, monolith vs its expert: "
            + ", ".join(
                f"{i}: {m:.3f} vs {e:.3f}" for i, (m, e) in enumerate(per_cluster) if m is not None
            )
        )
        acc, flops, detail, t = (
            r["router_accuracy"],
            r["train_flops"],
            r["router_overhead_detail"],
            r["targets"],
        )
        if flow:
            bands = [
                f"t {b['t_lo']:.1f}-{b['t_hi']:.1f}: {b['accuracy']:.2f}" for b in acc["by_noise"]
            ]
            shares = r["frechet_detail"]["cluster_shares"]
            print(
                "samples per cluster: "
                + "; ".join(
                    f"{key} {[round(v, 2) for v in shares[key]]}"
                    for key in ("floor", "monolith", *RULES)
                )
            )
        else:
            bands = [
                f"pos {b['pos_lo']}-{b['pos_hi'] - 1}: {b['accuracy']:.2f}"
                for b in acc["by_position"]
            ]
            cbtm = r["cbtm"]
            print(
                f"c-BTM router: held-out accuracy {cbtm['router_accuracy']['overall']:.3f}, "
                f"overhead {cbtm['router_overhead']:.1%} of an expert forward"
            )
        print(
            f"router held-out accuracy {acc['overall']:.3f} (chance {1 / k:.2f}); "
            + ", ".join(bands)
        )
        print(
            f"router overhead {r['router_overhead']:.1%} of one expert forward (wall, batch "
            f"{detail['batch']}), {detail['flops_fraction']:.1%} in FLOPs; train FLOPs: "
            f"monolith {flops['monolith']:.3g}, experts {flops['experts']:.3g}, router "
            f"{flops['router']:.3g} ({flops['router'] / flops['experts']:.1%} of experts)"
        )
        print(
            f"targets: sparse ensemble beats monolith on {t['measure']}: "
            f"{_yes(t['sparse_ensemble_beats_monolith'])} (best sparse / monolith = "
            f"{t['best_sparse_over_monolith']:.3f}); router overhead <= 5%: "
            f"{_yes(t['router_overhead_at_most_5pct'])}"
        )
        if "student" in r:
            st = r["student"]
            total = flops["experts"] + flops["router"] + flops["distill"]
            print(
                f"student: {st['steps']} steps x {st['batch']} from the {st['teacher_rule']} "
                f"ensemble in {st['seconds']:.0f} s, gap to teacher {st['teacher_gap']:.4f}; "
                f"distillation FLOPs {flops['distill']:.3g} ({flops['distill'] / flops['experts']:.0%} "
                f"of the experts'); experts + router + student {total:.3g} = "
                f"{total / flops['monolith']:.2f}x the monolith's training compute"
            )
            serving = st["serving"]
            base = serving["monolith"]
            print(f"serving one batch {st['serving_batch']}:")
            print(format_table(
                ["model", "FLOPs per input", "x monolith", "batch s", "x monolith wall"],
                [[key, c["flops_per_input"], c["flops_per_input"] / base["flops_per_input"],
                  c["batch_s"], c["batch_s"] / base["batch_s"]] for key, c in serving.items()],
            ))  # fmt: skip
        sampling = (
            f"; {r['frechet_detail']['samples']} samples x {plan['sample_steps']} Euler steps"
            if flow
            else ""
        )
        print(
            f"settings: model {plan['model']}; monolith batch {plan['batch']}, expert batches "
            f"{r['expert_batches']} ({plan['split']} split), {plan['steps']} steps each"
            f"{branched(r)}, AdamW "
            f"lr {plan['lr']}; router {plan['router']}, {plan['router_steps']} steps x "
            f"{plan['router_batch']}; eval {plan['eval_batches']} x {plan['eval_batch']}"
            f"{sampling}; {threads} torch thread(s); seconds: "
            + ", ".join(f"{key} {value:.0f}" for key, value in r["seconds"].items())
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and few steps (smoke test)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--only", choices=["bytelm", "flow"], help="run one workload")
    p.add_argument("--hybrid", action="store_true",
                   help="8 islands on 4 clusters: isolated experts, expert groups of local-update "
                        "islands, one global model and the monolith at equal compute (flow "
                        "unless --only bytelm)")  # fmt: skip
    p.add_argument("--k", type=int, default=4, help="number of experts (clusters)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--split",
        choices=["proportional", "equal"],
        default="proportional",
        help="how the monolith's batch is split across the experts (by cluster share, or B/K)",
    )
    p.add_argument(
        "--plan",
        action="append",
        default=[],
        metavar="WORKLOAD.KEY=VALUE",
        help="override one plan entry, e.g. bytelm.steps=3000 or bytelm.model.d_model=64 "
        "(repeatable; the JSON records the plan used)",
    )
    return p


def override_plans(plans: dict[str, Plan], items: Sequence[str]) -> dict[str, Plan]:
    """Apply ``--plan WORKLOAD.KEY[.SUBKEY]=VALUE`` overrides (numbers parsed as such)."""
    plans = dict(plans)
    for item in items:
        path, sep, text = item.partition("=")
        keys = path.split(".")
        if not sep or len(keys) not in (2, 3) or keys[0] not in plans:
            raise SystemExit(f"--plan {item!r}: use WORKLOAD.KEY=VALUE, WORKLOAD in {list(plans)}")
        try:
            value: Any = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                value = text
        plan = plans[keys[0]]
        if not hasattr(plan, keys[1]):
            raise SystemExit(f"--plan {item!r}: a plan has no entry {keys[1]!r}")
        if len(keys) == 3:
            inner = dict(getattr(plan, keys[1]))
            inner[keys[2]] = value
            value = inner
        plans[keys[0]] = dataclasses.replace(plan, **{keys[1]: value})
    return plans


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    plans = override_plans(QUICK_PLANS if args.quick else FULL_PLANS, args.plan)
    runners = {"bytelm": bytelm_benchmark, "flow": flow_benchmark}
    results = {}
    started = time.perf_counter()
    if args.hybrid:
        from ensemble_hybrid import hybrid_benchmark, print_hybrid

        for name in [args.only or "flow"]:
            print(f"== {name} (hybrid)", flush=True)
            results[name] = hybrid_benchmark(name, plans[name], args.k, args.seed)
        print_hybrid(results)
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
        write_json(args.json, {**results, "k": args.k, "quick": args.quick, "hybrid": True})
        return 0
    for name in [args.only] if args.only else list(runners):
        print(f"== {name}", flush=True)
        results[name] = runners[name](plans[name], args.k, args.split, args.seed)
    print_tables(results, args.k, args.threads)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    write_json(args.json, {**results, "k": args.k, "quick": args.quick})
    return 0


if __name__ == "__main__":
    sys.exit(main())
