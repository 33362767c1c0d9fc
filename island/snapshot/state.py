"""What a snapshot holds: an island's whole training state, by reference, and its meta.

:class:`SnapshotState` holds the model's ``state_dict``, the inner optimizer's ``state_dict``
(AdamW step counts, ``exp_avg``, ``exp_avg_sq``, param groups), the anchor (the parameters of
the global version the round started from), the error-feedback residuals, the RNG states
(python ``random``, numpy's global generator, torch CPU and every CUDA device), the batch
iterator's ``state_dict`` and a small JSON ``meta`` dict (see :func:`make_meta`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from comms.errors import ConfigError

log = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """Copies of every global RNG state: python, numpy, torch CPU and each CUDA device."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the global RNGs from :func:`capture_rng_state`'s output. CUDA states are restored for
    the devices present on both sides (a warning names any difference in count)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda") or []
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) != have:
        log.warning(
            "snapshot holds %d CUDA RNG states, this host has %d GPUs; restoring the common ones",
            len(cuda_states),
            have,
        )
    for device, cuda_state in enumerate(cuda_states[:have]):
        torch.cuda.set_rng_state(cuda_state, device)


def make_meta(
    *,
    island_id: str,
    round: int,
    base_version: int,
    last_pushed_seq: int,
    workload: str,
    workload_config: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """The meta dict an island stores with each snapshot; ``workload_config`` may be a
    dataclass. ``step`` and ``time`` are added by :meth:`AsyncSnapshotter.snapshot`."""
    if dataclasses.is_dataclass(workload_config) and not isinstance(workload_config, type):
        workload_config = dataclasses.asdict(workload_config)
    meta = {
        "island_id": island_id,
        "round": int(round),
        "base_version": int(base_version),
        "last_pushed_seq": int(last_pushed_seq),
        "workload": workload,
        "workload_config": workload_config,
        **extra,
    }
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"snapshot meta must be JSON-serialisable: {e}") from e
    return meta


@dataclasses.dataclass
class SnapshotState:
    """Everything an island needs to resume. Tensors may live on any device; anchor values
    are tensors or numpy arrays, residuals numpy arrays (as ``ErrorFeedback.residuals()``)."""

    model: Mapping[str, torch.Tensor]
    optimizer: Mapping[str, Any] | None = None
    anchor: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    residuals: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    rng: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data: Mapping[str, Any] | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def capture(
        cls,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        anchor: Mapping[str, Any] | None = None,
        residuals: Mapping[str, np.ndarray] | None = None,
        batches: Any = None,
        meta: Mapping[str, Any] | None = None,
    ) -> SnapshotState:
        """The live state, by reference (no copies but the RNG states): pass it to
        :meth:`AsyncSnapshotter.snapshot` before anything trains again."""
        return cls(
            model=model.state_dict(),
            optimizer=optimizer.state_dict() if optimizer is not None else None,
            anchor=dict(anchor or {}),
            residuals=dict(residuals or {}),
            rng=capture_rng_state(),
            data=batches.state_dict() if batches is not None else None,
            meta=dict(meta or {}),
        )

    def tree(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "anchor": self.anchor,
            "residuals": self.residuals,
            "rng": self.rng,
            "data": self.data,
        }
