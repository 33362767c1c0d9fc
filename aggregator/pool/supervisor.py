"""The merge pool's supervisor: the dispatcher thread, and the queue, workers and buffers.

Concurrency model. The gateway owns a :class:`MergePool`. Public methods may be called from any
thread; they change the queue under one lock and wake the pool's *dispatcher thread*, the only
thread that talks to worker processes (one duplex pipe each) and starts or stops them. The
dispatcher blocks in ``multiprocessing.connection.wait`` on the pipes, the processes'
sentinels and a wake-up pipe, with a timeout of at most ``poll_interval_s`` (1 s): an idle pool
costs no CPU. Each worker blocks on its pipe, merges one event at a time and reports it.

Bookkeeping and failures. Buffers belong to the gateway, not to workers: a worker is bound to
one buffer while it lives. The gateway credits an event to a buffer (weight sum, count,
staleness, ids) only when the worker reports it merged. A worker retiring on idle hands its
buffer back (kept, with its contribution, until the next flush). A worker that dies (kill -9)
with no event in flight leaves a consistent buffer, which is kept the same way. A worker that
dies with events in flight may have half-added one, so its buffer is discarded and every event
it had merged since the last flush is queued again, with the in-flight ones: the events'
bytes (shared blobs, or the WAL file) stay referenced until the flush that collects them, so
nothing is lost and nothing counted twice. An event whose worker died ``max_attempts`` times is
rejected. A decode error rejects the event; if the buffer was already partly updated, the
buffer is reset the same way (its generation number tells the worker to skip what was queued
for the old contents).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import multiprocessing as mp
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_ready

from aggregator.merge import UpdateId
from aggregator.pool.buffers import _Buffer, _Record
from aggregator.pool.shm import SharedParams
from aggregator.pool.worker import _worker_main

_COUNTERS = [
    "submitted",
    "merged",
    "rejected",
    "replayed",
    "starts",
    "exits",
    "crashes",
    "flushes",
    "peak",
]


@dataclass(eq=False)
class _Worker:
    process: mp.process.BaseProcess
    conn: object  # multiprocessing Connection
    buffer: _Buffer | None
    started_at: float
    ready: bool = False
    stopping_since: float | None = None
    broken_pipe: bool = False
    in_flight: dict[int, _Record] = field(default_factory=dict)


class PoolSupervisor:
    """The state of a :class:`~aggregator.pool.merge_pool.MergePool` and the thread that runs it:
    dispatch queued events, start workers while the backlog is deep, retire idle ones down to
    ``warm_workers``, and replay what a crashed worker held.

    The pool sets its settings (``layout``, ``max_workers``, ``warm_workers``,
    ``idle_timeout_s``, ``poll_interval_s``, ``scale_up_backlog``, ``prefetch``,
    ``stop_timeout_s``, ``max_attempts``, ``segment_prefix``, ``_worker_args``, ``_ctx``),
    then calls :meth:`_init_state` and starts :meth:`_run` in a thread.
    """

    def _init_state(self) -> None:
        """The queue, the workers, the buffers, the counters and the wake-up pipe."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._flush_lock = threading.Lock()
        self._queue: list[tuple[int, _Record]] = []  # heap by ordinal: FIFO, replays first
        self._records: dict[UpdateId, _Record] = {}  # submitted and not yet flushed/rejected
        self._ordinals = itertools.count()
        self._next_ordinal = 0
        self._flush_cut: int | None = None  # while set, only events below it are dispatched
        self._workers: list[_Worker] = []
        self._parked: list[_Buffer] = []  # buffers with a contribution and no worker
        self._rejected: list[tuple[UpdateId, str]] = []
        self._broken: str | None = None
        self._closed = False
        self._early_deaths = 0
        self._last_activity = time.monotonic()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._merge_seconds = 0.0
        self._start_latencies: deque[float] = deque(maxlen=100)  # seconds, newest last
        self._last_scale: tuple[str, float, int] | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # ------------------------------------------------------------ helpers (lock held)

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("the merge pool is closed")
        if self._broken:
            raise RuntimeError(f"the merge pool is broken: {self._broken}")

    def _wake(self) -> None:
        if self._wake_w < 0:
            return  # closed
        with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
            os.write(self._wake_w, b"\0")

    def _forget(self, record: _Record) -> None:
        self._records.pop(tuple(record.event.update_id), None)
        if record.owned_blob is not None:
            record.owned_blob.destroy()
            record.owned_blob = None

    def _reject(self, record: _Record, reason: str) -> None:
        self._forget(record)
        self._rejected.append((tuple(record.event.update_id), reason))
        self._counts["rejected"] += 1

    def _requeue(self, records: list[_Record]) -> None:
        for record in records:
            heapq.heappush(self._queue, (record.ordinal, record))
        self._counts["replayed"] += len(records)

    def _send(self, worker: _Worker, message: tuple) -> bool:
        try:
            worker.conn.send(message)
            return True
        except (OSError, ValueError):  # the worker died; its sentinel will tell
            worker.broken_pipe = True
            return False

    def _live(self) -> list[_Worker]:
        return [w for w in self._workers if w.stopping_since is None]

    # ------------------------------------------------------------ the dispatcher thread

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                    waitables = [self._wake_r]
                    for w in self._workers:
                        waitables += [w.conn, w.process.sentinel]
                    timeout = self._next_timeout(time.monotonic())
                wait_for_ready(waitables, timeout)
                with self._lock:
                    if self._closed:
                        return
                    self._drain_wake()
                    now = time.monotonic()
                    for w in list(self._workers):
                        self._read_reports(w, now)
                    for w in list(self._workers):
                        if w.process.exitcode is not None:
                            self._reap(w, now)
                    self._pump(now)
                    self._scale_down(now)
                    self._changed.notify_all()
        except BaseException as e:  # a bug or an OS failure: stop accepting, tell every caller
            with self._lock:
                self._broken = f"dispatcher failed: {type(e).__name__}: {e}"
                self._changed.notify_all()
            raise

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _next_timeout(self, now: float) -> float:
        timeout = self.poll_interval_s
        if len(self._live()) > self.warm_workers:
            idle_left = self._last_activity + self.idle_timeout_s - now
            timeout = min(timeout, max(idle_left, 0.0) + 0.005)
        return timeout

    def _read_reports(self, w: _Worker, now: float) -> None:
        while True:
            try:
                if not w.conn.poll():
                    return
                message = w.conn.recv()
            except (EOFError, OSError):
                return  # the worker is gone; the sentinel handles it
            self._last_activity = now
            if message[0] == "ready":
                w.ready = True
                self._early_deaths = 0
                self._start_latencies.append(time.perf_counter() - w.started_at)
                continue
            outcome, ordinal, gen, seconds, why = message
            self._merge_seconds += seconds
            if w.buffer is None or gen != w.buffer.gen:
                continue  # a report about contents already discarded
            record = w.in_flight.pop(ordinal, None)
            if record is None:
                continue
            if outcome == "merged":
                w.buffer.credit(record)
                self._counts["merged"] += 1
            elif outcome == "failed":
                self._reject(record, why)
            elif outcome == "tainted":
                self._reject(record, why)
                self._discard_contents(w)

    def _discard_contents(self, w: _Worker) -> None:
        """Forget what ``w``'s buffer holds and queue it all again (the worker lives on)."""
        replay = w.buffer.merged + list(w.in_flight.values())
        w.in_flight.clear()
        w.buffer.reset_tally()  # new generation: the worker skips events sent for the old one
        self._requeue(replay)

    def _reap(self, w: _Worker, now: float) -> None:
        self._workers.remove(w)
        w.conn.close()
        w.process.join(0)
        if w.stopping_since is not None:
            self._counts["exits"] += 1
            return
        self._counts["crashes"] += 1
        if not w.ready:
            self._early_deaths += 1
            if self._early_deaths >= 3:
                self._broken = (
                    f"merge workers die before they are ready (last exit code "
                    f"{w.process.exitcode}); check that the worker can import numpy and comms"
                )
        buf, w.buffer = w.buffer, None
        if not w.in_flight:
            self._park(buf)  # nothing was half-added: its contents stand
        else:
            culprits = list(w.in_flight.values())
            self._requeue(buf.merged)
            buf.shared.destroy()
            for record in culprits:
                record.attempts += 1
                if record.attempts >= self.max_attempts:
                    self._reject(record, f"a merge worker died {record.attempts} times on it")
                else:
                    self._requeue([record])
        self._last_scale = ("crash", now, len(self._live()))

    def _park(self, buf: _Buffer) -> None:
        if buf.count > 0:
            self._parked.append(buf)
        else:
            buf.shared.destroy()

    def _pump(self, now: float) -> None:
        """Send queued events to workers with room; start workers while the backlog is deep."""
        if self._closed or self._broken:
            return
        self._dispatch(now)
        live = self._live()
        while len(live) < self.max_workers and len(self._queue) > self.scale_up_backlog * len(live):
            live.append(self._spawn(now))
        self._dispatch(now)

    def _dispatch(self, now: float) -> None:
        cut = self._flush_cut
        while self._queue and (cut is None or self._queue[0][0] < cut):
            room = [
                w for w in self._live() if len(w.in_flight) < self.prefetch and not w.broken_pipe
            ]
            if not room:
                return
            w = min(room, key=lambda w: (not w.ready, len(w.in_flight)))
            _, record = heapq.heappop(self._queue)
            if not self._send(w, ("merge", record.ordinal, w.buffer.gen, record.event)):
                heapq.heappush(self._queue, (record.ordinal, record))
                continue
            w.in_flight[record.ordinal] = record
            self._last_activity = now

    def _spawn(self, now: float) -> _Worker:
        parked = max(self._parked, key=lambda b: b.count, default=None)
        if parked is not None:
            self._parked.remove(parked)
            buf = parked
        else:
            buf = _Buffer(SharedParams.create(self.layout, self.segment_prefix))
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(
                child_conn,
                buf.shared.name,
                self.layout,
                buf.gen,
                buf.count == 0,
                *self._worker_args,
            ),
            name=f"merge-worker-{self._counts['starts']}",
            daemon=True,
        )
        started_at = time.perf_counter()
        try:
            process.start()
        except BaseException:
            self._park(buf)
            parent_conn.close()
            raise
        finally:
            child_conn.close()
        worker = _Worker(process, parent_conn, buf, started_at)
        self._workers.append(worker)
        self._counts["starts"] += 1
        alive = len(self._live())
        self._counts["peak"] = max(self._counts["peak"], alive)
        self._last_scale = ("up", now, alive)
        return worker

    def _scale_down(self, now: float) -> None:
        for w in self._workers:  # workers told to stop that do not exit
            if w.stopping_since is not None and now - w.stopping_since > self.stop_timeout_s:
                w.process.kill()
        if now - self._last_activity < self.idle_timeout_s:
            return
        for w in reversed(self._live()):
            if len(self._live()) <= self.warm_workers:
                return
            if not w.in_flight:
                self._retire(w, now)

    def _retire(self, w: _Worker, now: float) -> None:
        w.stopping_since = now
        self._send(w, ("stop",))
        buf, w.buffer = w.buffer, None
        self._park(buf)  # kept with its contribution until the next flush, or freed
        self._last_scale = ("down", now, len(self._live()))
