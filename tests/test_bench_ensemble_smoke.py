"""Smoke test of ``scripts/bench_ensemble.py --quick``: it runs end to end for bytelm and flow
(partition, compute-matched training, router, ensembles, samples) and writes every figure the
issue names, all finite, with the experts' FLOPs (their shared seed phase included) equal to
the monolith's."""

import math

import pytest
from benchtools import run_bench

pytestmark = pytest.mark.timeout(150)

RULES = {"full", "top2", "top1"}
K = 4


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_common(figures: dict) -> None:
    for key in (
        "monolith_loss",
        "expert_losses",
        "ensemble",
        "router_overhead",
        "train_flops",
        "router_accuracy",
        "targets",
    ):
        assert key in figures, key
    assert _finite(figures["monolith_loss"]) and figures["monolith_loss"] > 0
    assert len(figures["expert_losses"]) == K
    assert all(_finite(v) and v > 0 for v in figures["expert_losses"])
    assert set(figures["ensemble"]) == RULES
    assert all(_finite(v) and v > 0 for v in figures["ensemble"].values())
    assert _finite(figures["router_overhead"]) and figures["router_overhead"] > 0
    flops = figures["train_flops"]
    assert set(flops) == {"monolith", "experts", "seed", "router"}
    assert all(_finite(v) and v >= 0 for v in flops.values())
    assert flops["monolith"] > 0 and flops["router"] > 0
    # compute-matched: the shared seed phase (if any) is counted with the experts
    assert flops["experts"] == pytest.approx(flops["monolith"])
    assert flops["seed"] < flops["experts"]
    accuracy = figures["router_accuracy"]["overall"]
    assert _finite(accuracy) and 0.0 <= accuracy <= 1.0
    assert isinstance(figures["targets"]["sparse_ensemble_beats_monolith"], bool)


def test_quick_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    doc, run = run_bench("bench_ensemble.py", out, "--quick", timeout=140)
    assert {"date", "machine", "command"} <= doc["meta"].keys()
    assert {"bytelm", "flow"} <= doc.keys()
    for workload in ("bytelm", "flow"):
        _check_common(doc[workload])

    lm = doc["bytelm"]
    # bytelm's experts branch from the monolith at 3/4 of the steps (a shared seed phase)
    steps = lm["settings"]["steps"]
    assert lm["branch_step"] == round(0.75 * steps) and 0 < lm["branch_step"] < steps
    assert lm["train_flops"]["seed"] == pytest.approx(
        lm["train_flops"]["monolith"] * lm["branch_step"] / steps
    )
    assert doc["flow"]["branch_step"] == 0 and doc["flow"]["train_flops"]["seed"] == 0
    assert all(_finite(b["accuracy"]) for b in lm["router_accuracy"]["by_position"])
    assert set(lm["cbtm"]["ensemble"]) == RULES
    assert all(_finite(v) for v in lm["cbtm"]["ensemble"].values())
    assert "frechet" not in lm

    flow = doc["flow"]
    assert set(flow["frechet"]) == RULES | {"monolith", "floor"}
    assert all(_finite(v) and v >= 0 for v in flow["frechet"].values())
    # the floor compares real digits with real digits: far below untrained samples
    assert flow["frechet"]["floor"] < flow["frechet"]["monolith"]
    bands = flow["router_accuracy"]["by_noise"]
    assert len(bands) == 10 and bands[0]["t_lo"] == 0.0 and bands[-1]["t_hi"] == 1.0
    assert all(_finite(b["accuracy"]) for b in bands)
    # the full mixture runs every expert at every step; sparse rules run no more
    calls = flow["frechet_detail"]["expert_calls_per_step"]
    assert calls["full"] == K and calls["top1"] <= calls["top2"] <= K

    assert "bytelm: K=4 experts" in run.stdout and "flow: K=4 experts" in run.stdout
