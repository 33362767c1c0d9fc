"""The root's model line: outer step, versions, and bit-identical replicas.

At each flush the root turns the merged pseudo-gradient into a new version (DiLoCo,
Douillard et al. 2023, Algorithm 1, outer loop; CO2, Sun et al. 2024)::

    g      = sum_i w_i delta_i / sum_i w_i          (aggregator.merge.finalize)
    f      = min(1, work / buffer_k)                (step_fraction; 1 with partial_step "full")
    u_v    = outer.step(theta_{v-1}, g, f)          (Nesterov SGD by default; momentum
                                                      deferred while f falls short of 1)
    wire   = encode(u_v)                            (the configured codec)
    theta_v = theta_{v-1} + decode(wire)            (aggregator.outer.apply_update)

A version merging less island work than ``buffer_k`` full rounds takes that share of an outer
step (aggregator.outer, "A partial step"): ``work`` counts each island update as
``min(1, steps / every)`` of a round (its meta), so a deadline flush or a slow island's lone
short last round does not move the model by a full step of momentum; by default
(``partial_step = "deferred"``) it moves it by none, the momentum waiting until versions
adding up to a full step have arrived.

A merge or outer step that is not finite (a float32 overflow of large-but-finite updates)
raises :class:`~aggregator.merge.NonFiniteMergeError`: a non-finite ``u_v`` or ``theta_v`` is
never published. The step may already have moved the optimizer's state (or theta, for a
``theta_v`` that overflows); the caller restores the saved state.

The root applies ``decode(encode(u_v))``, not ``u_v``: every replica (a leaf's cache, an
island's anchor) applies the very same bytes in the same float32 order and so holds exactly
the bits of ``theta_v``. The codec's error is not lost either: the root keeps it in an
error-feedback residual that joins the next ``u``.

Pure computation on numpy arrays; the service persists and publishes what it returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aggregator.merge import PartialAggregate, check_finite, finalize
from aggregator.outer import OuterOptimizer, apply_update
from comms.codecs import Codec, ErrorFeedback
from comms.identity import Identity
from comms.update import Manifest, decode_update, encode_update


@dataclass
class NewVersion:
    version: int
    envelope: bytes  # the signed u_v exactly as published
    update_norm: float
    count: int
    weight_sum: float
    max_staleness: int
    applied: dict[str, np.ndarray] | None = None
    fraction: float = 1.0  # the share of a full outer step it took (step_fraction)  # decode(encode(u_v)), as replicas apply it


def step_fraction(work: float, buffer_k: int | None) -> float:
    """The share of a full outer step a version merging ``work`` rounds of island work (each
    update ``min(1, steps / every)``) stands for: ``work / buffer_k``, at most 1
    (``buffer_k`` None: always 1)."""
    if buffer_k is None or work >= buffer_k:
        return 1.0
    if not work > 0:
        raise ValueError(f"a version merges some island work, got {work}")
    return work / buffer_k


class RootModel:
    """``theta_v``, the outer optimizer and the version counter of one ``model_id``."""

    def __init__(
        self,
        model_id: str,
        theta: Mapping[str, np.ndarray],
        outer: OuterOptimizer,
        codec: Codec,
        identity: Identity,
        version: int = 0,
        buffer_k: int | None = None,
        defer: bool = False,
        ef_decay: float = 1.0,
    ):
        """``buffer_k``: the updates a full version merges; a version of fewer takes that
        share of an outer step (None: every version a full step, "partial_step = full").
        ``defer``: such a version's momentum waits for a full step's share (aggregator.outer,
        "Deferred momentum"; "partial_step = deferred"). ``ef_decay``: the decay of the
        residual the publish codec leaves (``comms.codecs.ErrorFeedback``)."""
        self.model_id = model_id
        self.buffer_k = buffer_k
        self.defer = defer
        self.theta = {k: np.array(v, dtype=np.float32, order="C") for k, v in theta.items()}
        self.manifest = Manifest.from_arrays(self.theta)
        self.outer = outer
        self.codec = codec
        self.identity = identity
        self.version = version
        self.residual = ErrorFeedback(ef_decay)

    def step(self, partial: PartialAggregate) -> NewVersion:
        """Apply the outer step for one flushed aggregate; returns the published version."""
        g = finalize(partial)  # NonFiniteMergeError before any state moves
        fraction = step_fraction(partial.work, self.buffer_k)
        u = self.outer.step(self.theta, g, fraction, defer=self.defer)
        check_finite(u, f"the outer step to version {self.version + 1}")
        env = encode_update(
            u,
            codec=self.codec,
            model_id=self.model_id,
            kind="version",
            sender=self.identity.peer_id,
            sequence=self.version + 1,
            base_version=self.version,
            meta={
                "count": partial.count,
                "weight_sum": float(partial.weight_sum),
                "max_staleness": int(partial.max_staleness),
                "work": float(partial.work),
                "fraction": fraction,
                # which island updates this version holds: an island that applied its own
                # in-flight delta locally (eager rebase) drops it once it is in a version
                "contributors": sorted([s, q] for s, q in partial.contributors),
            },
            error_feedback=self.residual,
            identity=self.identity,
        )
        applied = decode_update(env)
        apply_update(self.theta, applied)
        check_finite(self.theta, f"theta at version {self.version + 1}")
        self.version += 1
        norm = float(np.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in applied.values())))
        return NewVersion(
            self.version,
            env.to_bytes(),
            norm,
            partial.count,
            float(partial.weight_sum),
            int(partial.max_staleness),
            applied,
            fraction,
        )

    # ---------------------------------------------------------------- persistence

    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {f"theta/{k}": v for k, v in self.theta.items()}
        out.update({f"outer/{k}": np.asarray(v) for k, v in self.outer.state_dict().items()})
        out.update({f"residual/{k}": v for k, v in self.residual.residuals().items()})
        return out

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray], version: int) -> None:
        theta = {k[6:]: v for k, v in arrays.items() if k.startswith("theta/")}
        if Manifest.from_arrays(theta).tensors != self.manifest.tensors:
            raise ValueError(f"saved state of {self.model_id!r} does not match its manifest")
        self.theta = {k: np.array(v, dtype=np.float32) for k, v in theta.items()}
        self.outer.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("outer/")})
        self.residual.load_residuals(
            {k[9:]: v for k, v in arrays.items() if k.startswith("residual/")}
        )
        self.version = version


def snapshot_envelope(
    model_id: str, theta: Mapping[str, np.ndarray], version: int, identity: Identity
) -> bytes:
    env = encode_update(
        theta,
        codec="none",
        model_id=model_id,
        kind="snapshot",
        sender=identity.peer_id,
        sequence=version,
        base_version=version,
        identity=identity,
    )
    return env.to_bytes()
