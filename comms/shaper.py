"""In-process link emulation: a token bucket for bandwidth, a fixed one-way latency, and random
connection drops.

A sender calls ``await shaper.transmit(nbytes)`` (or ``shaper.throttle(nbytes)`` from blocking
code) before it puts ``nbytes`` on the wire. The call returns when those bytes would have
arrived at the far end of a link of ``rate_bps`` bits per second and ``latency_s`` one-way
delay, or raises ``LinkError`` with probability ``loss`` to emulate a dropped connection.

Bandwidth is a token bucket that may go into debt: a call reserves its bytes at once, so a chunk
larger than the bucket is allowed, and concurrent callers queue behind each other's
reservations in call order; the long-run rate is exactly ``rate_bps``. Pure arithmetic:
``token_bucket_reserve``.

Latency: a caller that awaits each chunk before sending the next sees the full rate as long as
the bucket holds at least one bandwidth-delay product (the default ``burst_bytes`` does) and its
chunks are at least that large; smaller chunks behave like a window of one chunk, as on a real
link. The arrival of a chunk is ``departure + latency_s``.

Concurrency: the bucket state sits behind a ``threading.Lock`` that is held only for the
arithmetic, never while sleeping, so one shaper can be shared by threads and event loops.
The clock and both sleeps are injectable for tests.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from comms.errors import ConfigError, LinkError

MIN_BURST_BYTES = 64 * 1024


@dataclass(frozen=True)
class BucketState:
    tokens: float  # bytes available now; negative while callers owe time
    updated_at: float  # clock time of ``tokens``


def token_bucket_reserve(
    state: BucketState, now: float, nbytes: int, rate: float, burst: float
) -> tuple[float, BucketState]:
    """Reserve ``nbytes`` from a bucket filling at ``rate`` bytes/s, capped at ``burst`` bytes.

    Returns ``(wait_s, new_state)``: how long the caller waits before its bytes leave, and the
    bucket after the reservation (tokens may go negative: the debt later callers wait out).
    """
    elapsed = max(0.0, now - state.updated_at)
    tokens = min(burst, state.tokens + elapsed * rate) - nbytes
    wait = 0.0 if tokens >= 0 else -tokens / rate
    return wait, BucketState(tokens, max(now, state.updated_at))


class TokenBucketShaper:
    """Emulates one direction of a slow, lossy link (see the module docstring)."""

    def __init__(
        self,
        rate_bps: float,
        latency_s: float = 0.0,
        loss: float = 0.0,
        burst_bytes: int | None = None,
        seed: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        async_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        if not rate_bps > 0:
            raise ConfigError(
                f"link rate_bps must be positive (math.inf: unlimited), got {rate_bps}"
            )
        if not (latency_s >= 0 and math.isfinite(latency_s)):
            raise ConfigError(f"link latency_s must be a finite number >= 0, got {latency_s}")
        if not 0 <= loss <= 1:
            raise ConfigError(f"link loss must be a probability in [0, 1], got {loss}")
        self.rate_bps = float(rate_bps)
        self.latency_s = float(latency_s)
        self.loss = float(loss)
        self.rate_bytes = self.rate_bps / 8
        if burst_bytes is None:
            bdp = self.rate_bytes * self.latency_s if math.isfinite(self.rate_bytes) else 0.0
            burst_bytes = max(MIN_BURST_BYTES, math.ceil(bdp))
        if burst_bytes <= 0:
            raise ConfigError(f"link burst_bytes must be positive, got {burst_bytes}")
        self.burst_bytes = burst_bytes
        self._clock, self._sleep, self._async_sleep = clock, sleep, async_sleep
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._state = BucketState(float(burst_bytes), clock())
        self.bytes_passed = 0
        self.bytes_dropped = 0
        self.calls = 0
        self.drops = 0

    def _reserve(self, nbytes: int) -> tuple[float, bool]:
        """Seconds until ``nbytes`` arrive, and whether this call drops the connection."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        with self._lock:
            if math.isinf(self.rate_bytes):
                wait = 0.0
            else:
                wait, self._state = token_bucket_reserve(
                    self._state, self._clock(), nbytes, self.rate_bytes, self.burst_bytes
                )
            dropped = self.loss > 0 and self._rng.random() < self.loss
            self.calls += 1
            if dropped:
                self.drops += 1
                self.bytes_dropped += nbytes
            else:
                self.bytes_passed += nbytes
        return wait + self.latency_s, dropped

    def _dropped_error(self, nbytes: int) -> LinkError:
        return LinkError(
            f"emulated link dropped the connection while sending {nbytes} bytes "
            f"(loss probability {self.loss}); retry or resume"
        )

    async def transmit(self, nbytes: int) -> None:
        """Wait until ``nbytes`` have crossed the link; ``LinkError`` if the link drops them."""
        delay, dropped = self._reserve(nbytes)
        if delay > 0:
            await self._async_sleep(delay)
        if dropped:
            raise self._dropped_error(nbytes)

    def throttle(self, nbytes: int) -> None:
        """Blocking form of ``transmit`` for synchronous code."""
        delay, dropped = self._reserve(nbytes)
        if delay > 0:
            self._sleep(delay)
        if dropped:
            raise self._dropped_error(nbytes)

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {
                "calls": self.calls,
                "drops": self.drops,
                "bytes_passed": self.bytes_passed,
                "bytes_dropped": self.bytes_dropped,
            }
