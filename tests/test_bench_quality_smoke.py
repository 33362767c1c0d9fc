"""Smoke test of ``scripts/bench_quality.py --quick``: every method (DDP over gloo, synchronous
DiLoCo and Archipelago against a real aggregator process, hivemind peers) trains, and every
figure of the JSON and both plots are produced."""

import math
import os
import statistics
import subprocess
from pathlib import Path

import pytest
from benchtools import positive, run_bench

pytestmark = pytest.mark.timeout(240)

UNTRAINED_LOSS = math.log(256)  # nats per byte of a model that has learnt nothing
KEYS = {"final_loss", "steps", "bytes_per_island", "bytes_to_target", "seconds_to_target"}


def _check_method(name, entry, target):
    assert "error" not in entry, (name, entry.get("error"))
    assert entry.keys() >= KEYS, name
    assert set(entry["seconds_to_target"]) == {"100", "10"}, name
    # an untrained byte model predicts uniformly: ln 256 (its version-0 points measure 5.51);
    # the quick run ends near 3.2 for every method (0.58 of it); not training stays near 5.5
    assert positive(entry["final_loss"]) and entry["final_loss"] < 0.75 * UNTRAINED_LOSS, name
    # the first point is worse than the last (it is not always the untrained model: on a
    # loaded machine an island's first version may already hold a round of training)
    first = entry["curve"][0]
    assert first["loss"] > entry["final_loss"], name
    assert positive(entry["bytes_per_island"]), name  # every method communicated
    assert entry["steps"] >= 10, name
    reached = entry["bytes_to_target"] is not None
    assert reached == (entry["steps_to_target"] is not None), name
    for seconds in entry["seconds_to_target"].values():  # null exactly when never reached
        assert (seconds is not None) == reached and (seconds is None or positive(seconds))
    if reached:  # the first evaluation at or below the target; looked up by loss, since two
        # evaluations may hold the same steps (an overlapped island's later one with one more
        # round in flight), and the earlier of them can be above the target
        point = next(p for p in entry["curve"] if p["loss"] <= target)
        assert (point["step"], point["bytes"]) == (
            entry["steps_to_target"],
            entry["bytes_to_target"],
        ), name
    else:
        assert all(p["loss"] > target for p in entry["curve"]), name
    steps = [p["step"] for p in entry["curve"]]
    assert steps == sorted(steps) and len(steps) >= 2, name
    sent = [p["bytes"] for p in entry["curve"]]
    assert sent == sorted(sent), name  # cumulative counters only grow


def test_quick_benchmark_runs_every_method_and_writes_every_figure(tmp_path):
    out = tmp_path / "quality.json"
    args = ["--quick", "--no-netns", "--workdir", str(tmp_path / "work")]
    doc, run = run_bench("bench_quality.py", out, *args, timeout=230)
    target = doc["target_loss"]
    assert positive(target)
    ddp = doc["ddp"]
    assert ddp["final_loss"] == target and ddp["steps"] == doc["config"]["S"]
    assert ddp["bytes_to_target"] is not None and ddp["ddp_bytes_ratio"] == 1.0
    methods = {"ddp": ddp, "sync_diloco": doc["sync_diloco"], "hivemind": doc["hivemind"]}
    assert set(doc["archipelago"]) == {"int8_H10", "int4_H10"}
    methods.update({f"archipelago {k}": v for k, v in doc["archipelago"].items()})
    for name, entry in methods.items():
        _check_method(name, entry, target)
    assert doc["hivemind"]["measured"]["epochs"][0] >= 1  # hivemind really averaged
    for name, entry in [("sync_diloco", doc["sync_diloco"]), *doc["archipelago"].items()]:
        # steps are the islands' mean of the inner steps each version holds, counted from
        # the root's versions: every update merged is a round some island recorded, and a
        # version holds no more steps than the islands took
        measured = entry["measured"]
        assert measured["updates_unmatched"] == 0, name
        last = entry["curve"][-1]
        assert 0 < last["step"] <= statistics.mean(measured["steps_per_island"]), name
        assert 0 < last["step_rank0"] <= measured["steps_per_island"][0], name
    for path in doc["plots"].values():
        png = Path(path)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        png.unlink()
    assert {"date", "machine", "command"} <= doc["meta"].keys()
    assert any("MODELLED" in note for note in doc["notes"])
    assert "archipelago int4_H10" in run.stdout and "target loss" in run.stdout
    assert not _processes_mentioning(str(tmp_path))  # workers, peers, aggregator: all gone


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            continue
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")
def test_quick_benchmark_times_methods_over_real_shaped_links(tmp_path):
    """--shaped 100: DDP, sync DiLoCo and an Archipelago setting run again with every worker
    in its own network namespace behind a 100 Mbit/s tbf-shaped link, the root in the hub."""
    out = tmp_path / "quality.json"
    args = ["--quick", "--shaped", "100", "--skip", "hivemind", "--workdir", str(tmp_path / "work")]
    doc, run = run_bench("bench_quality.py", out, *args, "--plots", str(tmp_path), timeout=230)
    shaped = doc["shaped"]["100"]
    assert shaped["backend"] == "veth"  # no delay on this link: tbf on veth pairs
    ddp = shaped["ddp"]
    assert "error" not in ddp, ddp
    assert ddp["steps"] == 20 and positive(ddp["seconds_per_step"])
    assert ddp["seconds_to_target"] == pytest.approx(
        ddp["seconds_per_step"] * doc["ddp"]["steps_to_target"]
    )
    assert "error" not in shaped["sync_diloco"], shaped["sync_diloco"]
    assert shaped["sync_diloco"]["steps"] >= 10
    ours = [k for k in shaped if k.startswith("archipelago ")]
    reached = [k for k, e in doc["archipelago"].items() if e["seconds_to_target"]["100"]]
    assert len(ours) == (1 if reached else 0)
    for key in ours:
        assert "error" not in shaped[key] and shaped[key]["steps"] >= 10, shaped[key]
    for entry in shaped.values():  # a time is given exactly when the target was reached
        if isinstance(entry, dict) and "steps_to_target" in entry:
            reached_here = entry["steps_to_target"] is not None
            assert (entry["seconds_to_target"] is not None) == reached_here
            assert entry["seconds_to_target"] is None or positive(entry["seconds_to_target"])
    assert any("MEASURED" in note for note in doc["notes"])
    assert "MEASURED over real shaped links, 100 Mbit/s" in run.stdout
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "qbench-" not in names  # the namespaces are gone
    assert not _processes_mentioning(str(tmp_path))
