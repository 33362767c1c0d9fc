"""One island, many processes: data parallelism inside, one voice outside.

``torchrun --nproc-per-node N -m island run CONFIG`` starts N ranks of one island. Every inner
step is ordinary data parallelism (``DistributedDataParallel``: gradients all-reduced over the
island's fast interconnect); only the round's pseudo-gradient leaves the island. This is the
Holmes split (Yang et al., 2023: keep high-bandwidth traffic inside a group of devices, send
only what must cross the slow links) applied to DiLoCo (Douillard et al., 2023), whose inner
optimizer is itself data-parallel within a worker.

Roles. Rank 0 is the **leader**: it alone holds the ``SyncEngine`` (pushes and the version
stream), the status server, snapshots and the metrics file. The other ranks are
**followers**. DDP keeps every replica's parameters and AdamW state identical, so at a round
boundary the leader's ``anchor - params`` is the island's pseudo-gradient; the leader pushes
it, adopts the newest global version, and broadcasts the result:

1. the new anchor version (one int64, every boundary);
2. when that version differs from the last one broadcast, the anchor itself (float32, one
   flat tensor in sorted-name order): replicas are bit-identical by version, so an unchanged
   version means the followers' copy is already right;
3. every rank sets ``params = anchor``; the inner optimizer's state stays per rank.

At start the leader downloads the snapshot (late joiner) or resumes from its own snapshot, and
broadcasts what the followers need (:meth:`RankGroup.broadcast_object`), so every rank trains
from the same state. In sync mode the followers wait inside the broadcast (a collective,
bounded by the group's timeout) while the leader waits for the next version.

Data. Rank ``r`` of ``W`` in an island configured ``shard = i`` of ``num_shards = n`` draws
shard ``i + n * r`` of ``n * W`` (:meth:`RankGroup.data_shard`). Documents are dealt
round-robin (``workloads.select_documents``), so the ranks' slices are disjoint and together
they are exactly the island's single-process shard.

Stopping. SIGTERM to torchrun reaches every rank, not necessarily at the same step. Each step
the ranks agree with one all-reduce (:meth:`RankGroup.any_rank`): when any rank is stopping,
all stop after the same step, so no collective is left waiting for a rank that has gone.

Devices. On CPU the group uses gloo; with CUDA, ``cpu:gloo,cuda:nccl`` (each rank on
``cuda:LOCAL_RANK``: give the workload ``device = "cuda"`` or ``"auto"``, not a fixed index).

Concurrency: each rank is one process with one training thread; collectives are blocking calls
of that thread. :class:`RankGroup` itself is the single-process case (every method trivial), so
the daemon has one code path.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
from typing import Any

import numpy as np
import torch

from comms.errors import ConfigError
from island.local_update import LocalUpdate
from island.pseudo import copy_arrays, load_numpy_into

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankGroup:
    """The processes of one island; this base class is a single process (rank 0 of 1)."""

    rank = 0
    world_size = 1
    local_rank = 0

    @property
    def is_leader(self) -> bool:
        """True on rank 0: the only rank that talks to aggregators and writes files."""
        return self.rank == 0

    def data_shard(self, shard: int, num_shards: int) -> tuple[int, int]:
        """This rank's ``(shard, num_shards)``: shard ``shard + num_shards * rank`` of
        ``num_shards * world_size``, a disjoint part of the island's own shard."""
        return shard + num_shards * self.rank, num_shards * self.world_size

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to train with (DDP across ranks); ``model`` stays the one to read."""
        return model

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any (a collective: call it everywhere)."""
        return bool(flag)

    def broadcast_int(self, value: int | None) -> int:
        """The leader's ``value`` on every rank (followers pass None)."""
        return int(value)

    def broadcast_arrays(self, arrays: Arrays) -> Arrays:
        """Overwrite ``arrays`` in place with the leader's (same names and shapes, float32)."""
        return arrays

    def broadcast_object(self, obj: Any) -> Any:
        """The leader's picklable ``obj`` on every rank (followers pass None). Tensors in it
        must be on the CPU (they are unpickled on the device they were pickled from)."""
        return obj

    def close(self) -> None:
        """Leave the group (nothing to do for one process)."""


class TorchRankGroup(RankGroup):
    """The ranks of a ``torchrun`` launch, over ``torch.distributed`` (the default group).

    ``timeout_s`` bounds every collective: a follower waiting at a boundary while the leader
    waits for a version (sync mode) or downloads a snapshot must allow for that wait.
    """

    def __init__(self, rank: int, world_size: int, local_rank: int, *, timeout_s: float):
        import torch.distributed as dist

        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = torch.device("cpu")  # where anchors are broadcast: the model's device
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            backend = "cpu:gloo,cuda:nccl"
        if not dist.is_initialized():
            dist.init_process_group(
                backend, rank=rank, world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )  # fmt: skip
        self._dist = dist
        log.info("rank %d of %d joined the island's group (%s)", rank, world_size, backend)

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        self.device = next(model.parameters()).device
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers are not trained and start equal; not syncing them in forward keeps forward
        # passes free of collectives, so the leader can evaluate ``model`` alone.
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_int(self, value: int | None) -> int:
        t = torch.tensor([0 if value is None else int(value)], dtype=torch.int64)
        self._dist.broadcast(t, src=0)
        return int(t.item())

    def broadcast_arrays(self, arrays: Arrays) -> Arrays:
        names = sorted(arrays)
        sizes = [int(arrays[n].size) for n in names]
        if self.is_leader:
            flat = torch.from_numpy(
                np.concatenate([np.ravel(arrays[n]).astype(np.float32, copy=False) for n in names])
            ).to(self.device)
        else:
            flat = torch.empty(sum(sizes), dtype=torch.float32, device=self.device)
        self._dist.broadcast(flat, src=0)
        if not self.is_leader:
            host = flat.cpu().numpy()
            offset = 0
            for name, size in zip(names, sizes, strict=True):
                arrays[name][...] = host[offset : offset + size].reshape(arrays[name].shape)
                offset += size
        return arrays

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj if self.is_leader else None]
        self._dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]

    def close(self) -> None:
        if self._dist.is_initialized():
            # every rank reaches this point before any tears its sockets down: a rank leaving
            # while another still talks to it aborts the process inside gloo
            with contextlib.suppress(RuntimeError):
                self._dist.barrier()
            gc.collect()  # a dropped DDP wrapper's reducer still references the group
            self._dist.destroy_process_group()


def rank_group_from_env(timeout_s: float = 1800.0, env: dict[str, str] | None = None) -> RankGroup:
    """A ``TorchRankGroup`` under torchrun with ``WORLD_SIZE > 1``, else the single process."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return RankGroup()
    missing = [k for k in TORCHRUN_VARS if k not in env]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: start a multi-process island "
            "with `torchrun --nproc-per-node N -m island run CONFIG`"
        )
    return TorchRankGroup(int(env["RANK"]), world, int(env["LOCAL_RANK"]), timeout_s=timeout_s)


# ---------------------------------------------------------------------- local-update roles


def send_anchor(group: RankGroup, version: int, anchor: Arrays, last_sent: int | None) -> int:
    """The leader's half of one share: the version, then the arrays unless ``version`` is
    ``last_sent`` (the followers hold those bits already). Returns ``version``."""
    group.broadcast_int(version)
    if version != last_sent:
        group.broadcast_arrays(anchor)
    return version


def receive_anchor(group: RankGroup, anchor: Arrays, have: int | None) -> int:
    """A follower's half of one share: overwrites ``anchor`` in place unless the leader's
    version is ``have`` (the version ``anchor`` holds). Returns the leader's version."""
    version = group.broadcast_int(None)
    if version != have:
        group.broadcast_arrays(anchor)
    return version


class LeaderLocalUpdate(LocalUpdate):
    """``LocalUpdate`` on rank 0: after each start and boundary, shares the round's start
    point with the followers (its serial; the arrays only when it changed)."""

    def __init__(self, *args: Any, group: RankGroup, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.group = group
        self._shared_version: int | None = None
        if self.adopt_on_arrival:  # the followers take a new start only at boundaries
            log.warning("adopt = 'arrival' needs a single-rank island; adopting at boundaries")
            self.adopt_on_arrival = False

    def start(self) -> LeaderLocalUpdate:
        """``LocalUpdate.start``, then the first share: the anchor in full, and whether the
        model holds it (a late join) or holds a resumed snapshot's parameters, which the
        followers loaded already (a snapshot may have been taken mid-round)."""
        started = self._anchor is not None
        resuming = self._resume is not None
        super().start()
        if not started:
            self.group.broadcast_int(0 if resuming else 1)
            self._share()
        return self

    def end_round(self) -> None:
        super().end_round()
        self._share()

    def _share(self) -> None:
        # the round's start point (the anchor, plus own in-flight deltas when eager): it
        # changes every round, so it is keyed by its serial rather than the global version
        self._shared_version = send_anchor(
            self.group, self.start_serial, self._start, self._shared_version
        )


class FollowerLocalUpdate:
    """The rounds of a rank other than 0: counts steps like ``LocalUpdate`` and, at each
    boundary, takes the leader's anchor instead of pushing. Same call-order rules."""

    engine = None

    def __init__(self, model: torch.nn.Module, every: int, *, group: RankGroup):
        if every < 1:
            raise ValueError(f"every must be >= 1 inner step, got {every}")
        self.model = model
        self.every = int(every)
        self.group = group
        self._anchor = copy_arrays(dict(model.named_parameters()))  # a receive buffer
        self._version: int | None = None
        self._round = 0
        self._steps_in_round = 0
        self._total_steps = 0

    def start(self) -> FollowerLocalUpdate:
        """Receive the leader's first anchor (always sent in full); load it into the model
        unless the leader resumed from a snapshot (``share_resume_state`` loaded that)."""
        if self._version is None:
            load = bool(self.group.broadcast_int(None))
            self._version = receive_anchor(self.group, self._anchor, None)
            if load:
                load_numpy_into(self.model, self._anchor)
        return self

    def step(self, tokens: int = 0, seconds: float | None = None) -> bool:
        """Count one inner step; at the ``every``-th, end the round. True when one ended.
        (``tokens`` and ``seconds``, as ``LocalUpdate.step`` takes them, are not used here.)"""
        if self._version is None:
            raise RuntimeError("call start() before step()")
        self._steps_in_round += 1
        self._total_steps += 1
        if self._steps_in_round >= self.every:
            self.end_round()
            return True
        return False

    def end_round(self) -> None:
        """Take the leader's anchor (it has pushed this round's delta); params <- anchor."""
        self._receive(self._version)
        self._round += 1
        self._steps_in_round = 0

    def _receive(self, have: int | None) -> None:
        self._version = receive_anchor(self.group, self._anchor, have)
        load_numpy_into(self.model, self._anchor)

    @property
    def version(self) -> int:
        return -1 if self._version is None else self._version

    @property
    def round(self) -> int:
        return self._round

    @property
    def steps_in_round(self) -> int:
        return self._steps_in_round

    @property
    def anchor(self) -> Arrays:
        return self._anchor


def check_round_size(group: RankGroup, every_s: float | None, auto: bool = False) -> None:
    """ConfigError for ``sync.every_s`` or ``sync.auto`` on more than one rank (see
    ``make_local_update``): every rank must agree on each boundary."""
    if auto and group.world_size > 1:
        raise ConfigError(
            f"sync.auto: rounds sized to the link are not supported on a multi-rank island "
            f"({group.world_size} ranks under torchrun); set sync.every and sync.codec instead"
        )
    if every_s is not None and group.world_size > 1:
        raise ConfigError(
            f"sync.every_s: rounds sized by time are not supported on a multi-rank island "
            f"({group.world_size} ranks under torchrun); set sync.every (inner steps) instead"
        )


def make_local_update(
    group: RankGroup,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    engine: Any,
    every: int | None,
    every_s: float | None = None,
    anchor: Arrays | None = None,
    anchor_version: int | None = None,
) -> LocalUpdate | FollowerLocalUpdate:
    """The local-update object of this rank: the plain ``LocalUpdate`` for one process, the
    leader's broadcasting one on rank 0, a follower elsewhere (``engine`` None there).

    Rounds sized by time (``every_s``) need one process: every rank of a multi-rank island
    would have to agree on each boundary, where their clocks differ (ConfigError)."""
    kwargs = {"anchor": anchor, "anchor_version": anchor_version}
    if group.world_size == 1:
        return LocalUpdate(model, optimizer, engine=engine, **kwargs)
    check_round_size(group, every_s, auto=engine is not None and engine.config.auto)
    if group.is_leader:
        return LeaderLocalUpdate(model, optimizer, engine=engine, group=group, **kwargs)
    return FollowerLocalUpdate(model, every, group=group)  # the anchor comes from the leader


def share_resume_state(
    group: RankGroup, state: Any, model: torch.nn.Module, optimizer: Any, batches: Any
) -> dict[str, int] | None:
    """Give the followers the leader's resumed snapshot ``state`` (a ``SnapshotState`` or
    None; followers pass None): parameters, optimizer state and the batch position, loaded in
    place on every follower. Returns ``{"step", "tokens"}`` of the resumed state, or None
    when the leader started fresh. One process: nothing moves."""
    if group.world_size == 1:
        return None if state is None else _position(state)
    payload = None
    if group.is_leader and state is not None:
        payload = {
            "model": {k: v.detach().cpu() for k, v in state.model.items()},
            "optimizer": state.optimizer,
            "batch_step": int(state.data["batches"]["step"]),
            **_position(state),
        }
    payload = group.broadcast_object(payload)
    if payload is None:
        return None
    if not group.is_leader:
        model.load_state_dict(payload["model"])
        if payload["optimizer"] is not None:
            optimizer.load_state_dict(payload["optimizer"])
        # Every rank draws one batch a step, so the followers' iterators are at the leader's
        # step; their fingerprints (their own shards) stay their own.
        batches.load_state_dict({**batches.state_dict(), "step": payload["batch_step"]})
    return {"step": payload["step"], "tokens": payload["tokens"]}


def _position(state: Any) -> dict[str, int]:
    return {"step": int(state.meta["step"]), "tokens": int(state.meta.get("tokens", 0))}


def replicas_agree(group: RankGroup, digest: str) -> bool:
    """True on every rank when every rank's ``digest`` equals the leader's (a collective)."""
    if group.world_size == 1:
        return True
    leaders = group.broadcast_object(digest)
    return not group.any_rank(digest != leaders)


def training_state_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """blake2b of the parameters and the optimizer's per-parameter state tensors, in order:
    the bits DDP keeps identical across ranks (compare with :func:`replicas_agree`)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        for _, state in sorted(optimizer.state_dict()["state"].items()):
            for key, value in sorted(state.items()):
                h.update(str(key).encode())
                if torch.is_tensor(value):
                    h.update(value.detach().cpu().contiguous().numpy().tobytes())
                else:
                    h.update(repr(value).encode())
    return h.hexdigest()


def collective_timeout_s(sync_timeout_s: float, snapshot_timeout_s: float) -> float:
    """How long a rank may wait in a collective: followers wait at a boundary while the leader
    waits for a version (sync mode) or downloads a snapshot, with room for an evaluation."""
    return 2 * max(sync_timeout_s, snapshot_timeout_s) + 300
