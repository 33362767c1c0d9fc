"""The three console scripts exist and answer --help."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["island", "aggregator", "router"])
def test_help(module):
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert f"usage: {module}" in out.stdout
