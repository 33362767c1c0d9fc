"""The island daemon: the training loop of one island, built from the drop-in pieces.

``Island(config).run()`` trains the configured workload. In ``local_update`` mode it wraps
its own loop in ``LocalUpdate`` (the same object a user with their own ``train.py`` uses):
every ``sync.every`` inner steps (or ``sync.every_s`` seconds of compute, which ``slowdown``
stretches like a slower machine) the round's pseudo-gradient is pushed to the leaf aggregator
and the newest global version adopted (DiLoCo, Douillard et al. 2023; overlapped as in CO2,
Sun et al. 2024). In ``expert`` mode it trains alone on one cluster of a saved partition
(Decentralized Diffusion Models; c-BTM) and writes a signed expert checkpoint at the end.

Durability: a lazy snapshot (``island.snapshot``) is taken at round boundaries; ``run``
resumes from the newest complete one, so ``kill -9`` loses at most the round in progress,
which was never pushed. SIGINT/SIGTERM end the round in progress (its delta is pushed),
settle or abandon in-flight pushes (abandoned ones stay in the snapshot), write a final
snapshot and exit.

Concurrency: the training loop runs in the calling thread; the network (gRPC pushes and the
version stream) and the HTTP status server run on one ``LoopThread``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comms.aio import LoopThread
from comms.identity import Identity, Roster
from comms.logs import log_context
from island import fragmented
from island.config import IslandConfig
from island.distributed import (
    FollowerLocalUpdate,
    RankGroup,
    check_round_size,
    collective_timeout_s,
    make_local_update,
    rank_group_from_env,
    replicas_agree,
    share_resume_state,
    training_state_digest,
)
from island.local_update import LocalUpdate
from island.snapshot import (
    AsyncSnapshotter,
    SnapshotState,
    capture_rng_state,
    latest_complete,
    read_snapshot,
    restore_rng_state,
)
from island.streaming import StreamingLocalUpdate
from island.sync import SyncConfig, SyncEngine
from island.workloads import get_workload

log = logging.getLogger(__name__)


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to ``lr``, then constant or cosine down to ``min_lr_ratio * lr``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or cfg.total_steps <= cfg.warmup_steps:
        return cfg.lr
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    )


class Island:
    """One island: ``run()`` trains until ``steps`` or ``stop()``; status via ``status()``."""

    def __init__(
        self, config: IslandConfig, *, identity: Identity | None = None,
        group: RankGroup | None = None,
    ):  # fmt: skip
        self.config = config
        # Under torchrun: this process's rank in the island (island.distributed); else rank 0
        # of 1. Only the leader (rank 0) uses the identity, the network and files.
        self.group = group or rank_group_from_env(
            collective_timeout_s(config.sync.sync_timeout_s, config.sync.snapshot_timeout_s)
        )
        if config.mode == "local_update":
            check_round_size(self.group, config.sync.every_s, auto=config.sync.auto)
            fragmented.check_world_size(config.sync.fragments, self.group.world_size)
        self.identity = identity or (
            Identity.load_or_create(config.key)
            if config.key and self.group.is_leader
            else Identity.generate()
        )
        self.roster = Roster.load(config.roster) if config.roster else None
        self.workload = get_workload(config.workload, **config.workload_config)
        self._stop = threading.Event()
        self.step = 0
        self.round_records: list[dict[str, Any]] = []
        self.compute_s = 0.0
        self.eval_s = 0.0
        self.started = time.perf_counter()
        self.last_loss = float("nan")
        self.tokens = 0
        # with sync.fragments > 1: a StreamingLocalUpdate over fragmented.FragmentEngines
        self.lu: LocalUpdate | FollowerLocalUpdate | StreamingLocalUpdate | None = None
        self.replicas_agree: bool | None = None  # set at the end of a multi-process run
        self.engine: SyncEngine | fragmented.FragmentEngines | None = None
        self.loop: LoopThread | None = None
        self.http_address = ""
        self.http_url = ""  # http:// or https:// (when [tls] has a certificate)
        self.ready = threading.Event()
        self._report_mark = (time.perf_counter(), 0)  # (when, step) of the last push report
        self._loss_sum, self._loss_n = 0.0, 0  # training losses since the last push report
        self._last_val: tuple[float, int] | None = None  # (val_loss, version it evaluated)

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Ask the loop to finish the round in progress and shut down cleanly."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------ building blocks

    def _branch_from_seed(self, model: torch.nn.Module) -> None:
        """Expert mode with ``expert.init``: start from those parameters (a shared seed)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        from comms.errors import ConfigError, ShapeMismatchError
        from island.pseudo import load_numpy_into

        path = self.config.expert.init
        try:
            load_numpy_into(model, load_file(path))
        except (OSError, SafetensorError) as err:
            raise ConfigError(f"expert.init: cannot read {path}: {err}") from err
        except (ShapeMismatchError, ValueError) as err:  # names or shapes differ from the model
            raise ConfigError(f"expert.init: {path} does not fit the model: {err}") from err
        log.info("expert %s: branched from %s", self.config.name, path)

    def _doc_indices(self) -> list[int] | None:
        """The documents of the expert's cluster (expert mode, or an island of an expert
        group); None: all of them."""
        if self.config.mode != "expert" and not self.config.expert.partition:
            return None
        from safetensors.numpy import load_file

        path = Path(self.config.expert.partition) / "partition.safetensors"
        labels = load_file(str(path))["labels"]
        idx = np.flatnonzero(labels == self.config.expert.cluster)
        if idx.size == 0:
            raise ValueError(f"cluster {self.config.expert.cluster} of {path} has no documents")
        return idx.tolist()

    def _make_engine(self) -> SyncEngine | fragmented.FragmentEngines:
        """The sync engine; with ``sync.fragments`` > 1 one per fragment line, sharing the
        loop, the link's shaper and the ack log."""
        from comms.shaper import TokenBucketShaper

        link = self.config.link
        shaper = None
        if link.rate_mbit > 0:
            shaper = TokenBucketShaper(
                link.rate_mbit * 1e6, latency_s=link.latency_ms / 1e3, loss=link.loss
            )
        address = self.config.aggregator or self._discover_leaf()
        tls = self.config.tls
        (log.info if tls.enabled else log.warning)(
            "island %s: %s to aggregator %s%s", self.config.name, tls.describe(), address,
            "" if tls.enabled else " (gRPC in plaintext; set [tls] off a trusted network)",
        )  # fmt: skip
        ack_log = self._ack_log()

        def engine(sync: SyncConfig) -> SyncEngine:
            return SyncEngine(
                sync, self.identity, address, roster=self.roster, loop=self.loop,
                shaper=shaper, tls=tls.client_tls(), ack_log=ack_log,
            )  # fmt: skip

        if self.config.sync.fragments > 1:
            return fragmented.FragmentEngines(
                [engine(c) for c in fragmented.fragment_configs(self.config.sync)]
            )
        return engine(self.config.sync)

    def _ack_log(self) -> str:
        """Where the engine records every push the aggregator answered: ``acks.jsonl`` in the
        snapshot directory (none without one)."""
        if not self.config.snapshot.dir:
            return ""
        Path(self.config.snapshot.dir).mkdir(parents=True, exist_ok=True)
        return str(Path(self.config.snapshot.dir) / "acks.jsonl")

    def _discover_leaf(self) -> str:
        from comms.discovery import Discovery
        from comms.placement import Candidate, choose_closest, eligible

        disco = Discovery.start(self.identity, initial_peers=self.config.dht_peers)
        try:
            records = disco.lookup("aggregator")
        finally:
            disco.shutdown()
        sync = self.config.sync
        cands = eligible(
            [Candidate.from_record(r) for r in records], ("leaf", "mid", "root"),
            sync.model_id if sync.fragments == 1 else fragmented.fragment_configs(sync)[0].model_id,
        )  # fmt: skip
        chosen = self.loop.run(choose_closest(cands), timeout=30)
        log.info("%s: chose aggregator %s at %s", self.config.name, chosen.name, chosen.address)
        return chosen.address

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        o = self.config.optim
        return torch.optim.AdamW(
            model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
        )

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train; returns a summary. Blocks until ``steps`` are done or ``stop()``."""
        with log_context(**self._log_fields()):
            return self._run()

    def _log_fields(self) -> dict[str, Any]:
        """What every line logged while this island runs carries (``comms.logs``): its name,
        model (the model id, or the expert id), version and step, the last two read when a
        line is written."""
        cfg = self.config
        fields: dict[str, Any] = {"island": cfg.name}
        if cfg.mode == "local_update":
            fields["model_id"] = cfg.sync.model_id
            fields["version"] = lambda: self.lu.version if self.lu is not None else None
        else:
            fields["model_id"] = cfg.expert.expert_id or cfg.name
        if self.group.world_size > 1:
            fields["rank"] = self.group.rank
        fields["step"] = lambda: self.step
        return fields

    def _run(self) -> dict[str, Any]:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.loop = LoopThread(f"island-{cfg.name}").start()
        try:
            if cfg.http and self.group.is_leader:
                from island.status import start_status_server

                self.http_address = self.loop.run(start_status_server(self, cfg.http), 30)
            return self._train()
        finally:
            if self.engine is not None:
                self.engine.close(timeout=self.config.sync.close_timeout_s)
            self.loop.stop()
            self.group.close()

    def _train(self) -> dict[str, Any]:
        cfg = self.config
        model, optimizer, train_model, batches = self._build_training()
        snapshotter = (
            AsyncSnapshotter(cfg.snapshot.dir, keep=cfg.snapshot.keep)
            if cfg.snapshot.dir and self.group.is_leader
            else None
        )
        resumed = self._resume(model, optimizer, batches)
        if cfg.mode == "local_update":
            self._start_local_update(model, optimizer, resumed)
        self.ready.set()
        cfg.optim.total_steps = cfg.steps  # for the cosine schedule
        self.started = time.perf_counter()
        self._report_mark = (self.started, self.step)
        progress = _progress(cfg, self.step)
        try:
            self._train_steps(model, train_model, optimizer, batches, snapshotter, progress)
            if self.lu is not None and cfg.expert.output and self.engine is not None:
                self._drain_into_expert()
        finally:
            if progress is not None:
                progress.close()
            if self.engine is not None:
                self.engine.close(timeout=self.config.sync.close_timeout_s)
            if snapshotter is not None:
                self._snapshot(model, optimizer, batches, snapshotter)
                snapshotter.close()
        if self.group.world_size > 1:
            digest = training_state_digest(model, optimizer)  # params and AdamW moments
            self.replicas_agree = replicas_agree(self.group, digest)
        if cfg.expert.output and self.group.is_leader:
            if self.lu is not None:  # an expert group's island: the last version it adopted
                from island.pseudo import load_numpy_into

                load_numpy_into(model, self.lu.anchor)
            self._save_expert(model)
        return self.summary()

    def _build_training(self):
        """The model (branched from ``expert.init`` if set), its optimizer, the model to train
        (DDP across ranks; read and evaluate ``model``) and this rank's batch iterator."""
        cfg = self.config
        model = self.workload.build_model(cfg.seed)
        if cfg.mode == "expert" and cfg.expert.init:
            self._branch_from_seed(model)  # a resumed snapshot still overrides it
        optimizer = self._optimizer(model)
        train_model = self.group.wrap_model(model)  # DDP across ranks; `model` to read and eval
        data_seed = cfg.data_seed if cfg.data_seed >= 0 else cfg.seed + cfg.shard
        shard, num_shards = self.group.data_shard(cfg.shard, cfg.num_shards)
        batches = self.workload.train_batches(
            data_seed, shard=shard, num_shards=num_shards, doc_indices=self._doc_indices()
        )
        return model, optimizer, train_model, batches

    def _start_local_update(self, model, optimizer, resumed: SnapshotState | None) -> None:
        """Local-update mode: the sync engine (leader only) and the ``LocalUpdate`` around the
        model, both restored from ``resumed`` when the run resumes from a snapshot."""
        cfg = self.config
        if cfg.sync.fragments > 1:  # before F engines are made
            fragmented.check_fragment_count(model, cfg.sync.fragments)
        self.engine = self._make_engine() if self.group.is_leader else None
        if isinstance(self.engine, fragmented.FragmentEngines):
            self.lu = fragmented.start_fragments(
                model, optimizer, self.engine, resumed, self._push_report
            )
            return
        anchor = anchor_version = None
        if resumed is not None:
            fragmented.check_snapshot_fragments(resumed.meta, 1)
            self.engine.load_state_dict(resumed.data["engine"])
            anchor = {k: np.asarray(v) for k, v in resumed.anchor.items()}
            anchor_version = int(resumed.meta["base_version"])
        self.lu = make_local_update(
            self.group, model, optimizer, engine=self.engine, every=cfg.sync.every,
            every_s=cfg.sync.every_s, anchor=anchor, anchor_version=anchor_version,
        )  # fmt: skip
        self.lu.report = self._push_report
        self.lu.start()
        if resumed is not None and self.group.is_leader:
            self.lu.load_state_dict(resumed.data.get("local_update", {}))

    def _drain_into_expert(self) -> None:
        """An expert group's island that writes the expert: wait (``expert.drain_s`` at
        most) until a version of the expert's line holds this island's last rounds."""
        if not self.lu.drain(self.config.expert.drain_s):
            log.warning("%s: the expert is written at version %d: a version holding this "
                        "island's last round did not come within expert.drain_s = %g s",
                        self.config.name, self.lu.version, self.config.expert.drain_s)  # fmt: skip

    def _train_steps(self, model, train_model, optimizer, batches, snapshotter, progress) -> None:
        """Inner steps until ``steps`` or ``stop()``; round boundaries (local update) or
        checkpoints (expert mode) as they fall due; then the partial last round is pushed."""
        cfg = self.config
        losses: list[float] = []
        # every rank stops after the same step (one all-reduce a step under torchrun)
        while (cfg.steps == 0 or self.step < cfg.steps) and not self.group.any_rank(self.stopping):
            tokens, seconds = self._inner_step(model, train_model, optimizer, batches)
            losses.append(self.last_loss)
            if progress is not None:
                progress.update(1)
            if self.lu is not None:
                if self.lu.step(tokens=tokens, seconds=seconds):
                    self._end_of_round(model, optimizer, batches, snapshotter, losses)
                    losses = []
            elif self.step % cfg.snapshot.every_steps == 0 or self.step == cfg.steps:
                self._expert_checkpoint(model, optimizer, batches, snapshotter, losses)
                losses = []
        if self.lu is not None and self.lu.steps_in_round:
            self.lu.end_round()  # push the partial round(s): their progress is not lost
            self._end_of_round(model, optimizer, batches, snapshotter, losses, final=True)

    def _inner_step(self, model, train_model, optimizer, batches) -> tuple[int, float]:
        """One optimizer step on the next batch; counts time, loss and tokens; returns the
        batch's tokens and the step's seconds (with ``slowdown``'s sleep: what sizes a round
        by ``sync.every_s``)."""
        cfg, opt_cfg = self.config, self.config.optim
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(self.step, opt_cfg)
        batch = next(batches)
        with self._autocast():
            loss = self.workload.loss(train_model, batch)
        loss.backward()
        if opt_cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        spent = time.perf_counter() - t0
        if cfg.slowdown > 1:
            time.sleep(spent * (cfg.slowdown - 1))
        spent = time.perf_counter() - t0
        self.compute_s += spent
        self.step += 1
        self.last_loss = loss.item()
        self._loss_sum, self._loss_n = self._loss_sum + self.last_loss, self._loss_n + 1
        tokens = _batch_tokens(batch)
        self.tokens += tokens
        return tokens, spent

    def _autocast(self):
        """bf16 autocast on CUDA (weights, optimizer and pseudo-gradients stay fp32)."""
        if self.workload.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _resume(self, model, optimizer, batches) -> SnapshotState | None:
        if self.group.world_size == 1:
            return self._resume_from_snapshot(model, optimizer, batches)
        state = (
            self._resume_from_snapshot(model, optimizer, batches) if self.group.is_leader else None
        )
        position = share_resume_state(self.group, state, model, optimizer, batches)
        if position is not None:  # the followers take the leader's step count
            self.step, self.tokens = position["step"], position["tokens"]
        return state

    def _resume_from_snapshot(self, model, optimizer, batches) -> SnapshotState | None:
        cfg = self.config
        if not cfg.snapshot.dir:
            return None
        path = latest_complete(cfg.snapshot.dir)
        if path is None:
            return None
        state = read_snapshot(path)
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        batches.load_state_dict(state.data["batches"])
        restore_rng_state(state.rng)
        self.step = int(state.meta["step"])
        self.tokens = int(state.meta.get("tokens", 0))
        log.warning("%s: resumed from %s at step %d", cfg.name, path, self.step)
        return state

    def _snapshot(self, model, optimizer, batches, snapshotter) -> None:
        data = {"batches": batches.state_dict()}
        meta = {"step": self.step, "tokens": self.tokens, "island": self.config.name}
        anchor: dict[str, Any] = {}
        if self.lu is not None:
            data["engine"] = self.engine.state_dict()
            data["local_update"] = self.lu.state_dict()
            anchor = self.lu.anchor
            meta["base_version"] = self.lu.version
            meta["round"] = self.lu.round
            if isinstance(self.lu, StreamingLocalUpdate):
                meta["fragments"] = len(self.lu.updates)
                meta["base_versions"] = self.lu.versions
        state = SnapshotState(
            model=model.state_dict(), optimizer=optimizer.state_dict(), anchor=anchor,
            rng=capture_rng_state(), data=data, meta=meta,
        )  # fmt: skip
        snapshotter.snapshot(state, self.step)

    def _evaluate(self, model) -> float:
        t0 = time.perf_counter()
        val = self.workload.validation_loss(model, max_batches=self.config.eval_batches)
        self.eval_s += time.perf_counter() - t0
        return float(val)

    def _evaluate_global(self, model) -> float:
        """The validation loss of the global model: the params at a boundary (the anchor and
        the island's own deltas in flight), or with fragments the union of their anchors."""
        if isinstance(self.lu, StreamingLocalUpdate):
            return fragmented.evaluate_anchor(model, self.lu.anchor, lambda: self._evaluate(model))
        return self._evaluate(model)

    def _end_of_round(self, model, optimizer, batches, snapshotter, losses, final=False) -> None:
        """After a push and an adoption: evaluate the global model, log, snapshot."""
        if not self.group.is_leader:
            return
        lu = self.lu
        rnd = lu.round
        evaluate = self.config.eval_every and (rnd % self.config.eval_every == 0 or final)
        val = self._evaluate_global(model) if evaluate else None
        if val is not None:
            self._last_val = (val, lu.version)
        sync = self.engine.stats
        record = {
            "t": round(time.perf_counter() - self.started, 3),
            # seconds since the epoch: `island plot` lines islands up on it
            "wall_time": round(time.time(), 3),
            "island": self.config.name,
            "round": rnd,
            "step": self.step,
            "version": lu.version,
            **self._fragment_fields(),
            "train_loss": float(np.mean(losses)) if losses else None,
            "val_loss": val,
            "bytes_sent": sync["bytes_sent"],
            "bytes_received": sync["bytes_received"],
            "staleness": sync["last_staleness"],
            "pushes_accepted": sync["pushes_accepted"],
            "pushes_stale": sync["pushes_stale"],
            "steps_lost": sync["steps_lost"],
            "utilization": self.utilization(),
        }
        self._record(record)
        if snapshotter is not None and (rnd % self.config.snapshot.every_rounds == 0):
            self._snapshot(model, optimizer, batches, snapshotter)

    def _expert_checkpoint(self, model, optimizer, batches, snapshotter, losses) -> None:
        if not self.group.is_leader:
            return
        val = self._evaluate(model)
        self._record({
            "t": round(time.perf_counter() - self.started, 3),
            "wall_time": round(time.time(), 3),
            "island": self.config.name,
            "step": self.step,
            "train_loss": float(np.mean(losses)) if losses else None,
            "val_loss": val,
            "utilization": self.utilization(),
        })  # fmt: skip
        if snapshotter is not None:
            self._snapshot(model, optimizer, batches, snapshotter)

    def _record(self, record: dict[str, Any]) -> None:
        """Keep a round's (or an expert's checkpoint's) record, log it as the line's fields
        (``record`` names which: ``round`` or ``expert``) and append it to ``metrics_file``."""
        self.round_records.append(record)
        kind = "round" if "round" in record else "expert"
        what = f"round {record['round']}" if kind == "round" else "expert checkpoint"
        log.info("%s recorded at step %d", what, record["step"], extra={**record, "record": kind})
        if self.config.metrics_file:
            with open(self.config.metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _save_expert(self, model) -> None:
        from island.checkpoint import partition_id, save_expert

        e, cfg = self.config.expert, self.config
        grouped = cfg.mode == "local_update"  # one island of an expert group: its model line
        save_expert(
            e.output, model, workload=cfg.workload, workload_config=cfg.workload_config,
            expert_id=e.expert_id or (cfg.sync.model_id if grouped else cfg.name),
            cluster=e.cluster, version=self.lu.version if grouped else self.step,
            identity=self.identity,
            partition=partition_id(e.partition), train_steps=self.step,
            train_flops=float(self.workload.flops_per_step() * self.step),
        )  # fmt: skip

    def _push_report(self) -> dict[str, Any]:
        """What this island tells its aggregator's dashboard with each push (a few numbers in
        the push's meta, checked there): steps done, steps per second since the last push,
        utilization, mean training loss since then, the last validation loss of the global
        model and its version, bytes received; the cluster it trains on, if it trains one."""
        now, (then, step_then) = time.perf_counter(), self._report_mark
        self._report_mark = (now, self.step)
        report: dict[str, Any] = {
            "step": self.step,
            "steps_per_s": round((self.step - step_then) / max(now - then, 1e-6), 3),
            "utilization": round(self.utilization(), 4),
        }
        if self._loss_n and math.isfinite(self._loss_sum):
            report["train_loss"] = round(self._loss_sum / self._loss_n, 5)
        self._loss_sum, self._loss_n = 0.0, 0
        if self._last_val is not None and math.isfinite(self._last_val[0]):
            val, version = self._last_val
            report["val_loss"], report["val_version"] = round(val, 5), version
        if self.engine is not None:
            report["bytes_down"] = int(self.engine.stats["bytes_received"])
        if self.config.expert.partition and self.config.expert.cluster >= 0:
            report["cluster"] = self.config.expert.cluster  # an expert group's island
        return report

    # ------------------------------------------------------------------ status

    def utilization(self) -> float:
        """Fraction of wall time (evaluation excluded) spent in forward/backward/optimizer."""
        wall = time.perf_counter() - self.started - self.eval_s
        return min(1.0, self.compute_s / wall) if wall > 0 else 1.0

    def summary(self) -> dict[str, Any]:
        out = {
            "name": self.config.name,
            "mode": self.config.mode,
            "step": self.step,
            "tokens": self.tokens,
            "loss": self.last_loss,
            "utilization": self.utilization(),
            "tokens_per_s": self.tokens / max(1e-9, time.perf_counter() - self.started),
        }
        if self.group.world_size > 1:
            out.update(rank=self.group.rank, ranks=self.group.world_size)
            out.update(replicas_agree=self.replicas_agree)
        if self.lu is not None and self.engine is not None:
            sync = self.engine.stats
            fragments = self._fragment_fields()  # read once: the version below agrees with it
            version = (min(f["version"] for f in fragments["fragments"]) if fragments
                       else self.lu.version)  # fmt: skip
            out.update(
                version=version,
                anchor_digest=params_digest(self.lu.anchor),
                round=self.lu.round,
                staleness=sync["last_staleness"],
                bytes_sent=sync["bytes_sent"],
                bytes_received=sync["bytes_received"],
                queue_depth=sync["pushes_pending"],
                sync=sync,
                **fragments,
            )
        return out

    def _fragment_fields(self) -> dict[str, Any]:
        """With fragments: each fragment's version, staleness, bytes (``FragmentEngines``)."""
        if not isinstance(self.engine, fragmented.FragmentEngines):
            return {}
        return {"fragments": self.engine.status(self.lu)}


def params_digest(params: dict[str, np.ndarray]) -> str:
    """blake2b of the parameters' bytes in sorted-name order: equal digests, equal bits."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(params):
        h.update(name.encode())
        h.update(np.ascontiguousarray(params[name], dtype=np.float32).tobytes())
    return h.hexdigest()


def _batch_tokens(batch: Any) -> int:
    for name in ("inputs", "x_t"):
        t = getattr(batch, name, None)
        if t is not None:
            return int(t.numel()) if name == "inputs" else int(t.shape[0])
    return 0


def _progress(cfg: IslandConfig, start: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps or None, initial=start, desc=cfg.name, unit="step")


def export_initial_parameters(config: IslandConfig, path: str) -> dict[str, tuple[int, ...]]:
    """Write theta_0 of the configured workload and seed as safetensors (the root's ``init``);
    returns the shapes. Every island of a run starts from the aggregator's copy of it."""
    from safetensors.numpy import save_file

    from island.pseudo import params_to_numpy

    model = get_workload(config.workload, **config.workload_config).build_model(config.seed)
    params = params_to_numpy(model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(params, path)
    return {k: tuple(v.shape) for k, v in params.items()}
