"""The main job's report, from hand-made run records (no federation runs here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from federation_report import contributions_markdown, island_contributions  # noqa: E402


def test_island_contributions_count_what_each_islands_acks_say():
    acks = {
        "a": [
            {"status": "accepted", "steps": 10, "weight": "1.0"},
            {"status": "accepted", "steps": 10, "weight": "0.5"},
            {"status": "replayed", "steps": 10},  # delivered before a restart: counted once
            {"status": "stale", "steps": 10, "reason": "StaleError"},
        ],
        "b": [
            {"status": "accepted", "steps": 5, "weight": "0.7071"},
            {"status": "rejected", "steps": 5},
        ],
        "c": [],
    }
    a, b, c = island_contributions(["a", "b", "c"], acks, [40, 10, 3])
    assert (a["deltas_merged"], a["steps_merged"], a["deltas_lost"], a["steps_lost"]) == (
        3,
        30,
        1,
        10,
    )
    assert (a["weight_mean"], a["weight_min"], a["weight_max"]) == (0.75, 0.5, 1.0)
    assert (b["deltas_merged"], b["steps_merged"], b["steps_lost"]) == (1, 5, 5)
    assert a["share_of_merged_steps"] == pytest.approx(30 / 35)
    assert (c["deltas_merged"], c["weight_mean"], c["share_of_merged_steps"]) == (0, None, 0.0)
    table = contributions_markdown([a, b, c], [1.0, 1.0, 2.5])
    assert "| a | 1x | 40 | 3 | 30 | 85.7% | 0.750 (0.500-1.000) | 1 (10 steps) |" in table
    assert "| c | 2.5x | 3 | 0 | 0 | 0.0% | - | 0 (0 steps) |" in table
