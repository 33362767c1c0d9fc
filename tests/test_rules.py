"""Ensemble rules, mixing and c-BTM router weights against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from router.rules import (
    RULES,
    Selection,
    cbtm_router_weights,
    experts_to_run,
    make_rule,
    mix_log_probabilities,
    mix_probabilities,
    mix_velocities,
    parse_rule,
)

# Two rows, three experts.
W = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64)


def assert_selection(sel: Selection, indices, weights) -> None:
    assert sel.indices == indices
    torch.testing.assert_close(sel.weights, torch.tensor(weights, dtype=torch.float64))
    torch.testing.assert_close(sel.weights.sum(dim=1), torch.ones(2, dtype=torch.float64))


def test_registry_names() -> None:
    assert set(RULES) == {"full", "top_k", "top1", "threshold"}


def test_full_keeps_every_expert() -> None:
    assert_selection(make_rule("full").select(W), [[0, 1, 2], [0, 1, 2]], W.tolist())


def test_top_k_two() -> None:
    # Row 0: 0.5, 0.3 -> 0.5/0.8, 0.3/0.8. Row 1: 0.6, 0.3 -> 0.6/0.9, 0.3/0.9.
    sel = make_rule("top_k", k=2).select(W)
    assert_selection(sel, [[0, 1], [1, 2]], [[0.625, 0.375, 0.0], [0.0, 2 / 3, 1 / 3]])


def test_top_k_larger_than_experts_is_full() -> None:
    assert make_rule("top_k", k=5).select(W).indices == [[0, 1, 2], [0, 1, 2]]


def test_top1_is_one_hot_on_argmax() -> None:
    sel = make_rule("top1").select(W)
    assert_selection(sel, [[0], [1]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def test_top1_tie_goes_to_lower_index() -> None:
    sel = make_rule("top1").select(torch.tensor([[0.4, 0.4, 0.2]]))
    assert sel.indices == [[0]]
    assert make_rule("top_k", k=1).select(torch.tensor([[0.2, 0.4, 0.4]])).indices == [[1]]


def test_threshold() -> None:
    # tau = 0.3: row 0 keeps 0.5, 0.3 (-> 0.625, 0.375); row 1 keeps 0.6, 0.3 (-> 2/3, 1/3).
    sel = make_rule("threshold", tau=0.3).select(W)
    assert_selection(sel, [[0, 1], [1, 2]], [[0.625, 0.375, 0.0], [0.0, 2 / 3, 1 / 3]])
    # tau = 0.2: row 0 keeps everything; row 1 keeps 0.6 and 0.3.
    sel = make_rule("threshold", tau=0.2).select(W)
    assert_selection(sel, [[0, 1, 2], [1, 2]], [[0.5, 0.3, 0.2], [0.0, 2 / 3, 1 / 3]])


def test_threshold_always_keeps_the_argmax() -> None:
    sel = make_rule("threshold", tau=0.9).select(W)
    assert_selection(sel, [[0], [1]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def test_rules_renormalise_unnormalised_rows() -> None:
    sel = make_rule("full").select(torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(sel.weights, torch.tensor([[0.5, 0.5]]))


def test_parse_rule_specs() -> None:
    assert isinstance(parse_rule("full"), RULES["full"])
    assert parse_rule("top_k:3").k == 3
    assert parse_rule(" threshold:0.25 ").tau == 0.25
    assert isinstance(parse_rule("top1"), RULES["top1"])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: make_rule("top3"), "unknown ensemble rule 'top3'; known rules: full"),
        (lambda: make_rule("top_k", k=0), "integer k >= 1"),
        (lambda: make_rule("threshold", tau=1.5), "0 <= tau <= 1"),
        (lambda: make_rule("full", k=2), "bad parameters"),
        (lambda: parse_rule("top_k:two"), "bad rule spec"),
        (lambda: parse_rule("full:1"), "bad rule spec"),
        (lambda: make_rule("full").select(torch.tensor([0.5, 0.5])), "shape"),
        (lambda: make_rule("full").select(torch.tensor([[0.5, float("nan")]])), "NaN"),
        (lambda: make_rule("full").select(torch.tensor([[1.5, -0.5]])), "non-negative"),
        (lambda: make_rule("top1").select(torch.tensor([[0.0, 0.0]])), "positive total"),
    ],
)
def test_bad_input_gets_clear_errors(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_experts_to_run_is_union_over_rows() -> None:
    assert make_rule("top_k", k=2).select(W).experts_to_run() == [0, 1, 2]
    assert experts_to_run(make_rule("top1").select(W)) == [0, 1]
    # Every row picks expert 2: only expert 2 runs.
    all_pick_two = torch.tensor([[0.1, 0.2, 0.7], [0.3, 0.1, 0.6], [0.0, 0.0, 1.0]])
    assert experts_to_run(make_rule("top1").select(all_pick_two)) == [2]
    assert experts_to_run(torch.tensor([[False, True], [False, False]])) == [1]


def test_mix_velocities_full_by_hand() -> None:
    # Velocities (K=3, B=2, 2): expert k gives row b the vector below.
    v = torch.tensor(
        [
            [[1.0, 0.0], [2.0, 2.0]],
            [[0.0, 1.0], [-1.0, 0.0]],
            [[3.0, 3.0], [0.0, 4.0]],
        ],
        dtype=torch.float64,
    )
    # Row 0: 0.5*(1,0) + 0.3*(0,1) + 0.2*(3,3) = (1.1, 0.9).
    # Row 1: 0.1*(2,2) + 0.6*(-1,0) + 0.3*(0,4) = (-0.4, 1.4).
    expected = torch.tensor([[1.1, 0.9], [-0.4, 1.4]], dtype=torch.float64)
    torch.testing.assert_close(mix_velocities(W, v), expected)


def test_mix_velocities_with_only_the_run_experts() -> None:
    sel = make_rule("top1").select(torch.tensor([[0.1, 0.2, 0.7], [0.3, 0.1, 0.6]]))
    run = sel.experts_to_run()
    assert run == [2]
    v2 = torch.tensor([[[[5.0]]], [[[7.0]]]]).reshape(1, 2, 1, 1)  # only expert 2 ran
    out = mix_velocities(sel.weights, v2, experts=run)
    assert out.shape == (2, 1, 1)
    torch.testing.assert_close(out.flatten(), torch.tensor([5.0, 7.0]))
    with pytest.raises(ValueError, match=r"experts \[0, 1\] whose outputs were not given"):
        mix_velocities(W, torch.zeros(1, 2, 2, dtype=torch.float64), experts=[2])
    with pytest.raises(ValueError, match="expected"):
        mix_velocities(W, torch.zeros(3, 5, 2, dtype=torch.float64))


def test_mix_probabilities_by_hand() -> None:
    probs = torch.tensor(
        [
            [[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]],
            [[0.1, 0.8, 0.1], [0.2, 0.2, 0.6]],
            [[0.2, 0.2, 0.6], [1.0, 0.0, 0.0]],
        ],
        dtype=torch.float64,
    )
    # Row 0: 0.5*(.7,.2,.1) + 0.3*(.1,.8,.1) + 0.2*(.2,.2,.6) = (0.42, 0.38, 0.20).
    # Row 1: 0.1*(.5,.5,0) + 0.6*(.2,.2,.6) + 0.3*(1,0,0) = (0.47, 0.17, 0.36).
    expected = torch.tensor([[0.42, 0.38, 0.20], [0.47, 0.17, 0.36]], dtype=torch.float64)
    log_mix = mix_probabilities(W, probs)
    torch.testing.assert_close(log_mix.exp(), expected)
    torch.testing.assert_close(log_mix.exp().sum(dim=1), torch.ones(2, dtype=torch.float64))


def test_mix_log_probabilities_stable_with_tiny_probabilities() -> None:
    # exp(-1000) underflows even in float64; the mixture must still be exact in log space.
    w = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    lp = torch.tensor([[[-1000.0, 0.0]], [[-1001.0, 0.0]]], dtype=torch.float64)  # (K, B, V)
    out = mix_log_probabilities(w, lp)
    expected_tiny = -1000.0 + math.log(0.5 * (1.0 + math.exp(-1.0)))
    assert torch.isfinite(out).all()
    assert out[0, 0].item() == pytest.approx(expected_tiny, rel=1e-12)
    assert out[0, 1].item() == pytest.approx(0.0, abs=1e-12)


def test_mix_log_probabilities_skips_zero_weight_experts() -> None:
    # Top-1 weights zero expert 1, whose log-prob of token 0 is -inf: no NaN may appear.
    sel = make_rule("top1").select(torch.tensor([[0.9, 0.1]]))
    lp = torch.log(torch.tensor([[[0.25, 0.75]], [[0.0, 1.0]]]))
    out = mix_log_probabilities(sel.weights, lp)
    torch.testing.assert_close(out.exp(), torch.tensor([[0.25, 0.75]]))


def test_cbtm_router_weights_by_hand() -> None:
    e = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    c = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    # Row 0 squared distances (0, 1, 4); row 1: (2, 1, 2). T = 1 -> softmax(-d).
    w = cbtm_router_weights(e, c, temperature=1.0)
    z0 = 1 + math.exp(-1) + math.exp(-4)
    z1 = 2 * math.exp(-2) + math.exp(-1)
    expected = torch.tensor(
        [
            [1 / z0, math.exp(-1) / z0, math.exp(-4) / z0],
            [math.exp(-2) / z1, math.exp(-1) / z1, math.exp(-2) / z1],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2, dtype=torch.float64))


def test_cbtm_router_weights_stable_at_small_temperature() -> None:
    # Distances 10000 and 10001 at T = 0.1: exp(-1e5) underflows, softmax must not.
    e = torch.tensor([[0.0]])
    c = torch.tensor([[100.0], [math.sqrt(10001.0)]])
    w = cbtm_router_weights(e, c, temperature=0.1)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    assert w[0, 0].item() == pytest.approx(1.0 / (1.0 + math.exp(-10.0)), rel=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        cbtm_router_weights(e, c, temperature=0.0)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        cbtm_router_weights(torch.zeros(2, 3), torch.zeros(2, 4))
