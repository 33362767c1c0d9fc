"""Smoke test of ``scripts/bench_island.py --quick``: one island against a real root aggregator
process, overlapped then synchronous, writes every figure the issue names."""

import pytest
from benchtools import positive, run_bench

pytestmark = pytest.mark.timeout(120)

MODES = ("overlapped", "sync")


def test_quick_benchmark_writes_both_utilizations(tmp_path):
    out = tmp_path / "bench.json"
    doc, run = run_bench("bench_island.py", out, "--quick", timeout=110)
    assert doc["link_mbit"] == 10 and doc["latency_ms"] == 100
    assert doc["H"] == 5 and doc["rounds"] == 2
    assert {"date", "machine", "command"} <= doc["meta"].keys()
    assert set(doc["utilization"]) == set(MODES) == set(doc["round_seconds"])
    for mode in MODES:
        assert 0 < doc["utilization"][mode] <= 1, doc["utilization"]
        assert positive(doc["round_seconds"][mode])
        detail = doc["detail"][mode]
        assert detail["steps"] == 10 and detail["pushes_accepted"] == 2
        assert detail["pushes_lost"] == 0
    # sync mode waits at every boundary for the version of its own push: each round adopts it
    # (overlapped mode adopts what has arrived, maybe nothing yet in a round this short).
    assert doc["detail"]["sync"]["final_version"] == 2
    assert positive(doc["push_bytes"]) and doc["push_bytes"] == doc["detail"]["sync"]["push_bytes"]
    assert "shaped" in doc["shaped"] and "overlapped" in run.stdout and "sync" in run.stdout
