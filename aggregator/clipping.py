"""The service's side of the norm bound on island updates (:mod:`aggregator.norm_bound`).

Per model line, with ``merge.clip = "adaptive"`` (the default): before an island's delta is
admitted, the line's :class:`~aggregator.norm_bound.NormBound` gives its bound (in warm-up from
``||theta||``, computed once per version under the line's lock); the gateway measures the
delta's norm and clips (or refuses) it; once its WAL record is written the clipped norm enters
the window, and a clip is counted (``archipelago_updates_clipped{model_id, reason}``) and
logged with sender, norm and bound. The window goes into the root's saved state and a leaf's
flush notes, and a restart rebuilds it from there and from the replayed records' logged norms,
so a restarted aggregator bounds the next update exactly as it would have. Child partials
(kind ``partial``) are sums of updates already bounded at their leaf and are not bounded again.
"""

from __future__ import annotations

import asyncio
import logging

from aggregator.gateway import Admitted
from aggregator.lines import ModelLine
from aggregator.norm_bound import NormBound
from aggregator.robust import update_norm
from comms.errors import NormBoundError, RejectedError

log = logging.getLogger("aggregator.service")  # one log for all the service's parts


class NormClipping:
    """The norm bound of :class:`~aggregator.service.AggregatorService`'s model lines.

    Uses the service's ``config``, ``policy`` and ``metrics``.
    """

    def _new_norm_bound(self) -> NormBound | None:
        m = self.config.merge
        if m.clip_mode != "adaptive":
            return None
        return NormBound(m.clip_factor, m.clip_window, m.clip_min_count, m.clip_warmup_ratio)

    def _log_clip_mode(self) -> None:
        m = self.config.merge
        if m.clip_mode == "off":
            log.warning(
                '%s: merge.clip = "off": island updates are merged with any norm; one island '
                'can move the model arbitrarily far (set clip = "adaptive", the default)',
                self.config.name,
            )
        elif m.clip_mode == "static":
            log.info("%s: island updates clipped to L2 norm %g", self.config.name, m.clip_norm)

    async def _clip_bound(self, line: ModelLine, kind: str) -> float | None:
        """The bound for an island delta pushed now (None: not adaptive, or nothing known)."""
        nb = line.norm_bound
        if kind != "delta" or nb is None:
            return None
        theta_norm = await self._theta_norm(line) if nb.needs_theta else None
        return nb.bound(theta_norm)

    async def _theta_norm(self, line: ModelLine) -> float:
        """``||theta||`` of the line's current version (cached per version)."""
        async with line.lock:  # theta changes in place under the lock (outer step, u_v)
            if line.theta_norm is None or line.theta_norm[0] != line.version:
                norm = await asyncio.to_thread(update_norm, line.theta)
                line.theta_norm = (line.version, norm)
            return line.theta_norm[1]

    def _clip_reason(self, line: ModelLine) -> str:
        if self.policy.clip == "static":
            return "clip_norm"
        return "warmup" if line.norm_bound is None or line.norm_bound.warming_up else "norm_bound"

    def _observe_admitted(self, line: ModelLine, admitted: Admitted, replay: bool = False) -> None:
        """After the WAL append (lock held): the clipped norm into the window; count and log
        a clip. A replayed record only rebuilds the window."""
        nb, norm = line.norm_bound, admitted.window_norm
        if nb is None or norm is None:
            return
        if not replay:
            median = nb.median()
            if median:
                self.metrics.norm_ratio.observe(admitted.norm / median)
            if admitted.clipped:
                self._count_clip(line, admitted)
        nb.observe(norm)
        bound = nb.bound(line.theta_norm[1] if line.theta_norm else None)
        if bound is not None:
            self.metrics.norm_bound.labels(line.model_id).set(bound)

    def _count_clip(self, line: ModelLine, admitted: Admitted) -> None:
        reason = self._clip_reason(line)
        line.clipped += 1
        self.metrics.clipped.labels(line.model_id, reason).inc()
        log.warning(
            "%s: clipped the delta of %s (sequence %d) to model %s: L2 norm %.6g above the "
            "bound %.6g (%s), data scaled by %.3g",
            self.config.name, admitted.sender, admitted.sequence, line.model_id, admitted.norm,
            admitted.bound, reason, admitted.scale,
        )  # fmt: skip

    def _count_rejection(self, line: ModelLine | None, error: RejectedError) -> None:
        if line is not None and isinstance(error, NormBoundError):
            line.norm_rejected += 1

    def _clip_status(self, line: ModelLine) -> dict:
        """The line's bound for ``/status``."""
        out = {
            "mode": self.config.merge.clip_mode,
            "action": self.config.merge.clip_action,
            "clipped": line.clipped,
            "rejected": line.norm_rejected,
        }
        nb = line.norm_bound
        if nb is not None:
            out["window"] = len(nb)
            out["median"] = nb.median()
            out["warming_up"] = nb.warming_up
            out["bound"] = nb.bound(line.theta_norm[1] if line.theta_norm else None)
        elif self.config.merge.clip_mode == "static":
            out["bound"] = self.config.merge.clip_norm
        return out
