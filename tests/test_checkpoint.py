"""Signed expert and router checkpoints: a round trip gives the same outputs; a forged
signature, tampered weights, an unknown signer or an unknown workload is refused with its
typed error."""

from __future__ import annotations

import json

import pytest
import torch

from comms.errors import ConfigError, DigestMismatchError, SignatureError, UnknownPeerError
from comms.identity import Identity, Roster
from router.checkpoint import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    build_workload_model,
    load_expert,
    load_router,
    partition_id,
    save_expert,
    save_router,
    sign_manifest,
    write_checkpoint,
)
from router.models import CbtmRouter, PrefixRouter
from router.partition import TextPartitioner

BYTELM = {"context": 32, "n_layer": 1, "n_head": 2, "d_model": 32}
FLOW = {"hidden": 32, "n_blocks": 1, "time_dim": 8}


@pytest.fixture(scope="module")
def identity():
    return Identity.generate()


def save_bytelm_expert(directory, identity, seed=0, **kw):
    model = build_workload_model("bytelm", BYTELM, seed=seed)
    fields = dict(workload="bytelm", workload_config=BYTELM, expert_id="e0", cluster=0)
    save_expert(directory, model, **{**fields, **kw}, identity=identity)
    return model


def test_expert_round_trip_gives_the_same_outputs(tmp_path, identity):
    model = save_bytelm_expert(tmp_path / "e0", identity, seed=3, version=7, train_steps=11)
    loaded, manifest = load_expert(tmp_path / "e0")
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx), loaded(idx))
    # the tied embedding stays tied after loading
    assert loaded.lm_head.weight.data_ptr() == loaded.token_embedding.weight.data_ptr()
    assert manifest["version"] == 7 and manifest["train_steps"] == 11
    assert manifest["signer"] == identity.peer_id
    assert manifest["workload_config"] == BYTELM


def test_flow_expert_round_trip(tmp_path, identity):
    model = build_workload_model("flow", FLOW, seed=1)
    save_expert(
        tmp_path / "f", model, workload="flow", workload_config=FLOW, expert_id="f0",
        cluster=1, identity=identity,
    )  # fmt: skip
    loaded, manifest = load_expert(tmp_path / "f")
    x, t = torch.randn(4, 64), torch.rand(4)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t), loaded(x, t))
    assert manifest["cluster"] == 1


def test_edited_manifest_fails_the_signature(tmp_path, identity):
    save_bytelm_expert(tmp_path / "e0", identity)
    path = tmp_path / "e0" / MANIFEST_FILE
    doc = json.loads(path.read_text())
    doc["version"] = 99  # claim a newer version without re-signing
    path.write_text(json.dumps(doc))
    with pytest.raises(SignatureError):
        load_expert(tmp_path / "e0")


def test_signature_by_another_key_is_refused(tmp_path, identity):
    save_bytelm_expert(tmp_path / "e0", identity)
    path = tmp_path / "e0" / MANIFEST_FILE
    doc = json.loads(path.read_text())
    forger = Identity.generate()
    doc["signature"] = forger.sign(b"anything").hex()  # valid signature of other bytes
    path.write_text(json.dumps(doc))
    with pytest.raises(SignatureError):
        load_expert(tmp_path / "e0")


def test_tampered_weights_are_refused(tmp_path, identity):
    save_bytelm_expert(tmp_path / "e0", identity)
    weights = tmp_path / "e0" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one parameter
    weights.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError):
        load_expert(tmp_path / "e0")


def test_unknown_signer_is_refused_with_a_roster(tmp_path, identity):
    save_bytelm_expert(tmp_path / "e0", identity)
    stranger_roster = Roster()
    stranger_roster.add(Identity.generate().public_key, "island")
    with pytest.raises(UnknownPeerError):
        load_expert(tmp_path / "e0", roster=stranger_roster)
    with pytest.raises(UnknownPeerError):
        load_expert(tmp_path / "e0", trusted_keys=[Identity.generate().public_key])
    roster = Roster()
    roster.add(identity.public_key, "island")
    load_expert(tmp_path / "e0", roster=roster)
    load_expert(tmp_path / "e0", trusted_keys=[identity.public_key.hex()])


def test_resigned_manifest_with_a_swapped_key_is_refused_by_the_roster(tmp_path, identity):
    """Someone re-signs with their own key but claims the trusted signer's peer id."""
    save_bytelm_expert(tmp_path / "e0", identity)
    path = tmp_path / "e0" / MANIFEST_FILE
    forged = sign_manifest(json.loads(path.read_text()), Identity.generate())
    forged["signer"] = identity.peer_id
    path.write_text(json.dumps(forged))
    roster = Roster()
    roster.add(identity.public_key, "island")
    with pytest.raises(SignatureError):
        load_expert(tmp_path / "e0", roster=roster)


def test_unknown_workload_is_a_config_error(tmp_path, identity):
    model = build_workload_model("bytelm", BYTELM)
    fields = {"kind": "expert", "workload": "nope", "workload_config": {}, "expert_id": "x"}
    write_checkpoint(tmp_path / "x", model, fields, identity)
    with pytest.raises(ConfigError, match="nope"):
        load_expert(tmp_path / "x")


def test_bad_workload_config_and_missing_checkpoint_are_config_errors(tmp_path, identity):
    save_bytelm_expert(tmp_path / "e0", identity, workload_config={**BYTELM, "n_layerz": 2})
    with pytest.raises(ConfigError, match="n_layerz"):
        load_expert(tmp_path / "e0")
    with pytest.raises(ConfigError, match="no expert checkpoint"):
        load_expert(tmp_path / "missing")


def test_weights_of_another_shape_are_a_config_error(tmp_path, identity):
    model = build_workload_model("bytelm", {**BYTELM, "d_model": 16})
    save_expert(
        tmp_path / "e0", model, workload="bytelm", workload_config=BYTELM, expert_id="e0",
        cluster=0, identity=identity,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="do not fit"):
        load_expert(tmp_path / "e0")


def test_prefix_router_round_trip_and_kind_check(tmp_path, identity):
    torch.manual_seed(0)
    router = PrefixRouter(3, d_model=16, n_layers=1, context=32)
    config = {"d_model": 16, "n_layers": 1, "context": 32}
    save_router(
        tmp_path / "r", router, "prefix", config, 3, ["a", "b", "c"],
        identity=identity, workload="bytelm", partition="p1",
    )  # fmt: skip
    loaded, manifest = load_router(tmp_path / "r")
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(router.eval()(idx), loaded(idx))
    assert manifest["expert_ids"] == ["a", "b", "c"] and manifest["partition_id"] == "p1"
    with pytest.raises(ConfigError, match="router"):
        load_expert(tmp_path / "r")  # a router is not an expert


def test_cbtm_router_round_trip_carries_its_partition(tmp_path, identity):
    texts = ["import asyncio event loop task"] * 3 + ["xml element tree parse node"] * 3
    partition = TextPartitioner(2, svd_dims=2, n_init=2).fit(texts)
    partition.save(tmp_path / "part")
    router = CbtmRouter(partition, temperature=0.2)
    save_router(
        tmp_path / "r", router, "cbtm", {"temperature": 0.2}, 2, identity=identity,
        workload="bytelm", partition=partition_id(tmp_path / "part"),
    )  # fmt: skip
    loaded, _ = load_router(tmp_path / "r")
    idx = torch.tensor([list(b"asyncio loop"), list(b"xml tree nod")])
    assert torch.allclose(router.next_probabilities(idx), loaded.next_probabilities(idx))
    # the partition's files are signed too
    (tmp_path / "r" / "partition" / "partition.json").write_text("{}")
    with pytest.raises(DigestMismatchError):
        load_router(tmp_path / "r")
