"""Typed TOML configs: unknown keys and wrong types name the file and the key."""

from dataclasses import dataclass, field

import pytest

from comms.config import config_from_dict, config_to_dict, load_config
from comms.errors import ConfigError


@dataclass
class Sync:
    every: int = 100
    codec: str = "int8"
    lr: float = 0.7

    def validate(self):
        if self.every < 1:
            raise ConfigError(f"every: must be at least 1, got {self.every}")


@dataclass
class Top:
    name: str
    sync: Sync = field(default_factory=Sync)
    peers: list[str] = field(default_factory=list)
    seed: int | None = None


def test_load_round_trip(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "a"\npeers = ["x", "y"]\n[sync]\nevery = 5\nlr = 1\n')
    cfg = load_config(Top, p)
    assert cfg == Top(name="a", sync=Sync(every=5, lr=1.0), peers=["x", "y"])
    assert isinstance(cfg.sync.lr, float)
    assert config_from_dict(Top, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"name": "a", "sync": {"evry": 5}}, "sync.evry: unknown key"),
        ({"name": "a", "sync": {"every": "5"}}, "sync.every: expected an integer"),
        ({"name": "a", "sync": {"every": 0}}, "sync: every: must be at least 1"),
        ({"name": "a", "peers": "x"}, "peers: expected a list"),
        ({"name": "a", "seed": 1.5}, "seed: expected an integer"),
        ({}, "name"),
    ],
)
def test_bad_keys_named(doc, message):
    with pytest.raises(ConfigError, match=message) as e:
        config_from_dict(Top, doc, "island.toml")
    assert str(e.value).startswith("island.toml: ")


def test_bad_toml_names_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("name = ")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(Top, p)


def test_save_config_round_trip(tmp_path):
    from comms.config import save_config

    cfg = Top(name='a "quoted" name', sync=Sync(every=7), peers=["p"], seed=3)
    save_config(cfg, tmp_path / "c.toml")
    assert load_config(Top, tmp_path / "c.toml") == cfg


def test_save_nested_arrays_of_tables(tmp_path):
    from aggregator.config import AggregatorConfig, ModelConfig
    from comms.config import save_config

    cfg = AggregatorConfig(
        name="root", role="root", roster="r.json",
        models=[ModelConfig("a", init="x", outer_params={"lr": 0.5}), ModelConfig("b", init="y")],
    )  # fmt: skip
    save_config(cfg, tmp_path / "agg.toml")
    assert load_config(AggregatorConfig, tmp_path / "agg.toml") == cfg


@pytest.mark.parametrize(
    ("codec", "outer", "refused"),
    [("sparse2", "nesterov", True), ("topk", "co2", True), ("sparse2", "sgd", False),
     ("int8", "nesterov", False), ("int4", "co2", False)],
)  # fmt: skip
def test_a_root_refuses_a_sparse_publish_codec_with_an_outer_momentum(
    tmp_path, codec, outer, refused
):
    """Publishing u_v through a sparse codec with momentum diverged in a measured run
    (aggregator.config.check_publish_codec); a leaf's models entry does not publish."""
    from aggregator.config import AggregatorConfig

    path = tmp_path / "agg.toml"
    model = f'[[models]]\nmodel_id = "g"\ninit = "x.safetensors"\ncodec = "{codec}"\nouter = "{outer}"\n'
    path.write_text(f'name = "root"\nrole = "root"\n{model}')
    if refused:
        with pytest.raises(ConfigError, match=r'models\[0\]\.codec: .* outer = "sgd"'):
            load_config(AggregatorConfig, path)
    else:
        assert load_config(AggregatorConfig, path).models[0].codec == codec
    path.write_text(f'name = "leaf"\nrole = "leaf"\nparent = "127.0.0.1:1"\n{model}')
    assert load_config(AggregatorConfig, path).models[0].codec == codec
