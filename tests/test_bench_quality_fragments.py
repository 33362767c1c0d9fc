"""``scripts/bench_quality.py --fragments``: an Archipelago setting runs with streamed fragments
(the island's ``StreamingLocalUpdate`` over one sync engine per fragment line, against a real
``aggregator serve`` root serving one model line per fragment) next to the whole model, on
loopback, and its figures reach the table and the JSON."""

import json
import math

import pytest
from benchtools import positive, run_bench
from test_bench_quality_smoke import _processes_mentioning

pytestmark = pytest.mark.timeout(120)

UNTRAINED_LOSS = math.log(256)
LINES = ["global.f0", "global.f1"]


def test_quick_benchmark_runs_an_archipelago_setting_in_two_fragments(tmp_path):
    work = tmp_path / "work"
    args = ["--quick", "--no-netns", "--skip", "sync_diloco", "hivemind", "--codecs", "int4",
            "--fragments", "1", "2", "--steps", "20", "--world", "2", "--workdir", str(work),
            "--plots", str(tmp_path)]  # fmt: skip
    doc, run = run_bench("bench_quality.py", tmp_path / "quality.json", *args, timeout=110)
    assert list(doc["archipelago"]) == ["int4_H10", "int4_H10_F2"]  # side by side
    whole, streamed = doc["archipelago"]["int4_H10"], doc["archipelago"]["int4_H10_F2"]
    for entry in (whole, streamed):
        assert "error" not in entry, entry.get("error")
        assert entry["final_loss"] < 0.8 * UNTRAINED_LOSS  # it trained
        assert len(entry["bytes_up"]) == len(entry["bytes_down"]) == 2
        assert all(positive(b) for b in entry["bytes_up"] + entry["bytes_down"])
    assert (whole["fragments"], streamed["fragments"]) == (1, 2)
    assert streamed["settings"]["fragments"] == 2 and "fragments" not in whole["settings"]
    # the root served one line per fragment and published versions on each
    root = streamed["measured"]["root"]
    assert sorted(root["versions_per_line"]) == LINES
    assert all(n >= 1 for n in root["versions_per_line"].values())
    assert root["versions"] == sum(root["versions_per_line"].values())
    # every worker pushed on both lines; fragment 0 (first round H/2) pushed at least as often
    for lines in streamed["lines"]:
        assert [line["model_id"] for line in lines] == LINES
        assert lines[0]["pushes"] >= lines[1]["pushes"] >= 1
    # a push carries the larger fragment: the island's planned size plus framing, well below
    # the whole model's push (the quick model's cut is 58/42% of the parameters)
    assert (
        whole["push_bytes_planned"] <= whole["push_bytes_peak"] < 1.1 * whole["push_bytes_planned"]
    )
    assert streamed["push_bytes_planned"] <= streamed["push_bytes_peak"]
    assert streamed["push_bytes_peak"] < 1.1 * streamed["push_bytes_planned"]
    assert streamed["push_bytes_peak"] < 0.7 * whole["push_bytes_peak"]
    # rank 0 evaluated the union of the fragments' anchors at every H = 10 steps, as often as
    # the whole model's run, and each evaluation held no more steps than were taken
    result = json.loads((work / "archipelago_int4_H10_F2" / "result-0.json").read_text())
    evals = [e for e in result["evals"] if not e.get("drained")]
    assert [e["step"] for e in evals] == list(range(10, 10 * len(evals) + 1, 10))
    assert all(len(e["versions"]) == 2 and 0 <= e["holds_steps"] <= e["step"] - 10 for e in evals)
    assert "archipelago int4_H10_F2" in run.stdout and "peak B/push" in run.stdout
    assert any("fragments (slot suffix _F<n>)" in note for note in doc["notes"])
    assert doc["config"]["fragments"] == [1, 2]
    assert not _processes_mentioning(str(tmp_path))
