"""Outer optimizers by hand, against torch.optim.SGD, state round trips, the replica rule."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aggregator.outer import (
    CO2,
    OUTER_OPTIMIZERS,
    SGD,
    NesterovSGD,
    apply_update,
    make_outer_optimizer,
)
from comms.errors import ConfigError, NonFiniteError, ShapeMismatchError

REPO = Path(__file__).resolve().parents[1]


def f32(x):
    return np.asarray(x, dtype=np.float32)


def test_nesterov_two_steps_by_hand():
    opt = NesterovSGD(lr=0.5, momentum=0.5)  # exactly representable: bitwise checks hold
    theta = {"p": f32([1.0, 2.0])}
    # step 1: g = [0.5, -1]; m = 0.5*0 + g = [0.5, -1]
    #   u = -0.5 * (g + 0.5*m) = -0.5 * [0.75, -1.5] = [-0.375, 0.75]; theta = [0.625, 2.75]
    u = opt.step(theta, {"p": f32([0.5, -1.0])})
    np.testing.assert_array_equal(u["p"], f32([-0.375, 0.75]))
    np.testing.assert_array_equal(theta["p"], f32([1.0, 2.0]))  # step leaves theta alone
    apply_update(theta, u)
    np.testing.assert_array_equal(theta["p"], f32([0.625, 2.75]))
    # step 2: g = [1, 0]; m = 0.5*[0.5, -1] + [1, 0] = [1.25, -0.5]
    #   u = -0.5 * ([1, 0] + 0.5*[1.25, -0.5]) = -0.5 * [1.625, -0.25] = [-0.8125, 0.125]
    u = opt.step(theta, {"p": f32([1.0, 0.0])})
    np.testing.assert_array_equal(u["p"], f32([-0.8125, 0.125]))
    apply_update(theta, u)
    np.testing.assert_array_equal(theta["p"], f32([-0.1875, 2.875]))
    np.testing.assert_array_equal(opt.state_dict()["momentum/p"], f32([1.25, -0.5]))
    assert opt.steps == 2


def test_nesterov_defaults_are_diloco():
    opt = make_outer_optimizer()
    assert isinstance(opt, NesterovSGD) and opt.lr == 0.7 and opt.mu == 0.9
    theta = {"p": f32([0.0])}
    # step 1: m = 1; u = -0.7 * (1 + 0.9*1) = -1.33
    assert opt.step(theta, {"p": f32([1.0])})["p"][0] == pytest.approx(-1.33, rel=1e-6)
    # step 2: m = 0.9*1 + 1 = 1.9; u = -0.7 * (1 + 0.9*1.9) = -0.7 * 2.71 = -1.897
    assert opt.step(theta, {"p": f32([1.0])})["p"][0] == pytest.approx(-1.897, rel=1e-6)


def test_nesterov_matches_torch_sgd():
    import torch  # only the test compares against torch; the module never imports it

    rng = np.random.default_rng(1)
    theta = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": f32(rng.standard_normal(3))}
    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in theta.items()}
    ref = torch.optim.SGD(params.values(), lr=0.7, momentum=0.9, nesterov=True)
    opt = NesterovSGD()
    for _ in range(4):
        g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in theta.items()}
        for k, p in params.items():
            p.grad = torch.from_numpy(g[k].copy())
        ref.step()
        apply_update(theta, opt.step(theta, g))
    for k, p in params.items():
        # torch fuses multiply-adds (FMA); numpy rounds each op: a few ulps apart at most.
        np.testing.assert_allclose(theta[k], p.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_sgd_lr_one_is_fedavg():
    theta = {"p": f32([1.0, 2.0])}
    islands = [f32([0.0, 4.0]), f32([1.0, 1.0])]
    # deltas: anchor - params = [1, -2] and [0, 1]; mean g = [0.5, -0.5]
    g = {"p": np.mean([theta["p"] - x for x in islands], axis=0)}
    apply_update(theta, SGD(lr=1.0).step(theta, g))
    np.testing.assert_array_equal(theta["p"], np.mean(islands, axis=0))  # [0.5, 2.5]
    # lr = 0.5: u = -0.5 * [0.5, -0.5] = [-0.25, 0.25]
    np.testing.assert_array_equal(SGD(lr=0.5).step(theta, g)["p"], f32([-0.25, 0.25]))
    assert SGD().state_dict().keys() == {"step"}


def test_co2_clips_outer_momentum_for_real():
    opt = CO2(alpha=0.5, beta=0.5, gap_penalty=2.0, clip=0.25)
    theta = {"p": f32([0.0, 0.0, 0.0])}
    # m = 0.5*0 + [10, 0.125, -10] / 2 = [5, 0.0625, -5]; clamp to +-0.25 -> [0.25, 0.0625, -0.25]
    # u = -0.5 * m = [-0.125, -0.03125, 0.125]: exactly alpha*phi where the clip bit.
    u = opt.step(theta, {"p": f32([10.0, 0.125, -10.0])})
    np.testing.assert_array_equal(u["p"], f32([-0.125, -0.03125, 0.125]))
    assert abs(u["p"][0]) == 0.5 * 0.25 and abs(u["p"][2]) == 0.5 * 0.25
    # The clipped value is what is kept as momentum.
    np.testing.assert_array_equal(opt.momentum["p"], f32([0.25, 0.0625, -0.25]))
    # step 2, g = 0: m = 0.5 * [0.25, 0.0625, -0.25]; u = -0.5 * m
    u = opt.step(theta, {"p": f32([0.0, 0.0, 0.0])})
    np.testing.assert_array_equal(u["p"], f32([-0.0625, -0.015625, 0.0625]))
    # Without the clip the first step would be -0.5 * 5 = -2.5.
    unclipped = CO2(alpha=0.5, beta=0.5, gap_penalty=2.0, clip=None)
    assert unclipped.step(theta, {"p": f32([10.0, 0.125, -10.0])})["p"][0] == -2.5


@pytest.mark.parametrize("name", sorted(OUTER_OPTIMIZERS))
def test_state_round_trip(name):
    rng = np.random.default_rng(2)
    theta = {"a": f32(rng.standard_normal(5)), "b.weight": f32(rng.standard_normal((2, 2)))}
    grads = [{k: f32(rng.standard_normal(v.shape)) for k, v in theta.items()} for _ in range(3)]
    first = make_outer_optimizer(name)
    first.step(theta, grads[0])
    first.step(theta, grads[1])
    state = first.state_dict()
    assert int(state["step"]) == 2
    resumed = make_outer_optimizer(name)
    resumed.load_state_dict(state)
    for v in state.values():  # the state handed out is a copy
        v[...] = 0
    u_first, u_resumed = first.step(theta, grads[2]), resumed.step(theta, grads[2])
    for k in theta:
        np.testing.assert_array_equal(u_first[k], u_resumed[k])
    assert resumed.steps == 3


def test_load_state_dict_refuses_foreign_state():
    with pytest.raises(ValueError, match="keeps no momentum"):
        SGD().load_state_dict({"step": np.array(1), "momentum/p": f32([1.0])})
    with pytest.raises(ValueError, match="missing key 'step'"):
        NesterovSGD().load_state_dict({})
    with pytest.raises(ValueError, match="unexpected keys"):
        NesterovSGD().load_state_dict({"step": np.array(1), "velocity/p": f32([1.0])})


def test_step_and_apply_refuse_bad_input_without_changing_state():
    opt = NesterovSGD()
    theta = {"p": f32([1.0, 2.0])}
    with pytest.raises(NonFiniteError, match="'p'"):
        opt.step(theta, {"p": f32([np.nan, 0.0])})
    assert opt.steps == 0 and opt.momentum == {}
    with pytest.raises(ShapeMismatchError, match="missing \\['p'\\]"):
        opt.step(theta, {"q": f32([1.0, 2.0])})
    with pytest.raises(ShapeMismatchError, match="shape"):
        apply_update(theta, {"p": f32([1.0])})
    with pytest.raises(ValueError, match="writable float32"):
        apply_update({"p": np.zeros(2)}, {"p": f32([1.0, 1.0])})
    np.testing.assert_array_equal(theta["p"], f32([1.0, 2.0]))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: make_outer_optimizer("adam"), "unknown outer optimizer"),
        (lambda: make_outer_optimizer("sgd", momentum=0.9), "bad hyperparameters"),
        (lambda: NesterovSGD(momentum=1.0), "momentum must be in"),
        (lambda: SGD(lr=-1.0), "lr must be a positive"),
        (lambda: CO2(clip=0.0), "clip must be positive"),
        (lambda: CO2(gap_penalty=0.0), "gap_penalty must be positive"),
    ],
)
def test_bad_hyperparameters_are_config_errors(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_merge_path_does_not_import_torch():
    code = (
        "import sys\n"
        "import aggregator.staleness, aggregator.merge, aggregator.robust, aggregator.outer\n"
        "heavy = [m for m in ('torch', 'hivemind', 'grpc') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
