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
    assert set(flops) == {"monolith", "experts", "seed", "router", "distill"}
    assert all(_finite(v) and v >= 0 for v in flops.values())
    assert flops["monolith"] > 0 and flops["router"] > 0
    # compute-matched: the shared seed phase (if any) is counted with the experts
    assert flops["experts"] == pytest.approx(flops["monolith"])
    assert flops["seed"] < flops["experts"]
    accuracy = figures["router_accuracy"]["overall"]
    assert _finite(accuracy) and 0.0 <= accuracy <= 1.0
    assert isinstance(figures["targets"]["sparse_ensemble_beats_monolith"], bool)
    _check_student(figures)


def _check_student(figures: dict) -> None:
    """The distilled student: scored like the others, its compute counted, and what each way
    to serve costs: one forward for the student and the monolith, more for an ensemble."""
    student = figures["student"]
    assert _finite(student["loss"]) and student["loss"] > 0
    assert student["teacher_rule"] == "top_k:2" and _finite(student["teacher_gap"])
    assert student["steps"] == figures["settings"]["steps"]
    assert student["student_flops"] > 0 and student["teacher_flops"] > 0
    assert figures["train_flops"]["distill"] == pytest.approx(
        student["student_flops"] + student["teacher_flops"]
    )
    serving = student["serving"]
    assert set(serving) == RULES | {"monolith", "student"}
    one = serving["monolith"]["flops_per_input"]
    assert serving["student"]["flops_per_input"] == one  # the experts' architecture
    # the full mixture runs all K experts on every input, and its router on top
    assert serving["full"]["flops_per_input"] > K * one
    assert one < serving["top1"]["flops_per_input"] <= serving["top2"]["flops_per_input"]
    assert serving["top2"]["flops_per_input"] <= serving["full"]["flops_per_input"]
    # a sparse rule runs only the rows it routes: top-1 costs less than the full mixture
    assert serving["top1"]["flops_per_input"] < serving["full"]["flops_per_input"]
    assert all(_finite(c["batch_s"]) and c["batch_s"] > 0 for c in serving.values())


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
    assert set(flow["frechet"]) == RULES | {"monolith", "floor", "student"}
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
    assert run.stdout.count("student distilled from top2") == 2
