"""The aggregator service: gateway, merge, tree and root in one event-driven process.

One code path serves every role of the tree (LIFL, Qi et al. MLSys 2024): a **leaf** accepts
islands' deltas, a **mid** accepts its children's partial aggregates, and both merge what
they accept and push one partial aggregate to their parent when the buffer holds K updates or
its oldest has waited ``deadline_s`` (FedBuff, Nguyen et al. 2022). The **root** merges the
same way and, at each flush, applies the outer step and publishes a new version ``u_v`` that
flows back down the tree: every aggregator keeps a bit-identical replica of ``theta_v`` and a
cache of recent ``u_v``, so islands subscribe to and fetch from their own leaf.

Per model (``ModelLine``), the path of one push is::

    admit (verify, replay, manifest, staleness, finite)  -> WAL append + fsync -> ack
    -> merge into the buffer -> flush: root: outer step + publish; else: partial to parent

Durability: an update is acknowledged only after its WAL record is fsynced. A leaf writes a
flush *intent* before sending a partial and a *mark* once the parent acknowledged it; the root
writes its state (theta, outer momentum, version, replay guard) and then a mark. A restart
replays what lies above the mark: nothing acknowledged is lost, nothing is counted twice
(the parent's replay guard refuses a partial it already holds, which counts as delivered).

Concurrency: one asyncio event loop (grpc.aio server, aiohttp status server, timers, the
subscription to the parent). CPU work (decode, merge, outer step) and fsyncs run in worker
threads through ``asyncio.to_thread``; each model line's state changes under its own lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import numpy as np
from safetensors.numpy import load_file

from aggregator.config import AggregatorConfig, ModelConfig
from aggregator.gateway import AdmissionPolicy, Admitted, admit, parse_wal_record, wal_record
from aggregator.merge import PartialAggregate, merge_into
from aggregator.metrics import AggregatorMetrics
from aggregator.outer import apply_update, make_outer_optimizer
from aggregator.root import RootModel, snapshot_envelope
from aggregator.staleness import get_staleness_function
from aggregator.store import ModelStore
from aggregator.wal import WriteAheadLog
from comms.codecs import get_codec
from comms.envelope import Envelope, parse_header
from comms.errors import (
    CommsError,
    ConfigError,
    LinkError,
    MalformedError,
    NotFoundError,
    RejectedError,
    ReplayError,
)
from comms.http import split_listen
from comms.identity import Identity, ReplayGuard, Roster
from comms.placement import Candidate, choose_closest, eligible
from comms.transport import TransportClient, TransportServer
from comms.update import Manifest, decode_update, encode_update

log = logging.getLogger(__name__)

VERSION_CACHE = 256  # recent u_v a leaf or mid keeps for its subscribers
ROOT_VERSION_CACHE = 8  # the root's newest u_v in memory (older ones come from its store)


class ModelLine:
    """Everything one aggregator holds for one ``model_id``."""

    def __init__(self, model_id: str, wal: WriteAheadLog):
        self.model_id = model_id
        self.wal = wal
        self.manifest: Manifest | None = None
        self.theta: dict[str, np.ndarray] = {}  # replica of theta_v (the root's own at the root)
        self.version = 0
        self.root: RootModel | None = None
        self.config: ModelConfig | None = None  # the root's [[models]] entry
        self.store: ModelStore | None = None  # root: versions and snapshots on disk
        self.cache: OrderedDict[int, bytes] = OrderedDict()  # recent u_v (the root's too)
        self.buffer = PartialAggregate()
        self.buffer_index = 0  # WAL index of the newest update in the buffer
        self.oldest_at: float | None = None
        self.partial_seq = 0  # leaf/mid: sequence of the last partial sent up
        self.lock = asyncio.Lock()
        self.changed = asyncio.Condition()
        self.wakeup = asyncio.Event()
        self.snapshot: tuple[int, bytes] | None = None
        self.pool = None  # MergePool when merge.engine == "pool"
        self.pooled = 0  # updates submitted to the pool since the last flush

    @property
    def buffered(self) -> int:
        return self.buffer.count + self.pooled

    def take_buffer(self) -> tuple[PartialAggregate, int]:
        """Empty the buffer (the caller holds the lock and, with a pool, flushed it first)."""
        partial, index = self.buffer, self.buffer_index
        self.buffer, self.oldest_at = PartialAggregate(), None
        return partial, index

    def recycle(self, partial: PartialAggregate) -> None:
        """Hand a finished partial's buffers (nothing refers to them any more) to the next."""
        if self.buffer.empty:
            self.buffer.spare = partial.weighted_sum
        partial.weighted_sum = {}

    async def collect_pool(self) -> None:
        """Move what the merge workers summed into the in-process buffer."""
        if self.pool is None or self.pooled == 0:
            return
        pooled = await asyncio.to_thread(self.pool.flush)
        for update_id, reason in self.pool.drain_rejected():
            log.error("merge worker refused an admitted update %s: %s", update_id, reason)
        merge_into(self.buffer, pooled)
        self.pooled = 0

    def remember(self, version: int, data: bytes) -> None:
        """Keep a published u_v in memory for subscribers (the same bytes object for all)."""
        self.cache[version] = data
        while len(self.cache) > (ROOT_VERSION_CACHE if self.root is not None else VERSION_CACHE):
            self.cache.popitem(last=False)

    def version_bytes(self, version: int) -> bytes:
        if self.root is not None and version not in self.cache:
            return self.store.get_version(version)
        try:
            return self.cache[version]
        except KeyError:
            raise NotFoundError(
                f"model {self.model_id!r}: version {version} is no longer cached here "
                f"(oldest {next(iter(self.cache), None)}); fetch a snapshot and resubscribe"
            ) from None


class AggregatorService:
    """A leaf, mid or root aggregator; ``await start()``, then serve until ``stop()``."""

    def __init__(
        self,
        config: AggregatorConfig,
        *,
        identity: Identity | None = None,
        roster: Roster | None = None,
        discovery=None,
        clock=time.monotonic,
    ):
        self.config = config
        self.role = config.role
        self.state_dir = Path(config.state_dir)
        self.identity = identity or (
            Identity.load_or_create(config.key) if config.key else Identity.generate()
        )
        if roster is None:
            if not config.roster:
                raise ConfigError("roster: an aggregator needs a roster of allowed public keys")
            roster = Roster.load(config.roster)
        self.roster = roster
        self.clock = clock
        self.discovery = discovery
        self.guard = ReplayGuard()
        m = config.merge
        self.policy = AdmissionPolicy(
            roster=roster,
            staleness_fn=get_staleness_function(m.staleness, **m.staleness_params),
            max_staleness=m.max_staleness,
            clip_norm=m.clip_norm,
            weight_by_samples=m.weight_by_samples,
            max_bytes=config.max_update_bytes,
        )
        self.lines: dict[str, ModelLine] = {}
        self.metrics = AggregatorMetrics(config.name, config.role)
        self.server: TransportServer | None = None
        self.http = None
        self.parent: TransportClient | None = None
        self.parent_address = config.parent
        self.children: dict[str, float] = {}  # sender -> last seen (for load and /status)
        self._tasks: list[asyncio.Task] = []
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._announcer = None
        self.address = ""
        self.started_at = time.time()

    # ================================================================== lifecycle

    async def start(self) -> str:
        """Open every model line, replay the WAL, start serving; returns the gRPC address."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.role != "root":
            await self._connect_parent()
        model_ids = await self._model_ids()
        for model_id in model_ids:
            line = ModelLine(model_id, WriteAheadLog(self.state_dir / "wal" / model_id))
            self.lines[model_id] = line
            if self.role == "root":
                line.config = next(c for c in self.config.models if c.model_id == model_id)
                await asyncio.to_thread(self._open_root_line, line, line.config)
            else:
                await self._open_replica(line)
            if self.config.merge.engine == "pool":
                line.pool = self._make_pool(line)
            await self._replay(line)
        host, port = split_listen(self.config.listen)
        self.server = TransportServer(
            self, host=host, port=port, max_upload_bytes=self.config.max_update_bytes
        )
        self.address = f"{host}:{await self.server.start()}"
        for line in self.lines.values():
            self._spawn(self._deadline_loop(line), f"deadline {line.model_id}")
            if self.role != "root":
                self._spawn(self._follow_parent(line), f"follow {line.model_id}")
        if self.role != "root":
            self._spawn(self._send_partials(), "outbox")
        if self.config.http:
            from aggregator.http import start_status_server

            self.http = await start_status_server(self, self.config.http)
        if self.discovery is not None:
            self._announcer = self.discovery.keep_announced(
                "aggregator", self.config.name, self._record_fields, ttl=self.config.announce_ttl_s
            )
        log.info(
            "aggregator %s (%s) serving %s on %s",
            self.config.name, self.role, sorted(self.lines), self.address,
        )  # fmt: skip
        return self.address

    async def stop(self) -> None:
        if self._announcer is not None:
            await asyncio.to_thread(self._announcer.stop)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.http is not None:
            await self.http.cleanup()
        if self.server is not None:
            await self.server.stop(0.5)
        if self.parent is not None:
            await self.parent.close()
        for line in self.lines.values():
            if line.pool is not None:
                await asyncio.to_thread(line.pool.close)
            line.wal.close()

    def _make_pool(self, line: ModelLine):
        from aggregator.shm import ParamLayout
        from aggregator.workers import MergePool

        m = self.config.merge
        layout = ParamLayout.from_shapes({n: s for n, s, _ in line.manifest.tensors})
        return MergePool(
            layout,
            max_workers=m.max_workers,
            warm_workers=m.warm_workers,
            idle_timeout_s=m.idle_timeout_s,
            scale_up_backlog=m.scale_up_backlog,
            max_envelope_bytes=self.config.max_update_bytes,
        )

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    @staticmethod
    def _task_done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed: %r", task.get_name(), task.exception())

    def _record_fields(self) -> dict:
        host = self.address
        return {
            "address": host,
            "role": self.role,
            "load": len(self.children),
            "capacity": self.config.fan_in,
            "model_ids": sorted(self.lines),
        }

    # ================================================================== opening lines

    async def _model_ids(self) -> list[str]:
        ids = [m.model_id for m in self.config.models]
        if ids or self.role == "root":
            return ids
        raise ConfigError(
            f"{self.config.name}: a {self.role} needs [[models]] entries naming model_id"
        )

    def _open_root_line(self, line: ModelLine, cfg: ModelConfig) -> None:
        store = ModelStore(self.state_dir / "store", line.model_id, keep_versions=cfg.keep_versions)
        try:
            theta0 = load_file(cfg.init)
        except (OSError, ValueError) as e:  # safetensors raises its own error types too
            raise ConfigError(f"models.init: cannot read {cfg.init}: {e}") from e
        except Exception as e:
            raise ConfigError(f"models.init: {cfg.init} is not a safetensors file: {e}") from e
        outer = make_outer_optimizer(cfg.outer, **cfg.outer_params)
        codec = get_codec(cfg.codec, **cfg.codec_params)
        root = RootModel(line.model_id, theta0, outer, codec, self.identity)
        saved = store.load_state()
        if saved is not None:
            arrays, meta = saved
            root.load_state_arrays(arrays, int(meta["version"]))
            self.guard = _merged_guard(self.guard, meta.get("guard", {}))
            line.wal.mark = max(line.wal.mark, int(meta.get("wal_index", 0)))
        else:
            store.save_manifest(root.manifest)
            store.put_snapshot(0, root.theta)
            store.save_state(root.state_arrays(), self._root_meta(root, 0))
        line.root, line.store, line.manifest = root, store, root.manifest
        line.theta, line.version = root.theta, root.version

    def _root_meta(self, root: RootModel, wal_index: int) -> dict:
        return {"version": root.version, "wal_index": wal_index, "guard": self.guard.state()}

    async def _connect_parent(self) -> None:
        if not self.parent_address:
            if self.discovery is None:
                raise ConfigError("parent: a leaf or mid needs a parent address or dht_peers")
            roles = ("mid", "root") if self.role == "leaf" else ("root",)
            records = await asyncio.to_thread(self.discovery.lookup, "aggregator")
            candidates = eligible([Candidate.from_record(r) for r in records], roles)
            self.parent_address = (await choose_closest(candidates)).address
        self.parent = TransportClient(self.parent_address, deadline_s=self.config.push_deadline_s)

    async def _open_replica(self, line: ModelLine) -> None:
        data = await self.parent.fetch(line.model_id, -1)
        env = await asyncio.to_thread(self._verified, data, "snapshot", line.model_id)
        line.theta = decode_update(env)
        line.manifest = Manifest.from_arrays(line.theta)
        line.version = env.header.base_version
        log.info("%s: replica of %s at version %d", self.config.name, line.model_id, line.version)

    def _verified(self, data: bytes, kind: str, model_id: str) -> Envelope:
        env = Envelope.from_bytes(data, max_bytes=1 << 40)
        env.verify(self.roster, roles=("aggregator",))
        if env.header.kind != kind or env.header.model_id != model_id:
            raise MalformedError(
                f"expected a {kind} of {model_id!r}, got a {env.header.kind} of "
                f"{env.header.model_id!r}"
            )
        return env

    async def _replay(self, line: ModelLine) -> None:
        """Re-merge what the WAL holds above the mark; re-send flushes decided before a crash."""
        intents = line.wal.pending_intents()
        notes = [msgpack.unpackb(line.wal.last_mark_note())] if line.wal.mark else []
        notes += [msgpack.unpackb(r.body) for r in intents]
        for note in notes:
            if isinstance(note, dict):
                self.guard = _merged_guard(self.guard, note.get("guard", {}))
                line.partial_seq = max(line.partial_seq, int(note.get("seq", 0)))
        bounds = [(r.index, msgpack.unpackb(r.body)) for r in intents]
        replayed = 0
        for record in line.wal.pending():
            weight, data = parse_wal_record(record.body)
            admitted = await asyncio.to_thread(self._admit, data, weight, line.pool is None)
            self.guard.commit(admitted.replay_key, admitted.sequence)
            if line.pool is not None and admitted.delta is None:  # a backlog: workers scale up
                head = len(record.body) - len(data)
                self._submit_to_pool(line, admitted, (record.path, record.offset + head, len(data)))
            else:
                admitted.merge_into(line.buffer)
            line.buffer_index = record.index
            line.oldest_at = line.oldest_at or self.clock()
            replayed += 1
            while bounds and record.index == bounds[0][0]:
                index, note = bounds.pop(0)
                await line.collect_pool()
                partial, _ = line.take_buffer()
                await self._queue_partial(line, partial, index, int(note["seq"]), resend=True)
        if replayed:
            log.warning(
                "%s: replayed %d logged updates of %s from the WAL",
                self.config.name, replayed, line.model_id,
            )  # fmt: skip
            self.metrics.replayed.inc(replayed)
        if line.buffered:
            async with line.lock:
                await self._maybe_flush(line)

    # ================================================================== TransportHandler

    def _admit(self, data, logged_weight=None, decode=True) -> Admitted:
        return admit(
            data,
            policy=self.policy,
            manifests=lambda mid: self.lines[mid].manifest if mid in self.lines else None,
            v_now=lambda mid: self.lines[mid].version,
            guard=self.guard,
            logged_weight=logged_weight,
            decode=decode,
        )

    async def on_push(
        self, upload_id: str, data: bytes, metadata: dict[str, str]
    ) -> dict[str, str]:
        t0 = time.perf_counter()
        self.metrics.bytes_in.inc(len(data))
        try:
            header = parse_header(data)
            line = self.lines.get(header.model_id)
            if line is None:
                raise NotFoundError(f"model {header.model_id!r} is not served here")
            admitted = await asyncio.to_thread(self._admit, data, None, line.pool is None)
            async with line.lock:
                self.guard.check(admitted.replay_key, admitted.sequence)  # a concurrent duplicate
                body = wal_record(admitted, data)
                index = await asyncio.to_thread(line.wal.append, body)
                self.guard.commit(admitted.replay_key, admitted.sequence)
                if line.pool is not None and admitted.delta is None:
                    path, offset, length = line.wal.last_location
                    head = len(body) - len(data)  # the envelope inside the record
                    self._submit_to_pool(line, admitted, (path, offset + head, length - head))
                else:  # off the loop: a model-sized add (the lock keeps the buffer ours)
                    await asyncio.to_thread(admitted.merge_into, line.buffer)
                line.buffer_index = index
                if line.oldest_at is None:
                    line.oldest_at = self.clock()
                    line.wakeup.set()
                self.children[admitted.sender] = time.time()
                self.metrics.accepted(admitted)
                await self._maybe_flush(line)
                v_now = line.version
        except RejectedError as e:
            self.metrics.rejected.labels(e.reason).inc()
            log.info("rejected push %s: %s (%s)", upload_id[:12], e, e.reason)
            raise
        finally:
            self.metrics.push_seconds.observe(time.perf_counter() - t0)
        return {
            "status": "accepted",
            "staleness": str(admitted.staleness),
            "weight": f"{admitted.weight:.6g}",
            "v_now": str(v_now),
            "wal_index": str(index),
        }

    def _submit_to_pool(self, line: ModelLine, admitted: Admitted, where) -> None:
        """Hand an admitted delta to the merge workers by reference to its WAL record:
        ``where`` is (path, offset, length) of the envelope's bytes on disk."""
        from aggregator.workers import FileRef, MergeEvent

        uid = (admitted.sender, admitted.sequence)
        line.pool.submit(MergeEvent(FileRef(*where), admitted.weight, uid, admitted.staleness))
        line.pooled += 1

    async def subscribe(self, model_id: str, from_version: int) -> AsyncIterator[tuple[int, bytes]]:
        line = self.lines.get(model_id)
        if line is None:
            raise NotFoundError(f"model {model_id!r} is not served here")
        v = max(1, from_version)
        while True:
            async with line.changed:
                await line.changed.wait_for(lambda v=v: line.version >= v)
            data = line.cache.get(v) or await asyncio.to_thread(line.version_bytes, v)
            self.metrics.bytes_out.inc(len(data))
            yield v, data
            v += 1

    async def fetch(self, model_id: str, version: int) -> bytes:
        line = self.lines.get(model_id)
        if line is None:
            raise NotFoundError(f"model {model_id!r} is not served here")
        if version not in (-1, line.version):
            if line.store is not None and version in line.store.snapshot_versions():
                theta = await asyncio.to_thread(line.store.load_snapshot, version)
                return snapshot_envelope(model_id, theta, version, self.identity)
            raise NotFoundError(
                f"model {model_id!r}: no snapshot of version {version} here (current "
                f"{line.version}); fetch version -1 for the current one"
            )
        async with line.lock:
            if line.snapshot is None or line.snapshot[0] != line.version:
                theta = {k: v.copy() for k, v in line.theta.items()}
                data = await asyncio.to_thread(
                    snapshot_envelope, model_id, theta, line.version, self.identity
                )
                line.snapshot = (line.version, data)
            data = line.snapshot[1]
        self.metrics.bytes_out.inc(len(data))
        return data

    # ================================================================== flushing

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

        def step_and_persist():
            nv = line.root.step(partial)
            line.store.save_version_and_state(  # u_v, state (and snapshot), concurrently
                nv.version,
                nv.envelope,
                line.root.state_arrays(),
                {"version": nv.version, "wal_index": index, "guard": guard},
                snapshot=line.root.theta if nv.version % cfg.snapshot_every == 0 else None,
            )
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

    async def _publish(self, line: ModelLine, version: int) -> None:
        line.version = version
        async with line.changed:
            line.changed.notify_all()

    async def _queue_partial(
        self, line: ModelLine, partial: PartialAggregate, index: int, seq: int, resend=False
    ) -> None:
        note = msgpack.packb({"seq": seq, "guard": self.guard.state()})
        if not resend:
            await asyncio.to_thread(line.wal.intent, index, note)
        contributors = sorted([s, q] for s, q in partial.contributors)
        env = encode_update(
            partial.weighted_sum,
            codec="none",
            model_id=line.model_id,
            kind="partial",
            sender=self.identity.peer_id,
            sequence=seq,
            base_version=line.version,
            meta={
                "weight_sum": float(partial.weight_sum),
                "count": int(partial.count),
                "max_staleness": int(partial.max_staleness),
                "contributors": contributors,
            },
            identity=self.identity,
        )
        await self._outbox.put((line, index, seq, env.to_bytes(), note, partial.count))

    async def _send_partials(self) -> None:
        """Push queued partials to the parent in order, retrying until each is acknowledged."""
        while True:
            line, index, seq, data, note, count = await self._outbox.get()
            attempt = 0
            while True:
                try:
                    await self.parent.push(data, upload_id=f"{self.identity.peer_id}-{seq}")
                    self.metrics.partials_sent.inc()
                    self.metrics.bytes_out.inc(len(data))
                    break
                except ReplayError:
                    log.info("%s: parent already holds partial %d", self.config.name, seq)
                    break
                except RejectedError as e:
                    log.error(
                        "%s: parent refused partial %d of %s (%d updates lost): %s",
                        self.config.name, seq, line.model_id, count, e,
                    )  # fmt: skip
                    self.metrics.partials_dropped.labels(e.reason).inc()
                    break
                except (LinkError, CommsError, OSError) as e:
                    attempt += 1
                    delay = min(10.0, 0.2 * 2**attempt)
                    log.warning(
                        "%s: parent unreachable for partial %d (%s); retry in %.1fs",
                        self.config.name, seq, e, delay,
                    )  # fmt: skip
                    await asyncio.sleep(delay)
            await asyncio.to_thread(_mark, line.wal, index, note)

    # ================================================================== following the parent

    async def _follow_parent(self, line: ModelLine) -> None:
        """Apply each u_v the parent publishes to the replica and re-serve it to children."""
        while True:
            try:
                async for version, data in self.parent.subscribe(line.model_id, line.version + 1):
                    env = await asyncio.to_thread(self._verified, data, "version", line.model_id)
                    if version != line.version + 1 or env.header.base_version != line.version:
                        raise MalformedError(
                            f"version {version} does not follow {line.version}; refetching"
                        )
                    u = await asyncio.to_thread(decode_update, env, line.manifest)
                    async with line.lock:
                        await asyncio.to_thread(apply_update, line.theta, u)
                        line.remember(version, data)
                        await self._publish(line, version)
                    self.metrics.version.labels(line.model_id).set(version)
            except asyncio.CancelledError:
                raise
            except (CommsError, RejectedError) as e:
                log.warning("%s: following %s: %s", self.config.name, line.model_id, e)
                await asyncio.sleep(0.5)
                if isinstance(e, MalformedError | NotFoundError):
                    async with line.lock:
                        await self._open_replica(line)
                        line.cache.clear()

    # ================================================================== status

    def status(self) -> dict:
        return {
            "name": self.config.name,
            "role": self.role,
            "address": self.address,
            "parent": self.parent_address or None,
            "peer_id": self.identity.peer_id,
            "uptime_s": round(time.time() - self.started_at, 1),
            "children": len(self.children),
            "models": {
                mid: {
                    "version": line.version,
                    "buffered": line.buffered,
                    "workers": line.pool.stats().workers_alive if line.pool else None,
                    "wal_index": line.wal.last_index,
                    "wal_mark": line.wal.mark,
                    "partials_sent": line.partial_seq,
                }
                for mid, line in self.lines.items()
            },
            "outbox": self._outbox.qsize(),
        }


def _mark(wal: WriteAheadLog, index: int, note: bytes) -> None:
    if index > wal.mark:
        wal.mark_done(index, note)
        wal.compact()


def _merged_guard(guard: ReplayGuard, state: dict) -> ReplayGuard:
    merged = guard.state()
    for sender, seq in state.items():
        merged[sender] = max(int(seq), merged.get(sender, int(seq)))
    return ReplayGuard(merged)
