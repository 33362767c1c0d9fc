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
from pathlib import Path

from safetensors.numpy import load_file

from aggregator.clipping import NormClipping
from aggregator.config import AggregatorConfig, ModelConfig
from aggregator.dashboard.router_watch import router_watch
from aggregator.dashboard.summaries import SummaryChannel
from aggregator.dashboard.view import FederationView
from aggregator.direction_check import DirectionChecking
from aggregator.faults import fault_point
from aggregator.flush import Flushing
from aggregator.gateway import AdmissionPolicy, Admitted, admit, wal_record
from aggregator.groups import members_by_model
from aggregator.lines import ROOT_VERSION_CACHE, VERSION_CACHE, ModelLine
from aggregator.metrics import AggregatorMetrics
from aggregator.outer import make_outer_optimizer
from aggregator.parent import ParentLink
from aggregator.publish import Publishing
from aggregator.recovery import WalRecovery, _merged_guard
from aggregator.root import RootModel
from aggregator.staleness import get_staleness_function
from aggregator.store import ModelStore
from aggregator.wal import WriteAheadLog
from comms.codecs import get_codec
from comms.envelope import parse_header
from comms.errors import ConfigError, MalformedError, NotFoundError, RejectedError, StorageError
from comms.fragments import fragment_of
from comms.http import split_listen
from comms.identity import Identity, ReplayGuard, Roster
from comms.logs import bind
from comms.reads import ReadGuard
from comms.transport import TransportClient, TransportServer

__all__ = ["ROOT_VERSION_CACHE", "VERSION_CACHE", "AggregatorService", "ModelLine"]

log = logging.getLogger(__name__)


class AggregatorService(
    Flushing, Publishing, ParentLink, WalRecovery, NormClipping, DirectionChecking, SummaryChannel
):
    """A leaf, mid or root aggregator; ``await start()``, then serve until ``stop()``.

    The class conducts: lifecycle, opening the model lines and admitting pushes are here;
    flushes are :class:`~aggregator.flush.Flushing`'s, subscribers and fetches
    :class:`~aggregator.publish.Publishing`'s, the parent
    :class:`~aggregator.parent.ParentLink`'s, the WAL replay
    :class:`~aggregator.recovery.WalRecovery`'s and the norm bound of island updates
    :class:`~aggregator.clipping.NormClipping`'s, the direction check
    :class:`~aggregator.direction_check.DirectionChecking`'s, the dashboard summaries to
    and from the tree :class:`~aggregator.dashboard.summaries.SummaryChannel`'s.
    """

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
            clip=m.clip_mode,
            clip_action=m.clip_action,
            groups=members_by_model(config.expert_groups),
        )
        self._log_clip_mode()
        self._log_direction_mode()
        self.lines: dict[str, ModelLine] = {}
        self.metrics = AggregatorMetrics(config.name, config.role, lines=self.lines)
        self.view = FederationView(config.name, config.role, roster)  # the dashboard's data
        self._summary_sequences: dict[str, int] = {}  # child -> last summary (memory only)
        self.router_watch = None  # the configured router's state, for the dashboard
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
        self._log_tls()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.role != "root":
            await self._connect_parent()
        model_ids = await self._model_ids()
        for model_id in model_ids:
            line = ModelLine(model_id, WriteAheadLog(self.state_dir / "wal" / model_id))
            line.norm_bound = self._new_norm_bound()
            line.cache_limit_bytes = int(self.config.version_cache_mb * (1 << 20))
            self.lines[model_id] = line
            if self.role == "root":
                line.config = next(c for c in self.config.models if c.model_id == model_id)
                await asyncio.to_thread(self._open_root_line, line, line.config)
            else:
                await self._first_replica(line)
            if self.config.merge.engine == "pool":
                line.pool = self._make_pool(line)
            await self._replay(line)
        host, port = split_listen(self.config.listen)
        self.server = TransportServer(
            self,
            host=host,
            port=port,
            tls=self.config.tls.server_tls(),
            max_upload_bytes=self.config.max_update_bytes,
            read_guard=self._read_guard(),
        )
        self.address = f"{host}:{await self.server.start()}"
        for line in self.lines.values():
            self._spawn(self._deadline_loop(line), f"deadline {line.model_id}")
            if self.role != "root":
                self._spawn(self._follow_parent(line), f"follow {line.model_id}")
        if self.role != "root":
            self._spawn(self._send_partials(), "outbox")
            if self.config.summary_interval_s > 0:
                self._spawn(self._send_summaries(), "summaries")
        if self.config.router:
            self.router_watch = router_watch(self.config)
            self._spawn(self.router_watch.run(), "router watch")
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

    def _log_tls(self) -> None:
        tls = self.config.tls
        if tls.enabled:
            log.info("aggregator %s: %s (gRPC served and dialled over TLS)", self.config.name,
                     tls.describe())  # fmt: skip
        else:
            log.warning("aggregator %s: tls=off: gRPC in plaintext; set [tls] in the config "
                        "off a trusted network (docs/reliability.md, TLS)", self.config.name)  # fmt: skip

    def _read_guard(self) -> ReadGuard:
        """Who may Fetch and Subscribe here: keys in the roster, signed (``comms.reads``);
        anyone for a model whose ``[[models]]`` entry in this config has ``public_read``."""
        public = sorted(m.model_id for m in self.config.models if m.public_read)
        if public:
            log.warning("%s: models %s are readable without a signature", self.config.name, public)
        return ReadGuard(self.roster, public_models=public)

    def _make_pool(self, line: ModelLine):
        from aggregator.pool import MergePool
        from aggregator.pool.shm import ParamLayout

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
        if cfg.fragment:  # this line is one fragment of the model in init
            index, count = cfg.fragment
            names = fragment_of({k: v.size for k, v in theta0.items()}, index, count)
            theta0 = {k: theta0[k] for k in names}
        outer = make_outer_optimizer(cfg.outer, **cfg.outer_params)
        codec = get_codec(cfg.codec, **cfg.codec_params)
        merge = self.config.merge
        partial = merge.partial_step != "full"
        buffer_k = self.config.buffer_k(line.model_id) if partial else None
        root = RootModel(line.model_id, theta0, outer, codec, self.identity, buffer_k=buffer_k,
                         defer=merge.partial_step == "deferred",
                         ef_decay=cfg.ef_decay)  # fmt: skip
        saved = store.load_state()
        if saved is not None:
            arrays, meta = saved
            root.load_state_arrays(arrays, int(meta["version"]))
            self.guard = _merged_guard(self.guard, meta.get("guard", {}))
            line.wal.mark = max(line.wal.mark, int(meta.get("wal_index", 0)))
            if line.norm_bound is not None:  # the window as of wal_index; replay adds the rest
                line.norm_bound.load(meta.get("norms", []))
        else:
            store.save_manifest(root.manifest)
            store.put_snapshot(0, root.theta)
            store.save_state(root.state_arrays(), self._root_meta(root, 0))
        line.root, line.store, line.manifest = root, store, root.manifest
        line.theta, line.version = root.theta, root.version
        self._load_root_reference(line)

    def _root_meta(self, root: RootModel, wal_index: int) -> dict:
        return {"version": root.version, "wal_index": wal_index, "guard": self.guard.state()}

    # ================================================================== TransportHandler

    def _admit(self, data, logged=None, decode=True, clip_bound=None, reference=None) -> Admitted:
        return admit(
            data,
            policy=self.policy,
            manifests=lambda mid: self.lines[mid].manifest if mid in self.lines else None,
            v_now=lambda mid: self.lines[mid].version,
            guard=self.guard,
            logged=logged,
            decode=decode,
            clip_bound=clip_bound,
            reference=reference,
        )

    async def on_push(
        self, upload_id: str, data: bytes, metadata: dict[str, str]
    ) -> dict[str, str]:
        t0 = time.perf_counter()
        self.metrics.bytes_in.inc(len(data))
        line = None
        try:
            header = parse_header(data)
            if header.kind == "summary":  # telemetry never enters the WAL
                raise MalformedError("a summary goes by Report, not Push (which is logged)")
            line = self.lines.get(header.model_id)
            if line is None:
                raise NotFoundError(f"model {header.model_id!r} is not served here")
            bind(model_id=line.model_id, version=line.version)  # this push's lines (its task)
            bound = await self._clip_bound(line, header.kind)
            ref = self._reference(line, header.kind)
            decode = line.pool is None
            admitted = await asyncio.to_thread(self._admit, data, None, decode, bound, ref)
            async with line.lock:
                self.guard.check(admitted.replay_key, admitted.sequence)  # a concurrent duplicate
                self._check_direction(line, admitted)
                body = wal_record(admitted, data)
                index = await asyncio.to_thread(line.wal.append, body)
                fault_point("leaf.after_wal_append")
                self.guard.commit(admitted.replay_key, admitted.sequence)
                self._observe_admitted(line, admitted)
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
                self.view.admitted(admitted, len(data))
                await self._maybe_flush(line)
                v_now = line.version
        except RejectedError as e:
            self.metrics.rejected.labels(e.reason).inc()
            self._count_rejection(line, e)
            self.view.rejected(data, e)
            # a full disk is logged once, by the WAL's StorageHealth, not at every retry
            quiet = isinstance(e, StorageError)
            (log.debug if quiet else log.info)(
                "rejected push %s: %s (%s)", upload_id[:12], e, e.reason
            )
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
        line.pool.submit(admitted.pool_event(where))
        line.pooled += 1

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
                    "clip": self._clip_status(line),
                    "direction": self._direction_status(line),
                    "storage": line.storage_status(),
                    "dropped": line.dropped,
                }
                for mid, line in self.lines.items()
            },
            "outbox": self._outbox.qsize(),
        }
