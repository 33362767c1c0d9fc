"""Merging: weighted means by hand, tree equals flat, FedBuff flushing, robust rules."""

import tracemalloc

import numpy as np
import pytest

from aggregator.merge import (
    EmptyAggregateError,
    FedBuffBuffer,
    PartialAggregate,
    Update,
    accumulate,
    combine,
    combine_all,
    finalize,
    merge_into,
    update_weight,
)
from aggregator.robust import (
    LEAF_ONLY,
    TREE_COMPOSABLE,
    centered_clip,
    centered_clip_residual,
    clip_by_norm,
    coordinate_median,
    recenter,
    trimmed_mean,
    update_norm,
)
from aggregator.staleness import FutureBaseVersionError, staleness_weight
from comms.errors import NonFiniteError, ReplayError, ShapeMismatchError


def f32(x):
    return np.asarray(x, dtype=np.float32)


D1 = {"w": f32([1, 2]), "b": f32([[4]])}
D2 = {"w": f32([3, -2]), "b": f32([[0]])}
D3 = {"w": f32([-1, 6]), "b": f32([[2]])}


def three_update_partial():
    p = PartialAggregate()
    # fedbuff weights for s = 0, 3, 15: 1/sqrt(1)=1, 1/sqrt(4)=0.5, 1/sqrt(16)=0.25
    for i, (d, s) in enumerate([(D1, 0), (D2, 3), (D3, 15)]):
        accumulate(p, d, staleness_weight("fedbuff", s), update_id=("isl", i), staleness=s)
    return p


def test_accumulate_and_finalize_by_hand():
    p = three_update_partial()
    # w: 1*[1,2] + 0.5*[3,-2] + 0.25*[-1,6] = [1+1.5-0.25, 2-1+1.5] = [2.25, 2.5]
    # b: 1*4 + 0.5*0 + 0.25*2 = 4.5;  weight_sum = 1 + 0.5 + 0.25 = 1.75
    np.testing.assert_array_equal(p.weighted_sum["w"], f32([2.25, 2.5]))
    np.testing.assert_array_equal(p.weighted_sum["b"], f32([[4.5]]))
    assert p.weight_sum == 1.75 and p.count == 3 and p.max_staleness == 15
    assert p.contributors == {("isl", 0), ("isl", 1), ("isl", 2)}
    mean = finalize(p)
    # [2.25, 2.5] / 1.75 = [9/7, 10/7];  4.5 / 1.75 = 18/7
    np.testing.assert_allclose(mean["w"], [9 / 7, 10 / 7], rtol=1e-6)
    np.testing.assert_allclose(mean["b"], [[18 / 7]], rtol=1e-6)
    assert mean["w"].dtype == np.float32 and mean["b"].shape == (1, 1)
    # The inputs are untouched.
    np.testing.assert_array_equal(D1["w"], f32([1, 2]))


def test_weight_by_samples():
    assert update_weight(0.5) == 0.5
    assert update_weight(0.5, num_samples=4) == 2.0
    with pytest.raises(ValueError, match="num_samples"):
        update_weight(0.5, num_samples=0)


def test_accumulate_refuses_bad_input_and_leaves_partial_unchanged():
    p = three_update_partial()
    before = {k: v.copy() for k, v in p.weighted_sum.items()}
    with pytest.raises(ReplayError, match="already in this aggregate"):
        accumulate(p, D1, 1.0, update_id=("isl", 0))
    with pytest.raises(ShapeMismatchError, match="shape"):
        accumulate(p, {"w": f32([1, 2, 3]), "b": f32([[4]])}, 1.0)
    with pytest.raises(ShapeMismatchError, match="missing \\['b'\\]"):
        accumulate(p, {"w": f32([1, 2])}, 1.0)
    with pytest.raises(ValueError, match="finite positive"):
        accumulate(p, D1, 0.0)
    with pytest.raises(ValueError, match="finite positive"):
        accumulate(p, D1, float("nan"))
    assert p.count == 3 and p.weight_sum == 1.75
    for k in before:
        np.testing.assert_array_equal(p.weighted_sum[k], before[k])


def test_finalize_empty_is_a_clear_error():
    with pytest.raises(EmptyAggregateError, match="no update was merged"):
        finalize(PartialAggregate())


def random_updates(n, rng):
    shapes = {"emb": (17, 5), "bias": (5,), "scalar": ()}
    return [
        (
            {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()},
            rng.uniform(0.1, 2),
        )
        for _ in range(n)
    ]


def test_tree_equals_flat():
    rng = np.random.default_rng(0)
    ups = random_updates(10, rng)
    flat = PartialAggregate()
    leaves = [PartialAggregate() for _ in range(3)]
    for i, (d, w) in enumerate(ups):
        accumulate(flat, d, w, update_id=(f"isl{i}", 1), staleness=i)
        accumulate(leaves[i % 3], d, w, update_id=(f"isl{i}", 1), staleness=i)
    # Two levels: leaves 0 and 1 under a middle node, then the middle with leaf 2 at the top.
    middle = combine(leaves[0], leaves[1])
    top = combine(middle, leaves[2])
    assert top.count == flat.count == 10
    assert top.contributors == flat.contributors
    assert top.max_staleness == flat.max_staleness == 9
    assert top.weight_sum == pytest.approx(flat.weight_sum, rel=1e-12)
    mean_tree, mean_flat = finalize(top), finalize(flat)
    for k in mean_flat:
        np.testing.assert_allclose(mean_tree[k], mean_flat[k], rtol=1e-5, atol=1e-6)
    # combine is pure: children keep their own sums.
    assert leaves[0].count == 4 and middle.count == 7
    assert combine_all(leaves).contributors == flat.contributors
    # An empty child changes nothing.
    assert combine(top, PartialAggregate()).count == 10


def test_combine_refuses_an_update_counted_twice():
    a, b = PartialAggregate(), PartialAggregate()
    accumulate(a, D1, 1.0, update_id=("x", 7))
    accumulate(b, D2, 1.0, update_id=("x", 7))
    with pytest.raises(ReplayError, match="exactly once"):
        combine(a, b)


def test_accumulate_allocates_no_model_sized_temporary():
    n = 1 << 22  # 4 Mi float32 = 16 MiB
    p = PartialAggregate()
    delta = {"big": np.ones(n, dtype=np.float32)}
    accumulate(p, delta, 1.0)
    tracemalloc.start()
    try:
        accumulate(p, delta, 0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # one block of scratch (1 MiB), far below the 16 MiB a full-size temporary would take
    assert peak < 2 << 20, f"peak allocation {peak} bytes during an in-place accumulate"
    assert p.weighted_sum["big"][0] == 1.5 and p.weighted_sum["big"][-1] == 1.5


def test_spare_buffers_are_reused_and_give_the_same_bits():
    rng = np.random.default_rng(3)
    deltas = [{"w": rng.standard_normal((64, 32), np.float32)} for _ in range(3)]
    fresh = PartialAggregate()
    for i, d in enumerate(deltas):
        accumulate(fresh, d, 0.3 + i)
    spare = np.full((64, 32), np.nan, np.float32)  # stale contents must not leak in
    recycled = PartialAggregate(spare={"w": spare})
    for i, d in enumerate(deltas):
        accumulate(recycled, d, 0.3 + i)
    assert recycled.weighted_sum["w"] is spare and not recycled.spare
    np.testing.assert_array_equal(recycled.weighted_sum["w"], fresh.weighted_sum["w"])
    # a spare of the wrong shape is not used
    odd = PartialAggregate(spare={"w": np.zeros((3,), np.float32)})
    accumulate(odd, deltas[0], 1.0)
    assert odd.weighted_sum["w"].shape == (64, 32)
    # a partial merged into an empty one with spares lands in the spare buffer
    target = PartialAggregate(spare={"w": np.full((64, 32), 7.0, np.float32)})
    merge_into(target, fresh)
    np.testing.assert_array_equal(target.weighted_sum["w"], fresh.weighted_sum["w"])


def upd(sender, seq, base, value, samples=None):
    return Update(sender, seq, base, {"w": f32([value, -value])}, num_samples=samples)


def test_fedbuff_flushes_after_k_updates():
    buf = FedBuffBuffer(k=3, deadline_s=10.0)
    assert not buf.should_flush(now=0.0) and buf.next_deadline() is None
    buf.add(upd("a", 1, 5, 1.0), now=0.0, v_now=5)  # s=0, w=1
    buf.add(upd("b", 1, 2, 2.0), now=1.0, v_now=5)  # s=3, w=1/sqrt(4)=0.5
    assert len(buf) == 2 and not buf.should_flush(now=1.5)
    buf.add(upd("c", 1, 5, 4.0), now=2.0, v_now=5)  # s=0, w=1
    assert buf.should_flush(now=2.0)
    p = buf.flush()
    # (1*1 + 0.5*2 + 1*4) / (1 + 0.5 + 1) = 6 / 2.5 = 2.4
    np.testing.assert_allclose(finalize(p)["w"], [2.4, -2.4], rtol=1e-6)
    assert p.count == 3 and p.max_staleness == 3
    assert len(buf) == 0 and buf.oldest_at is None and not buf.should_flush(now=100.0)
    with pytest.raises(EmptyAggregateError, match="nothing to flush"):
        buf.flush()


def test_fedbuff_flushes_on_deadline_of_oldest_update():
    buf = FedBuffBuffer(k=10, deadline_s=5.0)
    buf.add(upd("a", 1, 0, 1.0), now=100.0, v_now=0)
    buf.add(upd("b", 1, 0, 3.0), now=103.0, v_now=0)  # does not move the oldest's clock
    assert buf.next_deadline() == 105.0
    assert not buf.should_flush(now=104.9)
    assert buf.should_flush(now=105.0)
    np.testing.assert_allclose(finalize(buf.flush())["w"], [2.0, -2.0])  # (1 + 3) / 2
    buf.add(upd("c", 1, 0, 1.0), now=200.0, v_now=0)
    assert buf.next_deadline() == 205.0  # a new oldest after the flush


def test_fedbuff_drops_stale_and_refuses_bad_updates():
    buf = FedBuffBuffer(k=2, deadline_s=None, max_staleness=2, staleness_fn="constant")
    verdict = buf.add(upd("a", 1, 0, 1.0), now=0.0, v_now=5)
    assert not verdict.ok and verdict.staleness == 5 and verdict.reason.startswith("stale:")
    assert len(buf) == 0 and buf.oldest_at is None
    with pytest.raises(FutureBaseVersionError):
        buf.add(upd("a", 2, 9, 1.0), now=0.0, v_now=5)
    assert buf.add(upd("a", 3, 4, 1.0), now=0.0, v_now=5).ok
    with pytest.raises(ReplayError):
        buf.add(upd("a", 3, 4, 1.0), now=1.0, v_now=5)
    assert len(buf) == 1 and not buf.should_flush(now=1e9)  # no deadline configured


def test_fedbuff_weights_by_samples():
    buf = FedBuffBuffer(k=2, weight_by_samples=True)
    buf.add(upd("a", 1, 0, 1.0, samples=1), now=0.0, v_now=0)
    buf.add(upd("b", 1, 0, 5.0, samples=3), now=0.0, v_now=0)
    # (1*1 + 3*5) / (1 + 3) = 4
    np.testing.assert_allclose(finalize(buf.flush())["w"], [4.0, -4.0])


# ---- robust rules -------------------------------------------------------------------------


def test_norm_and_clip_by_norm_over_all_tensors():
    delta = {"a": f32([3, 0]), "b": f32([[4]])}
    assert update_norm(delta) == 5.0  # sqrt(9 + 0 + 16)
    clipped = clip_by_norm(delta, 1.0)
    # scale 1/5: [0.6, 0], [[0.8]]
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-7)
    np.testing.assert_allclose(clipped["b"], [[0.8]], rtol=1e-7)
    assert update_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    same = clip_by_norm(delta, 10.0)
    assert same["a"] is delta["a"] and same["b"] is delta["b"]
    with pytest.raises(NonFiniteError):
        clip_by_norm({"a": f32([np.inf])}, 1.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_norm(delta, 0.0)


OUTLIER_UPDATES = [{"w": f32([1, 0])}, {"w": f32([0, 1])}, {"w": f32([100, 0])}]
ORIGIN = {"w": f32([0, 0])}


def test_centered_clipping_pulls_an_outlier_in():
    # Residuals from v=0 with tau=2: [1,0] (norm 1, kept), [0,1] (kept),
    # [100,0] (norm 100 -> scaled by 2/100 -> [2,0]). Mean = [3/3, 1/3] = [1, 1/3].
    v = centered_clip(OUTLIER_UPDATES, ORIGIN, tau=2.0, iterations=1)
    np.testing.assert_allclose(v["w"], [1.0, 1 / 3], rtol=1e-6)
    # The plain mean would be [101/3, 1/3] = [33.67, 0.33].
    assert v["w"][0] < 2.0
    # A second iteration re-centers at v1 = [1, 1/3]:
    # [1,0]-v1 = [0,-1/3] and [0,1]-v1 = [-1,2/3] (norm 1.20) are kept;
    # [100,0]-v1 = [99,-1/3] has norm r = hypot(99, 1/3) and is scaled by 2/r.
    r = np.hypot(99.0, 1 / 3)
    expected = (
        np.array([1.0, 1 / 3])
        + (np.array([0.0, -1 / 3]) + np.array([-1.0, 2 / 3]) + np.array([99.0, -1 / 3]) * 2 / r) / 3
    )
    v2 = centered_clip(OUTLIER_UPDATES, ORIGIN, tau=2.0, iterations=2)
    np.testing.assert_allclose(v2["w"], expected, rtol=1e-6)


def test_centered_clipping_composes_across_a_tree_with_a_shared_reference():
    leaf_a, leaf_b = PartialAggregate(), PartialAggregate()
    for i, u in enumerate(OUTLIER_UPDATES):
        leaf = leaf_a if i < 2 else leaf_b
        accumulate(leaf, centered_clip_residual(u, ORIGIN, tau=2.0), 1.0, update_id=("i", i))
    v = recenter(ORIGIN, finalize(combine(leaf_a, leaf_b)))
    np.testing.assert_allclose(v["w"], centered_clip(OUTLIER_UPDATES, ORIGIN, 2.0)["w"], rtol=1e-6)
    assert {"clip_by_norm", "centered_clip_residual"} == TREE_COMPOSABLE
    assert {"coordinate_median", "trimmed_mean"} <= LEAF_ONLY


MEDIAN_UPDATES = [{"w": f32([1, 10])}, {"w": f32([2, 20])}, {"w": f32([100, -5])}]


def test_coordinate_median_by_hand():
    # column 0: 1, 2, 100 -> 2;  column 1: -5, 10, 20 -> 10
    np.testing.assert_array_equal(coordinate_median(MEDIAN_UPDATES)["w"], f32([2, 10]))
    # even count: column 0: 1, 2, 3, 100 -> (2+3)/2 = 2.5;  column 1: -5, 0, 10, 20 -> 5
    four = [*MEDIAN_UPDATES, {"w": f32([3, 0])}]
    np.testing.assert_array_equal(coordinate_median(four)["w"], f32([2.5, 5]))


def test_trimmed_mean_by_hand():
    four = [*MEDIAN_UPDATES, {"w": f32([3, 0])}]
    # trim 0.25 of 4 drops 1 from each end: mean(2, 3) = 2.5; mean(0, 10) = 5
    np.testing.assert_array_equal(trimmed_mean(four, 0.25)["w"], f32([2.5, 5]))
    five = [{"w": f32([x])} for x in (4, 1, 100, 3, 2)]
    # trim 0.2 of 5 drops 1 from each end: mean(2, 3, 4) = 3
    np.testing.assert_array_equal(trimmed_mean(five, 0.2)["w"], f32([3]))
    # trim 0: the plain mean (4+1+100+3+2)/5 = 22
    np.testing.assert_array_equal(trimmed_mean(five, 0.0)["w"], f32([22]))
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(five, 0.5)


def test_leaf_only_rules_refuse_partial_aggregates():
    p = three_update_partial()
    for call in (lambda: coordinate_median([p]), lambda: trimmed_mean(p, 0.1)):
        with pytest.raises(TypeError, match="does not compose"):
            call()
    with pytest.raises(ValueError, match="no update"):
        coordinate_median([])
    with pytest.raises(ShapeMismatchError):
        coordinate_median([{"w": f32([1])}, {"w": f32([1, 2])}])


def test_median_of_medians_is_not_the_median():
    leaf_a = [{"w": f32([0])}, {"w": f32([0])}, {"w": f32([9])}]
    leaf_b = [{"w": f32([1])}, {"w": f32([9])}, {"w": f32([9])}]
    of_medians = coordinate_median([coordinate_median(leaf_a), coordinate_median(leaf_b)])
    assert of_medians["w"][0] == 4.5  # median(0, 9)
    assert coordinate_median(leaf_a + leaf_b)["w"][0] == 5.0  # 0,0,1,9,9,9 -> (1+9)/2


def reference_weighted_sum(deltas_and_weights):
    """``sum_i w_i * x_i`` the long way: each product rounded to float32, then added to zeros."""
    acc = None
    for x, w in deltas_and_weights:
        if acc is None:
            acc = np.zeros(x.shape, dtype=np.float32)
        product = np.multiply(x, np.float32(w), dtype=np.float32)
        acc = np.add(acc, product, dtype=np.float32)
    return acc


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("weights", [(0.7, 0.3, 1.25), (1.0, 1.0, 1.0), (1.0, 0.5, 1.0)])
def test_fast_paths_give_the_bits_of_the_long_way(dtype, weights):
    # 300_001 elements: more than two blocks of the scaled add, and a ragged last block.
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal(300_001).astype(dtype) for _ in weights]
    p = PartialAggregate()
    for i, (x, w) in enumerate(zip(xs, weights, strict=True)):
        accumulate(p, {"w": x}, w, update_id=("isl", i))
    got = p.weighted_sum["w"]
    want = reference_weighted_sum(list(zip(xs, weights, strict=True)))
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable
    np.testing.assert_array_equal(got, want)
    assert got.tobytes() == want.tobytes()  # bit for bit


def test_first_delta_and_unit_weight_allocate_only_the_partial():
    n = 1 << 22  # 4 Mi float32 = 16 MiB
    delta = {"big": np.ones(n, dtype=np.float32)}
    for weight in (0.5, 1.0):
        p = PartialAggregate()
        tracemalloc.start()
        try:
            accumulate(p, delta, weight)  # the new partial itself: 16 MiB, nothing more
            _, peak_fresh = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            accumulate(p, delta, 1.0)  # in place, no scratch at all
            _, peak_add = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak_fresh < (16 << 20) + (64 << 10), f"fresh partial peak {peak_fresh} bytes"
        assert peak_add - (16 << 20) < 64 << 10, f"unit-weight add peak {peak_add} bytes"
        assert p.weighted_sum["big"][0] == weight + 1 and p.weighted_sum["big"][-1] == weight + 1
