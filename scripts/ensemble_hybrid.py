"""``scripts/bench_ensemble.py --hybrid``: how to spend N islands on K clusters.

At equal total training compute (the monolith's ``S`` steps at batch ``B``; ``N = 8``
islands, ``K = 4`` clusters, groups of ``G = N / K = 2``), four ways to train:

(a) ``isolated``: K experts, each trained by one island alone on its cluster for ``G S`` steps
    (Decentralized Diffusion Models, McAllister et al. 2025; c-BTM, Gururangan et al. 2023);
(b) ``groups``: K experts, each trained by a group of G islands in local-update mode on its
    cluster, S inner steps each: every ``H`` inner steps each island pushes its
    pseudo-gradient, the expert's line merges them and takes the outer step (the hybrid mode,
    ``aggregator.groups``);
(c) ``global``: one model trained by all N islands in local-update mode on all the data
    (DiLoCo, Douillard et al. 2023), S inner steps each;
(d) ``monolith``: one model, S steps at batch B on all the data.

An island's batch is the same in (a), (b) and (c) up to rounding: expert k's islands take the
share of ``B / G`` that comes from cluster k (``split_batch``), the global model's islands
``B / N`` each; so every arm costs S B samples of compute. Every model starts from the same
theta_0 (no shared seed phase, whatever the plan's ``branch_at``). The experts of (a) and (b)
are mixed by one router trained on the partition (``full``, ``top_k:2``, ``top1``). The
default workload is flow, the setting Decentralized Diffusion Models was written for;
``--only bytelm`` runs the same on text. The measured seconds of an arm include building its
workloads; the modelled wall time counts the islands' training steps only.

Local-update rounds are simulated in this process, synchronously (every island of a line
pushes, then the line takes its outer step and every island adopts it), with the code the
aggregator and the islands run: ``island.pseudo.pseudo_gradient``, ``comms.update``'s
``encode_update`` / ``decode_update`` (int8 pushes with each island's error feedback, signed
envelopes), ``aggregator.merge.accumulate`` with the FedBuff weight of staleness 0 and
``aggregator.gateway.update_work``, and ``aggregator.root.RootModel`` (Nesterov outer step,
lr 0.7, momentum 0.9; ``u_v`` published in int8 with the root's error feedback). Bytes are
the envelopes' sizes: every push, and every version sent to each island of its line (gRPC
framing not counted). Time: the measured seconds of each arm here (one process, the islands
one after another, at whatever load the machine had then), and a modelled wall time for
islands running in parallel: the slowest island's steps times the seconds of one step at its
batch (``step_seconds``: every batch timed back to back, best of three) plus, per round, one
push and one version over a link of ``LINK_MBIT`` and ``LINK_LATENCY_S`` (the main job's
default link); the monolith and the isolated experts send nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ensemble_training import make_optimizer, split_batch, train_steps
from frechet import DigitFrechet

from aggregator.gateway import update_work
from aggregator.merge import PartialAggregate, accumulate
from aggregator.outer import apply_update, make_outer_optimizer
from aggregator.root import RootModel
from aggregator.staleness import staleness_weight
from comms.codecs import ErrorFeedback, get_codec
from comms.envelope import Envelope
from comms.identity import Identity
from comms.update import decode_update, encode_update
from island.pseudo import load_numpy_into, params_to_numpy, pseudo_gradient
from island.workloads import get_workload
from island.workloads.flow import model_velocity
from island.workloads.flow import sample as flow_sample

ISLANDS = 8
CODEC = "int8"  # islands' pushes and the published u_v (the defaults of island and root)
OUTER = ("nesterov", {"lr": 0.7, "momentum": 0.9})  # DiLoCo's outer step, the root's default
LINK_MBIT = 10.0
LINK_LATENCY_S = 0.05
ARMS = ("isolated", "groups", "global", "monolith")


@dataclass
class IslandSpec:
    """One island of a line: its batch and its documents (a shard of ``docs``)."""

    batch: int
    docs: list[int] | None  # None: every training document
    shard: int = 0
    num_shards: int = 1


@dataclass
class LineResult:
    model: torch.nn.Module
    bytes_up: int = 0  # pushes, island -> aggregator
    bytes_down: int = 0  # versions, aggregator -> islands
    versions: int = 0
    rounds: int = 0
    samples: int = 0  # training examples (images or windows) of every island together
    island_compute_s: list[float] = field(default_factory=list)


def comm_seconds(rounds: int, push_bytes: float, version_bytes: float) -> float:
    """Modelled link time of ``rounds`` synchronous rounds: one push up and one version down
    per round at ``LINK_MBIT``, each with ``LINK_LATENCY_S``."""
    per_round = 8 * (push_bytes + version_bytes) / (LINK_MBIT * 1e6) + 2 * LINK_LATENCY_S
    return rounds * per_round


def island_batches(batch: int, shares, group: int) -> list[int]:
    """Each cluster's island batch: cluster k's share of ``batch / group`` rows."""
    if batch % group:
        raise ValueError(f"batch {batch} must be a multiple of the group size {group}")
    return split_batch(batch // group, shares)


def train_alone(name: str, plan, spec: IslandSpec, steps: int, seed: int,
                data_seed: int) -> LineResult:  # fmt: skip
    """One island trains ``steps`` in isolation (an expert of arm (a), or the monolith)."""
    wl = get_workload(name, batch_size=spec.batch, **plan.model)
    model = wl.build_model(seed)
    optimizer = make_optimizer(model, plan.lr)
    data = wl.train_batches(data_seed, spec.shard, spec.num_shards, spec.docs)
    started = time.perf_counter()
    train_steps(wl, model, optimizer, data, range(steps), steps, plan.lr)
    seconds = time.perf_counter() - started
    return LineResult(model, samples=spec.batch * steps, island_compute_s=[seconds])


def train_line(name: str, plan, specs: list[IslandSpec], model_id: str, seed: int,
               data_seed: int) -> LineResult:  # fmt: skip
    """One model line trained by ``specs`` islands in local-update mode, synchronously: each
    round every island runs ``plan.every`` inner steps (AdamW, state kept across rounds) from
    the line's version, pushes ``anchor - params`` (int8, error feedback, signed), and the
    root merges the pushes and takes its outer step; every island adopts the new version."""
    wls = [get_workload(name, batch_size=s.batch, **plan.model) for s in specs]
    models = [wl.build_model(seed) for wl in wls]
    anchor = params_to_numpy(models[0])  # theta_0, shared (one seed)
    outer = make_outer_optimizer(OUTER[0], **OUTER[1])
    root = RootModel(model_id, anchor, outer, get_codec(CODEC), Identity.generate(),
                     buffer_k=len(specs))  # fmt: skip
    anchor = {k: v.copy() for k, v in root.theta.items()}
    optimizers = [make_optimizer(m, plan.lr) for m in models]
    data = [wl.train_batches(data_seed + i, s.shard, s.num_shards, s.docs)
            for i, (wl, s) in enumerate(zip(wls, specs, strict=True))]  # fmt: skip
    identities = [Identity.generate() for _ in specs]
    feedback = [ErrorFeedback() for _ in specs]
    out = LineResult(models[0], island_compute_s=[0.0] * len(specs))
    weight = staleness_weight("fedbuff", 0)  # synchronous rounds: every push is fresh
    for start in range(0, plan.steps, plan.every):
        steps = range(start, min(start + plan.every, plan.steps))
        partial = PartialAggregate()
        for i, (wl, model) in enumerate(zip(wls, models, strict=True)):
            load_numpy_into(model, anchor)
            clock = time.perf_counter()
            train_steps(wl, model, optimizers[i], data[i], steps, plan.steps, plan.lr)
            out.island_compute_s[i] += time.perf_counter() - clock
            out.samples += specs[i].batch * len(steps)
            meta = {"steps": len(steps), "every": plan.every}
            env = encode_update(
                pseudo_gradient(anchor, params_to_numpy(model)), codec=CODEC, model_id=model_id,
                kind="delta", sender=identities[i].peer_id, sequence=out.rounds + 1,
                base_version=root.version, meta=meta, error_feedback=feedback[i],
                identity=identities[i],
            )  # fmt: skip
            wire = env.to_bytes()
            out.bytes_up += len(wire)
            delta = decode_update(Envelope.from_bytes(wire, max_bytes=1 << 30))
            accumulate(partial, delta, weight, update_id=(env.header.sender, env.header.sequence),
                       work=update_work(meta))  # fmt: skip
        version = root.step(partial)
        out.bytes_down += len(version.envelope) * len(specs)
        apply_update(
            anchor, decode_update(Envelope.from_bytes(version.envelope, max_bytes=1 << 30))
        )
        out.rounds += 1
    load_numpy_into(models[0], anchor)  # the line's last version, as every island holds it
    out.versions = root.version
    return out


def train_arms(name: str, plan, labels: np.ndarray, shares, k: int, seed: int) -> dict:
    """The four arms of the module docstring, every model from the same theta_0 (``seed``);
    returns arm -> its lines (``LineResult``), seconds and island batches."""
    group = ISLANDS // k
    batches = island_batches(plan.batch, shares, group)
    members = [np.flatnonzero(labels == c).tolist() for c in range(k)]
    arms: dict[str, dict[str, Any]] = {}

    def record(arm: str, lines: list[LineResult], started: float) -> None:
        arms[arm] = {"lines": lines, "seconds": time.perf_counter() - started}
        print(f"  {arm}: trained in {arms[arm]['seconds']:.0f} s", flush=True)

    started = time.perf_counter()
    lines = [train_alone(name, plan, IslandSpec(batches[c], members[c]), group * plan.steps,
                         seed, seed + 10 * c) for c in range(k)]  # fmt: skip
    record("isolated", lines, started)
    started = time.perf_counter()
    lines = [train_line(name, plan, [IslandSpec(batches[c], members[c], j, group)
                                     for j in range(group)], f"expert{c}", seed, seed + 10 * c)
             for c in range(k)]  # fmt: skip
    record("groups", lines, started)
    started = time.perf_counter()
    per_island = split_batch(plan.batch, np.ones(ISLANDS))
    specs = [IslandSpec(per_island[i], None, i, ISLANDS) for i in range(ISLANDS)]
    record("global", [train_line(name, plan, specs, "global", seed, seed + 100)], started)
    started = time.perf_counter()
    monolith = train_alone(name, plan, IslandSpec(plan.batch, None), plan.steps, seed, seed + 1)
    record("monolith", [monolith], started)
    for arm in arms.values():
        arm["island_batches"] = batches
    arms["global"]["island_batches"] = per_island
    arms["monolith"]["island_batches"] = [plan.batch]
    return arms


def step_seconds(name: str, plan, batches, seed: int, steps: int = 5, repeats: int = 3):
    """batch -> seconds of one training step at that batch: the best of ``repeats`` runs of
    ``steps`` steps, every batch timed back to back after one warm-up step, so the arms'
    modelled wall times share one clock (the measured ones depend on the machine's load
    while each arm ran)."""
    out = {}
    for batch in sorted(set(batches)):
        wl = get_workload(name, batch_size=batch, **plan.model)
        model = wl.build_model(seed)
        optimizer = make_optimizer(model, plan.lr)
        data = wl.train_batches(seed)
        train_steps(wl, model, optimizer, data, range(1), steps, plan.lr)
        best = float("inf")
        for _ in range(repeats):
            clock = time.perf_counter()
            train_steps(wl, model, optimizer, data, range(steps), steps, plan.lr)
            best = min(best, (time.perf_counter() - clock) / steps)
        out[batch] = best
    return out


def island_steps(arm: str, entry: dict, plan, k: int) -> list[tuple[int, int]]:
    """(batch, steps) of every island of an arm."""
    batches, group = entry["island_batches"], ISLANDS // k
    if arm == "isolated":
        return [(b, group * plan.steps) for b in batches]
    if arm == "groups":
        return [(b, plan.steps) for b in batches for _ in range(group)]
    return [(b, plan.steps) for b in batches]  # global: one per island; monolith: one


def arm_figures(arm: str, entry: dict, plan, step_s: dict[int, float], k: int) -> dict[str, Any]:
    """Bytes, versions and times of one arm (see the module docstring for the wall time)."""
    lines: list[LineResult] = entry["lines"]
    up, down = sum(x.bytes_up for x in lines), sum(x.bytes_down for x in lines)
    compute = [s for x in lines for s in x.island_compute_s]
    islands = {"isolated": len(lines), "monolith": 1}.get(arm, ISLANDS)
    comm = 0.0
    for x in lines:
        if x.rounds:
            pushes = x.rounds * len(x.island_compute_s)
            comm = max(comm, comm_seconds(x.rounds, x.bytes_up / pushes, x.bytes_down / pushes))
    return {
        "islands": islands,
        "bytes_sent": up + down,
        "bytes_pushed": up,
        "bytes_published": down,
        "versions": [x.versions for x in lines],
        "rounds": max(x.rounds for x in lines),
        "samples_trained": sum(x.samples for x in lines),
        "measured_seconds": entry["seconds"],
        "island_compute_seconds": compute,
        "modelled_compute_seconds": max(
            n * step_s[b] for b, n in island_steps(arm, entry, plan, k)
        ),
        "modelled_wall_seconds": comm
        + max(n * step_s[b] for b, n in island_steps(arm, entry, plan, k)),
        "modelled_link_seconds": comm,
        "island_batches": entry["island_batches"],
        "steps_per_island": plan.steps * (ISLANDS // len(lines) if arm == "isolated" else 1),
    }


def quality(name: str, arms: dict, router, plan, seed: int) -> dict[str, dict[str, Any]]:
    """Held-out loss of every arm (the experts' arms under each rule and each expert alone),
    and for flow the Frechet distance of samples from the same noise, with the floor."""
    from bench_ensemble import RULES, ensemble_losses, ensemble_of

    eval_wl = get_workload(name, batch_size=plan.eval_batch, **plan.model)
    n_eval = plan.eval_batches
    out: dict[str, dict[str, Any]] = {}
    for arm, entry in arms.items():
        models = [x.model for x in entry["lines"]]
        if arm in ("isolated", "groups"):
            out[arm] = {"ensemble": ensemble_losses(eval_wl, models, router, n_eval),
                        "expert_losses": [eval_wl.validation_loss(m, n_eval) for m in models]}  # fmt: skip
            out[arm]["loss"] = min(out[arm]["ensemble"]["top1"], out[arm]["ensemble"]["top2"])
        else:
            out[arm] = {"loss": eval_wl.validation_loss(models[0], n_eval)}
    if name != "flow":
        return out
    scorer = DigitFrechet(eval_wl, plan.classifier_steps, seed)
    n = min(plan.samples or len(eval_wl.train_images), len(eval_wl.train_images))

    def score(images: np.ndarray) -> float:
        return scorer.score(np.clip(images.reshape(len(images), -1), -1.0, 1.0))

    for arm, entry in arms.items():
        models = [x.model for x in entry["lines"]]
        if arm in ("isolated", "groups"):
            fd = {key: score(ensemble_of("flow", models, router, rule).sample(n, plan.sample_steps,
                                                                              seed))
                  for key, rule in RULES.items()}  # fmt: skip
            out[arm]["frechet_by_rule"] = fd
            out[arm]["frechet"] = min(fd["top1"], fd["top2"])
        else:
            out[arm]["frechet"] = score(
                flow_sample(model_velocity(models[0]), n, plan.sample_steps, seed)
            )
    out["floor"] = {"frechet": score(scorer.floor_images(n)), "samples": n}
    return out


def hybrid_benchmark(name: str, plan, k: int, seed: int) -> dict[str, Any]:
    """Partition, train the four arms, a router for the experts, and measure them all."""
    from bench_ensemble import fit_router

    from router.models import FlowRouter, PrefixRouter
    from router.partition import TextPartitioner, VectorPartitioner

    if ISLANDS % k:
        raise SystemExit(f"--hybrid: {ISLANDS} islands do not split into groups for --k {k}")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    eval_wl = get_workload(name, batch_size=plan.eval_batch, **plan.model)
    if name == "flow":
        partition = VectorPartitioner(k, balanced=True, seed=seed).fit(eval_wl.train_images)
        shares = partition.sizes
    else:
        docs = eval_wl.documents()
        partition = TextPartitioner(k, balanced=True, seed=seed, balance_by=plan.balance_by).fit(
            [d.content for d in docs]
        )
        sizes = np.array([len(d.content) for d in docs], dtype=np.float64)
        shares = np.bincount(partition.labels, weights=sizes, minlength=k)
    seconds["partition"] = time.perf_counter() - clock
    torch.manual_seed(seed)
    arms = train_arms(name, plan, partition.labels, shares, k, seed)
    router = FlowRouter(k, **plan.router) if name == "flow" else PrefixRouter(k, **plan.router)
    torch.manual_seed(seed)
    router, metrics = fit_router(router, eval_wl, partition.labels, plan, seed, seconds)
    clock = time.perf_counter()
    figures = quality(name, arms, router, plan, seed)
    seconds["evaluate"] = time.perf_counter() - clock
    flops = eval_wl.flops_per_step(plan.batch) * plan.steps
    seconds.update({f"train_{arm}": entry["seconds"] for arm, entry in arms.items()})
    clock = time.perf_counter()
    step_s = step_seconds(name, plan, [b for e in arms.values() for b in e["island_batches"]],
                          seed)  # fmt: skip
    seconds["time_steps"] = time.perf_counter() - clock
    result: dict[str, Any] = {"arms": {}, "router_train_accuracy": metrics.train_accuracy}
    for arm, entry in arms.items():
        result["arms"][arm] = {**figures[arm], **arm_figures(arm, entry, plan, step_s, k),
                               "train_flops": flops}  # fmt: skip
    if "floor" in figures:
        result["frechet_floor"] = figures["floor"]["frechet"]
    result["settings"] = {
        "workload": name, "model": plan.model, "islands": ISLANDS, "clusters": k,
        "group": ISLANDS // k, "monolith_batch": plan.batch, "steps": plan.steps,
        "every": plan.every, "inner": {"optimizer": "AdamW", "lr": plan.lr, "weight_decay": 0.01,
                                       "schedule": "5% warm-up, cosine to 10%"},
        "outer": {"name": OUTER[0], **OUTER[1]}, "codec": CODEC,
        "link": {"rate_mbit": LINK_MBIT, "latency_s": LINK_LATENCY_S},
        "simulation": "in-process, synchronous rounds, the aggregator's and islands' functions",
        "cluster_sizes": np.bincount(partition.labels, minlength=k).tolist(),
        "samples": plan.samples, "sample_steps": plan.sample_steps,
        "step_seconds_by_batch": {str(b): v for b, v in step_s.items()},
    }  # fmt: skip
    result["seconds"] = seconds
    return result


def print_hybrid(results: dict[str, dict]) -> None:
    from benchlib import format_table

    for name, r in results.items():
        s, flow = r["settings"], name == "flow"
        print(f"\n{name}: {s['islands']} islands, {s['clusters']} clusters, equal compute "
              f"(monolith {s['steps']} steps at batch {s['monolith_batch']}); H = {s['every']}")  # fmt: skip
        rows = []
        labels = {
            "isolated": f"(a) {s['clusters']} experts, 1 island each, {s['group'] * s['steps']} steps",
            "groups": f"(b) {s['clusters']} experts, {s['group']} islands each (local update)",
            "global": f"(c) 1 model, {s['islands']} islands (local update)",
            "monolith": "(d) monolith",
        }  # fmt: skip
        for arm in ARMS:
            a = r["arms"][arm]
            rows.append([labels[arm], a["loss"], *([a["frechet"]] if flow else []), a["bytes_sent"],
                         a["measured_seconds"], a["modelled_wall_seconds"]])  # fmt: skip
        if flow:
            rows.append(["floor: train vs held-out digits", None, r["frechet_floor"], None, None,
                         None])  # fmt: skip
        head = ["method", "held-out loss", *(["Frechet"] if flow else []), "bytes sent",
                "measured s", "wall s (parallel, modelled)"]  # fmt: skip
        print(format_table(head, rows))
        for arm in ("isolated", "groups"):
            a = r["arms"][arm]
            fd = a.get("frechet_by_rule", {})
            print(f"{arm}: ensemble loss " + ", ".join(f"{k} {v:.4g}" for k, v in a["ensemble"].items())
                  + ("; Frechet " + ", ".join(f"{k} {v:.3g}" for k, v in fd.items()) if fd else "")
                  + "; experts alone " + ", ".join(f"{v:.4g}" for v in a["expert_losses"]))  # fmt: skip
        print("loss and Frechet of the experts' arms: the better of top-1 and top-2; seconds: "
              + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()))  # fmt: skip
