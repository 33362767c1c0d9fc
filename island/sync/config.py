"""What configures an island's sync with its aggregator (``SyncConfig``, the ``[sync]`` table,
validated at load) and the counters the engine keeps (``SyncStats``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from comms.codecs import get_codec
from comms.codecs.feedback import feedback_decay, is_valid_decay
from comms.errors import ConfigError

DEFAULT_EVERY = 100  # H when neither ``every`` nor ``every_s`` is given


@dataclass
class SyncConfig:
    """How an island syncs one model with its aggregator (the ``[sync]`` table).

    A round is sized in inner steps (``every``, H; DiLoCo) or in seconds of compute
    (``every_s``, T): set one of them, not both; with neither, ``every`` is 100. With
    ``every_s`` a round ends at the first inner step after which the island has computed for T
    seconds since the round began (time inside inner steps, not waiting on the network), so
    a slow island does fewer inner steps per round and pushes as often as a fast one. This is
    the Dynamic Local Updates (DyLU) of Liu et al. 2024 ("Asynchronous Local-SGD Training for
    Language Modeling", arXiv:2401.09135), which give each worker local steps in proportion
    to its speed so that workers finish their rounds together; here the clock sets that
    proportion as the island trains, instead of a speed measured beforehand (the paper's
    Delayed Nesterov outer step is not part of this). The push's meta then carries the round's ``steps`` and ``tokens`` but no
    ``every``: the root counts each such delta as one whole round of work
    (``aggregator.gateway.update_work``), and a federation that wants a delta to weigh by the
    work in it sets ``[merge] weight_by_samples = true`` on its aggregators (tokens; a
    ``LocalUpdate`` told no tokens sends its step count instead). ``every_s`` is for
    single-process islands: a multi-rank island (``island.distributed``) refuses it.
    """

    model_id: str = ""  # the model this island trains (an aggregator serves many); required
    # H: inner steps per round (DiLoCo uses 500; smaller syncs more often); None: 100 unless
    # every_s is set
    every: int | None = None
    every_s: float | None = None  # T: seconds of compute per round, instead of every
    codec: str = "int8"  # of pushed deltas: none, fp16, bf16, int8, int4, topk, sparse2, sign1
    codec_params: dict[str, Any] = field(default_factory=dict)  # e.g. {block = 128}
    # error feedback's decay beta in (0, 1]: each round sends Q(delta + beta * residual);
    # 1 keeps what a lossy codec dropped whole. None (the default): 0.95 with a sparse codec
    # (sparse2, topk: SparseLoCo's decay, measured better in docs/benchmarks/thin.md), else 1
    ef_decay: float | None = None
    mode: Literal["overlapped", "sync"] = "overlapped"  # overlapped never waits at a boundary
    # where a round starts: "eager" = the newest global version plus this island's own deltas
    # still in flight (applied locally until a version holds them); "lookahead" = the newest
    # version moved by the root's outer step with those deltas as its pseudo-gradient
    # (island.lookahead; needs outer_lr/outer_momentum equal to the root's Nesterov step);
    # "reset" = the version alone
    rebase: Literal["eager", "lookahead", "reset"] = "eager"
    # when an overlapped island adopts a version: "boundary" = at the next round boundary;
    # "arrival" = at the first inner step after it arrives, moving the round's progress onto
    # it (the round's start shifts, its progress is kept), so a round runs on a stale start
    # only until the version that merges the previous round arrives
    adopt: Literal["boundary", "arrival"] = "arrival"
    outer_lr: float = 0.7  # lookahead: the root's outer Nesterov lr and momentum
    outer_momentum: float = 0.9
    # rounds sized to the link (island.sync.auto): from its measured uplink and step time the
    # island picks, per round, the first codec of auto_codecs whose push takes at most
    # auto_target x the round's compute, and lengthens the round (up to auto_max_factor x
    # every / every_s) when even the last one is too slow; every / every_s stay the floor
    auto: bool = False
    auto_codecs: list[str] = field(default_factory=lambda: ["int8", "int4"])
    auto_target: float = 1.0
    auto_max_factor: float = 8.0
    # streamed fragments (Streaming DiLoCo; island run only): sync the model as this many
    # fragments, fragment p on model line fragment_model_id(model_id, p) (comms.fragments),
    # pushing at steps offset by p * every / fragments; 1: the whole model on model_id.
    # Needs every (not every_s) of at least fragments, and no auto
    fragments: int = 1
    max_pending_pushes: int = 8  # pushes waiting for a link; on overflow the oldest is dropped
    sync_timeout_s: float = 600.0  # sync mode: longest wait for the next global version
    snapshot_timeout_s: float = 300.0  # longest wait for a snapshot download
    verify_versions: bool = True  # check version signatures (when a roster is configured)
    max_buffered_versions: int = 256  # versions held for the next boundary; beyond: snapshot
    close_timeout_s: float = 30.0  # at shutdown, longest wait for pushes still in flight
    retry_interval_s: float = 0.5  # first wait before retrying a failed link (then doubles)
    # cap of that backoff: an aggregator back from a restart gets this island's push within
    # about this (plus the transport's reconnect backoff, at most 2 s), at one try per this
    # while it is down
    max_retry_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.every is None and self.every_s is None:
            self.every = DEFAULT_EVERY

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key."""
        self._validate_round_size()
        if not self.model_id:
            raise ConfigError("model_id: set the id of the model this island trains")
        if self.mode not in ("overlapped", "sync"):
            raise ConfigError(f"mode: must be 'overlapped' or 'sync', got {self.mode!r}")
        if self.rebase not in ("eager", "lookahead", "reset"):
            raise ConfigError(
                f"rebase: must be 'eager', 'lookahead' or 'reset', got {self.rebase!r}"
            )
        if self.adopt not in ("boundary", "arrival"):
            raise ConfigError(f"adopt: must be 'boundary' or 'arrival', got {self.adopt!r}")
        if not (self.outer_lr > 0 and 0 <= self.outer_momentum < 1):
            raise ConfigError(
                f"outer_lr/outer_momentum: need lr > 0 and momentum in [0, 1), got "
                f"{self.outer_lr!r}, {self.outer_momentum!r}"
            )
        for key in ("max_pending_pushes", "max_buffered_versions", "sync_timeout_s",
                    "snapshot_timeout_s", "retry_interval_s"):  # fmt: skip
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)!r}")
        if self.max_retry_interval_s < self.retry_interval_s:
            raise ConfigError("max_retry_interval_s: must be >= retry_interval_s")
        get_codec(self.codec, **self.codec_params)  # ConfigError for a bad codec
        d = self.ef_decay
        if d is not None and not is_valid_decay(d):
            raise ConfigError(f"ef_decay: must be in (0, 1] (1: no decay), got {d!r}")
        if self.auto:
            self._validate_auto()
        self._validate_fragments()

    def _validate_fragments(self) -> None:
        f = self.fragments
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise ConfigError(f"fragments: a whole number >= 1 (1: no fragments), got {f!r}")
        if f == 1:
            return
        if self.every_s is not None:
            raise ConfigError(
                f"fragments: streamed fragments push on a stagger of inner steps; set every "
                f"(inner steps per round) instead of every_s (got every_s={self.every_s!r})"
            )
        if self.auto:
            raise ConfigError(
                "fragments: not with auto (auto re-sizes each fragment's rounds on its own, "
                "which breaks the stagger, and the fragments share one uplink it would measure "
                "as theirs); set every and codec by hand"
            )
        if self.every < f:
            raise ConfigError(
                f"fragments: every ({self.every}) must be at least fragments ({f}): fragment "
                f"p pushes every/fragments * (p + 1) steps into the run"
            )

    def _validate_auto(self) -> None:
        ladder = self.auto_codecs
        if not isinstance(ladder, list | tuple) or not ladder:
            raise ConfigError(
                f"auto_codecs: a list of codec names, least compressed first (e.g. "
                f'["int8", "int4"]), got {ladder!r}'
            )
        if len(set(ladder)) != len(ladder):
            raise ConfigError(f"auto_codecs: a codec is named twice in {ladder!r}")
        for name in ladder:
            get_codec(name)  # ConfigError naming it
        if not (math.isfinite(self.auto_target) and self.auto_target > 0):
            raise ConfigError(f"auto_target: must be a positive number, got {self.auto_target!r}")
        if not (math.isfinite(self.auto_max_factor) and self.auto_max_factor >= 1):
            raise ConfigError(f"auto_max_factor: must be >= 1, got {self.auto_max_factor!r}")

    def _validate_round_size(self) -> None:
        if self.every is not None and self.every_s is not None:
            raise ConfigError(
                f"every_s: set either every (inner steps per round) or every_s (seconds of "
                f"compute per round), not both; got every={self.every!r}, "
                f"every_s={self.every_s!r}"
            )
        if self.every_s is not None:
            if not (math.isfinite(self.every_s) and self.every_s > 0):
                raise ConfigError(
                    f"every_s: must be a positive number of seconds, got {self.every_s!r}"
                )
        elif not self.every > 0:
            raise ConfigError(f"every: must be positive, got {self.every!r}")

    @property
    def error_feedback_decay(self) -> float:
        """``ef_decay``, or its default for ``codec``: 0.95 for a sparse codec, else 1."""
        return feedback_decay(self.codec, self.ef_decay)

    @property
    def by_time(self) -> bool:
        """True when rounds are sized in seconds of compute (``every_s``)."""
        return self.every_s is not None


@dataclass
class SyncStats:
    """Counters for the status page and metrics."""

    pushes_submitted: int = 0
    pushes_accepted: int = 0
    pushes_replayed: int = 0
    pushes_stale: int = 0
    pushes_rejected: int = 0
    pushes_dropped: int = 0
    pushes_pending: int = 0  # gauge: queued now, waiting or in flight
    push_link_failures: int = 0  # push attempts that failed for a link reason (then retried)
    steps_lost: int = 0  # inner steps of stale, rejected or dropped deltas
    versions_received: int = 0
    versions_refused: int = 0  # bad signature, malformed, wrong model
    version_gaps: int = 0  # skipped versions seen on the stream, or evicted from the buffer
    subscription_restarts: int = 0
    snapshots_fetched: int = 0
    snapshots_refused: int = 0  # malformed, badly signed, or not the island's model
    newest_version: int = -1
    last_staleness: int = -1  # of the last accepted push
    last_weight: float = 0.0
    last_v_now: int = -1
    bytes_sent: int = 0
    bytes_received: int = 0
    blocked_s: float = 0.0  # training-thread time spent waiting on the network
    uplink_bps: float = 0.0  # measured: bits of the last accepted pushes over their seconds
    codec: str = ""  # the codec of the last push
    round_plan: dict | None = None  # auto: the last RoundPlan (island.sync.auto), as a dict
