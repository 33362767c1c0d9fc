"""The example configs in docs/examples parse with the daemons' own config types."""

from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig
from comms.config import load_config
from island.config import IslandConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


@pytest.mark.parametrize(
    "name, cls",
    [
        ("root.toml", AggregatorConfig),
        ("leaf.toml", AggregatorConfig),
        ("island.toml", IslandConfig),
    ],
)
def test_example_parses(name, cls):
    cfg = load_config(cls, EXAMPLES / name)
    assert cfg.name
