"""The merge pool's public face: submit accepted updates, flush their sum, close.

:meth:`MergePool.flush` returns ``sum_k S_k`` over the workers' buffers as one
:class:`~aggregator.merge.PartialAggregate`, equal to an in-process ``accumulate`` of the same
updates up to float32 summation order (bit-identical with one worker). Public methods may be
called from any thread; the dispatcher thread and the state it manages are
:class:`~aggregator.pool.supervisor.PoolSupervisor`'s.

The merge path never imports torch: workers start in a ``forkserver`` context (default) whose
server has ``numpy`` and the codecs preloaded, so a new worker is ready in milliseconds
(``fork`` is not used: the gateway runs gRPC and asyncio threads).
"""

from __future__ import annotations

import heapq
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass

from aggregator.merge import PartialAggregate, UpdateId
from aggregator.pool.buffers import _Buffer, _Record, _sum_buffers
from aggregator.pool.shm import DEFAULT_PREFIX, BlobRef, ParamLayout, SharedBlob
from aggregator.pool.supervisor import PoolSupervisor
from aggregator.pool.worker import DecodeFn, FileRef, MergeEvent, _clip_scale, _merge_weight

DEFAULT_MAX_ENVELOPE_BYTES = 2 << 30
_PRELOAD = ["numpy", "aggregator.merge", "aggregator.pool.shm", "comms.envelope", "comms.codecs"]


def _check_event(event: MergeEvent) -> None:
    _merge_weight(event.weight)
    _clip_scale(event.scale)
    if not isinstance(event.source, BlobRef | FileRef):
        raise TypeError(f"event source must be a BlobRef or FileRef, got {event.source!r}")


@dataclass(frozen=True)
class PoolStats:
    workers_alive: int  # started and not told to stop
    workers_ready: int
    workers_peak: int
    queue_depth: int  # events waiting for a worker
    in_flight: int  # events sent to a worker, not yet reported
    events_submitted: int
    events_merged: int
    events_rejected: int
    events_replayed: int  # queued again after a worker died or a buffer was reset
    worker_starts: int
    worker_exits: int
    worker_crashes: int
    flushes: int
    buffers: int  # shared accumulation buffers held (bound to a worker or parked)
    merge_seconds: float  # workers' busy time, summed
    last_worker_start_s: float | None  # Process.start() to "ready", last worker
    mean_worker_start_s: float | None  # over the last 100 starts
    last_scale_event: tuple[str, float, int] | None  # (up|down|crash, monotonic time, alive)


def _check_arguments(
    *,
    max_workers: int,
    warm_workers: int,
    idle_timeout_s: float,
    poll_interval_s: float,
    stop_timeout_s: float,
    scale_up_backlog: int,
    prefetch: int,
    max_attempts: int,
    start_method: str,
) -> None:
    if max_workers < 1 or not 0 <= warm_workers <= max_workers:
        raise ValueError(
            f"need max_workers >= 1 and 0 <= warm_workers <= max_workers, got "
            f"max_workers={max_workers}, warm_workers={warm_workers}"
        )
    if min(idle_timeout_s, poll_interval_s, stop_timeout_s) <= 0:
        raise ValueError("idle_timeout_s, poll_interval_s and stop_timeout_s must be > 0")
    if scale_up_backlog < 1 or prefetch < 1 or max_attempts < 1:
        raise ValueError("scale_up_backlog, prefetch and max_attempts must be >= 1")
    if start_method == "fork":
        raise ValueError(
            "start_method 'fork' is unsafe in a threaded gateway; use 'forkserver' or 'spawn'"
        )


class MergePool(PoolSupervisor):
    """An elastic pool of merge worker processes, owned by the gateway.

    Call order: :meth:`submit` (or :meth:`submit_bytes`) each accepted update; :meth:`flush`
    when the merge rule says so (FedBuff's K or deadline) to take the partial aggregate of
    everything submitted before the call; :meth:`close` at shutdown. Events submitted during
    a flush wait for the next one.
    """

    def __init__(
        self,
        layout: ParamLayout,
        max_workers: int = 1,
        *,
        warm_workers: int = 0,
        idle_timeout_s: float = 30.0,
        scale_up_backlog: int = 2,
        prefetch: int = 2,
        poll_interval_s: float = 1.0,
        stop_timeout_s: float = 5.0,
        max_attempts: int = 3,
        start_method: str = "forkserver",
        decode: DecodeFn | None = None,
        verify_digest: bool = False,
        max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
        segment_prefix: str = DEFAULT_PREFIX,
    ):
        _check_arguments(
            max_workers=max_workers,
            warm_workers=warm_workers,
            idle_timeout_s=idle_timeout_s,
            poll_interval_s=poll_interval_s,
            stop_timeout_s=stop_timeout_s,
            scale_up_backlog=scale_up_backlog,
            prefetch=prefetch,
            max_attempts=max_attempts,
            start_method=start_method,
        )
        self.layout = layout
        self.max_workers, self.warm_workers = max_workers, warm_workers
        self.idle_timeout_s, self.poll_interval_s = idle_timeout_s, poll_interval_s
        self.scale_up_backlog, self.prefetch = scale_up_backlog, prefetch
        self.stop_timeout_s, self.max_attempts = stop_timeout_s, max_attempts
        self.segment_prefix = segment_prefix
        self._worker_args = (decode, verify_digest, max_envelope_bytes)
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(_PRELOAD)
        self._init_state()
        with self._lock:
            for _ in range(warm_workers):
                self._spawn(time.monotonic())
        self._thread = threading.Thread(target=self._run, name="merge-pool", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public API

    def submit(self, event: MergeEvent) -> int:
        """Queue one event; returns its ordinal. Its bytes (blob or file) must stay readable
        until a flush returns it or it is rejected (see :meth:`drain_rejected`).

        Raises ``ValueError`` for a bad weight, :class:`~comms.errors.ReplayError` for an id
        already pending, ``RuntimeError`` once the pool is closed or broken.
        """
        return self._submit(event, None)

    def submit_many(self, events: list[MergeEvent]) -> list[int]:
        """Queue several events at once, as one backlog: the dispatcher sees them all together
        (a WAL replay is a burst, and the pool scales up for it rather than for whichever part
        of it arrived before the first worker drained the queue). All or none: a bad event or
        an id already pending raises before any is queued."""
        from comms.errors import ReplayError

        for event in events:
            _check_event(event)
        ids = [tuple(e.update_id) for e in events]
        if len(set(ids)) != len(ids):
            raise ReplayError("the same update id twice in one batch", reason="duplicate")
        with self._lock:
            self._check_usable()
            for update_id in ids:
                if update_id in self._records:
                    raise ReplayError(
                        f"update {update_id} is already queued in this pool", reason="duplicate"
                    )
            ordinals = [self._queue_event(event, None) for event in events]
        self._wake()
        return ordinals

    def submit_blob(
        self, blob: SharedBlob, weight: float, update_id: UpdateId, staleness: int = 0
    ) -> int:
        """Queue the envelope in ``blob`` (made with :meth:`SharedBlob.create` and filled, e.g.
        chunk by chunk as it is received); the pool owns the blob from now on and unlinks it
        once the update is flushed or rejected. On error the caller keeps it."""
        if not blob.owner:
            raise ValueError(f"blob {blob.name!r} was attached, not created: pass its owner's")
        event = MergeEvent(blob.ref, weight, tuple(update_id), staleness)
        ordinal = self._submit(event, blob)
        blob.close()  # the pool only needs the name from here on
        return ordinal

    def submit_bytes(
        self,
        envelope: bytes | bytearray | memoryview,
        weight: float,
        update_id: UpdateId,
        staleness: int = 0,
    ) -> int:
        """Copy an envelope into a new shared blob the pool owns, and queue it."""
        blob = SharedBlob.from_bytes(envelope, self.segment_prefix)
        try:
            return self.submit_blob(blob, weight, update_id, staleness)
        except BaseException:
            blob.destroy()
            raise

    def _submit(self, event: MergeEvent, owned_blob: SharedBlob | None) -> int:
        from comms.errors import ReplayError

        _check_event(event)
        update_id = tuple(event.update_id)
        with self._lock:
            self._check_usable()
            if update_id in self._records:
                raise ReplayError(
                    f"update {update_id} is already queued in this pool", reason="duplicate"
                )
            ordinal = self._queue_event(event, owned_blob)
        self._wake()
        return ordinal

    def _queue_event(self, event: MergeEvent, owned_blob: SharedBlob | None) -> int:
        """Under the lock: give ``event`` the next ordinal and put it on the queue."""
        ordinal = next(self._ordinals)
        self._next_ordinal = ordinal + 1
        record = _Record(ordinal, event, owned_blob)
        self._records[tuple(event.update_id)] = record
        heapq.heappush(self._queue, (ordinal, record))
        self._counts["submitted"] += 1
        self._last_activity = time.monotonic()
        return ordinal

    def flush(self, timeout: float = 60.0) -> PartialAggregate:
        """Wait until every event submitted before this call is merged or rejected, then return
        the sum of all buffers as a new :class:`PartialAggregate` and empty them. Returns an
        empty aggregate (``count == 0``) when nothing was merged.

        Raises ``TimeoutError`` (nothing is lost; call again) or ``RuntimeError`` if the pool
        is closed or broken.
        """
        with self._flush_lock:
            buffers = self._wait_for_cut(timeout)
            try:
                result = _sum_buffers(buffers, self.layout)
            except BaseException:
                with self._lock:
                    self._flush_cut = None
                self._wake()
                raise
            with self._lock:
                for buf in buffers:
                    for record in buf.merged:
                        self._forget(record)
                    buf.reset_tally()
                for buf in self._parked:
                    buf.shared.destroy()
                self._parked = []
                self._flush_cut = None
                self._counts["flushes"] += 1
            self._wake()
            return result

    def drain_rejected(self) -> list[tuple[UpdateId, str]]:
        """Events rejected since the last call, with the reason (they are in no flush)."""
        with self._lock:
            out, self._rejected = self._rejected, []
            return out

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until every started worker has reported ready (``TimeoutError`` otherwise)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not all(w.ready for w in self._workers if w.stopping_since is None):
                self._check_usable()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"merge workers not ready after {timeout} s")
                self._changed.wait(min(left, self.poll_interval_s))

    def worker_pids(self) -> dict[int, int]:
        """``pid -> events merged into its buffer since the last flush`` for live workers."""
        with self._lock:
            return {
                w.process.pid: (w.buffer.count if w.buffer else 0)
                for w in self._workers
                if w.stopping_since is None
            }

    def stats(self) -> PoolStats:
        with self._lock:
            c = self._counts
            live = [w for w in self._workers if w.stopping_since is None]
            lat = self._start_latencies
            return PoolStats(
                workers_alive=len(live),
                workers_ready=sum(w.ready for w in live),
                workers_peak=c["peak"],
                queue_depth=len(self._queue),
                in_flight=sum(len(w.in_flight) for w in self._workers),
                events_submitted=c["submitted"],
                events_merged=c["merged"],
                events_rejected=c["rejected"],
                events_replayed=c["replayed"],
                worker_starts=c["starts"],
                worker_exits=c["exits"],
                worker_crashes=c["crashes"],
                flushes=c["flushes"],
                buffers=len(self._parked) + sum(w.buffer is not None for w in self._workers),
                merge_seconds=self._merge_seconds,
                last_worker_start_s=lat[-1] if lat else None,
                mean_worker_start_s=sum(lat) / len(lat) if lat else None,
                last_scale_event=self._last_scale,
            )

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker and unlink every segment. Events not yet flushed are dropped (the
        write-ahead log still holds them)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        self._wake()
        self._thread.join(timeout)
        with self._flush_lock:  # a flush that is summing buffers finishes first
            self._shutdown(timeout)

    def _shutdown(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for w in self._workers:
            if w.stopping_since is None:
                self._send(w, ("stop",))
        for w in self._workers:  # joined before unlinking: a starting worker may still attach
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.exitcode is None:
                w.process.kill()
                w.process.join(1.0)
            w.conn.close()
        buffers = self._parked + [w.buffer for w in self._workers if w.buffer is not None]
        for buf in buffers:
            buf.shared.destroy()
        for record in self._records.values():
            if record.owned_blob is not None:
                record.owned_blob.destroy()
        self._workers, self._parked, self._records, self._queue = [], [], {}, []
        wake_r, wake_w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, -1, -1
        os.close(wake_r)
        os.close(wake_w)

    def __enter__(self) -> MergePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ flush's helpers

    def _wait_for_cut(self, timeout: float) -> list[_Buffer]:
        deadline = time.monotonic() + timeout
        with self._lock:
            self._check_usable()
            cut = self._next_ordinal
            self._flush_cut = cut
            self._wake()
            while (self._queue and self._queue[0][0] < cut) or any(
                w.in_flight for w in self._workers
            ):
                left = deadline - time.monotonic()
                if self._closed or self._broken or left <= 0:
                    self._flush_cut = None
                    self._wake()
                    self._check_usable()
                    raise TimeoutError(
                        f"flush: {self._pending_before(cut)} event(s) still unmerged after "
                        f"{timeout} s; nothing is lost, call flush again"
                    )
                self._changed.wait(min(left, self.poll_interval_s))
            buffers = [w.buffer for w in self._workers if w.buffer is not None]
            return [b for b in buffers + self._parked if b.count > 0]

    def _pending_before(self, cut: int) -> int:
        queued = sum(1 for o, _ in self._queue if o < cut)
        return queued + sum(len(w.in_flight) for w in self._workers)
