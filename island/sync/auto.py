"""Rounds sized to the island's link: the codec and round length an island picks for itself.

With ``[sync] auto = true`` an island measures its own uplink (bytes of each accepted push
over the seconds from its send to its acknowledgement) and its own inner step time, and before
each round picks, from the ladder ``auto_codecs`` (least compressed first), the first codec
whose push would take at most ``auto_target`` times the round's compute; a push that keeps up
with the compute never queues behind the next one, so the link stays off the critical path
(the condition Streaming DiLoCo and the Asynchronous Local-SGD line of work design for: the
transfer of one round hidden behind the compute of the next). When even the last codec of the
ladder is too slow, the round is lengthened until its compute covers that codec's push (an
island on a thin link syncs less often), never beyond ``auto_max_factor`` times its configured
length. The configured ``every`` / ``every_s`` is the floor: a fast link never shortens a
round.

Everything here is arithmetic on measured figures; :class:`~island.local_update.LocalUpdate`
applies a :class:`RoundPlan` at each boundary and the engine reports it in its stats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from comms.codecs import get_codec

ENVELOPE_OVERHEAD_BYTES = 1024  # header, signature and per-tensor specs, rounded up


@dataclass(frozen=True)
class RoundPlan:
    """What the next round uses, and why."""

    codec: str
    every: int | None  # inner steps per round (None: rounds sized in seconds)
    every_s: float | None  # seconds of compute per round (None: sized in steps)
    push_s: float  # the push's predicted seconds at the measured rate
    round_s: float  # the round's predicted compute seconds
    reason: str  # "fits" | "compressed" | "lengthened" | "capped"

    def as_dict(self) -> dict:
        return {
            "codec": self.codec,
            "every": self.every,
            "every_s": self.every_s,
            "push_s": round(self.push_s, 4),
            "round_s": round(self.round_s, 4),
            "reason": self.reason,
        }


def push_nbytes(codec: str, numels: Sequence[int], params: Mapping | None = None) -> int:
    """Bytes on the wire of one delta of tensors with ``numels`` elements under ``codec``."""
    c = get_codec(codec, **dict(params or {}))
    return ENVELOPE_OVERHEAD_BYTES + sum(c.encoded_nbytes(int(n)) for n in numels)


def plan_round(
    sizes: Mapping[str, int],
    rate_bps: float,
    step_s: float,
    *,
    every: int | None,
    every_s: float | None,
    target: float = 1.0,
    max_factor: float = 8.0,
) -> RoundPlan:
    """The codec and round length for a link of ``rate_bps`` and inner steps of ``step_s``.

    ``sizes``: the ladder, codec name -> bytes of one push (least compressed first; dict
    order). ``every`` or ``every_s``: the configured round (exactly one set), also the floor.
    A push fits when ``push_s <= target * round_s``.
    """
    if (every is None) == (every_s is None):
        raise ValueError("give exactly one of every and every_s")
    if not sizes:
        raise ValueError("the codec ladder is empty")
    if not (rate_bps > 0 and math.isfinite(rate_bps)):
        raise ValueError(f"rate_bps must be a positive number, got {rate_bps!r}")
    if not (step_s > 0 and math.isfinite(step_s)):
        raise ValueError(f"step_s must be a positive number, got {step_s!r}")
    if not (target > 0 and max_factor >= 1):
        raise ValueError(f"need target > 0 and max_factor >= 1, got {target!r}, {max_factor!r}")
    round_s = every * step_s if every is not None else float(every_s)
    push = {name: 8.0 * nbytes / rate_bps for name, nbytes in sizes.items()}
    first = next(iter(sizes))
    for name, seconds in push.items():
        if seconds <= target * round_s:
            reason = "fits" if name == first else "compressed"
            return RoundPlan(name, every, every_s, seconds, round_s, reason)
    last = list(sizes)[-1]
    need_s = push[last] / target  # compute that covers the most compressed push
    cap_s = max_factor * round_s
    reason = "lengthened" if need_s <= cap_s else "capped"
    new_s = min(need_s, cap_s)
    if every is not None:
        steps = min(math.ceil(new_s / step_s), math.floor(max_factor * every))
        return RoundPlan(last, max(every, steps), None, push[last], max(every, steps) * step_s,
                         reason)  # fmt: skip
    return RoundPlan(last, None, new_s, push[last], new_s, reason)


class UplinkEstimate:
    """The uplink rate from measured pushes: bits over seconds of the last ``window`` pushes
    together (a long push weighs by its length; one slow ack does not swing it)."""

    def __init__(self, window: int = 4):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._samples: list[tuple[int, float]] = []

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0 and math.isfinite(seconds):
            self._samples = [*self._samples, (int(nbytes), float(seconds))][-self.window :]

    @property
    def rate_bps(self) -> float | None:
        if not self._samples:
            return None
        return 8.0 * sum(b for b, _ in self._samples) / sum(s for _, s in self._samples)
