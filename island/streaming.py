"""Streamed fragments: one model trained as F fragments that sync on staggered schedules.

The drop-in API of Streaming DiLoCo (Douillard et al. 2025; :mod:`comms.fragments` says how
the model is cut and why each fragment is a model line of its own). ``StreamingLocalUpdate``
holds one :class:`~island.local_update.LocalUpdate` per fragment, each over that fragment's
parameters only (:class:`ParameterSubset`) and with its own :class:`~island.sync.SyncEngine`
on the fragment's model line. Every fragment has rounds of H inner steps; fragment p's first
round is ``H * (p + 1) // F`` steps long, so the fragments push at steps H/F, 2H/F, ..., H
and every H steps after that: one push of about 1/F of the model every H/F steps instead of
the whole model every H, and each fragment's transfer overlaps the other fragments' steps.
A fragment adopts its own versions (at arrival or at its boundaries, as configured); the
fragments of a model may stand at different versions.

The daemon streams its model this way with ``[sync] fragments = F`` (``island.fragmented``):
``anchor``/``anchor_versions`` resume every fragment from a snapshot, and ``state_dict`` keeps
each fragment's round in progress (a snapshot falls on one fragment's boundary, mid-round for
the others), so a resumed fragment pushes the steps it took before the snapshot with its round.

Used like ``LocalUpdate``::

    engines = [SyncEngine(SyncConfig(model_id=fragment_model_id("lm", p), every=H), ...)
               for p in range(F)]
    with StreamingLocalUpdate(model, optimizer, engines=engines) as slu:
        for batch in data:
            loss(model, batch).backward(); optimizer.step(); optimizer.zero_grad()
            slu.step()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from comms.errors import ConfigError, NotFoundError
from comms.fragments import split_fragments
from island.local_update import LocalUpdate
from island.sync import SyncEngine


class ParameterSubset:
    """The parameters of ``model`` named in ``names``, seen as a model of their own (what
    :class:`LocalUpdate` reads, loads and describes: ``named_parameters``)."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]):
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"the model has no parameter(s) {missing[:5]}")
        self.module = model
        self.names = list(names)
        self._params = {n: params[n] for n in self.names}

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        yield from self._params.items()

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        yield from self._params.values()


class StreamingLocalUpdate:
    """F fragments of ``model``, each a :class:`LocalUpdate` on its own engine (see the
    module docstring). ``engines[p]`` syncs fragment p (:func:`comms.fragments.split_fragments`
    of the model's parameters into ``len(engines)``); every engine's ``sync.every`` must be the
    same H, in steps. ``anchor`` (every fragment's tensors together) and ``anchor_versions``
    (one per fragment) resume from a snapshot, as ``LocalUpdate``'s ``anchor`` does."""

    def __init__(
        self,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer | None = None,
        *,
        engines: Sequence[SyncEngine],
        flush_on_exit: bool = True,
        anchor: Mapping[str, Any] | None = None,
        anchor_versions: Sequence[int] | None = None,
    ):
        if not engines:
            raise ValueError("give one engine per fragment")
        if (anchor is None) != (anchor_versions is None):
            raise ValueError("give both anchor and anchor_versions (a resume), or neither")
        if anchor_versions is not None and len(anchor_versions) != len(engines):
            raise ValueError(
                f"anchor_versions: one per fragment ({len(engines)}), got {len(anchor_versions)}"
            )
        everies = {e.config.every for e in engines}
        if len(everies) != 1 or None in everies or any(e.config.by_time for e in engines):
            raise ValueError(
                f"every fragment's engine needs the same sync.every (inner steps), got {everies}"
            )
        every = everies.pop()
        count = len(engines)
        if every < count:
            raise ValueError(f"sync.every ({every}) must be at least the fragment count {count}")
        sizes = {n: p.numel() for n, p in model.named_parameters()}
        self.model = model
        self.fragments = split_fragments(sizes, count)
        self.updates = [
            LocalUpdate(
                ParameterSubset(model, names),  # type: ignore[arg-type]
                inner_optimizer,
                engine=engine,
                flush_on_exit=flush_on_exit,
                first_every=every * (p + 1) // count,
                **_resume_args(anchor, anchor_versions, names, p),
            )
            for p, (names, engine) in enumerate(zip(self.fragments, engines, strict=True))
        ]

    def start(self) -> StreamingLocalUpdate:
        """Start every fragment (a fresh one downloads its line's snapshot). ConfigError
        naming every fragment line the aggregator does not serve."""
        missing = []
        for lu in self.updates:
            try:
                lu.start()
            except NotFoundError:  # a snapshot of version -1 is missing only with its line
                missing.append(lu.engine.model_id)
        if missing:
            e = self.updates[0].engine
            raise ConfigError(
                f"sync.fragments = {len(self.updates)}: the aggregator at {e.address} serves "
                f"no model line {', '.join(missing)}; the root serves fragment p of "
                f'{len(self.updates)} as [[models]] model_id = "<model_id>.f<p>", init = the '
                f"whole model's file, fragment = [p, {len(self.updates)}]"
            )
        return self

    def __enter__(self) -> StreamingLocalUpdate:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        for lu in self.updates:
            lu.__exit__(exc_type, exc, tb)

    def step(self, tokens: int = 0, seconds: float | None = None) -> bool:
        """Count one inner step in every fragment; True when some fragment's round ended."""
        ended = False
        for lu in self.updates:
            ended |= lu.step(tokens=tokens, seconds=seconds)
        return ended

    def end_round(self) -> None:
        """Push every fragment's unfinished round (the steps since its last push)."""
        for lu in self.updates:
            if lu.steps_in_round:
                lu.end_round()

    def drain(self, timeout_s: float) -> bool:
        """After the last step: push every fragment's unfinished round, then adopt versions
        until each fragment's versions hold all its rounds (``LocalUpdate.drain``, at most
        ``timeout_s`` for each); True when none is left in flight."""
        self.end_round()
        return all([lu.drain(timeout_s) for lu in self.updates])

    @property
    def versions(self) -> list[int]:
        """Each fragment's global version."""
        return [lu.version for lu in self.updates]

    @property
    def version(self) -> int:
        """The oldest fragment's version (each fragment line counts its own versions)."""
        return min(self.versions)

    @property
    def round(self) -> int:
        """Rounds completed, summed over the fragments: one push of a fragment each."""
        return sum(lu.round for lu in self.updates)

    @property
    def steps_in_round(self) -> int:
        """The most inner steps any fragment has not pushed yet."""
        return max(lu.steps_in_round for lu in self.updates)

    @property
    def report(self) -> Callable[[], dict[str, Any]] | None:
        """What each fragment's push carries as its meta's ``report`` (``LocalUpdate``)."""
        return self.updates[0].report

    @report.setter
    def report(self, fn: Callable[[], dict[str, Any]] | None) -> None:
        for lu in self.updates:
            lu.report = fn

    @property
    def anchor(self) -> dict[str, Any]:
        """Every fragment's anchor together (``anchors``)."""
        return self.anchors

    def state_dict(self) -> dict[str, Any]:
        """Per fragment: its own deltas in flight and its round in progress, for a snapshot
        (taken at one fragment's boundary: the others are mid-round)."""
        return {
            "fragments": [{**lu.state_dict(), "round": lu.round_state()} for lu in self.updates]
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` after ``start()`` on a resume."""
        parts = state.get("fragments", [])
        if len(parts) != len(self.updates):
            raise ValueError(f"state of {len(parts)} fragments for {len(self.updates)}")
        for lu, part in zip(self.updates, parts, strict=True):
            lu.load_state_dict(part)
            lu.load_round_state(part["round"])

    @property
    def anchors(self) -> dict[str, Any]:
        """Every fragment's anchor, together: the model as the tree holds it, fragment by
        fragment (each at its own version)."""
        out: dict[str, Any] = {}
        for lu in self.updates:
            out.update(lu.anchor)
        return out


def _resume_args(
    anchor: Mapping[str, Any] | None, versions: Sequence[int] | None, names: Sequence[str], p: int
) -> dict[str, Any]:
    """Fragment p's ``anchor`` and ``anchor_version`` for ``LocalUpdate`` (none: a fresh start)."""
    if anchor is None or versions is None:
        return {}
    missing = [n for n in names if n not in anchor]
    if missing:
        raise ValueError(f"the resume anchor lacks fragment {p}'s tensors {missing[:5]}")
    return {"anchor": {n: np.asarray(anchor[n]) for n in names}, "anchor_version": int(versions[p])}
