"""Staleness of an update and the weight it gets in a merge.

An island trains from global version ``b`` (its *base version*) and pushes its delta while the
root has moved on to version ``v_now``. The update's staleness is ``s = v_now - b`` (an integer,
0 for a fresh update). A negative staleness means the sender claims a base version the root has
not published yet: a bug or a forgery, refused with :class:`FutureBaseVersionError`.

Weighting functions (pure; ``s`` is an int >= 0, the result a float in (0, 1]):

- ``fedbuff``: ``1 / sqrt(1 + s)``, the default. FedBuff (Nguyen et al., AISTATS 2022,
  "Federated Learning with Buffered Asynchronous Aggregation", Algorithm 1) scales each client
  update by this factor before it enters the buffer.
- ``polynomial``: ``(1 + s) ** -a`` with ``a > 0`` (default 0.5, which equals ``fedbuff``).
  FedAsync (Xie et al., 2019, "Asynchronous Federated Optimization", Section 5.2, eq. for
  ``s_a(t - tau)``).
- ``hinge``: ``1`` if ``s <= b`` else ``1 / (a * (s - b) + 1)``; FedAsync's hinge function
  (same section), defaults ``a = 10``, ``b = 4`` as in that paper's experiments.
- ``constant``: ``1`` for every ``s`` (FedAsync's constant function; plain async averaging).

Updates staler than a configured bound ``max_staleness`` are dropped by :func:`admit`, which
returns the reason as a string for the log and the metrics.

One pluggable concept, one small base class plus a registry by name, checked for completeness
at import. No I/O, no clock, no torch.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

from comms.errors import ConfigError, RejectedError, StaleError


class FutureBaseVersionError(RejectedError):
    """An update whose base version is newer than the newest version the root published."""

    reason = "future_base_version"


def staleness(base_version: int, v_now: int) -> int:
    """``s = v_now - base_version``; refuses a base version from the future."""
    s = int(v_now) - int(base_version)
    if s < 0:
        raise FutureBaseVersionError(
            f"update claims base version {base_version} but the newest published version is "
            f"{v_now}; a base version from the future is a sender bug or a forged header"
        )
    return s


class StalenessFunction:
    """Maps a staleness ``s >= 0`` to a weight in (0, 1]. Subclasses set ``name``, define
    ``weight`` and validate their parameters in ``__init__``."""

    name: ClassVar[str] = ""

    def weight(self, s: int) -> float:
        raise NotImplementedError

    def params(self) -> dict[str, float]:
        """The parameters that define this function (for logs and config round trips)."""
        return {}

    def __call__(self, s: int) -> float:
        if s < 0:
            raise ValueError(f"staleness must be >= 0, got {s}")
        return self.weight(s)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class FedBuffWeight(StalenessFunction):
    """``1 / sqrt(1 + s)`` (FedBuff)."""

    name = "fedbuff"

    def weight(self, s: int) -> float:
        return 1.0 / math.sqrt(1.0 + s)


class PolynomialWeight(StalenessFunction):
    """``(1 + s) ** -a`` (FedAsync's polynomial function)."""

    name = "polynomial"

    def __init__(self, a: float = 0.5):
        if not (math.isfinite(a) and a > 0):
            raise ConfigError(f"polynomial staleness: a must be a positive number, got {a!r}")
        self.a = float(a)

    def weight(self, s: int) -> float:
        return (1.0 + s) ** -self.a

    def params(self) -> dict[str, float]:
        return {"a": self.a}


class HingeWeight(StalenessFunction):
    """``1`` if ``s <= b`` else ``1 / (a * (s - b) + 1)`` (FedAsync's hinge function)."""

    name = "hinge"

    def __init__(self, a: float = 10.0, b: int = 4):
        if not (math.isfinite(a) and a > 0):
            raise ConfigError(f"hinge staleness: a must be a positive number, got {a!r}")
        if b < 0:
            raise ConfigError(f"hinge staleness: b must be >= 0, got {b!r}")
        self.a = float(a)
        self.b = int(b)

    def weight(self, s: int) -> float:
        if s <= self.b:
            return 1.0
        return 1.0 / (self.a * (s - self.b) + 1.0)

    def params(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b}


class ConstantWeight(StalenessFunction):
    """``1`` for every staleness."""

    name = "constant"

    def weight(self, s: int) -> float:
        return 1.0


STALENESS_FUNCTIONS: dict[str, type[StalenessFunction]] = {
    cls.name: cls for cls in (FedBuffWeight, PolynomialWeight, HingeWeight, ConstantWeight)
}
DEFAULT_STALENESS_FUNCTION = "fedbuff"

# Completeness: every subclass defined here is registered under its own, unique name.
assert all(name and STALENESS_FUNCTIONS[name].name == name for name in STALENESS_FUNCTIONS)
assert {c.name for c in StalenessFunction.__subclasses__()} == set(STALENESS_FUNCTIONS)


def get_staleness_function(
    fn: str | StalenessFunction = DEFAULT_STALENESS_FUNCTION, **params: Any
) -> StalenessFunction:
    """A staleness function by registry name (with its parameters), or ``fn`` itself."""
    if isinstance(fn, StalenessFunction):
        if params:
            raise ConfigError(
                f"parameters {sorted(params)} given with an already built {fn!r}; "
                "pass a name to build a new one"
            )
        return fn
    cls = STALENESS_FUNCTIONS.get(fn)
    if cls is None:
        raise ConfigError(
            f"unknown staleness function {fn!r}; choose one of {sorted(STALENESS_FUNCTIONS)}"
        )
    try:
        return cls(**params)
    except TypeError as e:
        raise ConfigError(f"staleness function {fn!r}: bad parameters {params}: {e}") from None


def staleness_weight(fn: str | StalenessFunction, s: int, **params: Any) -> float:
    """The weight of an update of staleness ``s`` under ``fn`` (a name or a built function)."""
    return get_staleness_function(fn, **params)(s)


class Admission(NamedTuple):
    """The outcome of :func:`admit`: ``ok``, the staleness ``s``, and a reason ('' when ok)."""

    ok: bool
    staleness: int
    reason: str


def admit(update_base_version: int, v_now: int, max_staleness: int | None) -> Admission:
    """Whether an update built on ``update_base_version`` may be merged at ``v_now``.

    ``max_staleness=None`` means no bound. Raises :class:`FutureBaseVersionError` when the base
    version is newer than ``v_now``.
    """
    s = staleness(update_base_version, v_now)
    if max_staleness is not None and s > max_staleness:
        reason = (
            f"stale: staleness {s} (base version {update_base_version}, now {v_now}) "
            f"exceeds max_staleness {max_staleness}"
        )
        return Admission(False, s, reason)
    return Admission(True, s, "")


def require_admitted(update_base_version: int, v_now: int, max_staleness: int | None) -> int:
    """Like :func:`admit` but raises :class:`~comms.errors.StaleError`; returns ``s``."""
    ok, s, reason = admit(update_base_version, v_now, max_staleness)
    if not ok:
        raise StaleError(reason + "; pull the newest version and push a fresh delta")
    return s
