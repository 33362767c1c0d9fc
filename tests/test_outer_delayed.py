"""Delayed Nesterov (Liu et al. 2024, Algorithm 3): by hand, against NesterovSGD, state kept
across a root restart mid-period, and bad hyperparameters."""

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.merge import PartialAggregate
from aggregator.outer import DelayedNesterov, NesterovSGD, make_outer_optimizer
from aggregator.root import RootModel
from aggregator.store import ModelStore
from comms.codecs import get_codec
from comms.config import config_from_dict
from comms.errors import ConfigError
from comms.identity import Identity


def f32(x):
    return np.asarray(x, dtype=np.float32)


def random_grads(rng, theta, n):
    return [{k: f32(rng.standard_normal(v.shape)) for k, v in theta.items()} for _ in range(n)]


def test_two_periods_by_hand():
    opt = DelayedNesterov(lr=0.5, momentum=0.5, delay=2)  # all values exact in float32
    theta = {"p": f32([0.0, 0.0])}
    # step 1 opens a period: d = g = [1, -2]; no momentum step: u = -0.5 * g / 2
    u = opt.step(theta, {"p": f32([1.0, -2.0])})
    np.testing.assert_array_equal(u["p"], f32([-0.25, 0.5]))
    np.testing.assert_array_equal(opt.momentum["p"], f32([0.0, 0.0]))  # untouched mid-period
    # step 2 closes it: d = [4, -2]; m = 0.5 * 0 + d / 2 = [2, -1]
    #   u = -0.5 * (g / 2 + 0.5 * m) = -0.5 * ([1.5, 0] + [1, -0.5]) = [-1.25, 0.25]
    u = opt.step(theta, {"p": f32([3.0, 0.0])})
    np.testing.assert_array_equal(u["p"], f32([-1.25, 0.25]))
    np.testing.assert_array_equal(opt.momentum["p"], f32([2.0, -1.0]))
    # step 3: d = [-1, 1]; u = -0.5 * [-0.5, 0.5]
    u3 = opt.step(theta, {"p": f32([-1.0, 1.0])})
    np.testing.assert_array_equal(u3["p"], f32([0.25, -0.25]))
    # step 4: d = [0, 2]; m = 0.5 * [2, -1] + [0, 1] = [1, 0.5]
    #   u = -0.5 * ([0.5, 0.5] + 0.5 * [1, 0.5]) = [-0.5, -0.375]
    u4 = opt.step(theta, {"p": f32([1.0, 1.0])})
    np.testing.assert_array_equal(u4["p"], f32([-0.5, -0.375]))
    np.testing.assert_array_equal(opt.momentum["p"], f32([1.0, 0.5]))
    # the period as a whole: -lr * (mean g + mu * m) = -0.5 * ([0, 1] + [0.5, 0.25])
    np.testing.assert_array_equal(u3["p"] + u4["p"], f32([-0.25, -0.625]))
    assert opt.steps == 4 and opt.state_dict().keys() == {"step", "momentum/p"}


def test_a_period_is_one_nesterov_step_on_its_mean():
    rng = np.random.default_rng(3)
    theta = {"a": f32(rng.standard_normal((3, 2))), "b": f32(rng.standard_normal(4))}
    delayed, plain = DelayedNesterov(delay=3), NesterovSGD()
    for _ in range(3):  # three periods
        grads = random_grads(rng, theta, 3)
        moved = {k: np.zeros_like(v) for k, v in theta.items()}
        for g in grads:
            for k, u in delayed.step(theta, g).items():
                moved[k] += u
        mean = {k: np.mean([g[k] for g in grads], axis=0) for k in theta}
        expected = plain.step(theta, mean)
        for k in theta:
            np.testing.assert_allclose(moved[k], expected[k], rtol=1e-5, atol=1e-6)


def test_delay_one_is_nesterov_bit_for_bit():
    rng = np.random.default_rng(4)
    theta = {"w": f32(rng.standard_normal((5, 3))), "b": f32(rng.standard_normal(3))}
    theta["w"][0, 0] = 0.0  # a zero gradient and momentum: the sign of zero must match too
    delayed = make_outer_optimizer("delayed_nesterov", lr=0.7, momentum=0.9, delay=1)
    plain = NesterovSGD(lr=0.7, momentum=0.9)
    for i, g in enumerate(random_grads(rng, theta, 8)):
        g["w"][0, 0] = -0.0
        fraction = (1.0, 1.0, 0.25, 1.0, 0.6)[i % 5]  # partial steps as the root takes them
        u_delayed, u_plain = delayed.step(theta, g, fraction), plain.step(theta, g, fraction)
        for k in theta:
            assert u_delayed[k].tobytes() == u_plain[k].tobytes(), (i, k)
    for k, v in plain.state_dict().items():
        assert delayed.state_dict()[k].tobytes() == v.tobytes()


def test_partial_version_scales_its_share():
    # delay 2, lr 0.5, mu 0.5; version 1 is a quarter step: u = -0.5 * 0.25 * g / 2; d = g / 4
    opt = DelayedNesterov(lr=0.5, momentum=0.5, delay=2)
    theta = {"p": f32([0.0])}
    np.testing.assert_array_equal(opt.step(theta, {"p": f32([8.0])}, 0.25)["p"], f32([-0.5]))
    # version 2, full: d = 2 + 4 = 6; m = 0.5 * 0 + 6 / 2 = 3; u = -0.5 * (4 / 2 + 0.5 * 3)
    np.testing.assert_array_equal(opt.step(theta, {"p": f32([4.0])})["p"], f32([-1.75]))


def test_state_kept_through_a_root_restart_mid_period(tmp_path):
    """The root's own persistence (RootModel.state_arrays -> ModelStore -> load_state_arrays):
    a root stopped inside a period continues it exactly as one that kept running."""
    rng = np.random.default_rng(5)
    # names in file order, as the root reads theta_0 from its safetensors init
    theta0 = {"b": f32(rng.standard_normal(3)), "w": f32(rng.standard_normal((4, 3)))}
    grads = random_grads(rng, theta0, 7)

    def root():
        opt = make_outer_optimizer("delayed_nesterov", lr=0.7, momentum=0.9, delay=3)
        return RootModel("m", theta0, opt, get_codec("none"), Identity.generate())

    def partial(g):
        return PartialAggregate(weight_sum=1.0, weighted_sum=dict(g), count=1, work=1.0)

    running, stopped = root(), root()
    for g in grads[:4]:  # 4 steps: one period of 3, then 1 step into the next
        running.step(partial(g))
        stopped.step(partial(g))
    store = ModelStore(tmp_path, "m")
    store.save_state(stopped.state_arrays(), {"version": stopped.version})
    assert "outer/pending/w" in stopped.state_arrays()
    restarted = root()
    arrays, meta = ModelStore(tmp_path, "m").load_state()
    restarted.load_state_arrays(arrays, int(meta["version"]))
    for g in grads[4:]:  # the rest of that period and the start of the next
        a, b = running.step(partial(g)), restarted.step(partial(g))
        for k in theta0:
            assert a.applied[k].tobytes() == b.applied[k].tobytes()
    for k in theta0:
        assert running.theta[k].tobytes() == restarted.theta[k].tobytes()


def test_state_saved_with_another_delay_is_refused():
    theta = {"p": f32([1.0])}
    opt = DelayedNesterov(delay=3)
    opt.step(theta, {"p": f32([1.0])})  # step 1: one pending sum
    state = opt.state_dict()
    with pytest.raises(ValueError, match="holds pending sums"):
        DelayedNesterov(delay=1).load_state_dict(state)  # 1 % 1 == 0: a period's start
    with pytest.raises(ValueError, match="needs pending sums"):
        DelayedNesterov(delay=2).load_state_dict({k: v for k, v in state.items()
                                                   if not k.startswith("pending/")})  # fmt: skip
    with pytest.raises(ValueError, match="unexpected keys"):
        DelayedNesterov(delay=3).load_state_dict({**state, "velocity/p": f32([0.0])})


@pytest.mark.parametrize(
    "params, message",
    [
        ({"delay": 0}, "delay must be a whole number"),
        ({"delay": 2.5}, "delay must be a whole number"),
        ({"delay": True}, "delay must be a whole number"),
        ({"delay": "4"}, "delay must be a whole number"),
        ({"lr": 0.0}, "lr must be a positive"),
        ({"lr": float("nan")}, "lr must be a positive"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"nesterov_period": 4}, "bad hyperparameters"),
    ],
)
def test_bad_hyperparameters_are_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        make_outer_optimizer("delayed_nesterov", **params)


def test_whole_float_delay_is_accepted():  # "delay=4" on a command line parses as 4.0
    assert make_outer_optimizer("delayed_nesterov", delay=4.0).delay == 4


def test_root_config_names_the_key_at_load():
    doc = {"name": "root", "role": "root", "models": [
        {"model_id": "g", "init": "x.safetensors", "outer": "delayed_nesterov",
         "outer_params": {"lr": 0.7, "momentum": 0.9, "delay": 0}}]}  # fmt: skip
    with pytest.raises(ConfigError, match=r"root\.toml: models\[0\]: outer / outer_params: "
                       r"delayed_nesterov: delay"):  # fmt: skip
        config_from_dict(AggregatorConfig, doc, "root.toml")
    doc["models"][0]["outer_params"]["delay"] = 4
    cfg = config_from_dict(AggregatorConfig, doc, "root.toml")
    assert cfg.models[0].outer == "delayed_nesterov"
