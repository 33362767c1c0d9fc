"""Expert groups: an expert's model line trained by several local-update islands (hybrid).

In expert mode (Decentralized Diffusion Models, McAllister et al. 2025; c-BTM, Gururangan et
al. 2023) each expert is trained by one island in isolation. A group lets several islands
train one expert together in local-update mode (DiLoCo, Douillard et al. 2023): every island
of the group trains on the expert's cluster and pushes its pseudo-gradient to the expert's
model id, and the tree merges them and takes the outer step exactly as for a global model.
One model line per expert; the aggregators serve them all at once.

An aggregator config names the groups (``[[expert_groups]]``, :mod:`aggregator.config`)::

    [[expert_groups]]
    model_id = "expert0"             # one of this aggregator's [[models]]
    islands = ["island0", "island1"] # roster names of the islands that train it

Rules, checked at load (:func:`check_groups`) with an error naming what is wrong: a group
names a served model and at least one island, no island twice, and an island belongs to one
group at most. At admission (:func:`group_refusal`) a model with a group takes deltas only
from its islands. Models without a group take any island's, a group's islands included (a
global model trained before or beside the experts, say). A version of a model with a group
merges at most as many updates as the group has islands (:func:`line_buffer_k`), so an
expert's line next to a global model's of larger ``buffer_k`` still takes whole outer
steps. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from comms.errors import ConfigError


@dataclass
class ExpertGroup:
    """The islands (roster names) that train one expert's model id in local-update mode."""

    model_id: str
    islands: list[str] = field(default_factory=list)


def check_groups(groups: Sequence[ExpertGroup], model_ids: Iterable[str]) -> None:
    """Raise :class:`ConfigError` naming the first wrong entry of ``groups``: an unknown or
    repeated model id, an empty group, an island named twice in one group or in two groups."""
    served = list(model_ids)
    owner: dict[str, str] = {}  # island -> the model id of its group
    seen: set[str] = set()
    for i, group in enumerate(groups):
        where = f"expert_groups[{i}]"
        if group.model_id not in served:
            raise ConfigError(
                f"{where}.model_id: {group.model_id!r} is not a model of this aggregator "
                f"(its [[models]] are {served}); add a [[models]] entry for it or fix the id"
            )
        if group.model_id in seen:
            raise ConfigError(
                f"{where}.model_id: {group.model_id!r} has a group already; list all its "
                "islands in one [[expert_groups]] entry"
            )
        seen.add(group.model_id)
        if not group.islands:
            raise ConfigError(
                f"{where}.islands: the group of {group.model_id!r} is empty; name the islands "
                "(roster names) that train it, or remove the entry"
            )
        for name in group.islands:
            if not name:
                raise ConfigError(f"{where}.islands: an empty island name")
            if owner.get(name) == group.model_id:
                raise ConfigError(
                    f"{where}.islands: island {name!r} is named twice in the group of "
                    f"{group.model_id!r}"
                )
            if name in owner:
                raise ConfigError(
                    f"{where}.islands: island {name!r} is in the groups of both "
                    f"{owner[name]!r} and {group.model_id!r}; an island trains one expert"
                )
            owner[name] = group.model_id


def members_by_model(groups: Sequence[ExpertGroup]) -> dict[str, frozenset[str]]:
    """model id -> the islands of its group (only models that have one)."""
    return {g.model_id: frozenset(g.islands) for g in groups}


def group_refusal(members: Mapping[str, frozenset[str]], model_id: str, island: str) -> str:
    """Why a delta from ``island`` to ``model_id`` is refused under the groups ``members``
    (``members_by_model``); "" when it is admitted."""
    group = members.get(model_id)
    if group is not None and island not in group:
        return (
            f"island {island!r} is not in the expert group of {model_id!r} "
            f"({sorted(group)}): add it to that [[expert_groups]] entry, or set the island's "
            "sync.model_id to the expert it trains"
        )
    return ""


def line_buffer_k(merge_k: int, model_k: int, group: int) -> int:
    """The updates a version of one model line merges: the model's own ``buffer_k`` if set,
    else the aggregator's ``merge.buffer_k``, but no more than the islands of its expert group
    (``group``; 0: none), which are all that push to it."""
    if model_k:
        return model_k
    return min(merge_k, group) if group else merge_k
