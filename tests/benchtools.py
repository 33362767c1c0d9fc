"""Shared pieces of the benchmark smoke tests: run a ``scripts/bench_*.py`` and read its JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def run_bench(
    script: str, out: Path, *args: str, timeout: float
) -> tuple[dict, subprocess.CompletedProcess]:
    """Run ``scripts/SCRIPT ARGS --json OUT``; assert it exited 0; its JSON and the run."""
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text()), run
