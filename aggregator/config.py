"""The aggregator's typed configuration (``aggregator serve CONFIG.toml``).

Example (a root serving one model)::

    name = "root"
    role = "root"                     # leaf | mid | root
    listen = "127.0.0.1:7000"         # gRPC; port 0 picks a free one
    http = "127.0.0.1:7001"           # /healthz /status /metrics; "" turns it off
    # http_token = "..."              # /status needs "Authorization: Bearer <token>";
                                      # empty: $ARCHIPELAGO_HTTP_TOKEN, else open
    # http_token_metrics = true       # ...and /metrics too (/healthz stays open)
    # summary_interval_s = 2.0        # leaf/mid: dashboard summary to the parent (0: none)
    # router = "http://host:8080"     # the dashboard shows this router serve's experts
    key = "keys/root.pem"             # Ed25519 identity, created if missing
    roster = "roster.json"            # public keys allowed to push, with roles
    state_dir = "state/root"          # write-ahead log, model store, root state

    [merge]
    buffer_k = 4                      # merge every K island updates...
    deadline_s = 30.0                 # ...or when the oldest has waited this long
    staleness = "fedbuff"             # fedbuff | polynomial | hinge | constant
    max_staleness = 16
    clip = "adaptive"                 # bound on each island update's L2 norm (the default):
    clip_factor = 2.0                 #   factor x the median of the last clip_window norms;
    clip_window = 32
    clip_min_count = 8                #   before that many, clip_warmup_ratio x ||theta||
    clip_warmup_ratio = 0.5
    clip_action = "clip"              # scale an update down to the bound, or "reject" it
    # clip = "static"                 # or an absolute bound: clip_norm = 5.0
    # clip = "off"                    # or none at all (a warning at start)
    direction = "reject"              # refuse an island update pointing against the last
    direction_min_cos = 0.0           #   merged step: cosine with -u_v below this (the
                                      #   default); "off": no check (a warning at start)
    partial_step = "deferred"         # root: a version of less work than buffer_k full rounds
                                      #   takes that share of a plain step, its momentum
                                      #   waiting for a full step's share; "scaled": that
                                      #   share of a momentum step; "full": a whole step

    [[models]]
    model_id = "global"
    init = "init.safetensors"         # root only: theta_0
    outer = "nesterov"                # nesterov | delayed_nesterov | sgd | co2
    outer_params = { lr = 0.7, momentum = 0.9 }
    # outer = "delayed_nesterov"      # momentum once per `delay` versions (Liu et al. 2024);
    # outer_params = { lr = 0.7, momentum = 0.9, delay = 4 }  # with buffer_k = 1, as there
    codec = "int8"                    # codec of the published u_v
    # public_read = true              # Fetch/Subscribe with no signature (default: roster only)
    # buffer_k = 2                    # this line's K (default: merge.buffer_k, at most the
                                      #   size of its expert group)

    # [[expert_groups]]               # hybrid: the islands (roster names) that train one
    # model_id = "expert0"            #   expert's model id in local-update mode; such a model
    # islands = ["island0", "island1"]#   takes island deltas only from them
    #                                 #   (docs/examples/root_expert_groups.toml)

    [tls]                             # empty or absent: plaintext gRPC (one machine, tests)
    cert = "tls/root.pem"             # this aggregator's certificate: it serves TLS with it,
    key = "tls/root-key.pem"          #   and presents it to its parent; key mode 0600
    ca = "tls/ca.pem"                 # the federation CA: verifies the parent (and clients)
    mutual = true                     # every client must present a certificate the CA signed
    # server_name = "root.example"    # the name to verify in the parent's certificate

``aggregator tls init DIR --daemon root=HOST,... --island NAME`` writes this material.

A leaf or mid names its parent by ``parent = "host:port"`` or finds one in the DHT
(``dht_peers``), choosing by measured round-trip time among aggregators that have room.

Every aggregator that admits island updates (kind ``delta``) bounds their norm
(:mod:`aggregator.norm_bound`); child partials were bounded at their leaf. A clip scales the
update's data, not its weight, and is logged in the WAL with the update, so a replay after a
restart re-merges the same sum whatever the config says then. The measurements behind the
defaults are in docs/reliability.md ("Adaptive norm bound"). The same aggregators refuse an
island update whose cosine with the last merged step ``-u_v`` is below ``direction_min_cos``
(:mod:`aggregator.direction`; docs/reliability.md, "Direction check").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from aggregator.direction import DEFAULT_MIN_COS
from aggregator.groups import ExpertGroup, check_groups, line_buffer_k
from aggregator.norm_bound import (
    DEFAULT_FACTOR,
    DEFAULT_MIN_COUNT,
    DEFAULT_WARMUP_RATIO,
    DEFAULT_WINDOW,
)
from comms.codecs.base import SPARSE_CODECS
from comms.codecs.feedback import is_valid_decay
from comms.errors import ConfigError
from comms.tls import TLSConfig

ROLES = ("leaf", "mid", "root")
PARTIAL_STEPS = ("deferred", "scaled", "full")  # merge.partial_step; the default first
MAX_UPDATE_MB = 1 << 20  # 1 TiB: far above any update, and max_update_bytes stays an int


@dataclass
class MergeConfig:
    buffer_k: int = 4  # flush after this many island updates (a child's partial counts its own)
    deadline_s: float = 30.0  # ...or when the oldest buffered update has waited this long
    staleness: str = "fedbuff"  # weighting by staleness s = v_now - base_version
    staleness_params: dict[str, float] = field(default_factory=dict)
    max_staleness: int | None = 16  # staler updates are refused (StaleError) and counted
    # Island updates (kind "delta") are bounded in L2 norm before merging (aggregator.norm_bound):
    # "adaptive": clip_factor x the median of the last clip_window accepted norms (in warm-up,
    # clip_warmup_ratio x ||theta||); "static": clip_norm; "off": nothing (logged at start).
    # Unset: "static" when clip_norm is given, else "adaptive".
    clip: Literal["adaptive", "static", "off"] | None = None
    clip_norm: float | None = None  # clip = "static": the absolute L2 bound of one update
    clip_factor: float = DEFAULT_FACTOR  # adaptive: bound = factor x median of the window
    clip_window: int = DEFAULT_WINDOW  # adaptive: accepted norms kept per model (clipped ones)
    clip_min_count: int = DEFAULT_MIN_COUNT  # adaptive: fewer norms: the warm-up bound
    clip_warmup_ratio: float = DEFAULT_WARMUP_RATIO  # warm-up bound: this x ||theta||
    clip_action: Literal["clip", "reject"] = "clip"  # scale down to the bound, or refuse
    # Island updates pointing against the last merged step (aggregator.direction): "reject"
    # refuses one whose cosine with -u_v is below direction_min_cos (at most a minority of
    # buffer_k per version); "off": no check (logged at start).
    direction: Literal["reject", "off"] = "reject"
    direction_min_cos: float = DEFAULT_MIN_COS  # honest: +0.09 and up; sign-flipped: below -0.07
    weight_by_samples: bool = False  # also weight an update by its meta "tokens"
    # Root: a version merging less island work than buffer_k full rounds (a deadline flush, a
    # slow island's lone short last round; each update counts min(1, steps / every)) takes
    # f = work / buffer_k of a plain gradient step and the momentum waits until versions adding
    # up to a full step have arrived ("deferred", aggregator.outer "Deferred momentum"; Nesterov
    # only, the other outer steps scale); "scaled": f of a momentum step, the momentum decaying
    # by the same share ("A partial step"); "full": every version a full step, DiLoCo's rule.
    partial_step: Literal["deferred", "scaled", "full"] = "deferred"
    engine: Literal["inline", "pool"] = "inline"  # merge in the service, or in worker processes
    max_workers: int = 2  # pool: most merge worker processes (scaled with the queue)
    warm_workers: int = 0  # pool: workers kept alive when idle (0: scale to zero)
    idle_timeout_s: float = 10.0  # pool: a worker idle this long retires
    scale_up_backlog: int = 2  # pool: another worker starts when this many events wait per worker

    def validate(self) -> None:
        if self.buffer_k < 1:
            raise ConfigError(f"buffer_k: must be at least 1, got {self.buffer_k}")
        if self.deadline_s <= 0:
            raise ConfigError(f"deadline_s: must be positive, got {self.deadline_s}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ConfigError(f"max_staleness: must be >= 0, got {self.max_staleness}")
        if self.max_workers < 1 or not 0 <= self.warm_workers <= self.max_workers:
            raise ConfigError(
                f"max_workers / warm_workers: need 1 <= max_workers and 0 <= warm_workers <= "
                f"max_workers, got {self.max_workers} / {self.warm_workers}"
            )
        self._validate_clip()
        if self.partial_step not in PARTIAL_STEPS:
            raise ConfigError(
                f"partial_step: must be one of {', '.join(map(repr, PARTIAL_STEPS))}, got "
                f"{self.partial_step!r}"
            )
        if self.direction not in ("reject", "off"):
            raise ConfigError(f'direction: must be "reject" or "off", got {self.direction!r}')
        if not -1.0 <= self.direction_min_cos < 1.0:
            raise ConfigError(
                f"direction_min_cos: must be in [-1, 1), got {self.direction_min_cos}"
            )

    @property
    def clip_mode(self) -> str:
        """``clip`` as set, or its default: "static" with a clip_norm, else "adaptive"."""
        if self.clip is not None:
            return self.clip
        return "static" if self.clip_norm is not None else "adaptive"

    def _validate_clip(self) -> None:
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ConfigError(f"clip_norm: must be positive, got {self.clip_norm}")
        if self.clip_mode == "static" and self.clip_norm is None:
            raise ConfigError('clip_norm: clip = "static" needs clip_norm (an L2 bound)')
        if self.clip_mode != "static" and self.clip_norm is not None:
            raise ConfigError(
                f'clip_norm: only used with clip = "static", here clip = "{self.clip_mode}"; '
                "remove one of the two"
            )
        if not self.clip_factor > 1:
            raise ConfigError(f"clip_factor: must be > 1, got {self.clip_factor}")
        if self.clip_window < 1:
            raise ConfigError(f"clip_window: must be at least 1, got {self.clip_window}")
        if not 1 <= self.clip_min_count <= self.clip_window:
            raise ConfigError(
                f"clip_min_count: must be in [1, clip_window={self.clip_window}], got "
                f"{self.clip_min_count}"
            )
        if not self.clip_warmup_ratio > 0:
            raise ConfigError(f"clip_warmup_ratio: must be positive, got {self.clip_warmup_ratio}")


@dataclass
class ModelConfig:
    model_id: str
    init: str = ""  # root: safetensors file holding theta_0
    outer: str = "nesterov"  # outer optimizer at the root
    outer_params: dict[str, Any] = field(default_factory=dict)
    codec: str = "int8"  # codec of the published u_v (error-free replicas: decode(encode(u)))
    codec_params: dict[str, Any] = field(default_factory=dict)
    # root: the decay of the residual a lossy publish codec leaves (u_v sent is
    # Q(u + beta * e)); 1 keeps it whole (0.9 to 1 measured alike: docs/benchmarks/thin.md)
    ef_decay: float = 1.0
    snapshot_every: int = 10  # a full snapshot of theta every N versions
    keep_versions: int = 1000  # recent u_v kept for subscribers catching up
    public_read: bool = False  # serve Fetch/Subscribe unsigned; each aggregator's own says
    # updates a version of this model merges; 0: merge.buffer_k, at most its expert group's size
    buffer_k: int = 0
    # root: [p, F] = this line is fragment p of F of init's tensors (streamed fragments,
    # comms.fragments; its model id is usually fragment_model_id(base, p)); []: all of them
    fragment: list[int] = field(default_factory=list)

    def validate(self) -> None:
        if not self.model_id:
            raise ConfigError("model_id: must not be empty")
        if self.buffer_k < 0:
            raise ConfigError(f"buffer_k: must be >= 0 (0: merge.buffer_k), got {self.buffer_k}")
        if self.snapshot_every < 1:
            raise ConfigError(f"snapshot_every: must be at least 1, got {self.snapshot_every}")
        if not is_valid_decay(self.ef_decay):
            raise ConfigError(f"ef_decay: must be in (0, 1] (1: no decay), got {self.ef_decay!r}")
        from aggregator.outer import make_outer_optimizer  # outer imports no config

        try:  # a bad name or hyperparameter fails at load, not when the root starts
            make_outer_optimizer(self.outer, **self.outer_params)
        except ConfigError as e:
            raise ConfigError(f"outer / outer_params: {e}") from None
        if self.fragment:
            f = self.fragment
            if not (len(f) == 2 and all(isinstance(x, int) for x in f) and 0 <= f[0] < f[1]):
                raise ConfigError(
                    f"fragment: [index, count] with 0 <= index < count (fragment 0 of 2 is "
                    f"[0, 2]), got {f!r}"
                )


def check_publish_codec(model: ModelConfig, where: str) -> None:
    """A sparse codec for the published ``u_v`` only with an outer optimizer without momentum.

    The root keeps what a sparse ``u_v`` leaves out in its residual, so most coordinates move
    only every ~1/density versions, while momentum goes on adding the islands' deltas that
    still point the same way; the late, accumulated steps then overshoot. Measured with
    ``scripts/bench_quality.py`` (bytelm 120K, 4 islands, H = 50, sparse2 at density 0.02 both
    ways, Nesterov 0.7 / 0.9): held-out loss 5.4 at the start, 3.7 after 300 steps, then 9.6,
    19 and 20 at 1,500 steps; the same pushes published in int8 stayed below 3.2, and with
    sparse2 both ways and ``outer = "sgd"`` the run was stable (docs/benchmarks/thin.md)."""
    from aggregator.outer import OUTER_OPTIMIZERS

    outer = OUTER_OPTIMIZERS.get(model.outer)
    if model.codec in SPARSE_CODECS and outer is not None and outer.uses_momentum:
        raise ConfigError(
            f"{where}.codec: {model.codec!r} for published versions needs an outer optimizer "
            f'without momentum (outer = "sgd"), not {model.outer!r}: the root\'s error '
            "feedback delays most coordinates by about 1/density versions and momentum "
            "overshoots them (a measured run diverged). Publish int8 or int4 and let the "
            'islands push sparse (sync.codec), or set outer = "sgd"'
        )


@dataclass
class AggregatorConfig:
    name: str
    role: Literal["leaf", "mid", "root"] = "leaf"
    listen: str = "127.0.0.1:0"
    http: str = "127.0.0.1:0"
    http_token: str = ""  # bearer token of /status; "": $ARCHIPELAGO_HTTP_TOKEN, else open
    http_token_metrics: bool = False  # the token also guards /metrics
    key: str = ""  # Ed25519 private key (PEM); generated here if missing
    roster: str = ""  # JSON roster: who may push and (signed) read; required to serve
    state_dir: str = "state"
    parent: str = ""  # leaf/mid: parent's gRPC address; empty: discover in the DHT
    dht: bool = False  # join (or, with no dht_peers, start) a hivemind DHT and announce there
    dht_peers: list[str] = field(default_factory=list)  # bootstrap multiaddrs
    dht_listen: str = "127.0.0.1"  # host the DHT node binds
    announce_ttl_s: float = 30.0
    fan_in: int = 0  # most children (islands or aggregators) placed here; 0: no limit
    max_update_mb: float = 1024.0  # refuse larger envelopes (OversizeError)
    push_deadline_s: float = 60.0  # deadline of one push to the parent
    version_cache_mb: float = 256.0  # leaf/mid: most MiB of recent u_v kept for subscribers
    # leaf/mid: seconds between dashboard summaries sent to the parent (Report; kept in its
    # memory, never in its WAL); 0: none, and the parent's page shows nothing below this one
    summary_interval_s: float = 2.0
    # the dashboard shows this `router serve`'s experts (clusters, versions), rule and health,
    # asked every 5 s at GET /v1/experts; router_token: its bearer token ("": none)
    router: str = ""
    router_token: str = ""
    merge: MergeConfig = field(default_factory=MergeConfig)
    models: list[ModelConfig] = field(default_factory=list)
    # hybrid: which islands train which expert's model id (aggregator.groups); none: any island
    expert_groups: list[ExpertGroup] = field(default_factory=list)
    tls: TLSConfig = field(default_factory=TLSConfig)  # empty: plaintext gRPC

    def validate(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role: must be one of {ROLES}, got {self.role!r}")
        self.tls.require("cert", who="an aggregator serves TLS with its own certificate and key")
        if self.role != "root":
            self.tls.require("ca", who="a leaf or mid verifies its parent with the federation CA")
        if self.role == "root":
            if not self.models:
                raise ConfigError("models: a root serves at least one [[models]] entry")
            for i, m in enumerate(self.models):
                if not m.init:
                    raise ConfigError(
                        f"models[{i}].init: a root needs theta_0 (a safetensors file)"
                    )
                check_publish_codec(m, f"models[{i}]")
        ids = [m.model_id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"models: model_id repeated in {ids}")
        check_groups(self.expert_groups, ids)
        if not (self.summary_interval_s == 0 or 0.05 <= self.summary_interval_s <= 3600):
            raise ConfigError(
                "summary_interval_s: must be 0 (no summaries) or in [0.05, 3600] seconds, "
                f"got {self.summary_interval_s}"
            )
        if self.router and not self.router.startswith(("http://", "https://")):
            raise ConfigError(f"router: expected an http:// or https:// URL, got {self.router!r}")
        if not self.version_cache_mb > 0:
            raise ConfigError(f"version_cache_mb: must be positive, got {self.version_cache_mb}")
        if not 0 < self.max_update_mb <= MAX_UPDATE_MB:
            raise ConfigError(
                f"max_update_mb: must be in (0, {MAX_UPDATE_MB}], got {self.max_update_mb}"
            )

    def buffer_k(self, model_id: str) -> int:
        """The updates a version of ``model_id`` merges (``aggregator.groups.line_buffer_k``)."""
        model = next((m.buffer_k for m in self.models if m.model_id == model_id), 0)
        group = next((len(g.islands) for g in self.expert_groups if g.model_id == model_id), 0)
        return line_buffer_k(self.merge.buffer_k, model, group)

    @property
    def max_update_bytes(self) -> int:
        return int(self.max_update_mb * (1 << 20))
