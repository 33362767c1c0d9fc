"""The gateway's tally of each shared accumulation buffer, and the sum of all at a flush.

A tally (weight sum, count, max staleness, the events credited) grows only as workers report
events merged; resetting it starts a new *generation* of the buffer's contents, and a worker
skips what was queued for an older one. The segments themselves are :mod:`aggregator.pool.shm`'s;
when events are credited, kept or replayed is :mod:`aggregator.pool.supervisor`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aggregator.merge import PartialAggregate
from aggregator.pool.shm import ParamLayout, SharedBlob, SharedParams
from aggregator.pool.worker import MergeEvent


@dataclass(eq=False)
class _Record:
    ordinal: int
    event: MergeEvent
    owned_blob: SharedBlob | None
    attempts: int = 0  # times its worker died while it was in flight


class _Buffer:
    """A shared accumulation buffer and the tally of what it holds (gateway side)."""

    def __init__(self, shared: SharedParams):
        self.shared = shared
        self.gen = 0
        self.reset_tally()

    def reset_tally(self) -> None:
        self.gen += 1
        self.weight_sum = 0.0
        self.work = 0.0
        self.max_staleness = 0
        self.merged: list[_Record] = []

    @property
    def count(self) -> int:
        return len(self.merged)

    def credit(self, record: _Record) -> None:
        self.weight_sum += float(np.float32(record.event.weight))  # as merge.accumulate does
        self.work += float(record.event.work)
        self.max_staleness = max(self.max_staleness, int(record.event.staleness))
        self.merged.append(record)


def _sum_buffers(buffers: list[_Buffer], layout: ParamLayout) -> PartialAggregate:
    """One PartialAggregate holding every buffer's contents and tally (new arrays)."""
    out = PartialAggregate()
    if not buffers:
        return out
    flat = np.empty(layout.numel, dtype=np.float32)
    np.copyto(flat, buffers[0].shared.flat)
    for buf in buffers[1:]:
        np.add(flat, buf.shared.flat, out=flat)
    out.weighted_sum = layout.views(flat)
    for buf in buffers:
        out.weight_sum += buf.weight_sum
        out.work += buf.work
        out.max_staleness = max(out.max_staleness, buf.max_staleness)
        out.contributors.update(r.event.update_id for r in buf.merged)
        out.count += buf.count
    return out
