"""The island daemon's typed configuration (``island run CONFIG.toml``).

Example (one island of a local-update run)::

    name = "island-0"
    mode = "local_update"            # or "expert": train alone on one cluster, no sync
                                     # (local_update with [expert] partition and cluster:
                                     # one island of an expert group, see ExpertConfig)
    key = "keys/island-0.pem"        # Ed25519 identity, created if missing
    roster = "roster.json"           # to verify the versions the root signs
    aggregator = "10.0.0.5:7000"     # its leaf; empty: the closest leaf found in the DHT
    workload = "bytelm"
    workload_config = { d_model = 128, n_layer = 4 }
    steps = 2000                     # inner steps in all (0: until stopped)
    shard = 0                        # this island's slice of the data...
    num_shards = 4                   # ...out of this many
    # http_token = "..."             # /status needs "Authorization: Bearer <token>";
                                     # empty: $ARCHIPELAGO_HTTP_TOKEN, else open
    # http_token_metrics = true      # ...and /metrics too (/healthz stays open)

    [optim]
    lr = 2e-3
    warmup_steps = 100

    [sync]
    model_id = "global"
    every = 100                      # H inner steps per round (the default)...
    # every_s = 30.0                 # ...or T seconds of compute per round (not both): a
                                     # slow island does fewer steps and pushes as often
    codec = "int8"
    mode = "overlapped"              # or "sync" (synchronous DiLoCo)
    # fragments = 2                  # stream the model as 2 fragments (Streaming DiLoCo):
                                     # lines global.f0 and global.f1 at the root, pushed in
                                     # turn every every/2 steps

    [link]                           # emulate a slow link in-process (0: as it is)
    rate_mbit = 10
    latency_ms = 50

    [snapshot]
    dir = "state/island-0"

    [tls]                            # empty or absent: plaintext gRPC
    ca = "tls/ca.pem"                # verifies the aggregator's certificate
    cert = "tls/island-0.pem"        # the client certificate a mutual-TLS aggregator requires
    key = "tls/island-0-key.pem"     # (mode 0600)
    mutual = true
    # server_name = "leaf.example"   # the name to verify when dialing by an address not in it
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from comms.errors import ConfigError
from comms.tls import TLSConfig
from island.sync import SyncConfig


@dataclass
class OptimConfig:
    """The inner optimizer: AdamW with warm-up and an optional cosine decay."""

    lr: float = 2e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # max global grad norm (0: off)
    warmup_steps: int = 100
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine: the last step's lr as a fraction of lr

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr: must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: need two values in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("warmup_steps and grad_clip: must be >= 0")


@dataclass
class LinkConfig:
    """In-process emulation of this island's uplink (token bucket); 0 leaves it unshaped."""

    rate_mbit: float = 0.0
    latency_ms: float = 0.0
    loss: float = 0.0  # probability that one chunk's send fails (the push then resumes)

    def validate(self) -> None:
        if self.rate_mbit < 0 or self.latency_ms < 0 or not 0 <= self.loss < 1:
            raise ConfigError("rate_mbit, latency_ms must be >= 0 and loss in [0, 1)")


@dataclass
class SnapshotConfig:
    dir: str = ""  # empty: no snapshots (a restart starts from the aggregator's version)
    every_rounds: int = 1  # local-update mode: a snapshot every N rounds
    every_steps: int = 200  # expert mode: a snapshot every N steps
    keep: int = 3


@dataclass
class ExpertConfig:
    """Expert mode: train on the documents of one cluster of a saved partition.

    In local-update mode with ``partition`` and ``cluster`` set, the island is one of an
    expert group (hybrid, ``aggregator.groups``): it trains on that cluster and pushes to
    ``sync.model_id``, the expert's model line; ``output`` then receives the expert as this
    island holds it at the end (the last version it adopted), signed, for the router. Its
    manifest's ``train_steps`` and ``train_flops`` are this island's own: the expert's are
    the sum over its group."""

    partition: str = ""  # directory written by `router partition`
    cluster: int = -1  # which cluster this island trains
    output: str = ""  # where the signed expert checkpoint goes at the end
    expert_id: str = ""  # defaults to the island's name (local-update mode: sync.model_id)
    # safetensors of the model's parameters to branch from (Branch-Train-Merge's seed: e.g. a
    # model trained on all the data for part of the budget); empty: the seed initialisation
    init: str = ""
    # an expert group's island: the longest wait after its last round for a version of the
    # expert's line that holds it, before writing ``output``
    drain_s: float = 60.0


@dataclass
class IslandConfig:
    name: str
    mode: Literal["local_update", "expert"] = "local_update"
    key: str = ""
    roster: str = ""
    aggregator: str = ""
    dht_peers: list[str] = field(default_factory=list)
    workload: str = "bytelm"
    workload_config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # model initialisation (all islands of a run share it)
    data_seed: int = -1  # batch order; -1: seed + shard
    shard: int = 0
    num_shards: int = 1
    steps: int = 1000
    threads: int = 0  # torch threads; 0 leaves torch's default
    # >1 makes this island that many times slower (heterogeneity tests): each inner step is
    # followed by a sleep of (slowdown - 1) times its duration, counted as compute (every_s)
    slowdown: float = 1.0
    eval_every: int = 1  # rounds (expert mode: every_steps of the snapshot) between evaluations
    eval_batches: int = 4
    http: str = "127.0.0.1:0"  # status endpoint; "" turns it off
    http_token: str = ""  # bearer token of /status; "": $ARCHIPELAGO_HTTP_TOKEN, else open
    http_token_metrics: bool = False  # the token also guards /metrics
    metrics_file: str = ""  # JSON lines, one per round, for reports
    optim: OptimConfig = field(default_factory=OptimConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)  # empty: plaintext gRPC

    def validate(self) -> None:
        self.tls.require("ca", who="an island verifies its aggregator with the federation CA")
        if not 0 <= self.shard < self.num_shards:
            raise ConfigError(
                f"shard: must be in [0, num_shards={self.num_shards}), got {self.shard}"
            )
        if self.steps < 0:
            raise ConfigError(f"steps: must be >= 0, got {self.steps}")
        if not 1 <= self.slowdown < math.inf:  # NaN fails this too
            raise ConfigError(f"slowdown: must be a finite number >= 1, got {self.slowdown}")
        if self.sync.fragments != 1 and self.mode != "local_update":
            raise ConfigError("sync.fragments: streamed fragments are for local_update mode "
                              "(an expert trains alone and syncs nothing)")  # fmt: skip
        if self.sync.fragments != 1 and self.expert.output:
            raise ConfigError("sync.fragments: not for an island that writes an expert "
                              "(expert.output): a checkpoint carries one version, fragments "
                              "have one each")  # fmt: skip
        if self.mode == "local_update" and not self.sync.model_id:
            raise ConfigError("sync.model_id: required in local_update mode")
        if self.mode == "expert" and (not self.expert.partition or self.expert.cluster < 0):
            raise ConfigError("expert.partition and expert.cluster: required in expert mode")
        half = bool(self.expert.partition) != (self.expert.cluster >= 0)  # one without the other
        if self.mode == "local_update" and half:
            raise ConfigError("expert.partition and expert.cluster: an island of an expert "
                              "group needs both (the expert's cluster of that partition)")  # fmt: skip
        if self.mode == "local_update" and self.expert.output and not self.expert.partition:
            raise ConfigError("expert.output: in local_update mode only for an island of an "
                              "expert group (set expert.partition and expert.cluster)")  # fmt: skip
        if self.expert.init and self.mode != "expert":
            raise ConfigError("expert.init: only in expert mode (local-update islands start "
                              "from the aggregator's version)")  # fmt: skip
        if self.expert.init and not Path(self.expert.init).is_file():
            raise ConfigError(f"expert.init: no such file {self.expert.init!r}")
        if self.mode == "local_update" and not (self.aggregator or self.dht_peers):
            raise ConfigError("aggregator: give a leaf's host:port, or dht_peers to find one")
