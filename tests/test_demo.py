"""The comms smoke demo (scripts/demo.py) end to end, as a new user runs it: a real two-node
DHT, a real gRPC aggregator and three islands on loopback, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "scripts" / "demo.py"


def run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DEMO), "--quick", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_quick_demo_delivers_every_update_and_refuses_forged_and_replayed(tmp_path):
    out = tmp_path / "demo.json"
    proc = run_demo("--json", str(out))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "demo OK" in proc.stdout
    figures = json.loads(out.read_text())
    rounds = figures["rounds"]
    assert rounds >= 2
    assert figures["meta"]["command"].startswith("python ")

    islands = {s["name"]: s for s in figures["islands"]}
    assert sorted(islands) == ["island-1", "island-2", "island-3"]
    per_update = islands["island-1"]["payload_bytes"] / rounds
    for s in islands.values():
        assert s["delivered"] == rounds
        assert s["payload_bytes"] == islands["island-1"]["payload_bytes"]  # same model, codec
        assert s["link_bytes"] >= s["payload_bytes"]
        assert 0 < figures["island_rates_mbps"][s["name"]] <= figures["link"]["rate_mbps"]
    # island-2's link dropped once, half way: the push resumed instead of starting over.
    assert [s["link_drops"] for s in islands.values()] == [0, 1, 0]
    assert islands["island-2"]["retries"] >= 1
    assert islands["island-2"]["link_bytes"] - islands["island-2"]["payload_bytes"] < per_update / 2

    assert figures["aggregator"]["accepted"] == 3 * rounds
    got = {r["what"]: (r["reason"], r["grpc_code"]) for r in figures["rejections"]}
    assert got == {
        "forged": ("signature", "UNAUTHENTICATED"),
        "replayed": ("replay", "ALREADY_EXISTS"),
    }
    assert [r["reason"] for r in figures["aggregator"]["rejected"]] == ["signature", "replay"]

    # int8 is lossy but close; error feedback makes the running sum closer than plain int8.
    assert 0 < figures["merged_rel_error"] < 0.02
    assert all(0 < e < 0.02 for e in figures["round_rel_errors"])
    assert figures["merged_rel_error"] < figures["merged_rel_error_without_error_feedback"]
    assert 3.5 < figures["compression_ratio_vs_fp32"] < 4.1


def test_demo_that_runs_out_of_time_exits_nonzero_with_the_reason(tmp_path):
    out = tmp_path / "demo.json"
    proc = run_demo("--timeout", "0.05", "--json", str(out))
    assert proc.returncode == 1
    assert "demo failed" in proc.stderr
    assert "did not finish within 0.05 s" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
