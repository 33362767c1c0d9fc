"""The dependency direction of DESIGN.md holds: comms is the ground floor; island and
aggregator never import each other; the aggregator's merge path never imports torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "comms": {"island", "aggregator", "router", "torch"},
    "aggregator": {"island", "router", "torch"},
    "island": {"aggregator", "router"},
    "router": {"aggregator"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports(package):
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        hits = imported_packages(path) & FORBIDDEN[package]
        if hits:
            bad[str(path.relative_to(ROOT))] = sorted(hits)
    assert not bad, f"{package} must not import {sorted(FORBIDDEN[package])}: {bad}"


def test_aggregator_service_starts_without_torch():
    code = "import sys, aggregator.service, aggregator.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT)
