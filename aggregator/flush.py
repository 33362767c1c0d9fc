"""Flushing a model line: when (FedBuff's K updates or deadline) and what a flush does.

At the root a flush is the outer step: ``u_v`` and the root's state are written, the WAL is
marked and compacted, and the new version is published. At a leaf or mid it is a partial
aggregate queued for the parent (:mod:`aggregator.parent`). A flush runs with the line's lock
held; the CPU work and fsyncs run in threads.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgpack

from aggregator.faults import fault_point
from aggregator.lines import ModelLine
from aggregator.merge import PartialAggregate

log = logging.getLogger("aggregator.service")  # one log for all the service's parts


class Flushing:
    """Flushes of :class:`~aggregator.service.AggregatorService`'s model lines.

    Uses the service's ``config``, ``clock``, ``guard`` and ``metrics``, :meth:`_publish`
    (:mod:`aggregator.publish`) and :meth:`_queue_partial` (:mod:`aggregator.parent`).
    """

    async def _deadline_loop(self, line: ModelLine) -> None:
        """Flush a buffer whose oldest update has waited ``deadline_s``; sleeps when empty."""
        deadline_s = self.config.merge.deadline_s
        while True:
            if line.oldest_at is None:
                line.wakeup.clear()
                await line.wakeup.wait()
                continue
            remaining = line.oldest_at + deadline_s - self.clock()
            if remaining > 0:
                await asyncio.sleep(min(remaining, 1.0))
                continue
            async with line.lock:
                await self._maybe_flush(line, deadline=True)

    async def _maybe_flush(self, line: ModelLine, deadline: bool = False) -> None:
        """Flush when K updates are buffered or the deadline passed (caller holds the lock)."""
        count = line.buffered
        if count == 0:
            return
        due = line.oldest_at is not None and (
            self.clock() - line.oldest_at >= self.config.merge.deadline_s
        )
        if count < self.config.merge.buffer_k and not (deadline or due):
            return
        await line.collect_pool()
        partial, index = line.take_buffer()
        if line.root is not None:
            await self._root_step(line, partial, index)
        else:
            line.partial_seq += 1
            await self._queue_partial(line, partial, index, line.partial_seq)
        line.recycle(partial)  # the step or the encoded partial holds no reference to it

    async def _root_step(self, line: ModelLine, partial: PartialAggregate, index: int) -> None:
        t0 = time.perf_counter()
        cfg = line.config
        guard = self.guard.state()
        norms = line.norm_bound.state() if line.norm_bound is not None else []

        def step_and_persist():
            nv = line.root.step(partial)
            line.store.save_version_and_state(  # u_v, state (and snapshot), concurrently
                nv.version,
                nv.envelope,
                line.root.state_arrays(),
                {"version": nv.version, "wal_index": index, "guard": guard, "norms": norms},
                snapshot=line.root.theta if nv.version % cfg.snapshot_every == 0 else None,
            )
            fault_point("root.before_mark")
            line.wal.mark_done(index, msgpack.packb({"version": nv.version}))
            line.wal.compact()
            line.store.prune()
            return nv

        nv = await asyncio.to_thread(step_and_persist)
        line.theta = line.root.theta
        line.remember(nv.version, nv.envelope)
        await self._publish(line, nv.version)
        self.metrics.merge_seconds.observe(time.perf_counter() - t0)
        self.metrics.version.labels(line.model_id).set(nv.version)
        log.info(
            "%s: version %d of %s from %d updates (weight %.3g, max staleness %d, |u| %.3g)",
            self.config.name, nv.version, line.model_id, nv.count, nv.weight_sum,
            nv.max_staleness, nv.update_norm,
        )  # fmt: skip
