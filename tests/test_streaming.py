"""Streamed fragments (Streaming DiLoCo): the cut, and an island training one model as two
fragments against a real root that serves each fragment as a model line of its own."""

from __future__ import annotations

import pytest
import torch
from aggtools import make_federation
from safetensors.numpy import save_file

from aggregator.config import ModelConfig
from aggregator.service import AggregatorService
from comms.aio import LoopThread
from comms.errors import ConfigError
from comms.fragments import fragment_model_id, fragment_of, split_fragments
from island.pseudo import params_to_numpy
from island.streaming import ParameterSubset, StreamingLocalUpdate
from island.sync import SyncConfig, SyncEngine


def test_the_cut_is_contiguous_sorted_balanced_and_never_empty():
    sizes = {"b": 10, "a": 10, "d": 10, "c": 10}
    assert split_fragments(sizes, 2) == [["a", "b"], ["c", "d"]]
    assert split_fragments(sizes, 1) == [["a", "b", "c", "d"]]
    assert split_fragments({"a": 100, "b": 1, "c": 1, "d": 1}, 3) == [["a"], ["b"], ["c", "d"]]
    assert split_fragments({"a": 1, "b": 1, "c": 1, "d": 100}, 4) == [["a"], ["b"], ["c"], ["d"]]
    sizes = {f"layer{i:02d}": 1000 + 37 * i for i in range(24)}
    runs = split_fragments(sizes, 4)
    assert [n for run in runs for n in run] == sorted(sizes)  # every tensor once, in order
    totals = [sum(sizes[n] for n in run) for run in runs]
    assert max(totals) < 1.2 * sum(totals) / 4  # about equal
    assert fragment_of(sizes, 2, 4) == runs[2]
    for bad in (0, 25, 2.0):
        with pytest.raises(ConfigError, match="fragments: need between 1 and 24"):
            split_fragments(sizes, bad)
    with pytest.raises(ConfigError, match=r"index must be in \[0, 4\)"):
        fragment_of(sizes, 4, 4)
    assert fragment_model_id("lm", 3) == "lm.f3"


@pytest.mark.parametrize("fragment", [[2, 2], [0], [-1, 2], [0, 2, 1], [0.0, 2]])
def test_a_bad_fragment_is_a_config_error(fragment):
    with pytest.raises(ConfigError, match="fragment: "):
        ModelConfig(model_id="lm.f0", init="x", fragment=fragment).validate()


def test_parameter_subset_sees_only_its_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    sub = ParameterSubset(model, ["1.bias", "0.weight"])
    assert [n for n, _ in sub.named_parameters()] == ["1.bias", "0.weight"]
    assert list(sub.parameters())[1] is model[0].weight
    with pytest.raises(ValueError, match="no parameter"):
        ParameterSubset(model, ["2.weight"])


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def test_two_fragments_push_in_turn_and_each_replica_holds_the_roots_bits(tmp_path):
    """H = 4, two fragments: fragment 0 pushes at steps 2, 6, 10, ... and fragment 1 at 4, 8,
    12, ...; each push holds its fragment's tensors only (about half the model), the root
    merges each line on its own, and at the end the island's anchor of each fragment is the
    root's theta of that line, bit for bit."""
    model = mlp()
    theta0 = {k: v.copy() for k, v in params_to_numpy(model).items()}
    fed = make_federation(tmp_path, 1, aggregators=("root",))
    save_file(theta0, str(fed.init_path))  # the model's theta_0 in place of the synthetic one
    cfg = fed.config("root", "root", buffer_k=1, codec="int8")
    sizes = {k: v.size for k, v in theta0.items()}
    cfg.models = [
        ModelConfig(model_id=fragment_model_id("lm", p), init=str(fed.init_path), codec="int8",
                    fragment=[p, 2])
        for p in range(2)
    ]  # fmt: skip
    loop = LoopThread("test-root").start()
    root = AggregatorService(cfg)
    loop.run(root.start(), 30)
    configs = [SyncConfig(model_id=fragment_model_id("lm", p), every=4) for p in range(2)]
    engines = [SyncEngine(c, fed.islands[0], root.address, roster=fed.roster) for c in configs]
    pushes: list[tuple[int, int]] = []  # (step, fragment) of each push
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    try:
        with StreamingLocalUpdate(model, optimizer, engines=engines) as slu:
            assert slu.fragments == [["0.bias", "0.weight"], ["2.bias", "2.weight"]]
            for step in range(1, 21):
                x = torch.randn(32, 8, generator=g)
                torch.nn.functional.mse_loss(model(x), x[:, :4]).backward()
                optimizer.step()
                optimizer.zero_grad()
                rounds = [lu.round for lu in slu.updates]
                slu.step()
                pushes += [(step, p) for p, lu in enumerate(slu.updates) if lu.round > rounds[p]]
            assert slu.drain(30)  # fragment 0's last 2 steps are pushed as a short round
        assert pushes == [(s, 0 if s % 4 == 2 else 1) for s in range(2, 21, 2)]
        assert slu.versions == [6, 5]
        for p, lu in enumerate(slu.updates):
            line = root.lines[fragment_model_id("lm", p)]
            assert line.version == lu.version
            want = {k: theta0[k] for k in fragment_of(sizes, p, 2)}
            assert sorted(line.root.theta) == sorted(want)  # this line holds its fragment only
            for name, value in line.root.theta.items():
                assert lu.anchor[name].tobytes() == value.tobytes(), name
        assert set(slu.anchors) == set(theta0)
        sent = [e.stats["bytes_sent"] for e in engines]
        assert max(sent) < 0.75 * sum(sent)  # each fragment's pushes carry about half the bytes
    finally:
        for e in engines:
            e.close(timeout=5)
        loop.run(root.stop(), 30)
        loop.stop()
