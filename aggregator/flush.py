"""Flushing a model line: when (FedBuff's K updates or deadline) and what a flush does.

At the root a flush is the outer step: ``u_v`` and the root's state are written, the WAL is
marked and compacted, and the new version is published. At a leaf or mid it is a partial
aggregate queued for the parent (:mod:`aggregator.parent`). A flush runs with the line's lock
held; the CPU work and fsyncs run in threads.

A flush that cannot be made durable (a full disk: the root's version and state, or a leaf's
intent) publishes and sends nothing: the root's in-memory state is restored from its store,
the partial goes back into the buffer (its updates are acknowledged and stay in the WAL) and
the flush is tried again after ``FLUSH_RETRY_S``. A merge that is not finite (a float32
overflow of large-but-finite updates) is never published or sent: its updates are dropped
deliberately, logged with their ids and counted (``archipelago_updates_dropped``); at the
root a WAL mark records the drop, so a restart does not replay them.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgpack

from aggregator.faults import fault_point
from aggregator.lines import FLUSH_RETRY_S, ModelLine
from aggregator.merge import NonFiniteMergeError, PartialAggregate, check_finite
from comms.errors import StorageError

log = logging.getLogger("aggregator.service")  # one log for all the service's parts


class Flushing:
    """Flushes of :class:`~aggregator.service.AggregatorService`'s model lines.

    Uses the service's ``config``, ``clock``, ``guard`` and ``metrics``, :meth:`_publish`
    (:mod:`aggregator.publish`), :meth:`_queue_partial` (:mod:`aggregator.parent`) and
    :meth:`_set_reference` (:mod:`aggregator.direction_check`).
    """

    async def _deadline_loop(self, line: ModelLine) -> None:
        """Flush a buffer whose oldest update has waited ``deadline_s``; sleeps when empty."""
        deadline_s = self.config.merge.deadline_s
        while True:
            if line.oldest_at is None:
                line.wakeup.clear()
                await line.wakeup.wait()
                continue
            if line.flush_retry_at is not None:  # the last flush failed (a full disk): retry
                remaining = line.flush_retry_at - self.clock()
            else:
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
        if count < self.config.buffer_k(line.model_id) and not (deadline or due):
            return
        await line.collect_pool()
        oldest_at = line.oldest_at
        partial, index = line.take_buffer()
        if partial.empty:  # the merge workers refused every update (logged there): nothing to
            # publish or send; they stay above the WAL mark, so a restart merges them again
            line.recycle(partial)
            return
        try:
            if line.root is not None:
                await self._root_step(line, partial, index)
            else:
                await asyncio.to_thread(check_finite, partial.weighted_sum, "the partial sum")
                line.partial_seq += 1
                try:
                    await self._queue_partial(line, partial, index, line.partial_seq)
                except BaseException:
                    line.partial_seq -= 1  # no intent was logged for it
                    raise
        except StorageError as e:  # nothing published or sent; the updates stay buffered
            line.restore_buffer(partial, index, oldest_at)
            line.flush_retry_at = self.clock() + FLUSH_RETRY_S
            self.metrics.flush_failures.labels(line.model_id, e.reason).inc()
            log.debug("%s: flush of %s deferred: %s", self.config.name, line.model_id, e)
            return
        except NonFiniteMergeError as e:
            await self._drop_nonfinite(line, partial, index, e)
        line.flush_retry_at = None
        line.recycle(partial)  # the step or the encoded partial holds no reference to it

    async def _drop_nonfinite(
        self, line: ModelLine, partial: PartialAggregate, index: int, err: Exception
    ) -> None:
        """Drop the updates of a merge that overflowed, saying which and why; at the root, mark
        them in the WAL so a restart does not replay them (a leaf would replay and drop them
        again: its marks follow its parent's acks)."""
        ids = sorted(partial.contributors)
        line.dropped += partial.count
        self.metrics.dropped.labels(line.model_id, "nonfinite_merge").inc(partial.count)
        log.error(
            "%s: %s of %s: dropped %d acknowledged update(s) %s (weight %.3g) instead of "
            "publishing a non-finite version; their senders' updates are too large",
            self.config.name, err, line.model_id, partial.count, ids[:16], partial.weight_sum,
            extra={"model_id": line.model_id},
        )  # fmt: skip
        if line.root is not None:
            note = msgpack.packb(
                {"version": line.root.version, "guard": self.guard.state(), "dropped": ids}
            )
            await asyncio.to_thread(line.wal.mark_done, index, note)

    async def _root_step(self, line: ModelLine, partial: PartialAggregate, index: int) -> None:
        t0 = time.perf_counter()
        cfg = line.config
        guard = self.guard.state()
        norms = line.norm_bound.state() if line.norm_bound is not None else []

        def step_and_persist():
            before = line.root.version
            try:
                nv = line.root.step(partial)
                line.store.save_version_and_state(  # u_v, state (and snapshot), concurrently
                    nv.version,
                    nv.envelope,
                    line.root.state_arrays(),
                    {"version": nv.version, "wal_index": index, "guard": guard, "norms": norms},
                    snapshot=line.root.theta if nv.version % cfg.snapshot_every == 0 else None,
                )
            except BaseException:
                # the step may have moved theta or the optimizer: back to what is on disk
                if self._reload_root(line) != before + 1:
                    raise
                # only the directory's fsync failed after the state's rename: it is on disk
            self._set_reference(line, nv.version, nv.applied)  # the step is durable now
            fault_point("root.before_mark")
            line.wal.mark_done(index, msgpack.packb({"version": nv.version}))
            line.wal.compact()
            line.store.prune()
            return nv

        try:
            nv = await asyncio.to_thread(step_and_persist)
        finally:
            line.theta = line.root.theta  # a reload replaces the dict
        line.remember(nv.version, nv.envelope)
        fault_point("root.before_publish")
        await self._publish(line, nv.version)
        self.metrics.merge_seconds.observe(time.perf_counter() - t0)
        self.metrics.version.labels(line.model_id).set(nv.version)
        log.info(
            "%s: version %d of %s from %d updates (weight %.3g, max staleness %d, |u| %.3g, "
            "step %.3g)",
            self.config.name, nv.version, line.model_id, nv.count, nv.weight_sum,
            nv.max_staleness, nv.update_norm, nv.fraction,
            extra={"model_id": line.model_id, "version": nv.version},
        )  # fmt: skip

    @staticmethod
    def _reload_root(line: ModelLine) -> int:
        """Restore the root's theta, optimizer and residual from its stored state; returns the
        stored version."""
        arrays, meta = line.store.load_state()
        line.root.load_state_arrays(arrays, int(meta["version"]))
        return line.root.version
