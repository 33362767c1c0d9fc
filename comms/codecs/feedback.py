"""Error feedback: what a lossy codec dropped, carried into the next send.

Seide et al., "1-bit SGD" (2014); Karimireddy et al., "Error Feedback Fixes SignSGD" (2019):
``c_t = x_t + e_t``, ``send Q(c_t)``, ``e_{t+1} = c_t - Q(c_t)``. Summed over rounds, what was
sent plus the final residual equals what was put in.

With a decay ``beta < 1`` (SparseLoCo, Sarfi et al. 2025, arXiv:2508.15706: the
error-feedback buffer decays like a momentum buffer, ``e <- beta * e + delta``, and the top-k
is taken of it) the corrected input is ``c_t = x_t + beta * e_t``: what was not sent fades
by ``beta`` a round instead of waiting whole until its coordinate is chosen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from comms.codecs.base import SPARSE_CODECS, Codec, _finite_abs_max, as_float_array

# The decay a sparse codec's feedback gets unless configured (SparseLoCo's; measured better
# than none in docs/benchmarks/thin.md); dense codecs keep the residual whole.
SPARSE_DECAY = 0.95


def is_valid_decay(decay: Any) -> bool:
    """A decay is a number in (0, 1] (not a bool)."""
    return not isinstance(decay, bool) and isinstance(decay, int | float) and 0 < decay <= 1


def feedback_decay(codec_name: str, decay: float | None) -> float:
    """``decay``, or when it is None the default for ``codec_name``: ``SPARSE_DECAY`` for a
    sparse codec (``SPARSE_CODECS``), 1 for the others."""
    if decay is not None:
        return float(decay)
    return SPARSE_DECAY if codec_name in SPARSE_CODECS else 1.0


class ErrorFeedback:
    """Per-tensor residuals of a lossy codec, carried into the next round.

    ``compress(name, x, codec)`` sends ``Q(x + e)`` and keeps ``e' = (x + e) - Q(x + e)``, so
    over any number of rounds ``sum(decoded) + residual == sum(inputs)`` up to float32
    rounding. If encoding raises (NaN input, say), the residual is left as it was.
    ``decay`` (beta, in (0, 1]; 1 keeps the residual whole) scales the residual before it is
    added: ``c = x + float32(beta * e)``, ``e' = c - Q(c)``, each operation in float32, so
    ``e'`` is a function of ``x``, ``e`` and ``beta`` bit for bit.
    Not thread-safe: one instance belongs to one sender.
    """

    def __init__(self, decay: float = 1.0) -> None:
        if not is_valid_decay(decay):
            raise ValueError(f"error feedback: decay must be in (0, 1], got {decay!r}")
        self.decay = float(decay)
        self._residuals: dict[str, np.ndarray] = {}

    def compress(self, name: str, x: Any, codec: Codec) -> bytes:
        arr = as_float_array(x, codec.name)
        corrected = np.array(arr, dtype=np.float32, order="C")  # always a fresh copy
        residual = self._residuals.get(name)
        if residual is not None:
            if residual.shape != corrected.shape:
                raise ValueError(
                    f"error feedback: tensor {name!r} has shape {corrected.shape} but its "
                    f"residual has shape {residual.shape}; call reset() when the model changes"
                )
            if self.decay == 1.0:
                corrected += residual
            else:
                corrected += residual * np.float32(self.decay)
        payload = codec.encode(corrected)
        decoded = codec.decode(payload, corrected.shape)
        np.subtract(corrected, decoded, out=corrected)
        self._residuals[name] = corrected
        return payload

    def residuals(self) -> dict[str, np.ndarray]:
        """A copy of every residual, for snapshots."""
        return {name: r.copy() for name, r in self._residuals.items()}

    def load_residuals(self, residuals: dict[str, Any]) -> None:
        """Replace the residuals with ``residuals`` (as saved by ``residuals()``)."""
        loaded = {}
        for name, value in residuals.items():
            arr = np.array(as_float_array(value, "error feedback"), dtype=np.float32, order="C")
            _finite_abs_max(arr, "error feedback", f"residual {name!r}")
            loaded[name] = arr
        self._residuals = loaded

    def reset(self) -> None:
        self._residuals.clear()
