"""Restoring a snapshot in place: into a model, an optimizer, the anchor, the residuals, the
batch iterator and the global RNGs, with errors that say what does not fit."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from island.snapshot.errors import SnapshotMismatchError
from island.snapshot.format import read_snapshot
from island.snapshot.state import restore_rng_state


def _shorten(error: Exception, limit: int = 600) -> str:
    text = str(error)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more chars)"


def _restore_mapping(target: Any, saved: Mapping[str, Any], what: str, path: Path) -> None:
    """Copy ``saved`` into ``target``: an object with ``load_residuals``; an empty mapping
    (filled); or a mapping with the same names (tensors and arrays copied in place)."""
    if hasattr(target, "load_residuals"):
        target.load_residuals(dict(saved))
        return
    if target and target.keys() != saved.keys():
        raise SnapshotMismatchError(
            f"{path}: {what} names differ from the snapshot's: missing "
            f"{sorted(saved.keys() - target.keys())}, extra {sorted(target.keys() - saved.keys())}",
            path,
        )
    for name, value in saved.items():
        current = target.get(name)
        if isinstance(current, torch.Tensor | np.ndarray) and current.shape != value.shape:
            raise SnapshotMismatchError(
                f"{path}: {what} {name!r} has shape {tuple(current.shape)}, the snapshot "
                f"{tuple(value.shape)}",
                path,
            )
        if isinstance(current, torch.Tensor):
            with torch.no_grad():
                current.copy_(torch.as_tensor(value))
        elif isinstance(current, np.ndarray):
            np.copyto(current, np.asarray(value))
        else:
            target[name] = value


def load_snapshot(
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    anchor: MutableMapping[str, Any] | None = None,
    residuals: Any = None,
    batches: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a snapshot in place and return its meta (with ``step``).

    ``model`` and ``optimizer`` get ``load_state_dict`` (strict; optimizer state follows the
    parameters' devices); ``anchor`` (a mapping) and ``residuals`` (a mapping, or an object
    with ``load_residuals`` such as ``ErrorFeedback``) are filled or copied into; ``batches``
    gets its ``load_state_dict``; the global RNGs are set unless ``restore_rng`` is False.
    Anything not passed is left alone (:func:`read_snapshot` returns every part).
    """
    path = Path(path)
    state = read_snapshot(path)
    if model is not None:
        try:
            model.load_state_dict(state.model)
        except RuntimeError as e:
            raise SnapshotMismatchError(
                f"{path}: the model does not fit: {_shorten(e)}", path
            ) from e
    if optimizer is not None:
        if state.optimizer is None:
            raise SnapshotMismatchError(f"{path}: the snapshot holds no optimizer state", path)
        try:
            optimizer.load_state_dict(state.optimizer)
        except (ValueError, KeyError, RuntimeError) as e:
            raise SnapshotMismatchError(
                f"{path}: the optimizer does not fit: {_shorten(e)}", path
            ) from e
    if anchor is not None:
        _restore_mapping(anchor, state.anchor, "anchor", path)
    if residuals is not None:
        _restore_mapping(residuals, state.residuals, "residual", path)
    if batches is not None:
        if state.data is None:
            raise SnapshotMismatchError(f"{path}: the snapshot holds no iterator state", path)
        batches.load_state_dict(dict(state.data))
    if restore_rng and state.rng:
        restore_rng_state(state.rng)
    return dict(state.meta)
