"""Elastic merge workers: an event-driven pool of processes that sum updates in shared memory.

The design follows LIFL (Qi et al., "LIFL: A Lightweight, Event-driven Serverless Platform for
Federated Learning", MLSys 2024): aggregation is *event driven* (each accepted update is one
event, merged eagerly as it arrives), the *data plane is shared memory* (an update's bytes stay
in a shared segment or in the write-ahead log; only a reference travels to the worker, and each
worker's running sum lives in a shared segment the gateway reads without any copy through a
pipe), and the pool *scales with the queue and down to zero*, keeping ``warm_workers`` alive
for reuse.

What a worker computes is :func:`aggregator.merge.accumulate` (FedBuff, Nguyen et al. 2022):
``S += w_i * delta_i`` in float32, where ``delta_i`` is decoded with the codec its envelope
names (the ``none`` codec is read in place from shared memory, no decoded copy; a decoder can
be injected). :meth:`MergePool.flush` returns ``sum_k S_k`` over the workers' buffers as one
:class:`~aggregator.merge.PartialAggregate`, equal to an in-process ``accumulate`` of the same
updates up to float32 summation order (bit-identical with one worker).

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

The merge path never imports torch: workers start in a ``forkserver`` context (default) whose
server has ``numpy`` and the codecs preloaded, so a new worker is ready in milliseconds
(``fork`` is not used: the gateway runs gRPC and asyncio threads).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_ready

import numpy as np

from aggregator.merge import PartialAggregate, UpdateId, scaled_add_
from aggregator.shm import DEFAULT_PREFIX, BlobRef, ParamLayout, SharedBlob, SharedParams

DecodeFn = Callable[[dict, memoryview, tuple[int, ...]], np.ndarray]
"""``decode(codec_spec, payload, shape) -> float32 array``; must be picklable (module level)."""

DEFAULT_MAX_ENVELOPE_BYTES = 2 << 30
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
_BLOCK = 1 << 16  # elements per block of the fused add: 256 KiB of float32, fits in L2
_PRELOAD = ["numpy", "aggregator.merge", "aggregator.shm", "comms.envelope", "comms.codecs"]


@dataclass(frozen=True)
class FileRef:
    """An update's envelope bytes in a file, e.g. a write-ahead-log record's body."""

    path: str
    offset: int
    length: int


@dataclass(frozen=True)
class MergeEvent:
    """One accepted update to merge: where its envelope lies, and how much it weighs."""

    source: BlobRef | FileRef
    weight: float
    update_id: UpdateId  # (sender, sequence); must match the envelope's header
    staleness: int = 0


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


def decode_with_codec(codec_spec: dict, payload: memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """The default decoder: the codec the envelope names (``comms.codecs``, imported lazily)."""
    from comms.codecs import codec_from_spec

    return codec_from_spec(codec_spec).decode(payload, shape)


def _merge_weight(weight: float) -> np.float32:
    w = np.float32(weight)
    if not (math.isfinite(weight) and np.isfinite(w) and w > 0):
        raise ValueError(f"merge weight must be a finite positive number, got {weight!r}")
    return w


# ---------------------------------------------------------------- the worker process


@dataclass
class _WorkerState:
    gen: int  # generation of the buffer's contents this worker is adding to
    clean: bool  # the buffer holds nothing of this generation yet: overwrite, don't add
    dead_gen: int | None = None  # a generation this worker corrupted: skip its events


def _read_file_ref(ref: FileRef) -> bytes:
    chunks, offset, left = [], ref.offset, ref.length
    fd = os.open(ref.path, os.O_RDONLY)
    try:
        while left > 0:
            chunk = os.pread(fd, left, offset)
            if not chunk:
                raise ValueError(
                    f"{ref.path}: file ends before byte {ref.offset + ref.length} of the event"
                )
            chunks.append(chunk)
            offset += len(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _add_raw_float32(dst: np.ndarray, payload: memoryview, weight: np.float32, fresh: bool) -> None:
    """The ``none`` codec without a decoded copy: ``dst (+)= weight * x`` read straight from the
    shared payload, block by block, refusing NaN/Inf as ``NoneCodec.decode`` does. Same float32
    operations as :func:`~aggregator.merge.scaled_add_`, so the result is bit-identical."""
    from comms.errors import MalformedError, NonFiniteError

    flat = dst.reshape(-1)
    if payload.nbytes != 4 * flat.size:
        raise MalformedError(f"none: payload is {payload.nbytes} bytes for {flat.size} elements")
    src = np.frombuffer(payload, dtype="<f4")
    scratch = np.empty(min(flat.size, _BLOCK), dtype=np.float32)
    for start in range(0, flat.size, _BLOCK):
        stop = min(start + _BLOCK, flat.size)
        buf = scratch[: stop - start]
        np.multiply(src[start:stop], weight, out=buf)
        if not (np.isfinite(buf.max()) and np.isfinite(buf.min())):
            raise NonFiniteError("none: payload holds non-finite values (NaN or Inf)")
        if fresh:
            flat[start:stop] = buf
        else:
            np.add(flat[start:stop], buf, out=flat[start:stop])


def _add_envelope(acc, data, event, fresh, decode, verify_digest, max_bytes) -> tuple[str, str]:
    """Add ``weight * decode(envelope)`` into ``acc``: ``("merged"|"failed"|"tainted", why)``.

    ``tainted`` means ``acc`` was partly changed before the failure (not on a fresh buffer,
    which the next event overwrites whole anyway).
    """
    from comms.envelope import Envelope, parse_header
    from comms.errors import MalformedError

    try:
        if verify_digest:
            envelope = Envelope.from_bytes(data, max_bytes=max_bytes)
            header, payload = envelope.header, envelope.payload
        else:  # the gateway verified digest and signature before it accepted the update
            header = parse_header(data)
            if header.payload_size > len(data):
                raise MalformedError(f"envelope truncated: payload needs {header.payload_size} B")
            payload = data[len(data) - header.payload_size :]
        if (header.sender, header.sequence) != tuple(event.update_id):
            raise ValueError(
                f"envelope is update ({header.sender}, {header.sequence}), the event says "
                f"{event.update_id}"
            )
        shapes = acc.layout.shapes()
        got = {t.name: t.shape for t in header.tensors}
        if got != shapes:
            raise ValueError(
                f"envelope tensors {sorted(got)[:8]} or their shapes differ from the model's "
                f"layout ({len(shapes)} tensors)"
            )
    except Exception as e:  # hostile bytes raise an open set of types; all mean "reject"
        return "failed", f"{type(e).__name__}: {e}"
    weight = _merge_weight(event.weight)
    touched = False
    try:
        for spec in header.tensors:
            encoded = payload[spec.offset : spec.offset + spec.nbytes]
            dst = acc.arrays[spec.name]
            if decode is decode_with_codec and spec.codec == {"name": "none"} and dst.size:
                touched = True
                _add_raw_float32(dst, encoded, weight, fresh)  # zero copy from shared memory
                continue
            x = decode(spec.codec, encoded, spec.shape)
            if x.shape != spec.shape:
                raise ValueError(f"decoder gave shape {x.shape} for {spec.name!r} {spec.shape}")
            touched = True
            if fresh:
                np.multiply(x, weight, out=dst, dtype=np.float32)
            else:
                scaled_add_(dst, x, weight)
    except Exception as e:
        return ("tainted" if touched and not fresh else "failed"), f"{type(e).__name__}: {e}"
    return "merged", ""


def _merge_one(state, acc, event, gen, decode, verify_digest, max_bytes) -> tuple[str, str]:
    if gen == state.dead_gen:
        return "skipped", ""
    if gen != state.gen:
        state.gen, state.clean = gen, True
    try:
        if isinstance(event.source, BlobRef):
            blob = SharedBlob.attach(event.source)
            try:
                outcome = _add_envelope(
                    acc, blob.view, event, state.clean, decode, verify_digest, max_bytes
                )
            finally:
                blob.close()
        else:
            data = memoryview(_read_file_ref(event.source))
            outcome = _add_envelope(acc, data, event, state.clean, decode, verify_digest, max_bytes)
    except (OSError, ValueError) as e:  # the blob or file is gone or short
        return "failed", f"cannot read the event's bytes: {type(e).__name__}: {e}"
    if outcome[0] == "merged":
        state.clean = False
    elif outcome[0] == "tainted":
        state.dead_gen = gen
    return outcome


def _worker_main(conn, buffer_name, layout, gen, clean, decode, verify_digest, max_bytes) -> None:
    """A merge worker: merge each event the gateway sends into one shared buffer, report it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway decides when workers stop
    import comms.envelope  # before "ready", not on the first event

    if decode is None:
        import comms.codecs  # noqa: F401

        decode = decode_with_codec
    acc = SharedParams.attach(layout, buffer_name)
    state = _WorkerState(gen=gen, clean=clean)
    try:
        conn.send(("ready", os.getpid()))
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the gateway is gone
            if message[0] == "stop":
                return
            _, ordinal, msg_gen, event = message
            start = time.perf_counter()
            outcome, why = _merge_one(state, acc, event, msg_gen, decode, verify_digest, max_bytes)
            conn.send((outcome, ordinal, msg_gen, time.perf_counter() - start, why))
    finally:
        acc.close()


# ---------------------------------------------------------------- gateway-side bookkeeping


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
        self.max_staleness = 0
        self.merged: list[_Record] = []

    @property
    def count(self) -> int:
        return len(self.merged)

    def credit(self, record: _Record) -> None:
        self.weight_sum += float(np.float32(record.event.weight))  # as merge.accumulate does
        self.max_staleness = max(self.max_staleness, int(record.event.staleness))
        self.merged.append(record)


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
        out.max_staleness = max(out.max_staleness, buf.max_staleness)
        out.contributors.update(r.event.update_id for r in buf.merged)
        out.count += buf.count
    return out


# ---------------------------------------------------------------- the pool


class MergePool:
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

        _merge_weight(event.weight)
        if not isinstance(event.source, BlobRef | FileRef):
            raise TypeError(f"event source must be a BlobRef or FileRef, got {event.source!r}")
        update_id = tuple(event.update_id)
        with self._lock:
            self._check_usable()
            if update_id in self._records:
                raise ReplayError(
                    f"update {update_id} is already queued in this pool", reason="duplicate"
                )
            ordinal = next(self._ordinals)
            self._next_ordinal = ordinal + 1
            record = _Record(ordinal, event, owned_blob)
            self._records[update_id] = record
            heapq.heappush(self._queue, (ordinal, record))
            self._counts["submitted"] += 1
            self._last_activity = time.monotonic()
        self._wake()
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
