"""Router checkpoints, and whole ensembles assembled from signed checkpoints.

The checkpoint format (weights + signed manifest) is ``island.checkpoint``'s, where experts
are written. A router's manifest names its kind (``flow``, ``prefix``, ``cbtm``), its
constructor config, its number of outputs and the expert ids by output; a c-BTM router keeps
its partition in ``partition/`` inside the checkpoint, signed with it.

``load_ensemble`` assembles verified experts and a router into an ``EnsembleModel``: router
output k is the expert whose manifest says cluster k (or, without clusters, the router's
``expert_ids`` order), and experts and router must agree on the workload and the partition.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comms.errors import ConfigError
from comms.identity import Identity, Roster
from island.checkpoint import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    build_workload_model,
    canonical_json,
    check_json_fields,
    check_model_fits_weights,
    file_digest,
    load_expert,
    load_weights,
    partition_id,
    read_manifest,
    save_expert,
    sign_manifest,
    verify_manifest,
    write_checkpoint,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "ROUTER_KINDS",
    "WEIGHTS_FILE",
    "LoadedEnsemble",
    "build_workload_model",
    "canonical_json",
    "expert_order",
    "file_digest",
    "load_ensemble",
    "load_expert",
    "load_router",
    "partition_id",
    "read_manifest",
    "save_expert",
    "save_router",
    "sign_manifest",
    "verify_manifest",
    "write_checkpoint",
]


PARTITION_DIR = "partition"
ROUTER_KINDS = ("flow", "prefix", "cbtm")


def save_router(
    directory: str | os.PathLike,
    router: nn.Module,
    kind: str,
    config: Mapping[str, Any],
    num_experts: int,
    expert_ids: Iterable[str] = (),
    *,
    identity: Identity,
    workload: str,
    partition: str | None = None,
    version: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a router checkpoint: ``kind`` and ``config`` rebuild it (``FlowRouter(num_experts,
    **config)``, ``PrefixRouter(...)``, or ``CbtmRouter(partition, **config)`` with the
    partition saved beside it). ``expert_ids`` name the experts by router output."""
    if kind not in ROUTER_KINDS:
        raise ValueError(f"router kind must be one of {ROUTER_KINDS}, got {kind!r}")
    if router.num_experts != num_experts:
        raise ValueError(f"the router has {router.num_experts} outputs, not {num_experts}")
    expert_ids = list(expert_ids)
    if expert_ids and len(expert_ids) != num_experts:
        raise ValueError(f"got {len(expert_ids)} expert ids for {num_experts} router outputs")
    directory = Path(directory)
    extra_files = []
    if kind == "cbtm":
        saved = router.partition.save(directory / PARTITION_DIR)
        extra_files = [f"{PARTITION_DIR}/{p.name}" for p in sorted(saved.iterdir())]
    fields = {
        "kind": "router",
        "router_kind": kind,
        "router_config": dict(config),
        "num_experts": int(num_experts),
        "expert_ids": expert_ids,
        "workload": workload,
        "partition_id": partition,
        "version": int(version),
        "extra": dict(extra or {}),
    }
    check_json_fields(fields)
    return write_checkpoint(directory, router, fields, identity, extra_files)


def build_router(kind: str, config: Mapping[str, Any], num_experts: int, partition=None):
    """A fresh router of ``kind`` (``cbtm`` needs the ``Partition``)."""
    from router.models import CbtmRouter, FlowRouter, PrefixRouter

    if kind not in ROUTER_KINDS:
        raise ConfigError(f"router_kind: must be one of {list(ROUTER_KINDS)}, got {kind!r}")
    try:
        if kind == "cbtm":
            return CbtmRouter(partition, **config)
        return {"flow": FlowRouter, "prefix": PrefixRouter}[kind](num_experts, **config)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"router_config: cannot build a {kind} router: {e}") from e


def load_router(
    directory: str | os.PathLike,
    roster: Roster | None = None,
    trusted_keys: Iterable[bytes | str] | None = None,
    device: str = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Verify and load a router checkpoint: (router in eval mode on ``device``, manifest)."""
    directory = Path(directory)
    manifest = read_manifest(directory, "router", roster, trusted_keys)
    kind = manifest.get("router_kind")
    config = manifest.get("router_config")
    num_experts = manifest.get("num_experts")
    if not isinstance(config, dict) or not isinstance(num_experts, int):
        raise ConfigError(f"{directory}/{MANIFEST_FILE}: router_config or num_experts is bad")
    partition = None
    if kind == "cbtm":
        partition = load_partition(directory / PARTITION_DIR)
    try:
        if kind != "cbtm":  # a c-BTM router's size is its (verified) partition's
            check_model_fits_weights(lambda: build_router(kind, config, num_experts), directory)
        router = build_router(kind, config, num_experts, partition)
    except ConfigError as e:
        raise ConfigError(f"{directory}/{MANIFEST_FILE}: {e}") from e
    if kind == "cbtm":
        router = router.to(torch.device(device))
    load_weights(router, directory, device)
    if router.num_experts != num_experts:
        raise ConfigError(
            f"{directory}: router has {router.num_experts} outputs, not {num_experts}"
        )
    return router.eval(), manifest


# --- ensembles ----------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedEnsemble:
    ensemble: Any  # router.ensemble.EnsembleModel, in eval mode
    workload: str
    experts: list[dict[str, Any]]  # expert manifests in router-output order
    router: dict[str, Any]  # what routes: kind, outputs, partition, source
    rule: str  # the default rule spec


def expert_order(
    manifests: list[dict[str, Any]], num_outputs: int, router_expert_ids: list[str]
) -> list[int]:
    """Indices into ``manifests`` in router-output order: by each expert's ``cluster`` when all
    have one, else by the router's ``expert_ids``. Raises ConfigError when they do not fit."""
    ids = [m["expert_id"] for m in manifests]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"experts: two checkpoints share an expert id ({ids})")
    if len(manifests) != num_outputs:
        raise ConfigError(
            f"experts: {len(manifests)} experts given but the router has {num_outputs} outputs"
        )
    clusters = [m.get("cluster") for m in manifests]
    if all(isinstance(c, int) for c in clusters):
        if sorted(clusters) != list(range(num_outputs)):
            raise ConfigError(
                f"experts: clusters {sorted(clusters)} do not cover the router's outputs "
                f"0..{num_outputs - 1} once each"
            )
        order = sorted(range(len(manifests)), key=lambda i: clusters[i])
    elif router_expert_ids and sorted(router_expert_ids) == sorted(ids):
        order = [ids.index(e) for e in router_expert_ids]
    else:
        raise ConfigError(
            "experts: cannot match experts to router outputs: give every expert a cluster, or "
            f"save the router with expert_ids naming {ids}"
        )
    if router_expert_ids and [ids[i] for i in order] != list(router_expert_ids):
        raise ConfigError(
            f"experts: router outputs name experts {router_expert_ids} but the checkpoints' "
            f"clusters order them {[ids[i] for i in order]}"
        )
    return order


def load_partition(directory: str | os.PathLike):
    """``Partition.load``, with whatever a missing or damaged partition raises (a missing file,
    bad JSON, a missing array, a damaged safetensors file) as a ``ConfigError``."""
    from safetensors import SafetensorError

    from router.partition import Partition

    try:
        return Partition.load(directory)
    except (OSError, ValueError, KeyError, TypeError, RecursionError, SafetensorError) as e:
        raise ConfigError(f"partition {directory}: {e}") from e


def _cbtm_from_partition(directory: str | os.PathLike, temperature: float):
    from router.models import CbtmRouter

    try:
        router = CbtmRouter(load_partition(directory), temperature)
    except ValueError as e:
        raise ConfigError(f"partition: {e}") from e
    part = partition_id(directory)
    info = {"router_kind": "cbtm", "num_experts": router.num_experts, "partition_id": part}
    return router, {**info, "source": str(directory), "temperature": temperature}


def load_ensemble(
    experts: Iterable[str | os.PathLike],
    router: str | os.PathLike = "",
    partition: str | os.PathLike = "",
    rule: str = "top1",
    device: str = "cpu",
    roster: Roster | None = None,
    trusted_keys: Iterable[bytes | str] | None = None,
    cbtm_temperature: float = 0.1,
) -> LoadedEnsemble:
    """Verify and load expert checkpoints and a router checkpoint (or a c-BTM router built
    from a saved ``partition``) into an ``EnsembleModel``; router output k is the expert of
    cluster k. Mismatched workloads, partitions or output counts raise ConfigError."""
    from island.workloads import resolve_device
    from router.ensemble import EnsembleModel

    device = str(resolve_device(device))
    loaded = [load_expert(d, roster, trusted_keys, device) for d in experts]
    workloads = {m["workload"] for _, m in loaded}
    if len(workloads) != 1:
        raise ConfigError(f"experts: give one or more experts of one workload, got {workloads}")
    workload = workloads.pop()
    if router:
        module, rm = load_router(router, roster, trusted_keys, device)
        if rm["workload"] != workload:
            raise ConfigError(f"router: is for {rm['workload']}, the experts are {workload}")
        info = {k: rm.get(k) for k in ("router_kind", "num_experts", "partition_id", "version")}
        info.update(signer=rm.get("signer"), source=str(router))
        names = list(rm.get("expert_ids") or [])
    else:
        module, info = _cbtm_from_partition(partition, cbtm_temperature)
        module, names = module.to(torch.device(device)), []
    manifests = [m for _, m in loaded]
    order = expert_order(manifests, module.num_experts, names)
    part = info.get("partition_id")
    others = [
        m["expert_id"] for m in manifests if part and m.get("partition_id") not in (None, part)
    ]
    if others:
        raise ConfigError(f"experts: {others} were trained on another partition than {part}")
    by_output = {manifests[i]["expert_id"]: loaded[i][0] for i in order}
    try:
        ensemble = EnsembleModel.from_parts(workload, by_output, module, rule)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"router: {e}") from e
    return LoadedEnsemble(ensemble.eval(), workload, [manifests[i] for i in order], info, rule)
