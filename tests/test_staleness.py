"""Staleness and its weights, against numbers computed by hand."""

from itertools import pairwise

import pytest

from aggregator.staleness import (
    STALENESS_FUNCTIONS,
    ConstantWeight,
    FedBuffWeight,
    FutureBaseVersionError,
    HingeWeight,
    PolynomialWeight,
    admit,
    get_staleness_function,
    require_admitted,
    staleness,
    staleness_weight,
)
from comms.errors import ConfigError, RejectedError, StaleError

STALENESSES = (0, 1, 3, 8)


def test_staleness_is_now_minus_base():
    assert staleness(base_version=7, v_now=7) == 0
    assert staleness(base_version=4, v_now=7) == 3


def test_base_version_from_the_future_is_refused():
    with pytest.raises(FutureBaseVersionError, match="from the future") as e:
        staleness(base_version=8, v_now=7)
    assert isinstance(e.value, RejectedError)
    assert e.value.reason == "future_base_version"
    with pytest.raises(FutureBaseVersionError):
        admit(update_base_version=8, v_now=7, max_staleness=None)


@pytest.mark.parametrize(
    "name, params, expected",
    [
        # fedbuff 1/sqrt(1+s): 1/sqrt(1)=1, 1/sqrt(2)=0.70710678, 1/sqrt(4)=0.5, 1/sqrt(9)=1/3
        ("fedbuff", {}, (1.0, 0.7071067811865476, 0.5, 1 / 3)),
        # polynomial default a=0.5 is fedbuff
        ("polynomial", {}, (1.0, 0.7071067811865476, 0.5, 1 / 3)),
        # polynomial a=1: 1/1, 1/2, 1/4, 1/9
        ("polynomial", {"a": 1.0}, (1.0, 0.5, 0.25, 1 / 9)),
        # polynomial a=2: 1/1, 1/4, 1/16, 1/81
        ("polynomial", {"a": 2.0}, (1.0, 0.25, 0.0625, 1 / 81)),
        # hinge a=10, b=4 (defaults): s<=4 -> 1; s=8 -> 1/(10*(8-4)+1) = 1/41
        ("hinge", {}, (1.0, 1.0, 1.0, 1 / 41)),
        # hinge a=0.5, b=1: s=0,1 -> 1; s=3 -> 1/(0.5*2+1) = 1/2; s=8 -> 1/(0.5*7+1) = 2/9
        ("hinge", {"a": 0.5, "b": 1}, (1.0, 1.0, 0.5, 2 / 9)),
        ("constant", {}, (1.0, 1.0, 1.0, 1.0)),
    ],
)
def test_weights_by_hand(name, params, expected):
    for s, want in zip(STALENESSES, expected, strict=True):
        assert staleness_weight(name, s, **params) == pytest.approx(want, rel=1e-12, abs=0)


def test_registry_names_and_objects():
    assert set(STALENESS_FUNCTIONS) == {"fedbuff", "polynomial", "hinge", "constant"}
    assert isinstance(get_staleness_function(), FedBuffWeight)
    fn = HingeWeight(a=2.0, b=0)
    assert get_staleness_function(fn) is fn
    # 1/(2*(3-0)+1) = 1/7
    assert staleness_weight(fn, 3) == pytest.approx(1 / 7)
    assert repr(PolynomialWeight(a=1.5)) == "PolynomialWeight(a=1.5)"
    assert ConstantWeight()(100) == 1.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: get_staleness_function("exponential"), "unknown staleness function"),
        (lambda: get_staleness_function("polynomial", a=-1.0), "a must be a positive"),
        (lambda: get_staleness_function("hinge", b=-2), "b must be >= 0"),
        (lambda: get_staleness_function("fedbuff", a=1.0), "bad parameters"),
        (lambda: get_staleness_function(FedBuffWeight(), a=1.0), "already built"),
    ],
)
def test_bad_configuration_is_a_config_error(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_negative_staleness_has_no_weight():
    with pytest.raises(ValueError, match=">= 0"):
        staleness_weight("fedbuff", -1)


def test_admit_within_and_beyond_the_bound():
    assert admit(update_base_version=10, v_now=12, max_staleness=2) == (True, 2, "")
    ok, s, reason = admit(update_base_version=9, v_now=12, max_staleness=2)
    assert not ok and s == 3
    assert reason.startswith("stale:") and "staleness 3" in reason and "max_staleness 2" in reason
    # No bound: anything from the past is admitted.
    assert admit(update_base_version=0, v_now=10_000, max_staleness=None).ok


def test_require_admitted_raises_stale_error():
    assert require_admitted(5, 6, max_staleness=1) == 1
    with pytest.raises(StaleError, match="max_staleness 1") as e:
        require_admitted(4, 6, max_staleness=1)
    assert e.value.grpc_code == "FAILED_PRECONDITION"


def test_weights_are_decreasing_and_positive():
    for name in STALENESS_FUNCTIONS:
        ws = [staleness_weight(name, s) for s in range(50)]
        assert all(0 < w <= 1 for w in ws)
        assert all(a >= b for a, b in pairwise(ws))
