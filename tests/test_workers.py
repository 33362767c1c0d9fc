"""The elastic merge pool: real worker processes, real envelopes and codecs, /dev/shm checked."""

from __future__ import annotations

import os
import secrets
import signal
import time

import numpy as np
import pytest

from aggregator.merge import PartialAggregate, accumulate
from aggregator.shm import BlobRef, ParamLayout, SharedBlob, SharedParams, list_segments
from aggregator.workers import FileRef, MergeEvent, MergePool, decode_with_codec
from comms.codecs import codec_from_spec, get_codec
from comms.envelope import Envelope
from comms.errors import ReplayError

SHAPES = {"w": (48, 40), "b": (33,), "empty": (0,)}
LAYOUT = ParamLayout.from_shapes(SHAPES)


def slow_decode(codec_spec, payload, shape):
    """The real decoder, slowed so that a burst keeps workers busy for a while."""
    time.sleep(0.01)
    return decode_with_codec(codec_spec, payload, shape)


def make_envelope(rng, sequence, codec="none", sender="island-a", nan_in=None) -> bytes:
    c = get_codec(codec)
    tensors = []
    for name, shape in SHAPES.items():
        x = rng.standard_normal(shape).astype(np.float32)
        if name == nan_in:  # raw bytes: what a broken peer could send
            x.flat[0] = np.nan
            tensors.append((name, shape, "float32", {"name": "none"}, x))
        else:
            tensors.append((name, shape, "float32", c.spec(), c.encode(x)))
    env = Envelope.build(
        model_id="m", kind="delta", sender=sender, sequence=sequence, tensors=tensors
    )
    return env.to_bytes()


def direct(updates) -> PartialAggregate:
    """In-process accumulate of (envelope bytes, weight, staleness), decoded the same way."""
    partial = PartialAggregate()
    for data, weight, staleness in updates:
        env = Envelope.from_bytes(data, max_bytes=1 << 30)
        delta = {s.name: codec_from_spec(s.codec).decode(p, s.shape) for s, p in env.tensors()}
        update_id = (env.header.sender, env.header.sequence)
        accumulate(partial, delta, weight, update_id=update_id, staleness=staleness)
    return partial


def assert_same(got: PartialAggregate, want: PartialAggregate, exact: bool) -> None:
    assert got.count == want.count
    assert got.contributors == want.contributors
    assert got.max_staleness == want.max_staleness
    assert got.weight_sum == pytest.approx(want.weight_sum, rel=1e-12)
    assert got.weighted_sum.keys() == want.weighted_sum.keys()
    for name, x in want.weighted_sum.items():
        if exact:
            assert np.array_equal(got.weighted_sum[name], x), name
        else:
            np.testing.assert_allclose(got.weighted_sum[name], x, rtol=1e-5, atol=1e-5)


def wait_until(predicate, timeout=10.0, step=0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(step)


@pytest.fixture
def new_pool():
    """Pools with their own segment prefix; after each test: closed, and /dev/shm clean."""
    prefix = f"arcpt{secrets.token_hex(3)}"
    pools = []

    def factory(**kwargs) -> MergePool:
        pool = MergePool(LAYOUT, segment_prefix=prefix, **kwargs)
        pools.append(pool)
        return pool

    yield factory
    for pool in pools:
        pool.close()
    assert list_segments(prefix) == []


def cpu_seconds(pid: int) -> float:
    return cpu_seconds_of(f"/proc/{pid}/stat")


def cpu_seconds_of(stat_path: str) -> float:
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- shared memory


def test_shared_params_and_blobs_share_memory_and_leave_nothing_behind():
    prefix = f"arcpt{secrets.token_hex(3)}"
    owner = SharedParams.create(LAYOUT, prefix)
    other = SharedParams.attach(LAYOUT, owner.name)
    assert LAYOUT.slots[1].offset % 16 == 0 and owner.arrays["w"].shape == (48, 40)
    other.arrays["b"][:] = 3.0
    assert np.all(owner.arrays["b"] == 3.0) and np.all(owner.arrays["w"] == 0.0)
    held = other.arrays["w"]
    with pytest.raises(BufferError, match="views of it are still in use"):
        other.close()
    del held
    other.close()
    with pytest.raises(PermissionError):
        other.unlink()
    blob = SharedBlob.from_bytes(b"envelope bytes", prefix)
    seen = SharedBlob.attach(BlobRef(blob.name, blob.size))
    assert bytes(seen.view) == b"envelope bytes"
    seen.close()
    assert len(list_segments(prefix)) == 2
    owner.destroy()
    blob.destroy()
    assert list_segments(prefix) == []


# ---------------------------------------------------------------- the pool


def test_pool_equals_direct_accumulate_exactly_with_one_worker(new_pool, tmp_path):
    rng = np.random.default_rng(1)
    pool = new_pool(max_workers=1, idle_timeout_s=30.0)
    wal = tmp_path / "segment.wal"
    for round_ in range(2):  # the second round overwrites the first round's buffer
        updates, offset = [], 0
        with open(wal, "wb") as f:
            f.write(b"junk before the first record")
            offset = f.tell()
            for i in range(10):
                seq = 10 * round_ + i
                data = make_envelope(rng, seq, codec="int8" if i % 2 else "none")
                weight, staleness = float(rng.uniform(0.05, 3.0)), int(rng.integers(0, 5))
                updates.append((data, weight, staleness))
                if i < 5:
                    pool.submit_bytes(data, weight, ("island-a", seq), staleness)
                else:  # by reference into a log file, as the gateway's WAL holds it
                    f.write(data)
                    ref = FileRef(str(wal), offset, len(data))
                    offset += len(data)
                    f.flush()
                    pool.submit(MergeEvent(ref, weight, ("island-a", seq), staleness))
        got = pool.flush()
        assert_same(got, direct(updates), exact=True)
    stats = pool.stats()
    assert (stats.events_merged, stats.flushes, stats.events_rejected) == (20, 2, 0)
    assert pool.flush().empty

    with pytest.raises(ValueError, match="finite positive"):
        pool.submit_bytes(make_envelope(rng, 99), float("nan"), ("island-a", 99))
    data = make_envelope(rng, 100)
    pool.submit_bytes(data, 1.0, ("island-a", 100))
    wait_until(lambda: pool.stats().events_merged == 21)
    with pytest.raises(ReplayError):  # merged, not yet flushed: still counted as pending
        pool.submit_bytes(data, 1.0, ("island-a", 100))
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit_bytes(data, 1.0, ("island-a", 101))


def test_sparse_updates_merge_at_their_entries_to_the_bits_of_their_dense_sum(new_pool):
    """A worker adds a topk or sparse2 tensor at its kept entries only (no dense decode), and
    one worker's sum is still exactly the in-process sum of the dense decodes; a clip scale
    is applied to the entries as the gateway applies it to a dense array."""
    rng = np.random.default_rng(8)
    pool = new_pool(max_workers=1, idle_timeout_s=30.0)
    updates = []
    for seq in range(8):
        data = make_envelope(rng, seq, codec=("sparse2", "topk")[seq % 2])
        weight = 1.0 if seq == 0 else float(rng.uniform(0.05, 3.0))
        updates.append((data, weight, 0))
        pool.submit_bytes(data, weight, ("island-a", seq))
    assert_same(pool.flush(), direct(updates), exact=True)
    data = make_envelope(rng, 8, codec="sparse2")
    blob = SharedBlob.from_bytes(data, pool.segment_prefix)
    pool.submit(MergeEvent(blob.ref, 0.5, ("island-a", 8), scale=0.25))
    env = Envelope.from_bytes(data, max_bytes=1 << 30)
    clipped = {
        s.name: np.multiply(codec_from_spec(s.codec).decode(p, s.shape), np.float32(0.25))
        for s, p in env.tensors()
    }
    want = PartialAggregate()
    accumulate(want, clipped, 0.5, update_id=("island-a", 8))
    try:
        assert_same(pool.flush(), want, exact=True)
    finally:
        blob.destroy()


def test_scales_up_under_a_burst_and_down_to_zero_when_idle(new_pool):
    rng = np.random.default_rng(2)
    pool = new_pool(max_workers=3, idle_timeout_s=0.5, decode=slow_decode)
    updates = []
    for seq in range(20):
        data, weight = make_envelope(rng, seq, codec="int8"), float(rng.uniform(0.1, 2.0))
        updates.append((data, weight, 0))
        pool.submit_bytes(data, weight, ("island-a", seq))
    assert_same(pool.flush(), direct(updates), exact=False)
    stats = pool.stats()
    assert stats.workers_peak > 1 and stats.worker_starts <= 3
    wait_until(lambda: pool.stats().worker_exits == pool.stats().worker_starts)
    stats = pool.stats()
    assert stats.workers_alive == 0
    assert stats.last_scale_event[0] == "down" and stats.buffers == 0
    assert stats.worker_exits == stats.worker_starts and stats.worker_crashes == 0

    # From zero again: a cold worker starts for the next event.
    data = make_envelope(rng, 20)
    pool.submit_bytes(data, 0.5, ("island-a", 20))
    assert_same(pool.flush(), direct([(data, 0.5, 0)]), exact=True)
    assert pool.stats().worker_starts == stats.worker_starts + 1


def test_a_batch_is_one_backlog_queued_all_or_none(new_pool, tmp_path):
    """submit_many queues every event before the dispatcher looks (it starts the workers the
    whole backlog needs, as a WAL replay does after a restart), and refuses the batch whole."""
    rng = np.random.default_rng(7)
    pool = new_pool(max_workers=3, idle_timeout_s=30.0, scale_up_backlog=1)
    wal, updates, events, offset = tmp_path / "segment.wal", [], [], 0
    with open(wal, "wb") as f:
        for seq in range(12):
            data, weight = make_envelope(rng, seq, codec="int8"), float(rng.uniform(0.1, 2.0))
            f.write(data)
            updates.append((data, weight, 0))
            events.append(
                MergeEvent(FileRef(str(wal), offset, len(data)), weight, ("island-a", seq))
            )
            offset += len(data)
    bad_weight = MergeEvent(events[0].source, float("nan"), ("island-a", 99))
    for bad, error in (([*events[:2], bad_weight], ValueError), (events[:2] * 2, ReplayError)):
        with pytest.raises(error):
            pool.submit_many(bad)
        assert pool.stats().events_submitted == 0  # nothing of a refused batch was queued
    assert pool.submit_many(events) == list(range(12))
    assert_same(pool.flush(), direct(updates), exact=False)
    stats = pool.stats()
    assert stats.workers_peak == 3 and stats.worker_starts == 3, stats


def test_idle_worker_hands_its_buffer_back_before_the_flush(new_pool):
    rng = np.random.default_rng(3)
    pool = new_pool(max_workers=1, idle_timeout_s=0.3, verify_digest=True)
    updates = [(make_envelope(rng, seq), float(seq + 1), seq) for seq in range(3)]
    for data, weight, staleness in updates:
        pool.submit_bytes(data, weight, ("island-a", staleness), staleness)
    wait_until(lambda: pool.stats().worker_exits == 1)
    assert pool.stats().buffers == 1  # parked, contribution kept
    assert_same(pool.flush(), direct(updates), exact=True)
    assert pool.stats().buffers == 0


def test_killed_worker_loses_nothing_and_counts_nothing_twice(new_pool):
    rng = np.random.default_rng(4)
    pool = new_pool(max_workers=2, scale_up_backlog=1, decode=slow_decode)
    updates = []
    for seq in range(20):
        data, weight = make_envelope(rng, seq, codec="none"), float(rng.uniform(0.1, 2.0))
        updates.append((data, weight, seq % 4))
        pool.submit_bytes(data, weight, ("island-a", seq), seq % 4)
    wait_until(lambda: any(n >= 2 for n in pool.worker_pids().values()))
    victim = max(pool.worker_pids().items(), key=lambda item: item[1])[0]
    os.kill(victim, signal.SIGKILL)
    got = pool.flush()
    assert_same(got, direct(updates), exact=False)
    stats = pool.stats()
    assert stats.worker_crashes == 1 and stats.events_replayed >= 2
    assert stats.events_merged >= 20 and stats.events_rejected == 0
    assert victim not in pool.worker_pids()


def test_bad_update_is_rejected_and_a_tainted_buffer_is_rebuilt(new_pool, tmp_path):
    rng = np.random.default_rng(5)
    pool = new_pool(max_workers=1)
    good = [(make_envelope(rng, seq), float(seq + 1), 0) for seq in range(5)]
    for data, weight, _ in good[:3]:
        pool.submit_bytes(data, weight, ("island-a", int(weight) - 1))
    wait_until(lambda: pool.stats().events_merged == 3)
    # NaN in the second tensor: the first one was already added into a non-empty buffer.
    pool.submit_bytes(make_envelope(rng, 10, nan_in="b"), 1.0, ("island-a", 10))
    pool.submit_bytes(make_envelope(rng, 11), 1.0, ("island-a", 12))  # id mismatch
    pool.submit(MergeEvent(FileRef(str(tmp_path / "gone"), 0, 8), 1.0, ("island-a", 13)))
    for data, weight, _ in good[3:]:
        pool.submit_bytes(data, weight, ("island-a", int(weight) - 1))
    assert_same(pool.flush(), direct(good), exact=True)  # replayed in the original order
    reasons = dict(pool.drain_rejected())
    assert "NonFiniteError" in reasons[("island-a", 10)]
    assert "event says" in reasons[("island-a", 12)]
    assert "cannot read" in reasons[("island-a", 13)]
    stats = pool.stats()
    assert stats.events_replayed >= 3 and stats.events_rejected == 3


def thread_cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, by thread id."""
    out = {}
    for task in os.scandir("/proc/self/task"):
        try:
            out[int(task.name)] = cpu_seconds_of(f"/proc/self/task/{task.name}/stat")
        except OSError:  # the thread ended meanwhile
            continue
    return out


def test_idle_pool_uses_almost_no_cpu(new_pool):
    """Only the pool's own threads and workers are measured: the rest of the test process
    (other tests' leftover threads, the interpreter) is not the pool's to account for."""
    threads_before = set(thread_cpu_seconds())
    pool = new_pool(max_workers=2, warm_workers=1, idle_timeout_s=0.2)
    pool.wait_ready()
    pids = list(pool.worker_pids())
    assert len(pids) == 1
    time.sleep(0.3)  # past the idle timeout: the warm worker must stay
    start = thread_cpu_seconds()
    pool_threads = set(start) - threads_before
    assert pool_threads, "the pool's dispatcher thread was not found"
    before_workers = sum(cpu_seconds(p) for p in pids)
    time.sleep(1.0)
    end = thread_cpu_seconds()
    dispatcher = sum(end.get(tid, start[tid]) - start[tid] for tid in pool_threads)
    workers = sum(cpu_seconds(p) for p in pids) - before_workers
    # idle, both measure 0 (ticks of 10 ms); a dispatcher polling at 1 kHz measures 0.1 s
    assert dispatcher + workers < 0.05, (dispatcher, workers)
    assert list(pool.worker_pids()) == pids and pool.stats().worker_exits == 0
