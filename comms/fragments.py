"""A model cut into fragments that sync on staggered schedules (Streaming DiLoCo).

Streaming DiLoCo (Douillard et al., "Streaming DiLoCo with overlapping communication", 2025)
syncs the model in F fragments: fragment p is pushed and merged at its own round boundaries,
offset by H / F inner steps from the previous fragment's, so the peak bandwidth falls by F and
each fragment's transfer overlaps the inner steps. Here each fragment is a model line of its
own at the aggregators, with its own versions (``<model_id>.f<p>``: one line per fragment,
not one line carrying fragment ids, so every invariant of a model line holds per fragment
unchanged: exactly-once, replay, bit-identical replicas of each fragment).

Both sides cut the same way, from the tensors' names and sizes alone: names in sorted order,
cut into F contiguous runs of about equal size (a run ends once its cumulative size reaches
its share ``(p + 1) * total / F``; every run holds at least one tensor). The island cuts its
model's parameters and the root its ``init`` file's tensors with this one function.
"""

from __future__ import annotations

from collections.abc import Mapping

from comms.errors import ConfigError


def fragment_model_id(model_id: str, index: int) -> str:
    """The model line of fragment ``index`` of ``model_id``."""
    return f"{model_id}.f{int(index)}"


def split_fragments(sizes: Mapping[str, int], count: int) -> list[list[str]]:
    """Cut tensors (name -> number of elements) into ``count`` contiguous runs of sorted names
    of about equal total size. ConfigError when ``count`` is not in [1, number of tensors]."""
    names = sorted(sizes)
    if not isinstance(count, int) or not 1 <= count <= len(names):
        raise ConfigError(
            f"fragments: need between 1 and {len(names)} (the model's tensors), got {count!r}"
        )
    total = sum(max(0, int(sizes[n])) for n in names)
    runs: list[list[str]] = [[] for _ in range(count)]
    done, p = 0, 0
    for i, name in enumerate(names):
        later_runs = count - 1 - p
        if (
            runs[p]
            and later_runs
            and (done >= (p + 1) * total / count or len(names) - i <= later_runs)
        ):
            p += 1  # this run has its share (or each later run needs one of the names left)
        runs[p].append(name)
        done += max(0, int(sizes[name]))
    return runs


def fragment_of(sizes: Mapping[str, int], index: int, count: int) -> list[str]:
    """The names of fragment ``index`` of ``count`` (ConfigError for an index out of range)."""
    if not isinstance(index, int) or not 0 <= index < count:
        raise ConfigError(f"fragment: index must be in [0, {count}), got {index!r}")
    return split_fragments(sizes, count)[index]
