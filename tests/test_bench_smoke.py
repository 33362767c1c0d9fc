"""Smoke test of ``scripts/bench_aggregator.py --quick``: it runs end to end (real aggregator
processes, real hivemind peers) and writes every figure, finite and positive."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(150)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_aggregator.py"
TOPOLOGIES = ("flat", "tree", "hivemind")


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_quick_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    doc = json.loads(out.read_text())
    for key in ("merge_gbps", "numpy_add_gbps", "round_seconds", "idle_cpu_percent", "notes"):
        assert key in doc, key
    assert {"date", "machine", "command"} <= doc["meta"].keys()
    assert _positive(doc["merge_gbps"]) and _positive(doc["numpy_add_gbps"])
    idle = doc["idle_cpu_percent"]  # may be exactly 0 over a short window: finite, not negative
    assert isinstance(idle, int | float) and math.isfinite(idle) and 0 <= idle < 100
    assert set(doc["round_seconds"]) == set(TOPOLOGIES)
    for topology in TOPOLOGIES:
        per_n = doc["round_seconds"][topology]
        assert set(per_n) == {"4", "16"}, per_n
        assert _positive(per_n["4"]), (topology, per_n, doc["notes"])
        assert per_n["16"] is None  # --quick runs N=4 only, and says so in the notes
    assert any("N=[16] not run" in note for note in doc["notes"])
    assert all(isinstance(note, str) for note in doc["notes"])
    assert "flat N=4" in run.stdout and "hivemind/tree" in run.stdout  # the printed table
