"""``scripts/gen_benchmarks.py`` renders BENCHMARKS.md from the committed benchmark JSON."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gen_benchmarks.py"
DOCS = REPO / "docs" / "benchmarks"


def _render(tmp_path, directory: Path) -> str:
    out = tmp_path / "BENCHMARKS.md"
    subprocess.run([sys.executable, str(SCRIPT), "--dir", str(directory), "--out", str(out)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return out.read_text()


def test_every_committed_benchmark_gets_its_section_with_the_figures(tmp_path):
    text = _render(tmp_path, DOCS)
    for heading in ("## Quality per byte and time to target (headline)",
                    "## Comms: codecs and transport", "## Aggregator:", "## Island:",
                    "## Experts and router vs a compute-matched monolith",
                    "## Expert groups: islands spent four ways at equal compute"):  # fmt: skip
        assert heading in text
    quality = json.loads((DOCS / "bench_quality.json").read_text())
    target = f"Target loss (DDP's final held-out loss): {quality['target_loss']:.3g}."
    assert target in text
    assert "Not measured yet" not in text
    assert text.count("| target | measured | status |") >= 4  # every section states its targets


def test_a_missing_benchmark_is_named_with_the_command_to_run(tmp_path):
    some = tmp_path / "some"
    some.mkdir()
    shutil.copy(DOCS / "bench_comms.json", some)
    text = _render(tmp_path, some)
    assert "## Comms: codecs and transport" in text
    assert f"python scripts/bench_quality.py --json {some}/bench_quality.json" in text
    assert f"python scripts/bench_ensemble.py --hybrid --json {some}/bench_ensemble_hybrid" in text


def test_the_expert_groups_section_says_which_way_the_result_went(tmp_path):
    """The hybrid section's reading follows the figures: the best arm, better or worse."""
    doc = json.loads((DOCS / "bench_ensemble_hybrid.json").read_text())
    some = tmp_path / "some"
    some.mkdir()
    arms = doc["flow"]["arms"]
    for groups, best, verdict in ((1.0, "(b) experts, a group", "better than"),
                                  (1e6, None, "worse than")):  # fmt: skip
        arms["groups"]["frechet"] = groups
        (some / "bench_ensemble_hybrid.json").write_text(json.dumps(doc))
        text = _render(tmp_path, some)
        reading = text[text.index("What it means") :]
        if best:
            assert f"Best: {best}" in reading
        else:
            assert "Best: (b)" not in reading
        against = reading[reading.index("Groups against isolated") :].split("\n")[0]
        assert verdict in against
