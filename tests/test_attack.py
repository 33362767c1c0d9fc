"""One island pushing updates scaled by 1e6 to a root with the default config, as real
``aggregator serve`` and ``island run`` processes (scripts/attack.py --quick, 100 steps): the
norm bound clips every one of them and the global model stays finite and near the all-honest
run's loss. With the bound off the same run ends with a NaN model (each island exits with an
error), so this test fails without it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import attack  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_a_1e6_scaled_island_is_clipped_and_the_model_stays_near_the_honest_run(tmp_path):
    args = attack.parse_args(["--quick", "--steps", "100", "--out", str(tmp_path)])
    honest = attack.Run(tmp_path / "honest", "honest", args).execute()
    scaled = attack.Run(tmp_path / "scale", "scale", args).execute()
    assert math.isfinite(scaled["global_val_loss"]), scaled  # unbounded: NaN
    assert not honest["islands_failed"] and not scaled["islands_failed"], scaled
    assert honest["clip_status"]["mode"] == "adaptive"  # the default config
    assert honest["clip_status"]["clipped"] == 0  # honest updates stay inside the bound
    rounds = args.steps // args.every
    assert scaled["version"] == honest["version"] == rounds
    assert scaled["clip_status"]["clipped"] == rounds  # each of the attacker's pushes
    # quick runs are short and noisy (150 steps: 1.125, at full size 1.025; docs/reliability.md)
    ratio = scaled["global_val_loss"] / honest["global_val_loss"]
    assert ratio < 1.25, (honest, scaled)
