"""The gateway's admission checks: what must hold before an update is logged and acknowledged.

``admit`` takes the raw bytes of one pushed envelope and either returns an ``Admitted``
update (a one-update ``PartialAggregate`` for an island's delta, the child's aggregate for a
child aggregator's partial) or raises the ``comms.errors.RejectedError`` that names what is
wrong. In order, cheapest first:

1. size (``OversizeError``, before anything is parsed), framing, protocol version, digest;
2. kind (``delta`` from an island, ``partial`` from a child aggregator) and a served model;
3. signature against the roster, in the role the kind needs;
4. replay: the sender's sequence must be above the last one accepted;
5. names, shapes and dtypes against the model's manifest;
6. staleness ``s = v_now - base_version`` within the bound (FedBuff, Nguyen et al. 2022);
7. every decoded value finite; optional per-update L2 clipping.

The weight is computed here (``staleness_fn(s)``, times the update's tokens, a number in
[0, 2**53], when weighting by samples) and logged with the update in the WAL, so a replay
after a crash rebuilds the very same weighted sum. Pure apart from CPU work; the service runs it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import numpy as np

from aggregator.merge import PartialAggregate, accumulate, merge_into
from aggregator.robust import clip_by_norm
from aggregator.staleness import StalenessFunction, staleness
from comms.codecs import codec_from_spec
from comms.envelope import Envelope
from comms.errors import ConfigError, MalformedError, NotFoundError, StaleError
from comms.identity import ReplayGuard, Roster
from comms.update import Manifest, decode_update, expected_nbytes

ROLES_FOR_KIND = {"delta": ("island", "admin"), "partial": ("aggregator",)}
MAX_TOKENS = 2**53  # the largest integer a float holds exactly; weights stay finite float32
_F32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Admitted:
    """An update that passed every check: an island's delta or a child's partial aggregate."""

    envelope: Envelope
    staleness: int
    weight: float
    delta: dict[str, np.ndarray] | None = None  # kind "delta": decoded (and clipped) arrays
    partial: PartialAggregate | None = None  # kind "partial": the child's aggregate

    def merge_into(self, buffer: PartialAggregate) -> None:
        """Add this update to ``buffer`` (weighted; duplicates refused by ReplayError)."""
        if self.partial is not None:
            merge_into(buffer, self.partial)
        else:
            uid = (self.sender, self.sequence)
            accumulate(buffer, self.delta, self.weight, update_id=uid, staleness=self.staleness)

    @property
    def sender(self) -> str:
        return self.envelope.header.sender

    @property
    def sequence(self) -> int:
        return self.envelope.header.sequence

    @property
    def replay_key(self) -> str:
        return replay_key(self.envelope.header.model_id, self.sender)


def replay_key(model_id: str, sender: str) -> str:
    """Sequences increase per sender *and model*: one island may train several models."""
    return f"{model_id}/{sender}"


@dataclass
class AdmissionPolicy:
    roster: Roster
    staleness_fn: StalenessFunction
    max_staleness: int | None = None
    clip_norm: float | None = None
    weight_by_samples: bool = False
    max_bytes: int = 1 << 30


def _partial_from_child(env: Envelope, arrays: dict[str, np.ndarray]) -> PartialAggregate:
    meta = env.header.meta
    try:
        weight_sum = float(meta["weight_sum"])
        count = int(meta["count"])
        max_staleness = int(meta["max_staleness"])
        contributors = {(str(s), int(q)) for s, q in meta.get("contributors", [])}
    except (KeyError, TypeError, ValueError) as e:
        raise MalformedError(f"partial aggregate from {env.header.sender}: bad meta ({e})") from e
    if not (weight_sum > 0 and np.isfinite(weight_sum)) or count < 1:
        raise MalformedError(
            f"partial aggregate from {env.header.sender}: weight_sum {weight_sum} and count "
            f"{count} must be positive"
        )
    return PartialAggregate(weight_sum, arrays, count, max_staleness, contributors)


def admit(
    data: bytes | memoryview,
    *,
    policy: AdmissionPolicy,
    manifests: Callable[[str], Manifest | None],
    v_now: Callable[[str], int],
    guard: ReplayGuard,
    logged_weight: tuple[int, float] | None = None,
    decode: bool = True,
) -> Admitted:
    """Check one pushed envelope; raise the typed rejection or return what to merge.

    ``logged_weight`` (staleness, weight) replays a WAL record with the weight it was first
    admitted with; the replay guard and the staleness bound are not consulted again then.
    With ``decode=False`` a delta is only validated (``Codec.validate``: the same refusals,
    without building the arrays) and ``Admitted.delta`` is None: merge workers decode it.
    """
    env = Envelope.from_bytes(data, max_bytes=policy.max_bytes, expected_nbytes=expected_nbytes)
    h = env.header
    roles = ROLES_FOR_KIND.get(h.kind)
    if roles is None:
        raise MalformedError(
            f"an aggregator accepts kinds {sorted(ROLES_FOR_KIND)}, not {h.kind!r}"
        )
    manifest = manifests(h.model_id)
    if manifest is None:
        raise NotFoundError(f"model {h.model_id!r} is not served here")
    env.verify(policy.roster, roles=roles)
    if logged_weight is None:
        guard.check(replay_key(h.model_id, h.sender), h.sequence)
    if not decode and h.kind == "delta" and policy.clip_norm is None:
        validate_update(env, manifest)
        arrays = None
    else:
        arrays = decode_update(env, manifest)
    if h.kind == "partial":
        partial = _partial_from_child(env, arrays)
        s = logged_weight[0] if logged_weight else staleness(h.base_version, v_now(h.model_id))
        if logged_weight is None and policy.max_staleness is not None and s > policy.max_staleness:
            raise StaleError(
                f"partial from {h.sender} is based on version {h.base_version}, {s} behind "
                f"the current {v_now(h.model_id)} (bound {policy.max_staleness})"
            )
        return Admitted(env, s, partial.weight_sum, partial=partial)
    if logged_weight is not None:
        s, weight = logged_weight
    else:
        now = v_now(h.model_id)
        s = staleness(h.base_version, now)
        if policy.max_staleness is not None and s > policy.max_staleness:
            raise StaleError(
                f"delta from {h.sender} (sequence {h.sequence}) is based on version "
                f"{h.base_version}, {s} versions behind the current {now}; the bound is "
                f"{policy.max_staleness}: it was dropped"
            )
        weight = policy.staleness_fn(s)
        if policy.weight_by_samples:
            weight *= max(1.0, _tokens(env))
    if policy.clip_norm is not None:
        arrays = clip_by_norm(arrays, policy.clip_norm)
    return Admitted(env, s, weight, delta=arrays)


def validate_update(env: Envelope, manifest: Manifest) -> None:
    """What ``decode_update`` refuses, checked without decoding (see ``Codec.validate``)."""
    manifest.check(env.header.tensors, env.header.model_id)
    for spec, payload in env.tensors():
        try:
            codec = codec_from_spec(spec.codec)
        except ConfigError as e:
            raise MalformedError(f"tensor {spec.name!r}: {e}") from e
        codec.validate(payload, tuple(spec.shape))


def wal_record(admitted: Admitted, data: bytes | memoryview) -> bytes:
    """The WAL body of an admitted update: its admission figures, then its exact bytes."""
    head = msgpack.packb({"s": admitted.staleness, "w": admitted.weight})
    return len(head).to_bytes(4, "big") + head + bytes(data)


def parse_wal_record(body: bytes | memoryview) -> tuple[tuple[int, float], memoryview]:
    """``((staleness, weight), envelope bytes)`` of a WAL body written by ``wal_record``;
    ``MalformedError`` naming what is wrong with a damaged one."""
    view = memoryview(body).cast("B")
    if len(view) < 4:
        raise MalformedError(f"WAL record of {len(view)} bytes lacks its 4-byte head length")
    n = int.from_bytes(view[:4], "big")
    if 4 + n > len(view):
        raise MalformedError(f"WAL record head declares {n} bytes; only {len(view) - 4} follow")
    try:
        head = msgpack.unpackb(view[4 : 4 + n])
    except Exception as e:  # msgpack raises an open set of types on damaged input
        raise MalformedError(f"WAL record head is not valid msgpack: {e}") from e
    s, w = (head.get("s"), head.get("w")) if isinstance(head, dict) else (None, None)
    if type(s) is not int or s < 0:
        raise MalformedError(f"WAL record head: staleness must be an int >= 0, got {s!r}")
    if type(w) not in (int, float) or not (0 < w <= _F32_MAX and np.float32(w) > 0):
        raise MalformedError(f"WAL record head: weight must be a positive float32, got {w!r}")
    return (s, float(w)), view[4 + n :]


def _tokens(env: Envelope) -> float:
    """The ``tokens`` an update's meta declares (1 when absent), for weighting by samples."""
    tokens = env.header.meta.get("tokens", 1)
    if type(tokens) not in (int, float) or not 0 <= tokens <= MAX_TOKENS:
        raise MalformedError(
            f"delta from {env.header.sender} (sequence {env.header.sequence}): meta 'tokens' "
            f"must be a number in [0, 2**53], got {tokens!r}"
        )
    return float(tokens)
