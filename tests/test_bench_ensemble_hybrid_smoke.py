"""Smoke test of ``scripts/bench_ensemble.py --hybrid --quick`` (flow): the four arms (isolated
experts, expert groups of local-update islands, one global local-update model, the monolith)
train at equal compute and every figure the benchmark reports is there and sane."""

import math

import pytest
from benchtools import run_bench

pytestmark = pytest.mark.timeout(120)

ARMS = ("isolated", "groups", "global", "monolith")
K, ISLANDS = 4, 8


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_hybrid_benchmark_compares_four_arms_at_equal_compute(tmp_path):
    doc, run = run_bench("bench_ensemble.py", tmp_path / "hybrid.json", "--hybrid", "--quick",
                         timeout=110)  # fmt: skip
    assert doc["hybrid"] is True and {"date", "machine", "command"} <= doc["meta"].keys()
    flow = doc["flow"]
    s, arms = flow["settings"], flow["arms"]
    assert set(arms) == set(ARMS)
    budget = s["steps"] * s["monolith_batch"]
    for name, arm in arms.items():
        assert _finite(arm["loss"]) and arm["loss"] > 0, name
        assert _finite(arm["frechet"]) and arm["frechet"] > flow["frechet_floor"], name
        assert arm["samples_trained"] == budget, name  # equal total compute
        wall, compute = arm["modelled_wall_seconds"], arm["modelled_compute_seconds"]
        assert wall == pytest.approx(compute + arm["modelled_link_seconds"]) and compute > 0
    # (a) one island per expert for G times the steps; (b) G islands per expert's line
    assert arms["isolated"]["steps_per_island"] == s["group"] * s["steps"]
    assert len(arms["isolated"]["island_compute_seconds"]) == K
    # the same island batches, twice the steps: twice the modelled compute time
    assert arms["isolated"]["modelled_compute_seconds"] == pytest.approx(
        s["group"] * arms["groups"]["modelled_compute_seconds"]
    )
    assert len(arms["groups"]["island_compute_seconds"]) == ISLANDS
    assert len(arms["global"]["island_compute_seconds"]) == ISLANDS
    # experts in isolation and the monolith send nothing; the local-update arms push and
    # publish one envelope per island and round, one version per round of each line
    rounds = math.ceil(s["steps"] / s["every"])
    assert arms["isolated"]["bytes_sent"] == arms["monolith"]["bytes_sent"] == 0
    assert arms["groups"]["versions"] == [rounds] * K and arms["global"]["versions"] == [rounds]
    for name in ("groups", "global"):
        arm = arms[name]
        assert arm["bytes_pushed"] > 0 and arm["bytes_published"] > 0
        assert arm["bytes_sent"] == arm["bytes_pushed"] + arm["bytes_published"]
        assert arm["modelled_link_seconds"] > 0
    for name in ("isolated", "groups"):
        assert set(arms[name]["ensemble"]) == {"full", "top2", "top1"}
        assert len(arms[name]["expert_losses"]) == K
    assert "(b) 4 experts, 2 islands each (local update)" in run.stdout
    assert "(d) monolith" in run.stdout
