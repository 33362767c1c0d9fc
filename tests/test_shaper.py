"""The in-process link shaper: token-bucket arithmetic by hand, then real-clock rate and latency."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from comms.errors import ConfigError, LinkError
from comms.shaper import BucketState, TokenBucketShaper, token_bucket_reserve


def test_token_bucket_arithmetic_by_hand():
    # 1000 B/s, burst 500 B, bucket full at t=0.
    state = BucketState(tokens=500.0, updated_at=0.0)
    wait, state = token_bucket_reserve(state, now=0.0, nbytes=300, rate=1000.0, burst=500.0)
    assert wait == 0.0 and state.tokens == 200.0
    # t=0.1: refill 100 -> 300, minus 700 -> -400: wait 400/1000 s.
    wait, state = token_bucket_reserve(state, now=0.1, nbytes=700, rate=1000.0, burst=500.0)
    assert wait == pytest.approx(0.4) and state.tokens == pytest.approx(-400.0)
    # A concurrent caller at the same instant queues behind that debt: (400 + 100) / 1000.
    wait, state = token_bucket_reserve(state, now=0.1, nbytes=100, rate=1000.0, burst=500.0)
    assert wait == pytest.approx(0.5) and state.tokens == pytest.approx(-500.0)
    # t=2.0: refill 1900 -> 1400, capped at the burst 500; minus 100 -> 400.
    wait, state = token_bucket_reserve(state, now=2.0, nbytes=100, rate=1000.0, burst=500.0)
    assert wait == 0.0 and state.tokens == pytest.approx(400.0) and state.updated_at == 2.0


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_latency_is_hidden_for_chunks_of_one_bandwidth_delay_product():
    # 8000 bit/s = 1000 B/s, 0.1 s one way: BDP 100 B. Ten 200 B chunks, each awaited in turn.
    clock = FakeClock()
    shaper = TokenBucketShaper(8000, latency_s=0.1, burst_bytes=100, clock=clock, sleep=clock.sleep)
    for _ in range(10):
        shaper.throttle(200)
    # First chunk: 100 B of debt (0.1 s) + 0.1 s latency; then one chunk per 0.2 s.
    assert clock.now == pytest.approx(2.0)
    assert shaper.bytes_passed == 2000 and shaper.calls == 10


def test_small_chunks_behave_like_a_window_of_one_chunk():
    clock = FakeClock()
    shaper = TokenBucketShaper(8000, latency_s=0.1, burst_bytes=100, clock=clock, sleep=clock.sleep)
    for _ in range(10):
        shaper.throttle(10)  # 10 B per 0.1 s round, far below the 1000 B/s rate
    assert clock.now == pytest.approx(1.0)


def assert_rate_kept(transfer, nbytes: int, rate_bps: float) -> None:
    """A token bucket never lets bytes through faster than its rate: past the initial burst,
    a transfer takes at least ``(nbytes - burst) / rate``, a hard bound whatever the load,
    checked on every try. It may take longer when the machine is busy: a sleep that
    overshoots by more than the bucket can credit back (burst / rate) is lost time. Load can
    only slow a transfer, so the upper bound is checked on the fastest of up to three tries,
    with room for some oversleeping; a shaper at half its rate fails it every time.
    ``transfer()`` sends ``nbytes`` through a fresh shaper: ``(seconds, shaper)``."""
    nominal = nbytes * 8 / rate_bps
    tries: list[float] = []
    while len(tries) < 3 and not (tries and min(tries) <= 1.4 * nominal + 0.1):
        elapsed, shaper = transfer()
        assert shaper.bytes_passed == nbytes
        assert elapsed >= (nbytes - shaper.burst_bytes) * 8 / rate_bps, (elapsed, nominal)
        tries.append(elapsed)
    assert min(tries) <= 1.4 * nominal + 0.1, (tries, nominal)


def test_measured_rate_matches_setting():
    rate_bps = 24e6  # 3 MB/s
    total, chunk = 3_000_000, 64 * 1024

    async def transfer() -> tuple[float, TokenBucketShaper]:
        shaper = TokenBucketShaper(rate_bps)
        start = time.perf_counter()
        sent = 0
        while sent < total:
            n = min(chunk, total - sent)
            await shaper.transmit(n)
            sent += n
        return time.perf_counter() - start, shaper

    assert_rate_kept(lambda: asyncio.run(transfer()), total, rate_bps)


def test_threads_share_the_rate():
    rate_bps = 32e6  # 4 MB/s shared by four threads
    per_thread, chunk = 300_000, 30_000

    def transfer() -> tuple[float, TokenBucketShaper]:
        shaper = TokenBucketShaper(rate_bps, burst_bytes=32 * 1024)

        def push():
            for _ in range(per_thread // chunk):
                shaper.throttle(chunk)

        threads = [threading.Thread(target=push) for _ in range(4)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        return time.perf_counter() - start, shaper

    assert_rate_kept(transfer, 4 * per_thread, rate_bps)


async def test_latency_is_added():
    asked = []

    async def recording_sleep(seconds: float) -> None:
        asked.append(seconds)
        await asyncio.sleep(seconds)

    shaper = TokenBucketShaper(1e9, latency_s=0.15, async_sleep=recording_sleep)
    start = time.perf_counter()
    await shaper.transmit(100)
    elapsed = time.perf_counter() - start
    # exactly the latency was asked for (100 B at 1 Gbit/s fit the bucket), and really slept;
    # how much longer the loop took to wake up depends on the machine's load, not the shaper
    assert asked == [pytest.approx(0.15, abs=1e-9)]
    assert elapsed >= 0.15


async def test_loss_one_always_drops_and_zero_never():
    always = TokenBucketShaper(1e9, loss=1.0, seed=1)
    for _ in range(20):
        with pytest.raises(LinkError, match="dropped"):
            await always.transmit(10)
    assert always.drops == 20 and always.bytes_passed == 0 and always.bytes_dropped == 200

    never = TokenBucketShaper(1e9, loss=0.0)
    for _ in range(200):
        await never.transmit(10)
    assert never.drops == 0 and never.bytes_passed == 2000


def test_partial_loss_is_seeded_and_near_its_probability():
    def run(seed: int) -> list[bool]:
        shaper = TokenBucketShaper(1e12, loss=0.3, seed=seed)
        outcomes = []
        for _ in range(1000):
            try:
                shaper.throttle(1)
                outcomes.append(True)
            except LinkError:
                outcomes.append(False)
        return outcomes

    first = run(7)
    assert first == run(7)
    assert 230 <= first.count(False) <= 370


def test_unlimited_rate_and_bad_settings():
    unlimited = TokenBucketShaper(float("inf"))
    asyncio.run(unlimited.transmit(10**9))
    assert unlimited.stats()["bytes_passed"] == 10**9
    for kwargs in (
        {"rate_bps": 0},
        {"rate_bps": 1e6, "loss": 1.5},
        {"rate_bps": 1e6, "latency_s": -1},
    ):
        with pytest.raises(ConfigError):
            TokenBucketShaper(**kwargs)
    with pytest.raises(ValueError):
        unlimited.throttle(-1)
