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
        ("root_expert_groups.toml", AggregatorConfig),
        ("island_expert_group.toml", IslandConfig),
    ],
)
def test_example_parses(name, cls):
    cfg = load_config(cls, EXAMPLES / name)
    assert cfg.name


def test_the_expert_groups_example_gives_each_expert_its_two_islands():
    cfg = load_config(AggregatorConfig, EXAMPLES / "root_expert_groups.toml")
    assert {g.model_id: g.islands for g in cfg.expert_groups} == {
        "expert0": ["island0", "island1"],
        "expert1": ["island2", "island3"],
    }
    assert (cfg.buffer_k("expert0"), cfg.buffer_k("expert1")) == (2, 2)
    island = load_config(IslandConfig, EXAMPLES / "island_expert_group.toml")
    assert (island.mode, island.sync.model_id, island.expert.cluster) == (
        "local_update",
        "expert0",
        0,
    )
