"""The main job's expert phase without a federation: the verdict the headline prints, the
prompts cut from held-out text, and a bad ``--experts-workload`` refused before anything is
written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from federation_experts import held_out_prompts  # noqa: E402
from federation_report import experts_verdict  # noqa: E402


def test_flow_verdict_compares_the_best_sparse_rule_by_frechet_distance():
    # bench_ensemble's flow figures: top-2 beats the monolith, top-1 does not
    en = {"frechet": {"monolith": 21.23, "full": 20.87, "top2": 19.18, "top1": 28.2, "floor": 3.65}}
    v = experts_verdict(en)
    assert v["rule"] == "top2" and v["ensemble_wins"]
    assert v["text"] == (
        "ensemble top-2 FD 19.2 < monolith 21.2: the ensemble wins (full 20.9, top-1 28.2)"
    )


def test_bytelm_verdict_says_when_the_monolith_wins():
    # the bytelm figures of the demo before the flow experts: every rule above the monolith
    en = {"monolith_loss": 1.768, "full_loss": 1.833, "top2_loss": 1.845, "top1_loss": 1.868}
    v = experts_verdict(en)
    assert v["rule"] == "top2" and not v["ensemble_wins"]
    assert v["text"] == (
        "ensemble top-2 loss 1.845 > monolith 1.768: the monolith wins (full 1.833, top-1 1.868)"
    )


def test_verdict_is_none_without_a_monolith():
    assert experts_verdict({"frechet": {"top2": 1.0, "top1": 2.0, "floor": 0.5}}) is None


def test_prompts_are_cut_from_the_held_out_documents(tmp_path):
    data = tmp_path / "notes"
    data.mkdir()
    for i in range(12):  # enough files that the hash split holds some out
        lines = [f"note {i} line {j}: the quick brown fox {i * j} jumps" for j in range(40)]
        (data / f"note{i}.txt").write_text("\n".join(lines) + "\n")
    model = {"data": [str(data)], "context": 32}
    from island.workloads import get_workload

    workload = get_workload("bytelm", **model)
    held = [bytes(d.content).decode() for d in workload.validation_documents()]
    train = [bytes(d.content).decode() for d in workload.documents()]
    prompts = held_out_prompts(model, count=3, max_bytes=40)
    assert len(prompts) == 3
    for prompt in prompts:
        assert 0 < len(prompt.encode()) <= 40
        assert any(prompt in text for text in held), prompt
        assert not any(prompt in text for text in train), prompt  # each file names itself


def test_unknown_experts_workload_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "federation.py"), "--experts-workload",
         "nonsense", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--experts-workload: invalid choice: 'nonsense'" in proc.stderr
    assert "'flow'" in proc.stderr and "'bytelm'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
