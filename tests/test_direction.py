"""The direction check's math (aggregator.direction) against numbers computed by hand, the
gateway's scoring (decoded and streamed alike), and its config keys."""

import math

import numpy as np
import pytest
from aggtools import delta_bytes, make_federation

from aggregator.config import MergeConfig
from aggregator.direction import (
    agreement,
    decide,
    dot,
    max_refusals,
    reference_from_update,
    update_dot,
)
from aggregator.gateway import AdmissionPolicy, WalHead, admit
from aggregator.staleness import get_staleness_function
from comms.errors import ConfigError, ShapeMismatchError
from comms.identity import ReplayGuard
from comms.update import Manifest


def test_agreement_is_the_cosine_with_minus_u_by_hand():
    # delta (1, 0) against u = (-1, 0): the step theta took was -delta's direction: +1
    assert agreement(-1.0, 1.0, 1.0) == 1.0
    # delta (1, 0) against u = (1, 1): <d, u> = 1, |u| = sqrt(2): cos with -u = -1/sqrt(2)
    assert agreement(1.0, 1.0, math.sqrt(2)) == pytest.approx(-1 / math.sqrt(2))
    # rounding just outside [-1, 1] is clamped; undefined cosines are None
    assert agreement(-1.0000001, 1.0, 1.0) == 1.0
    assert agreement(0.0, 0.0, 1.0) is None and agreement(0.0, 1.0, 0.0) is None
    assert agreement(math.inf, 1.0, 1.0) is None


def test_update_dot_and_reference_by_hand():
    u = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([[2.0]], np.float32)}
    ref = reference_from_update(3, u)
    assert ref.version == 3 and ref.norm == pytest.approx(3.0)  # sqrt(1 + 4 + 4)
    d = {"a": np.array([3.0, -1.0], np.float32), "b": np.array([[0.5]], np.float32)}
    assert update_dot(d, ref) == pytest.approx(3 - 2 + 1)
    with pytest.raises(ShapeMismatchError):
        update_dot({"a": d["a"]}, ref)


def test_dot_accumulates_in_float64_across_blocks():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000).astype(np.float32)  # several 64 Ki blocks
    y = rng.standard_normal(200_000).astype(np.float32)
    assert dot(x, y) == pytest.approx(float(x.astype(np.float64) @ y.astype(np.float64)), 1e-12)


def test_decide_refuses_below_the_threshold_up_to_the_cap():
    assert decide(0.2, 0.0, 0, 1) == "admit"
    assert decide(0.0, 0.0, 0, 1) == "admit"  # at the threshold: admitted
    assert decide(None, 0.0, 5, 1) == "admit"  # no reference: nothing to check
    assert decide(-0.1, 0.0, 0, 1) == "refused"
    assert decide(-0.1, 0.0, 1, 1) == "over_cap"
    assert decide(-0.1, -0.2, 0, 1) == "admit"  # a lower threshold lets it through
    assert decide(0.05, 0.1, 1, 2) == "refused"


def test_max_refusals_is_a_minority_of_buffer_k():
    assert [max_refusals(k) for k in (1, 2, 3, 4, 5, 6, 7, 16)] == [1, 1, 1, 1, 2, 2, 3, 7]


def _scored(tmp_path, delta, u, decode=True, logged=None):
    tmp_path.mkdir()
    fed = make_federation(tmp_path, 1, aggregators=("root",))
    policy = AdmissionPolicy(roster=fed.roster, staleness_fn=get_staleness_function("fedbuff"))
    data = delta_bytes(fed.islands[0], delta, 1, base_version=1, codec="int8")
    return admit(data, policy=policy, manifests=lambda _: Manifest.from_arrays(fed.theta0),
                 v_now=lambda _: 1, guard=ReplayGuard(), decode=decode, logged=logged,
                 reference=reference_from_update(1, u))  # fmt: skip


def test_the_gateway_scores_a_delta_decoded_or_streamed_alike(tmp_path):
    rng = np.random.default_rng(1)
    shapes = {"w": (32, 16), "b": (16,)}
    u = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    honest = {k: (-0.7 * u[k] + 0.5 * rng.standard_normal(u[k].shape)).astype(np.float32)
              for k in u}  # fmt: skip
    flipped = {k: -v for k, v in honest.items()}
    a = _scored(tmp_path / "a", honest, u)
    b = _scored(tmp_path / "b", honest, u, decode=False)
    c = _scored(tmp_path / "c", flipped, u)
    assert a.agreement > 0.5 and a.reference_version == 1
    assert b.agreement == pytest.approx(a.agreement, abs=1e-9)  # streamed, one tensor at a time
    assert c.agreement == pytest.approx(-a.agreement, abs=1e-9)
    # a replayed record is never scored: its admission was decided when it was logged
    replay = _scored(tmp_path / "d", flipped, u, logged=WalHead(0, 1.0, 1.0, 1.0))
    assert replay.agreement is None and replay.reference_version is None


@pytest.mark.parametrize(
    "kw, key",
    [({"direction": "maybe"}, "direction"), ({"direction_min_cos": 1.0}, "direction_min_cos"),
     ({"direction_min_cos": -1.5}, "direction_min_cos"),
     ({"direction_min_cos": math.nan}, "direction_min_cos")],
)  # fmt: skip
def test_bad_direction_config_names_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        MergeConfig(**kw).validate()


def test_the_direction_check_is_on_by_default_at_zero():
    m = MergeConfig()
    m.validate()
    assert m.direction == "reject" and m.direction_min_cos == 0.0
