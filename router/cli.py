"""``router``: partition the data, train the router, evaluate the ensemble, serve it.

    router partition CONFIG.toml   cluster a workload's training documents into K partitions
    router train CONFIG.toml       train a router to predict the partition, save it signed
    router eval CONFIG.toml        held-out loss of each expert and of the ensemble per rule
    router distill CONFIG.toml     train one dense student on the ensemble's outputs, save it
    router serve SERVE.toml        serve the ensemble over HTTP (see ``router.server``)

``partition``, ``train``, ``eval`` and ``distill`` read one experiment config (``RouterConfig``)::

    [workload]
    name = "bytelm"
    config = { data = ["corpus/"], context = 64 }

    [partition]
    dir = "runs/partition"
    k = 4

    [router]
    dir = "runs/router"
    steps = 500

    [eval]
    experts = ["runs/expert0", "runs/expert1", "runs/expert2", "runs/expert3"]
    output = "runs/eval.json"

    [distill]                      # experts and router default to [eval]'s
    rule = "top_k:2"
    steps = 600
    output = "runs/student"

``distill``'s ``--steps``, ``--batch-size``, ``--lr``, ``--seed``, ``--rule`` and ``--output``
override the ``[distill]`` keys of the same names.

Configs are typed (``comms.config.load_config``); paths are taken from the working directory.
A bad config or input prints ``router: <file>: <key>: <message>`` and exits 2, with no
traceback. Everything runs synchronously in the calling thread (``serve`` runs an asyncio loop).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Literal

from comms.config import config_from_dict, load_config
from comms.errors import CommsError, ConfigError
from comms.logs import add_log_arguments, setup_from_args

# --- configs --------------------------------------------------------------------------------


@dataclasses.dataclass
class WorkloadSection:
    name: str = "bytelm"  # a registered workload: bytelm or flow
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # its config keys


@dataclasses.dataclass
class PartitionSection:
    dir: str = "partition"  # where the partition is saved
    k: int = 4  # number of clusters = experts
    balanced: bool = True  # c-BTM balanced k-means
    balance_slack: float = 0.1  # clusters hold at most ceil(n / k * (1 + slack)) items
    balance_by: Literal["documents", "bytes"] = "documents"  # text: what a balanced cap counts
    seed: int = 0
    n_init: int = 10  # k-means restarts
    svd_dims: int = 100  # text: TF-IDF -> SVD dimensions
    max_features: int = 50_000  # text: TF-IDF vocabulary size
    pca_dims: int = 0  # vectors: PCA dimensions (0 = raw features)
    examples: int = 3  # documents shown per cluster in the report

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k: must be at least 1, got {self.k}")
        if self.balance_slack < 0:
            raise ConfigError(f"balance_slack: must be >= 0, got {self.balance_slack}")
        for key in ("n_init", "svd_dims", "max_features"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be at least 1, got {getattr(self, key)}")
        if self.pca_dims < 0:
            raise ConfigError(f"pca_dims: must be >= 0, got {self.pca_dims}")


@dataclasses.dataclass
class RouterSection:
    dir: str = "router"  # where the router checkpoint is saved
    kind: str = "auto"  # flow, prefix, or auto (flow for flow, prefix for bytelm)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # router constructor keys
    expert_ids: list[str] = dataclasses.field(default_factory=list)  # names by output
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    position_weighting: str = "uniform"  # text: uniform or linear
    eval_samples: int = 2048  # held-out draws for the accuracy report
    key: str = ""  # Ed25519 key file to sign with (created if absent); "" = a fresh key
    version: int = 0

    def validate(self) -> None:
        if self.kind not in ("auto", "flow", "prefix"):
            raise ConfigError(f"kind: must be auto, flow or prefix, got {self.kind!r}")
        for key in ("steps", "batch_size", "eval_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be at least 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.position_weighting not in ("uniform", "linear"):
            raise ConfigError(
                f"position_weighting: must be uniform or linear, got {self.position_weighting!r}"
            )


@dataclasses.dataclass
class EvalSection:
    experts: list[str] = dataclasses.field(default_factory=list)  # expert checkpoint dirs
    router: str = ""  # router checkpoint dir; "" = router.dir
    rules: list[str] = dataclasses.field(default_factory=lambda: ["full", "top_k:2", "top1"])
    monolith: str = ""  # optional: one model trained on all data, for comparison
    max_batches: int = 8  # held-out batches per loss
    output: str = "eval.json"

    def validate(self) -> None:
        from router.rules import parse_rule

        for i, spec in enumerate(self.rules):
            try:
                parse_rule(spec)
            except ValueError as e:
                raise ConfigError(f"rules[{i}]: {e}") from e
        if self.max_batches < 1:
            raise ConfigError(f"max_batches: must be at least 1, got {self.max_batches}")


@dataclasses.dataclass
class DistillSection:
    experts: list[str] = dataclasses.field(default_factory=list)  # [] = eval.experts
    router: str = ""  # router checkpoint dir; "" = eval.router, else router.dir
    rule: str = "top_k:2"  # the teacher: the ensemble under this rule
    # model keys over the experts' (e.g. hidden = 256); {} = the experts' architecture
    student: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: int = 600
    batch_size: int = 256  # images (flow) or windows (bytelm) per step
    lr: float = 2e-3  # AdamW peak; 5% warmup, cosine to 10%
    seed: int = 0  # the student's initialisation and the drawn inputs
    gap_batches: int = 4  # fresh batches on which the student's gap to the teacher is measured
    output: str = "student"  # where the student checkpoint is saved
    expert_id: str = "student"
    key: str = ""  # Ed25519 key file to sign with (created if absent); "" = a fresh key

    def validate(self) -> None:
        from router.rules import parse_rule

        try:
            parse_rule(self.rule)
        except ValueError as e:
            raise ConfigError(f"rule: {e}") from e
        for key in ("steps", "batch_size", "gap_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be at least 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.seed < 0:
            raise ConfigError(f"seed: must be non-negative, got {self.seed}")
        if not self.expert_id or "." in self.expert_id:
            raise ConfigError(f"expert_id: must be non-empty without '.', got {self.expert_id!r}")


@dataclasses.dataclass
class RouterConfig:
    workload: WorkloadSection = dataclasses.field(default_factory=WorkloadSection)
    partition: PartitionSection = dataclasses.field(default_factory=PartitionSection)
    router: RouterSection = dataclasses.field(default_factory=RouterSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    distill: DistillSection = dataclasses.field(default_factory=DistillSection)


def build_workload(config: RouterConfig, source: str):
    """The configured workload; errors name ``workload.config.<key>`` in ``source``."""
    from island.workloads import WORKLOADS

    name = config.workload.name
    if name not in WORKLOADS:
        raise ConfigError(
            f"{source}: workload.name: unknown workload {name!r}; known: "
            f"{', '.join(sorted(WORKLOADS))}"
        )
    cls = WORKLOADS[name]
    typed = config_from_dict(cls.Config, config.workload.config, f"{source}: workload.config")
    try:
        return cls(typed)
    except ConfigError as e:
        raise ConfigError(f"{source}: workload.config.{e}") from e


# --- partition ------------------------------------------------------------------------------


def run_partition(config: RouterConfig, source: str) -> int:
    import numpy as np

    from router.checkpoint import partition_id
    from router.partition import TextPartitioner, VectorPartitioner

    workload = build_workload(config, source)
    p = config.partition
    documents = workload.documents()
    try:
        if workload.name == "bytelm":
            partitioner = TextPartitioner(
                p.k, p.svd_dims, p.max_features, p.balanced, p.seed,
                balance_slack=p.balance_slack, n_init=p.n_init, balance_by=p.balance_by,
            )  # fmt: skip
            partition = partitioner.fit([d.content for d in documents])
        else:
            partitioner = VectorPartitioner(
                p.k, p.balanced, p.seed, p.pca_dims or None,
                balance_slack=p.balance_slack, n_init=p.n_init,
            )  # fmt: skip
            partition = partitioner.fit(np.stack([np.asarray(d.content) for d in documents]))
    except ValueError as e:
        raise ConfigError(f"{source}: partition: {e}") from e
    partition.save(p.dir)
    print(partition.report(names=[d.id for d in documents], examples=p.examples))
    print(f"saved partition {partition_id(p.dir)} to {p.dir}")
    return 0


# --- train ----------------------------------------------------------------------------------


def router_kind(config: RouterConfig, workload_name: str) -> str:
    if config.router.kind != "auto":
        return config.router.kind
    return "flow" if workload_name == "flow" else "prefix"


def load_identity(key: str):
    from comms.identity import Identity

    return Identity.load_or_create(key) if key else Identity.generate()


def run_train(config: RouterConfig, source: str) -> int:
    from router.checkpoint import build_router, partition_id, save_router
    from router.training import held_out_labels, router_accuracy, train_router

    workload = build_workload(config, source)
    r = config.router
    partition = _load_partition(config.partition.dir, source)
    kind = router_kind(config, workload.name)
    try:
        router = build_router(kind, r.config, partition.k)
    except ConfigError as e:
        raise ConfigError(f"{source}: router.config: {e}") from e
    if r.expert_ids and len(r.expert_ids) != partition.k:
        raise ConfigError(
            f"{source}: router.expert_ids: {len(r.expert_ids)} names for {partition.k} clusters"
        )
    metrics = train_router(
        router, workload, partition.labels, r.steps, r.batch_size, r.lr, r.seed,
        position_weighting=r.position_weighting,
    )  # fmt: skip
    validation = workload.validation_documents()
    labels = held_out_labels(partition, validation)
    accuracy = router_accuracy(router, workload, labels, validation, samples=r.eval_samples)
    summary = {
        "steps": metrics.steps,
        "final_loss": metrics.final_loss,
        "train_accuracy": metrics.train_accuracy,
        "held_out_accuracy": accuracy,
        "train_flops": metrics.train_flops,
        "seconds": metrics.seconds,
    }
    save_router(
        r.dir, router.cpu(), kind, r.config, partition.k, r.expert_ids,
        identity=load_identity(r.key), workload=workload.name,
        partition=partition_id(config.partition.dir), version=r.version, extra=summary,
    )  # fmt: skip
    print(
        f"{kind} router, {partition.k} outputs: loss {metrics.final_loss:.4f}, train accuracy "
        f"{metrics.train_accuracy:.3f}, held-out accuracy {accuracy:.3f} "
        f"({metrics.seconds:.1f} s); saved to {r.dir}"
    )
    return 0


def _load_partition(directory: str, source: str):
    from router.partition import Partition

    try:
        return Partition.load(directory)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{source}: partition.dir: {e}") from e


# --- eval -----------------------------------------------------------------------------------


def evaluate(config: RouterConfig, source: str) -> dict[str, Any]:
    """Held-out losses: each expert, the ensemble under each rule, and the monolith."""
    from router.checkpoint import load_ensemble, load_expert
    from router.rules import parse_rule

    e = config.eval
    if not e.experts:
        raise ConfigError(f"{source}: eval.experts: list the expert checkpoint directories")
    workload = build_workload(config, source)
    device = str(workload.device)
    try:
        served = load_ensemble(e.experts, e.router or config.router.dir, device=device)
    except ConfigError as err:
        raise ConfigError(f"{source}: eval: {err}") from err
    ensemble = served.ensemble
    losses: dict[str, float] = {}
    for expert_id, model in ensemble.experts.items():
        losses[f"expert {expert_id}"] = workload.validation_loss(model, e.max_batches)
    for spec in e.rules:
        ensemble.rule = parse_rule(spec)
        losses[f"ensemble {spec}"] = workload.validation_loss(ensemble, e.max_batches)
    if e.monolith:
        model, _ = load_expert(e.monolith, device=device)
        losses["monolith"] = workload.validation_loss(model, e.max_batches)
    return {
        "workload": workload.name,
        "experts": [m["expert_id"] for m in served.experts],
        "router": served.router,
        "max_batches": e.max_batches,
        "losses": losses,
    }


def run_eval(config: RouterConfig, source: str) -> int:
    report = evaluate(config, source)
    width = max(len(k) for k in report["losses"])
    print(f"{'model'.ljust(width)}  held-out loss")
    for name, loss in report["losses"].items():
        print(f"{name.ljust(width)}  {loss:.4f}")
    out = Path(config.eval.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


# --- distill --------------------------------------------------------------------------------


def _same_architecture(models: dict[str, Any]) -> str:
    """'' when every model has the same parameter names and shapes, else what differs."""
    (first, reference), *others = models.items()
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    for name, model in others:
        theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if theirs != shapes:
            diff = sorted(set(shapes.items()) ^ set(theirs.items()))[0][0]
            return (
                f"{name} and {first} differ at {diff} ({shapes.get(diff, 'absent')} in {first}, "
                f"{theirs.get(diff, 'absent')} in {name})"
            )
    return ""


def distill_ensemble(config: RouterConfig, source: str) -> dict[str, Any]:
    """Load the ensemble, check every input, train the student, save it signed as an expert."""
    from router.checkpoint import build_workload_model, load_ensemble, save_expert
    from router.distill import distill, teacher_gap

    d = config.distill
    experts = d.experts or config.eval.experts
    if not experts:
        raise ConfigError(f"{source}: distill.experts: list the expert checkpoints")
    router = d.router or config.eval.router or config.router.dir
    workload = build_workload(config, source)  # held-out loss on router eval's batches
    inputs = copy.copy(workload)  # the same data, drawn d.batch_size at a time
    inputs.config = dataclasses.replace(workload.config, batch_size=d.batch_size)
    try:
        served = load_ensemble(experts, router, rule=d.rule, device=str(workload.device))
    except ConfigError as e:
        raise ConfigError(f"{source}: distill: {e}") from e
    if served.workload != workload.name:
        raise ConfigError(
            f"{source}: workload.name: {workload.name!r}, but the experts are {served.workload}"
        )
    ensemble = served.ensemble
    different = _same_architecture(dict(ensemble.experts.items()))
    if different and not d.student:
        raise ConfigError(
            f"{source}: distill.experts: the experts' architectures differ ({different}); set "
            "distill.student to the student's model keys"
        )
    student_config = {**served.experts[0]["workload_config"], **d.student}
    student_config["batch_size"] = d.batch_size
    student_config.pop("device", None)
    try:
        student = build_workload_model(workload.name, student_config, str(workload.device), d.seed)
    except ConfigError as e:
        raise ConfigError(f"{source}: distill.student: {e}") from e
    window = getattr(workload.config, "context", None)
    if window is not None and getattr(student, "context", window) < window:
        raise ConfigError(
            f"{source}: distill.student: context {student.context} is shorter than the "
            f"workload's windows of {window} bytes"
        )
    gap_before = teacher_gap(student, ensemble, inputs.train_batches(d.seed + 1), d.gap_batches)
    metrics = distill(student, ensemble, inputs.train_batches(d.seed), d.steps, d.lr)
    gap_after = teacher_gap(student, ensemble, inputs.train_batches(d.seed + 1), d.gap_batches)
    summary = {
        "workload": workload.name,
        "experts": [m["expert_id"] for m in served.experts],
        "rule": d.rule,
        "steps": d.steps,
        "batch_size": d.batch_size,
        "lr": d.lr,
        "seed": d.seed,
        "final_loss": metrics.final_loss,
        "gap_before": gap_before,
        "gap_after": gap_after,
        "validation_loss": workload.validation_loss(student, config.eval.max_batches),
        "flops": metrics.flops,
        "student_flops": metrics.student_flops,
        "teacher_flops": metrics.teacher_flops,
        "seconds": metrics.seconds,
        "output": d.output,
    }
    save_expert(
        d.output, student.cpu(), workload=workload.name, workload_config=student_config,
        expert_id=d.expert_id, cluster=None, identity=load_identity(d.key),
        partition=None, train_steps=d.steps, train_flops=metrics.flops,
        extra={"distilled": summary},
    )  # fmt: skip
    return summary


def run_distill(config: RouterConfig, source: str) -> int:
    summary = distill_ensemble(config, source)
    print(
        f"distilled {summary['experts']} under {summary['rule']} into one {summary['workload']} "
        f"model: {summary['steps']} steps at batch {summary['batch_size']}, "
        f"{summary['seconds']:.1f} s, {summary['flops']:.3g} FLOPs "
        f"(student {summary['student_flops']:.3g}, teacher {summary['teacher_flops']:.3g}); "
        f"gap to the ensemble {summary['gap_before']:.4f} untrained -> "
        f"{summary['gap_after']:.4f}; saved to {summary['output']}"
    )
    return 0


# --- serve ----------------------------------------------------------------------------------


def run_serve(path: str) -> int:
    from router.server import ServeConfig, serve

    config = load_config(ServeConfig, path)
    try:
        asyncio.run(serve(config))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    return 0


# --- entry point ----------------------------------------------------------------------------

COMMANDS = {
    "partition": run_partition,
    "train": run_train,
    "eval": run_eval,
    "distill": run_distill,
}
DISTILL_FLAGS = ("steps", "batch_size", "lr", "seed", "rule", "output")


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return run_serve(args.config)
    config = load_config(RouterConfig, args.config)
    if args.command == "distill":
        flags = {k: getattr(args, k) for k in DISTILL_FLAGS if getattr(args, k) is not None}
        config.distill = dataclasses.replace(config.distill, **flags)
        try:
            config.distill.validate()
        except ConfigError as e:
            raise ConfigError(f"{args.config}: distill (or its flag): {e}") from e
    return COMMANDS[args.command](config, args.config)


def add_distill_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, help="training steps (distill.steps)")
    p.add_argument("--batch-size", type=int, help="inputs per step (distill.batch_size)")
    p.add_argument("--lr", type=float, help="AdamW peak learning rate (distill.lr)")
    p.add_argument("--seed", type=int, help="student init and input draws (distill.seed)")
    p.add_argument("--rule", help="the teacher's rule: full, top1, top_k:K or threshold:TAU")
    p.add_argument("--output", help="student checkpoint directory (distill.output)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="router",
        description="Archipelago router: partition data, train the router, serve the ensemble.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [
        ("partition", "cluster the training data into K partitions"),
        ("train", "train the router on the partition labels"),
        ("eval", "evaluate experts and ensembles on held-out data"),
        ("distill", "train one dense student on the ensemble's outputs"),
        ("serve", "serve the ensemble over HTTP"),
    ]:
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="path to a TOML config")
        if name == "distill":
            add_distill_flags(p)
        add_log_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_from_args(args)
    try:
        return dispatch(args)
    except ConfigError as e:
        print(f"router: {e}", file=sys.stderr)
        return 2
    except CommsError as e:  # a checkpoint refused: bad signature, digest, unknown signer
        print(f"router: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
