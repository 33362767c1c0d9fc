"""The island daemon's streamed fragments: ``[sync] fragments = F`` (Streaming DiLoCo).

With F > 1 the daemon trains its model as F fragments (``comms.fragments``): one
``SyncEngine`` per fragment line ``<model_id>.f<p>``, all on the daemon's one network loop,
behind one emulated link (one shaper: the fragments share the island's uplink) and writing one
ack log (each line names its model id), and one ``island.streaming.StreamingLocalUpdate``
around them, so fragment p pushes at steps ``H * (p + 1) // F``, then every H. This module
holds what the daemon needs on top: ``FragmentEngines`` (the engines seen as one: counters
summed, state per fragment, closed together), the per-fragment resume and status, and the
evaluation of the global model, which is the union of the fragments' anchors (at a fragment's
boundary the other fragments' parameters hold their rounds' local progress, not the anchor).

Not combined with: a multi-rank island (its followers take a whole anchor at every boundary),
``every_s`` and ``auto`` (``SyncConfig`` refuses them), expert mode and ``expert.output``
(``IslandConfig``). Concurrency: the training thread calls everything here; the engines'
network side runs on the daemon's ``LoopThread``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from comms.errors import ConfigError
from comms.fragments import fragment_model_id, split_fragments
from island.pseudo import load_numpy_into, params_to_numpy
from island.streaming import StreamingLocalUpdate
from island.sync import SyncConfig, SyncEngine

# SyncStats fields that are a gauge of one fragment, not a count to sum over fragments
_OLDEST = ("newest_version", "last_v_now")  # the fragment furthest behind
_WORST = ("last_staleness",)
_SKIP = ("codec", "round_plan", "last_weight", "uplink_bps")  # kept from fragment 0


def fragment_configs(sync: SyncConfig) -> list[SyncConfig]:
    """One ``SyncConfig`` per fragment line of ``sync.model_id`` (``fragments`` of them)."""
    return [
        dataclasses.replace(sync, model_id=fragment_model_id(sync.model_id, p))
        for p in range(sync.fragments)
    ]


def check_fragment_count(model: torch.nn.Module, count: int) -> None:
    """ConfigError when the model cannot be cut into ``count`` fragments (more fragments than
    parameter tensors), naming the key and the count the model allows."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    try:
        split_fragments(sizes, count)
    except ConfigError as err:
        raise ConfigError(
            f"sync.fragments = {count}: the model has {len(sizes)} parameter tensors, and "
            f"each fragment needs at least one ({err})"
        ) from err


def check_world_size(fragments: int, world_size: int) -> None:
    """ConfigError for fragments on a multi-rank island."""
    if fragments > 1 and world_size > 1:
        raise ConfigError(
            f"sync.fragments = {fragments}: streamed fragments are not supported on a "
            f"multi-rank island ({world_size} ranks under torchrun: its followers take one "
            "whole anchor at each boundary); run it as one process or set fragments = 1"
        )


class FragmentEngines:
    """The fragments' engines, seen by the daemon as one: ``stats`` sums the counters (gauges:
    the fragment furthest behind), ``state_dict`` keeps each engine's state, ``close`` closes
    them all."""

    def __init__(self, engines: Sequence[SyncEngine]):
        self.engines = list(engines)

    @property
    def stats(self) -> dict[str, Any]:
        per = [e.stats for e in self.engines]
        out = dict(per[0])
        for key, value in per[0].items():
            if key in _SKIP:
                continue
            values = [s[key] for s in per]
            if key in _OLDEST:
                out[key] = min(values)
            elif key in _WORST:
                out[key] = max(values)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = sum(values)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"fragments": [e.state_dict() for e in self.engines]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        parts = state.get("fragments", [])
        if len(parts) != len(self.engines):
            raise ValueError(f"engine state of {len(parts)} fragments for {len(self.engines)}")
        for engine, part in zip(self.engines, parts, strict=True):
            engine.load_state_dict(part)

    def close(self, timeout: float) -> None:
        """Close every engine, each waiting for its queued pushes, ``timeout`` s in all."""
        deadline = time.monotonic() + timeout
        for engine in self.engines:
            engine.close(timeout=max(1.0, deadline - time.monotonic()))

    def status(self, lu: StreamingLocalUpdate) -> list[dict[str, Any]]:
        """Each fragment's line, version, newest version received, staleness of its last
        accepted push, rounds, bytes and pushes queued (the island's ``/status``)."""
        out = []
        for engine, fragment in zip(self.engines, lu.updates, strict=True):
            s = engine.stats
            out.append({
                "model_id": engine.model_id,
                "version": fragment.version,
                "newest_version": s["newest_version"],
                "staleness": s["last_staleness"],
                "round": fragment.round,
                "bytes_sent": s["bytes_sent"],
                "bytes_received": s["bytes_received"],
                "queue_depth": s["pushes_pending"],
            })  # fmt: skip
        return out


def check_snapshot_fragments(meta: Mapping[str, Any], count: int) -> None:
    """ConfigError unless the snapshot (its ``meta``) was taken with ``count`` fragments."""
    got = int(meta.get("fragments", 1))
    if got != count:
        raise ConfigError(
            f"sync.fragments = {count}, but the snapshot to resume was taken with {got}; "
            f"resume with sync.fragments = {got}, or start from an empty snapshot.dir (the "
            "island then joins at the aggregators' versions)"
        )


def start_fragments(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    engines: FragmentEngines,
    resumed: Any,
    report: Callable[[], dict[str, Any]],
) -> StreamingLocalUpdate:
    """The started ``StreamingLocalUpdate`` over ``engines``, resumed from the snapshot state
    ``resumed`` (a ``SnapshotState``; None: every fragment fetches its line's snapshot)."""
    anchor = versions = None
    if resumed is not None:
        check_snapshot_fragments(resumed.meta, len(engines.engines))
        engines.load_state_dict(resumed.data["engine"])
        anchor = {k: np.asarray(v) for k, v in resumed.anchor.items()}
        versions = [int(v) for v in resumed.meta["base_versions"]]
    lu = StreamingLocalUpdate(
        model, optimizer, engines=engines.engines, anchor=anchor, anchor_versions=versions
    )
    lu.report = report
    lu.start()
    if resumed is not None:
        lu.load_state_dict(resumed.data["local_update"])
    return lu


def evaluate_anchor(
    model: torch.nn.Module, anchor: Mapping[str, Any], evaluate: Callable[[], float]
) -> float:
    """``evaluate()`` with the model's parameters set to ``anchor`` (the union of the
    fragments' anchors: the global model), then put back bit for bit."""
    params = params_to_numpy(model)
    load_numpy_into(model, anchor)
    try:
        return evaluate()
    finally:
        load_numpy_into(model, params)
