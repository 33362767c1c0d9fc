"""Smoke test of ``scripts/bench_aggregator.py --quick``: it runs end to end (real aggregator
processes, real hivemind peers) and writes every figure, finite and positive."""

import math

import pytest
from benchtools import positive, run_bench

pytestmark = pytest.mark.timeout(150)

TOPOLOGIES = ("flat", "tree", "hivemind")


def test_quick_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    doc, run = run_bench("bench_aggregator.py", out, "--quick", timeout=140)
    for key in ("merge_gbps", "numpy_add_gbps", "round_seconds", "idle_cpu_percent", "notes"):
        assert key in doc, key
    assert {"date", "machine", "command"} <= doc["meta"].keys()
    assert positive(doc["merge_gbps"]) and positive(doc["numpy_add_gbps"])
    idle = doc["idle_cpu_percent"]  # may be exactly 0 over a short window: finite, not negative
    assert isinstance(idle, int | float) and math.isfinite(idle) and 0 <= idle < 100
    assert set(doc["round_seconds"]) == set(TOPOLOGIES)
    for topology in TOPOLOGIES:
        per_n = doc["round_seconds"][topology]
        assert set(per_n) == {"4", "16"}, per_n
        assert positive(per_n["4"]), (topology, per_n, doc["notes"])
        assert per_n["16"] is None  # --quick runs N=4 only, and says so in the notes
    assert any("N=[16] not run" in note for note in doc["notes"])
    assert all(isinstance(note, str) for note in doc["notes"])
    assert "flat N=4" in run.stdout and "hivemind/tree" in run.stdout  # the printed table
