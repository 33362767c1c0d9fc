"""The adaptive norm bound (aggregator.norm_bound) and the gateway's clip, against numbers
computed by hand."""

import math

import msgpack
import numpy as np
import pytest
from aggtools import delta_bytes, make_federation

from aggregator.config import MergeConfig
from aggregator.gateway import (
    AdmissionPolicy,
    WalHead,
    admit,
    encoded_norm,
    parse_wal_record,
    wal_record,
)
from aggregator.merge import PartialAggregate
from aggregator.norm_bound import NormBound, clipped_norm
from aggregator.pool import FileRef, MergeEvent, MergePool
from aggregator.pool.shm import ParamLayout
from aggregator.staleness import get_staleness_function
from comms.config import config_from_dict
from comms.envelope import Envelope
from comms.errors import ConfigError, MalformedError, NormBoundError
from comms.identity import ReplayGuard
from comms.update import Manifest

# ------------------------------------------------------------------ NormBound


def test_warm_up_bound_is_relative_to_theta_until_min_count_norms():
    nb = NormBound(factor=4.0, window=5, min_count=3, warmup_ratio=0.5)
    assert nb.bound(10.0) == 5.0 and nb.warming_up and nb.needs_theta
    nb.observe(1.0)
    nb.observe(2.0)
    assert nb.bound(10.0) == 5.0  # two norms: still 0.5 * ||theta||, not 4 * 1.5
    nb.observe(3.0)
    assert not nb.warming_up and not nb.needs_theta
    assert nb.bound(10.0) == 8.0 and nb.bound(None) == 8.0  # 4 * median(1, 2, 3)


def test_median_of_the_last_window_norms():
    nb = NormBound(factor=4.0, window=5, min_count=3)
    for n in (1.0, 2.0, 3.0, 10.0, 20.0):
        nb.observe(n)
    assert nb.median() == 3.0 and nb.bound() == 12.0
    nb.observe(4.0)  # 1.0 leaves the window: (2, 3, 10, 20, 4)
    assert nb.state() == [2.0, 3.0, 10.0, 20.0, 4.0]
    assert nb.median() == 4.0 and nb.bound() == 16.0
    even = NormBound(factor=3.0, window=4, min_count=1)
    for n in (5.0, 1.0, 3.0, 2.0):
        even.observe(n)
    assert even.bound() == 3.0 * 2.5  # the mean of the two middle ones


def test_without_theta_the_median_so_far_or_nothing():
    nb = NormBound(factor=4.0, window=8, min_count=4, warmup_ratio=0.5)
    assert nb.bound(None) is None and nb.bound(0.0) is None  # nothing to compare with
    nb.observe(2.0)
    assert nb.bound(None) == 8.0 and nb.bound(0.0) == 8.0
    assert nb.bound(100.0) == 50.0  # with theta, the warm-up bound


def test_a_zero_median_falls_back_to_theta_instead_of_zeroing_every_update():
    nb = NormBound(factor=4.0, window=4, min_count=2, warmup_ratio=0.25)
    for _ in range(3):
        nb.observe(0.0)
    assert nb.warming_up and nb.bound(8.0) == 2.0
    assert nb.bound(None) is None


def test_state_round_trip_keeps_the_last_window_norms():
    nb = NormBound(factor=4.0, window=3, min_count=1)
    nb.load([1.0, 2.0, 3.0, 4.0])
    assert nb.state() == [2.0, 3.0, 4.0]
    other = NormBound(factor=4.0, window=3, min_count=1)
    other.load(nb.state())
    assert other.bound() == nb.bound() == 4.0 * 3.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_observe_refuses_what_is_not_a_norm(bad):
    with pytest.raises(ValueError, match="norm"):
        NormBound().observe(bad)


@pytest.mark.parametrize(
    "kwargs",
    [{"factor": 1.0}, {"factor": math.inf}, {"window": 0}, {"min_count": 0},
     {"window": 4, "min_count": 5}, {"warmup_ratio": 0.0}],
    ids=repr,
)  # fmt: skip
def test_norm_bound_refuses_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        NormBound(**kwargs)


def test_clipped_norm_is_norm_times_scale():
    assert clipped_norm(5.0, 0.2) == 1.0 and clipped_norm(3.0, 1.0) == 3.0


# ------------------------------------------------------------------ config


def test_merge_config_clip_defaults_and_errors_name_the_key():
    assert config_from_dict(MergeConfig, {}).clip_mode == "adaptive"
    assert config_from_dict(MergeConfig, {"clip_norm": 2.0}).clip_mode == "static"
    assert config_from_dict(MergeConfig, {"clip": "off"}).clip_mode == "off"
    for doc, key in [
        ({"clip": "static"}, "clip_norm"),
        ({"clip": "adaptive", "clip_norm": 1.0}, "clip_norm"),
        ({"clip": "median"}, "clip"),
        ({"clip_factor": 0.5}, "clip_factor"),
        ({"clip_window": 0}, "clip_window"),
        ({"clip_min_count": 64}, "clip_min_count"),
        ({"clip_warmup_ratio": -1.0}, "clip_warmup_ratio"),
        ({"clip_action": "drop"}, "clip_action"),
    ]:
        with pytest.raises(ConfigError, match=f"{key}:"):
            config_from_dict(MergeConfig, doc)


# ------------------------------------------------------------------ the gateway's clip

# One update of norm 5 (3-4-0 over two tensors), clipped to bound 1: scale 0.2.
X = {"a": np.array([3.0, 0.0], dtype=np.float32), "b": np.array([[4.0]], dtype=np.float32)}


@pytest.fixture
def setup(tmp_path):
    fed = make_federation(tmp_path, 1, aggregators=(), shapes={"a": (2,), "b": (1, 1)})
    manifest = Manifest.from_arrays(X)
    data = delta_bytes(fed.islands[0], X, sequence=1)

    def run(data=data, decode=True, logged=None, clip_bound=None, **policy):
        pol = AdmissionPolicy(fed.roster, get_staleness_function("fedbuff"), **policy)
        return admit(data, policy=pol, manifests=lambda m: manifest, v_now=lambda m: 0,
                     guard=ReplayGuard(), logged=logged, decode=decode, clip_bound=clip_bound)  # fmt: skip

    return run, data


def test_a_delta_above_the_bound_is_scaled_to_it_and_keeps_its_weight(setup):
    run, _ = setup
    a = run(clip="adaptive", clip_bound=1.0)
    assert a.norm == 5.0 and a.scale == pytest.approx(0.2) and a.clipped
    assert a.weight == 1.0  # the weight in sum w_i is not touched
    assert a.window_norm == pytest.approx(1.0)
    np.testing.assert_array_equal(a.delta["a"], np.float32([3.0, 0.0]) * np.float32(0.2))
    np.testing.assert_array_equal(a.delta["b"], np.float32([[4.0]]) * np.float32(0.2))
    below = run(clip="adaptive", clip_bound=5.0)
    assert below.scale == 1.0 and not below.clipped and below.delta["b"][0, 0] == 4.0
    unbounded = run(clip="adaptive", clip_bound=None)  # no bound known yet
    assert unbounded.scale == 1.0 and unbounded.norm == 5.0


def test_validate_only_admission_measures_the_same_norm_without_keeping_arrays(setup):
    run, data = setup
    a = run(decode=False, clip="adaptive", clip_bound=1.0)
    assert a.delta is None and a.norm == 5.0 and a.scale == pytest.approx(0.2)
    assert encoded_norm(Envelope.from_bytes(data, max_bytes=1 << 20), Manifest.from_arrays(X)) == 5
    off = run(decode=False, clip="off")
    assert off.norm is None and off.scale == 1.0


def test_reject_action_refuses_with_a_typed_error_and_its_reason(setup):
    run, _ = setup
    with pytest.raises(NormBoundError, match="norm 5, above this aggregator's bound 1") as e:
        run(clip="adaptive", clip_action="reject", clip_bound=1.0)
    assert e.value.reason == "norm_bound"
    assert run(clip="adaptive", clip_action="reject", clip_bound=6.0).scale == 1.0


def test_static_clip_norm_still_clips(setup):
    run, _ = setup
    a = run(clip_norm=2.5)  # clip defaults to "static" with a clip_norm, as before
    assert a.scale == pytest.approx(0.5) and a.delta["b"][0, 0] == np.float32(4.0) * np.float32(0.5)
    assert run(clip_norm=2.5, clip_bound=0.1).scale == pytest.approx(0.5)  # static ignores it


def test_the_wal_head_carries_norm_and_scale_and_replays_them_as_logged(setup):
    run, data = setup
    a = run(clip="adaptive", clip_bound=1.0)
    head, body = parse_wal_record(wal_record(a, data))
    assert head == WalHead(0, 1.0, 5.0, a.scale) and bytes(body) == data
    # replayed under any policy, the logged scale decides: same bits as the first admission
    for policy in ({"clip": "off"}, {"clip": "adaptive"}, {"clip_norm": 100.0}):
        again = run(logged=head, **policy)
        assert again.scale == a.scale and again.norm == 5.0
        for k in X:
            assert again.delta[k].tobytes() == a.delta[k].tobytes()
    assert run(logged=head, decode=False, clip="off").scale == a.scale


def test_a_record_from_before_scales_were_logged_replays_as_it_was_first_merged(setup):
    run, data = setup
    packed = msgpack.packb({"s": 0, "w": 1.0})
    head, _ = parse_wal_record(len(packed).to_bytes(4, "big") + packed + data)
    assert head == WalHead(0, 1.0, None, None)
    assert run(logged=head, clip="adaptive").scale == 1.0  # never clipped then
    static = run(logged=head, clip_norm=2.5)  # clip_norm clipped it then: recomputed the same
    assert static.scale == pytest.approx(0.5)
    assert run(logged=head, decode=False, clip_norm=2.5).scale == static.scale


@pytest.mark.parametrize(
    "head",
    [{"s": 0, "w": 1.0, "k": 1.5}, {"s": 0, "w": 1.0, "k": -0.1}, {"s": 0, "w": 1.0, "k": "x"},
     {"s": 0, "w": 1.0, "n": math.nan}, {"s": 0, "w": 1.0, "n": -1.0}, {"s": 0, "w": 1.0, "n": True}],
    ids=repr,
)  # fmt: skip
def test_parse_wal_record_refuses_a_norm_or_scale_the_merge_cannot_use(head):
    packed = msgpack.packb(head)
    with pytest.raises(MalformedError, match="WAL record head"):
        parse_wal_record(len(packed).to_bytes(4, "big") + packed + b"envelope")


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_merge_workers_apply_the_gateway_scale_to_the_bit(codec, tmp_path):
    """S += w * (s * x) in a worker equals the gateway's scale_update, then accumulate."""
    fed = make_federation(tmp_path, 1, aggregators=(), shapes={"a": (2,), "b": (1, 1)})
    data = delta_bytes(fed.islands[0], X, sequence=1, codec=codec)
    pol = AdmissionPolicy(fed.roster, get_staleness_function("fedbuff"), clip="adaptive")
    kw = dict(policy=pol, manifests=lambda m: Manifest.from_arrays(X), v_now=lambda m: 0,
              clip_bound=1.0)  # fmt: skip
    inline = admit(data, guard=ReplayGuard(), **kw)
    pooled = admit(data, guard=ReplayGuard(), decode=False, **kw)
    assert pooled.delta is None and pooled.scale == inline.scale < 1
    want = PartialAggregate()
    inline.merge_into(want)
    path = tmp_path / "envelope"
    path.write_bytes(data)
    pool = MergePool(ParamLayout.from_shapes({"a": (2,), "b": (1, 1)}), max_workers=1)
    try:
        uid = (pooled.sender, pooled.sequence)
        pool.submit(MergeEvent(FileRef(str(path), 0, len(data)), 1.0, uid, 0, pooled.scale))
        got = pool.flush()
        with pytest.raises(ValueError, match="clip scale"):
            pool.submit(MergeEvent(FileRef(str(path), 0, len(data)), 1.0, uid, 0, 1.5))
    finally:
        pool.close()
    for k in X:
        assert got.weighted_sum[k].tobytes() == want.weighted_sum[k].tobytes(), k
    assert got.weight_sum == want.weight_sum == 1.0
