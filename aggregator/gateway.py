"""The gateway's admission checks: what must hold before an update is logged and acknowledged.

``admit`` takes the raw bytes of one pushed envelope and either returns an ``Admitted``
update (a one-update ``PartialAggregate`` for an island's delta, the child's aggregate for a
child aggregator's partial) or raises the ``comms.errors.RejectedError`` that names what is
wrong. In order, cheapest first:

1. size (``OversizeError``, before anything is parsed), framing, protocol version, digest;
2. kind (``delta`` from an island, ``partial`` from a child aggregator) and a served model;
3. signature against the roster, in the role the kind needs; an island delta to a model
   with an expert group from an island outside it (``GroupError``, :mod:`aggregator.groups`);
4. replay: the sender's sequence must be above the last one accepted;
5. names, shapes and dtypes against the model's manifest;
6. staleness ``s = v_now - base_version`` within the bound (FedBuff, Nguyen et al. 2022);
7. every decoded value finite;
8. an island delta's L2 norm against the bound (:mod:`aggregator.norm_bound`; ``clip``
   "adaptive" by default, "static" with ``clip_norm``, or "off"): above it the delta's data is
   scaled to the bound (its weight is not) or, with ``clip_action = "reject"``, refused
   (``NormBoundError``). Child partials are sums of updates bounded at their leaf.
9. with a ``reference`` (the line's last published ``u_v``, :mod:`aggregator.direction`), an
   island delta's agreement, its cosine with ``-u_v``, is measured and returned; the service
   refuses one below ``direction_min_cos`` (``DirectionError``) under the line's lock.

The weight is computed here (``staleness_fn(s)``, times the update's tokens, a number in
[0, 2**53], when weighting by samples) and logged with the update in the WAL together with the
delta's norm and clip scale, so a replay after a crash rebuilds the very same weighted sum
``sum_i w_i s_i x_i / sum_i w_i`` without deciding anything again. A record written before the
scale was logged replays with scale 1, or through ``clip_norm`` when the policy is static (as
such records were first merged). Pure apart from CPU work; the service runs it in a worker
thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import msgpack
import numpy as np

from aggregator.direction import Reference, agreement, dot, update_dot
from aggregator.groups import group_refusal
from aggregator.merge import PartialAggregate, accumulate, merge_into, scale_tensor
from aggregator.norm_bound import clipped_norm
from aggregator.robust import clip_scale, sum_of_squares, update_norm
from aggregator.staleness import StalenessFunction, staleness
from comms.codecs import codec_from_spec
from comms.envelope import Envelope
from comms.errors import (
    ConfigError,
    GroupError,
    MalformedError,
    NonFiniteError,
    NormBoundError,
    NotFoundError,
    StaleError,
)
from comms.identity import ReplayGuard, Roster
from comms.update import Manifest, decode_update, expected_nbytes

ROLES_FOR_KIND = {"delta": ("island", "admin"), "partial": ("aggregator",)}
MAX_TOKENS = 2**53  # the largest integer a float holds exactly; weights stay finite float32
_F32_MAX = float(np.finfo(np.float32).max)


CLIP_MODES = ("adaptive", "static", "off")


class WalHead(NamedTuple):
    """The admission figures logged before an update's bytes in its WAL record."""

    staleness: int
    weight: float
    norm: float | None = None  # a delta's L2 norm as decoded (None: not measured)
    scale: float | None = None  # the factor its data was scaled by (None: a record from before)


@dataclass
class Admitted:
    """An update that passed every check: an island's delta or a child's partial aggregate."""

    envelope: Envelope
    staleness: int
    weight: float
    delta: dict[str, np.ndarray] | None = None  # kind "delta": decoded (and clipped) arrays
    partial: PartialAggregate | None = None  # kind "partial": the child's aggregate
    norm: float | None = None  # kind "delta": its L2 norm before clipping, when measured
    scale: float = 1.0  # kind "delta": min(1, bound / norm), applied to its data (not weight)
    bound: float | None = None  # the bound it was checked against (None: unbounded or replay)
    agreement: float | None = None  # kind "delta": cosine with -u_v (None: not scored)
    reference_version: int | None = None  # the v of that u_v
    work: float = 1.0  # kind "delta": its share of a full round (update_work)

    @property
    def clipped(self) -> bool:
        return self.scale < 1.0

    @property
    def window_norm(self) -> float | None:
        """What enters the norm window: the clipped norm ``norm * scale`` (None: no norm)."""
        return None if self.norm is None else clipped_norm(self.norm, self.scale)

    def merge_into(self, buffer: PartialAggregate) -> None:
        """Add this update to ``buffer`` (weighted; duplicates refused by ReplayError)."""
        if self.partial is not None:
            merge_into(buffer, self.partial)
        else:
            uid = (self.sender, self.sequence)
            accumulate(buffer, self.delta, self.weight, update_id=uid, staleness=self.staleness,
                       work=self.work)  # fmt: skip

    def pool_event(self, where: tuple[str, int, int]):
        """The merge pool's event for this delta, whose envelope lies at ``where`` = (path,
        offset, length) on disk (its WAL record): the workers read and decode it there."""
        from aggregator.pool import FileRef, MergeEvent

        uid = (self.sender, self.sequence)
        return MergeEvent(FileRef(*where), self.weight, uid, self.staleness, self.scale, self.work)

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
    clip_norm: float | None = None  # the bound of clip "static"
    weight_by_samples: bool = False
    max_bytes: int = 1 << 30
    # "adaptive": the caller passes each delta's bound to admit(); "static": clip_norm;
    # "off": no bound. None: "static" when clip_norm is given, else "off".
    clip: str | None = None
    clip_action: str = "clip"  # "clip": scale to the bound; "reject": NormBoundError
    # expert groups (aggregator.groups.members_by_model): model id -> the islands that train it
    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def __post_init__(self):
        if self.clip is None:
            self.clip = "static" if self.clip_norm is not None else "off"
        if self.clip not in CLIP_MODES or self.clip_action not in ("clip", "reject"):
            raise ValueError(f"clip {self.clip!r} / clip_action {self.clip_action!r}: unknown")
        if self.clip == "static" and not (self.clip_norm and self.clip_norm > 0):
            raise ValueError(f"clip 'static' needs a positive clip_norm, got {self.clip_norm!r}")


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
    work = meta.get("work", count)  # a child from before work was counted: whole rounds
    if not (isinstance(work, int | float) and 0 < work <= count):
        raise MalformedError(
            f"partial aggregate from {env.header.sender}: work {work!r} must be in (0, count "
            f"{count}]"
        )
    return PartialAggregate(weight_sum, arrays, count, max_staleness, contributors,
                            work=float(work))  # fmt: skip


def update_work(meta: dict) -> float:
    """An island delta's share of a full round: ``min(1, steps / every)`` from its meta (the
    inner steps it holds, the island's steps per round), 1 when either is missing or not a
    positive integer (an island that does not say, or a round not counted in steps)."""
    steps, every = meta.get("steps"), meta.get("every")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (steps, every)):
        return 1.0
    return min(1.0, steps / every)


def admit(
    data: bytes | memoryview,
    *,
    policy: AdmissionPolicy,
    manifests: Callable[[str], Manifest | None],
    v_now: Callable[[str], int],
    guard: ReplayGuard,
    logged: WalHead | None = None,
    decode: bool = True,
    clip_bound: float | None = None,
    reference: Reference | None = None,
) -> Admitted:
    """Check one pushed envelope; raise the typed rejection or return what to merge.

    ``logged`` (a WAL record's head) replays a record with the figures it was first admitted
    with: weight, and a delta's norm and clip scale; the replay guard, the staleness bound and
    the norm bound are not consulted again then. ``clip_bound`` is the bound of an island delta
    when the policy is "adaptive" (the service keeps one :class:`~aggregator.norm_bound.NormBound`
    per model; None: no bound yet). With ``decode=False`` a delta is only validated
    (``Codec.validate``: the same refusals, without building the arrays) or, when its norm is
    needed, decoded one tensor at a time for it; ``Admitted.delta`` is None and merge workers
    decode it, scaled by ``Admitted.scale``. ``reference`` (a fresh island delta only): its
    agreement with ``-u_v`` is measured into ``Admitted.agreement``; the caller decides.
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
    entry = env.verify(policy.roster, roles=roles)
    if logged is None:
        if h.kind == "delta" and entry.role == "island" and policy.groups:
            refusal = group_refusal(policy.groups, h.model_id, entry.name or h.sender)
            if refusal:
                raise GroupError(refusal)
        guard.check(replay_key(h.model_id, h.sender), h.sequence)
    if h.kind == "partial":
        return _admit_partial(env, decode_update(env, manifest), policy, v_now, logged)
    bound = None
    if logged is not None:
        s, weight = logged.staleness, logged.weight
    else:
        s, weight = _delta_weight(env, policy, v_now)
        bound = clip_bound if policy.clip == "adaptive" else policy.clip_norm
    measure = policy.clip != "off" and (logged is None or logged.scale is None)
    score = reference is not None and logged is None
    udot = None
    if decode:
        arrays = decode_update(env, manifest, sparse=True)
        norm = update_norm(arrays) if measure or score else None
        udot = update_dot(arrays, reference) if score else None
    elif measure or score:
        arrays = None
        norm, udot = encoded_norm_dot(env, manifest, reference if score else None)
    else:
        arrays, norm = None, None
        validate_update(env, manifest)
    cos = agreement(udot, norm, reference.norm) if score else None
    if logged is not None:
        scale, norm = _logged_scale(logged, policy, norm)
    else:
        scale = 1.0 if bound is None or norm is None else clip_scale(norm, bound)
        if scale < 1.0 and policy.clip_action == "reject":
            raise NormBoundError(
                f"delta from {h.sender} (sequence {h.sequence}) to model {h.model_id!r} has L2 "
                f"norm {norm:.6g}, above this aggregator's bound {bound:.6g}: refused "
                f"(clip_action = 'reject'); an honest island sends updates near the median of "
                f"recent ones, so check its learning rate, data and code"
            )
    if arrays is not None and scale != 1.0:
        arrays = scale_update(arrays, scale)
    return Admitted(
        env, s, weight, delta=arrays, norm=norm, scale=scale, bound=bound, agreement=cos,
        reference_version=reference.version if score else None, work=update_work(h.meta),
    )  # fmt: skip


def _admit_partial(env, arrays, policy, v_now, logged) -> Admitted:
    h = env.header
    partial = _partial_from_child(env, arrays)
    s = logged.staleness if logged else staleness(h.base_version, v_now(h.model_id))
    if logged is None and policy.max_staleness is not None and s > policy.max_staleness:
        raise StaleError(
            f"partial from {h.sender} is based on version {h.base_version}, {s} behind "
            f"the current {v_now(h.model_id)} (bound {policy.max_staleness})"
        )
    return Admitted(env, s, partial.weight_sum, partial=partial)


def _delta_weight(env: Envelope, policy: AdmissionPolicy, v_now) -> tuple[int, float]:
    """A fresh delta's staleness (refused beyond the bound) and merge weight."""
    h = env.header
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
    return s, weight


def _logged_scale(logged: WalHead, policy: AdmissionPolicy, norm: float | None):
    """(scale, norm) of a replayed delta: as logged; a record from before scales were logged
    was clipped only by a static ``clip_norm``, recomputed here as it was then."""
    if logged.scale is not None:
        return logged.scale, logged.norm
    if policy.clip == "static" and norm is not None:
        return clip_scale(norm, policy.clip_norm), norm
    return 1.0, norm


def scale_update(delta: Mapping[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """``scale * delta`` as new float32 arrays (the scale rounded to float32 once, as the merge
    workers apply it), the data of a clipped update."""
    s = np.float32(scale)
    return {name: scale_tensor(x, s) for name, x in delta.items()}


def encoded_norm(env: Envelope, manifest: Manifest) -> float:
    """The L2 norm of an envelope's decoded tensors, decoding one tensor at a time (what
    ``decode_update`` refuses is refused here too); memory: one tensor, not the update."""
    return encoded_norm_dot(env, manifest)[0]


def encoded_norm_dot(
    env: Envelope, manifest: Manifest, reference: Reference | None = None
) -> tuple[float, float | None]:
    """``(||x||, <x, u_v>)`` of an envelope's decoded tensors ``x``, one tensor at a time
    (the dot None without a ``reference``), as :func:`encoded_norm`."""
    manifest.check(env.header.tensors, env.header.model_id)
    total, udot = 0.0, (None if reference is None else 0.0)
    for spec, payload in env.tensors():
        try:
            codec = codec_from_spec(spec.codec)
        except ConfigError as e:
            raise MalformedError(f"tensor {spec.name!r}: {e}") from e
        x = codec.decode_sparse(payload, tuple(spec.shape))
        if x is None:
            x = codec.decode(payload, tuple(spec.shape))
        total += sum_of_squares(x)
        if not math.isfinite(total):  # codecs refuse NaN/Inf already; never let one through
            raise NonFiniteError(f"tensor {spec.name!r} decodes to non-finite values")
        if reference is not None:
            udot += dot(x, reference.update[spec.name])
    return math.sqrt(total), udot


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
    """The WAL body of an admitted update: its admission figures (staleness ``s``, weight
    ``w``; for a delta its clip scale ``k`` and, when measured, its norm ``n``), then its exact
    bytes."""
    head = {"s": admitted.staleness, "w": admitted.weight}
    if admitted.partial is None:
        head["k"] = admitted.scale
        if admitted.norm is not None:
            head["n"] = admitted.norm
    packed = msgpack.packb(head)
    return len(packed).to_bytes(4, "big") + packed + bytes(data)


def parse_wal_record(body: bytes | memoryview) -> tuple[WalHead, memoryview]:
    """``(WalHead, envelope bytes)`` of a WAL body written by ``wal_record`` (a head without
    ``n`` or ``k``, from before they were logged, reads as None there);
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
    norm, scale = head.get("n"), head.get("k")
    if norm is not None and not (type(norm) in (int, float) and 0 <= norm < math.inf):
        raise MalformedError(f"WAL record head: norm must be a finite number >= 0, got {norm!r}")
    if scale is not None and not (type(scale) in (int, float) and 0 <= scale <= 1):
        raise MalformedError(f"WAL record head: clip scale must be in [0, 1], got {scale!r}")
    norm = None if norm is None else float(norm)
    return WalHead(s, float(w), norm, None if scale is None else float(scale)), view[4 + n :]


def _tokens(env: Envelope) -> float:
    """The ``tokens`` an update's meta declares (1 when absent), for weighting by samples."""
    tokens = env.header.meta.get("tokens", 1)
    if type(tokens) not in (int, float) or not 0 <= tokens <= MAX_TOKENS:
        raise MalformedError(
            f"delta from {env.header.sender} (sequence {env.header.sequence}): meta 'tokens' "
            f"must be a number in [0, 2**53], got {tokens!r}"
        )
    return float(tokens)
