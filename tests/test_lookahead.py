"""The island's replay of the root's Nesterov step (rebase = "lookahead")."""

import itertools

import numpy as np
import pytest

from aggregator.outer import NesterovSGD
from island.lookahead import NesterovReplay


def grads(rng, n, shape=(5, 3)):
    return [{"w": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def test_replay_rebuilds_the_roots_momentum_from_its_updates():
    rng = np.random.default_rng(0)
    root = NesterovSGD(lr=0.7, momentum=0.9)
    theta = {"w": rng.standard_normal((5, 3)).astype(np.float32)}
    replay = NesterovReplay(0.7, 0.9)
    for g in grads(rng, 6):
        u = root.step(theta, g)
        theta = {"w": theta["w"] + u["w"]}
        replay.observe(u)
    np.testing.assert_allclose(
        replay.momentum["w"], root.state_dict()["momentum/w"], rtol=1e-4, atol=1e-5
    )


def test_replay_follows_versions_the_root_took_as_part_of_a_step():
    """Versions of fewer updates than buffer_k (meta "fraction" < 1) among full ones: the
    replica still holds the root's momentum."""
    rng = np.random.default_rng(1)
    root = NesterovSGD(lr=0.7, momentum=0.9)
    theta = {"w": rng.standard_normal((5, 3)).astype(np.float32)}
    replay = NesterovReplay(0.7, 0.9)
    for g, f in zip(grads(rng, 7), [1.0, 0.25, 0.5, 1.0, 0.75, 0.25, 1.0], strict=True):
        u = root.step(theta, g, fraction=f)
        theta = {"w": theta["w"] + u["w"]}
        replay.observe(u, fraction=f)
    np.testing.assert_allclose(
        replay.momentum["w"], root.state_dict()["momentum/w"], rtol=1e-4, atol=1e-5
    )


def test_predict_is_the_roots_next_step_when_the_proxy_is_the_mean():
    rng = np.random.default_rng(1)
    root = NesterovSGD(lr=0.7, momentum=0.9)
    theta = {"w": rng.standard_normal((5, 3)).astype(np.float32)}
    replay = NesterovReplay(0.7, 0.9)
    history = grads(rng, 4)
    for g in history:
        u = root.step(theta, g)
        theta = {"w": theta["w"] + u["w"]}
        replay.observe(u)
    nxt, after = grads(rng, 2)
    predicted = replay.predict(theta, [nxt, after])  # two steps ahead, replica unchanged
    for g in (nxt, after):
        u = root.step(theta, g)
        theta = {"w": theta["w"] + u["w"]}
    np.testing.assert_allclose(predicted["w"], theta["w"], rtol=1e-4, atol=1e-5)
    # predict left the replica as it was: predicting again gives the same point
    again = replay.predict(theta, [])
    np.testing.assert_array_equal(again["w"], theta["w"])


def test_an_unknown_momentum_is_forgotten_within_a_few_versions():
    rng = np.random.default_rng(2)
    root = NesterovSGD(lr=0.7, momentum=0.9)
    theta = {"w": np.zeros((5, 3), np.float32)}
    late = NesterovReplay(0.7, 0.9)
    errors = []
    for i, g in enumerate(grads(rng, 16)):
        u = root.step(theta, g)
        theta = {"w": theta["w"] + u["w"]}
        if i >= 4:  # joins after a snapshot: momentum unknown, taken as zero
            late.observe(u)
            truth = root.state_dict()["momentum/w"]
            errors.append(float(np.abs(late.momentum["w"] - truth).max()))
    assert errors[0] > 0.1  # the first guess is really off
    # the error shrinks by mu / (1 + mu) = 0.47 per version, down to float32 rounding
    assert errors[-1] < 1e-2 * errors[0]
    assert all(b <= a * 0.5 + 1e-3 for a, b in itertools.pairwise(errors))


def test_plain_sgd_needs_no_state_and_bad_settings_are_refused():
    replay = NesterovReplay(0.5, 0.0)
    replay.observe({"w": np.ones(3, np.float32)})
    assert replay.momentum == {}
    out = replay.predict({"w": np.zeros(3, np.float32)}, [{"w": np.ones(3, np.float32)}])
    np.testing.assert_array_equal(out["w"], np.full(3, -0.5, np.float32))
    for lr, mu in ((0.0, 0.9), (float("nan"), 0.9), (0.7, 1.0), (0.7, -0.1)):
        with pytest.raises(ValueError, match="lookahead"):
            NesterovReplay(lr, mu)
