"""The service's side of the direction check on island updates (:mod:`aggregator.direction`).

Per model line, with ``merge.direction = "reject"`` (the default): the line keeps its last
published ``u_v`` as the reference (the root: from its outer step, and at start from its model
store; a leaf or mid: each version it adopts, and at start the current one, asked of its parent
by subscribing from its own version). The gateway scores an island delta against it; under the
line's lock, before the WAL append, a delta whose agreement is below ``direction_min_cos`` is
refused with ``DirectionError`` (counted ``archipelago_updates_opposed{model_id, decision}``
with ``decision="refused"``, and in ``archipelago_updates_rejected{reason="direction"}``), at
most :func:`~aggregator.direction.max_refusals` per version; past that it is admitted
(``decision="over_cap"``) and logged. Refused updates never reach the WAL and admitted ones
merge unchanged, so a replay re-merges the same sum whatever the config says then. The
per-version refusal count lives in memory: a restart may refuse up to the cap again in the
version it restarted at. Child partials are not scored (their islands were, at their leaf).
"""

from __future__ import annotations

import logging

from aggregator.direction import (
    Reference,
    decide,
    max_refusals,
    quantiles,
    reference_from_update,
)
from aggregator.gateway import Admitted
from aggregator.lines import ModelLine
from comms.envelope import Envelope
from comms.errors import DirectionError
from comms.update import decode_update

log = logging.getLogger("aggregator.service")  # one log for all the service's parts


class DirectionChecking:
    """The direction check of :class:`~aggregator.service.AggregatorService`'s model lines.

    Uses the service's ``config`` and ``metrics``.
    """

    @property
    def _direction_on(self) -> bool:
        return self.config.merge.direction == "reject"

    def _log_direction_mode(self) -> None:
        if not self._direction_on:
            log.warning(
                '%s: merge.direction = "off": island updates pointing against the last merged '
                "step are merged; one island can reverse its share of every step (set "
                'direction = "reject", the default)',
                self.config.name,
            )

    def _reference(self, line: ModelLine, kind: str) -> Reference | None:
        """What the gateway scores a delta pushed now against (None: no check)."""
        if kind != "delta" or not self._direction_on:
            return None
        ref = line.reference
        return ref if ref is not None and ref.version == line.version else None

    def _set_reference(self, line: ModelLine, version: int, update) -> None:
        """Keep ``u_v`` of ``version`` as the line's reference (in a worker thread)."""
        if self._direction_on and version >= 1:
            line.reference = reference_from_update(version, update)

    def _load_root_reference(self, line: ModelLine) -> None:
        """At a root's start: ``u_v`` of its current version, from its model store."""
        if not self._direction_on or line.version < 1:
            return
        data = line.store.get_version(line.version)
        env = Envelope.from_bytes(data, max_bytes=1 << 40)
        self._set_reference(line, line.version, decode_update(env, line.manifest))

    def _check_direction(self, line: ModelLine, admitted: Admitted) -> None:
        """Before the WAL append (lock held): refuse a delta against the last step, or count
        one admitted past the version's cap."""
        cos = admitted.agreement
        if cos is None:
            return
        self.metrics.agreement.observe(cos)
        line.agreements.append(cos)
        m = self.config.merge
        v = line.version
        refused = line.refused_at[1] if line.refused_at[0] == v else 0
        decision = decide(
            cos, m.direction_min_cos, refused, max_refusals(self.config.buffer_k(line.model_id))
        )
        if decision == "admit":
            return
        self.metrics.opposed.labels(line.model_id, decision).inc()
        if decision == "over_cap":
            line.direction_over_cap += 1
            log.warning(
                "%s: admitted the delta of %s (sequence %d) to model %s against the last step "
                "(cosine %.3f with -u_%d, below %g): version %d already refused %d",
                self.config.name, admitted.sender, admitted.sequence, line.model_id, cos,
                admitted.reference_version, m.direction_min_cos, v, refused,
            )  # fmt: skip
            return
        line.refused_at = (v, refused + 1)
        line.direction_refused += 1
        raise DirectionError(
            f"delta from {admitted.sender} (sequence {admitted.sequence}) to model "
            f"{line.model_id!r} points against the model's last merged step (cosine {cos:.3f} "
            f"with -u_{admitted.reference_version}, below this aggregator's "
            f"direction_min_cos {m.direction_min_cos:g}): refused; an honest island's update "
            "follows the recent steps, so check its sign convention (delta = anchor - params), "
            "data and code"
        )

    def _direction_status(self, line: ModelLine) -> dict:
        """The line's direction check for ``/status``."""
        m = self.config.merge
        ref = line.reference
        return {
            "mode": m.direction,
            "min_cos": m.direction_min_cos,
            "reference_version": ref.version if ref is not None else None,
            "refused": line.direction_refused,
            "over_cap": line.direction_over_cap,
            "agreement": quantiles(line.agreements),
        }
