"""Expert groups (hybrid): an expert's model line trained by several local-update islands.

The configuration's errors, a root's admission by group over real gRPC, and a real
``aggregator serve`` root with two expert model lines, each trained by its own two
``island run`` processes on its cluster, whose signed expert checkpoints hold the root's bits.
"""

import asyncio
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from aggtools import delta_bytes, make_federation, random_delta, rejected_by_reason
from safetensors.numpy import load_file
from test_island_daemon import _start, _start_root, _stop

from aggregator.config import AggregatorConfig, MergeConfig, ModelConfig
from aggregator.groups import ExpertGroup
from aggregator.outer import apply_update
from aggregator.service import AggregatorService
from comms.config import load_config, save_config
from comms.envelope import Envelope
from comms.errors import ConfigError, GroupError
from comms.identity import Identity, Roster
from comms.transport import TransportClient
from comms.update import decode_update
from island.config import ExpertConfig, IslandConfig, SnapshotConfig
from island.sync import SyncConfig

pytestmark = pytest.mark.timeout(240)
TINY = {"d_model": 32, "n_layer": 1, "n_head": 2, "context": 32, "batch_size": 4}
GROUPS = {"expert0": ["island0", "island1"], "expert1": ["island2", "island3"]}


@pytest.fixture(scope="module")
def two_clusters(tmp_path_factory):
    from island.workloads import get_workload
    from router.partition import TextPartitioner

    directory = tmp_path_factory.mktemp("partition")
    docs = get_workload("bytelm", **TINY).documents()
    TextPartitioner(2, seed=0).fit([d.content for d in docs]).save(directory)
    return str(directory)


def _root_config(tmp_path, groups, models=("expert0", "expert1")) -> AggregatorConfig:
    return AggregatorConfig(
        name="root", role="root", key=str(tmp_path / "root.pem"),
        roster=str(tmp_path / "roster.json"), state_dir=str(tmp_path / "root-state"), http="",
        merge=MergeConfig(buffer_k=2, deadline_s=5.0, direction="off"),
        models=[ModelConfig(m, init=str(tmp_path / "init.safetensors"), codec="int8")
                for m in models],
        expert_groups=[ExpertGroup(m, list(names)) for m, names in groups.items()],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"expert0": ["island0", "island0"]}, "island 'island0' is named twice in the group of "
                                              "'expert0'"),
        ({"expert0": ["island0"], "expert1": ["island1", "island0"]},
         "island 'island0' is in the groups of both 'expert0' and 'expert1'"),
        ({"expert9": ["island0"]}, r"expert_groups\[0\]\.model_id: 'expert9' is not a model of "
                                   "this aggregator"),
        ({"expert0": []}, r"expert_groups\[0\]\.islands: the group of 'expert0' is empty"),
    ],
)  # fmt: skip
def test_a_bad_expert_group_is_a_config_error_naming_it_and_serve_writes_nothing(
    tmp_path, groups, message
):
    path = tmp_path / "root.toml"
    save_config(_root_config(tmp_path, groups), path)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(AggregatorConfig, path)
    assert str(path) in str(err.value)
    run = subprocess.run([sys.executable, "-m", "aggregator", "serve", str(path)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "expert_groups[" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root.toml"]  # no key, no state


async def test_a_model_line_admits_deltas_only_from_its_groups_islands(tmp_path):
    fed = make_federation(tmp_path, 4, aggregators=("root",))
    cfg = fed.config("root", "root", buffer_k=100)
    cfg.models = [ModelConfig(m, init=str(fed.init_path), codec="none")
                  for m in ("expert0", "expert1", "global")]  # fmt: skip
    cfg.expert_groups = [ExpertGroup(m, names) for m, names in GROUPS.items()]
    cfg.validate()
    root = AggregatorService(cfg)
    await root.start()
    island0, _, island2, _ = fed.islands
    d = random_delta(fed.theta0, 0)
    try:
        async with TransportClient(root.address) as c:
            ack = await c.push(delta_bytes(island0, d, 1, model_id="expert0"))
            assert ack["status"] == "accepted"
            with pytest.raises(GroupError, match="not in the expert group of 'expert0'"):
                await c.push(delta_bytes(island2, d, 1, model_id="expert0"))
            with pytest.raises(GroupError, match="not in the expert group of 'expert1'"):
                await c.push(delta_bytes(island0, d, 2, model_id="expert1"))
            ack = await c.push(delta_bytes(island2, d, 2, model_id="expert1"))
            assert ack["status"] == "accepted"
            # a model without a group takes any island's, a group's islands' too
            ack = await c.push(delta_bytes(island0, d, 3, model_id="global"))
            assert ack["status"] == "accepted"
        assert root.lines["expert0"].buffer.count == 1
        assert root.lines["expert1"].buffer.count == 1
        assert root.lines["global"].buffer.count == 1
        rejected = rejected_by_reason(root)
        assert rejected.get("group") == 2, rejected
    finally:
        await root.stop()


async def test_an_experts_line_takes_whole_steps_from_its_group_beside_a_larger_global_k(
    tmp_path,
):
    """merge.buffer_k = 4 for the global model; the expert's line of a group of 2 publishes a
    version once both have pushed, a whole outer step (fraction 1), not at the deadline."""
    fed = make_federation(tmp_path, 4, aggregators=("root",))
    cfg = fed.config("root", "root", buffer_k=4, deadline_s=60.0)
    cfg.models = [ModelConfig(m, init=str(fed.init_path), codec="none")
                  for m in ("expert0", "global")]  # fmt: skip
    cfg.expert_groups = [ExpertGroup("expert0", ["island0", "island1"])]
    assert (cfg.buffer_k("expert0"), cfg.buffer_k("global")) == (2, 4)
    root = AggregatorService(cfg)
    await root.start()
    try:
        async with TransportClient(root.address, identity=fed.islands[0]) as c:
            for i in (0, 1):
                await c.push(delta_bytes(fed.islands[i], random_delta(fed.theta0, i), 1,
                                         model_id="expert0"))  # fmt: skip
            for i in (2, 3):
                await c.push(delta_bytes(fed.islands[i], random_delta(fed.theta0, i), 1))
            for _ in range(100):
                if root.lines["expert0"].version == 1:
                    break
                await asyncio.sleep(0.05)
            async for _, data in c.subscribe("expert0", 1):  # u_1 as published
                fraction = Envelope.from_bytes(data, max_bytes=1 << 30).header.meta["fraction"]
                break
        assert root.lines["expert0"].version == 1
        assert fraction == 1.0
        assert root.lines["global"].version == 0 and root.lines["global"].buffered == 2
    finally:
        await root.stop()


async def test_a_groups_pushes_reach_the_roots_expert_line_through_a_leaf(tmp_path):
    """Root and leaf serve the expert's line and the global one, with the same groups: the
    leaf refuses an island outside the group and forwards the group's two deltas as one
    partial, which the root turns into one whole version holding both."""
    fed = make_federation(tmp_path, 3, aggregators=("root", "leaf0"))
    group = [ExpertGroup("expert0", ["island0", "island1"])]

    def config(name, role, parent=""):
        cfg = fed.config(name, role, parent=parent, buffer_k=4, deadline_s=60.0)
        init = str(fed.init_path) if role == "root" else ""
        cfg.models = [ModelConfig(m, init=init, codec="none") for m in ("expert0", "global")]
        cfg.expert_groups = group
        return cfg

    root = AggregatorService(config("root", "root"))
    root_address = await root.start()
    leaf = AggregatorService(config("leaf0", "leaf", parent=root_address))
    await leaf.start()
    deltas = [random_delta(fed.theta0, i) for i in range(2)]
    try:
        async with TransportClient(leaf.address) as c:
            with pytest.raises(GroupError):
                await c.push(delta_bytes(fed.islands[2], deltas[0], 1, model_id="expert0"))
            for i in (0, 1):
                await c.push(delta_bytes(fed.islands[i], deltas[i], 1, model_id="expert0"))
        for _ in range(200):
            if root.lines["expert0"].version == 1:
                break
            await asyncio.sleep(0.05)
        assert root.lines["expert0"].version == 1 and root.lines["global"].version == 0
        async with TransportClient(root_address, identity=fed.islands[0]) as c:
            async for _, data in c.subscribe("expert0", 1):
                meta = Envelope.from_bytes(data, max_bytes=1 << 30).header.meta
                break
        assert meta["fraction"] == 1.0 and meta["count"] == 2
        assert {s for s, _ in meta["contributors"]} == {fed.islands[i].peer_id for i in (0, 1)}
    finally:
        await leaf.stop()
        await root.stop()


def test_an_island_of_a_group_trains_on_its_experts_cluster_only(tmp_path, two_clusters):
    from island.daemon import Island

    labels = load_file(os.path.join(two_clusters, "partition.safetensors"))["labels"]
    for cluster in (0, 1):
        cfg = _island(tmp_path, 0, two_clusters, cluster, "127.0.0.1:1")
        cfg.validate()
        cfg.roster = ""
        assert Island(cfg)._doc_indices() == np.flatnonzero(labels == cluster).tolist()
    plain = IslandConfig(name="i", aggregator="x:1", sync=SyncConfig(model_id="global"))
    assert Island(plain)._doc_indices() is None
    with pytest.raises(ConfigError, match="needs both"):
        IslandConfig(name="i", aggregator="x:1", sync=SyncConfig(model_id="e"),
                     expert=ExpertConfig(partition=two_clusters)).validate()  # fmt: skip


def _island(tmp_path, i: int, partition: str, cluster: int, address: str) -> IslandConfig:
    model_id = f"expert{cluster}"
    return IslandConfig(
        name=f"island{i}", key=str(tmp_path / f"island{i}.pem"),
        roster=str(tmp_path / "roster.json"), aggregator=address, workload="bytelm",
        workload_config=TINY, steps=20, shard=i % 2, num_shards=2, threads=1, eval_batches=1,
        http="", metrics_file=str(tmp_path / f"island{i}.jsonl"),
        sync=SyncConfig(model_id=model_id, every=10, codec="int8"),
        snapshot=SnapshotConfig(),
        expert=ExpertConfig(partition=partition, cluster=cluster,
                            output=str(tmp_path / f"out{i}")),
    )  # fmt: skip


async def _versions(address, model_id, reader, theta0, upto):
    """theta_v of ``model_id`` for v = 0..upto (rebuilt from the published u_v) and the
    senders of the island updates each version merged."""
    theta = {k: v.copy() for k, v in theta0.items()}
    thetas, senders = {0: {k: v.copy() for k, v in theta.items()}}, set()
    async with TransportClient(address, identity=reader) as c:
        async for v, data in c.subscribe(model_id, 1):
            env = Envelope.from_bytes(data, max_bytes=1 << 30)
            apply_update(theta, decode_update(env))
            thetas[v] = {k: x.copy() for k, x in theta.items()}
            senders |= {s for s, _ in env.header.meta["contributors"]}
            if v >= upto:
                return thetas, senders
    return thetas, senders


def test_two_expert_groups_train_their_experts_through_one_root(tmp_path, two_clusters):
    """Four `island run` processes, two per expert, push to the expert's model line at one
    `aggregator serve` root: each line merges only its group's updates, and every island's
    signed expert checkpoint is its model line at the version it holds, bit for bit."""
    from island.checkpoint import load_expert
    from island.daemon import export_initial_parameters
    from island.pseudo import params_to_numpy

    roster, idents = Roster(), {}
    for i in range(4):
        idents[f"island{i}"] = Identity.generate()
        idents[f"island{i}"].save(tmp_path / f"island{i}.pem")
        roster.add(idents[f"island{i}"].public_key, "island", f"island{i}")
    for name, role in (("root", "aggregator"), ("admin", "admin")):
        idents[name] = Identity.generate()
        idents[name].save(tmp_path / f"{name}.pem")
        roster.add(idents[name].public_key, role, name)
    roster.save(tmp_path / "roster.json")
    configs = [_island(tmp_path, i, two_clusters, i // 2, "") for i in range(4)]
    export_initial_parameters(configs[0], str(tmp_path / "init.safetensors"))
    save_config(_root_config(tmp_path, GROUPS), tmp_path / "root.toml")
    root, address, _ = _start_root(tmp_path)
    procs = []
    try:
        for i, cfg in enumerate(configs):
            cfg.aggregator = address
            save_config(cfg, tmp_path / f"island{i}.toml")
            procs.append(_start(["island", "run", str(tmp_path / f"island{i}.toml")],
                                tmp_path / f"island{i}.log", "training")[0])  # fmt: skip
        for i, p in enumerate(procs):
            p.communicate(timeout=180)
            assert p.returncode == 0, (tmp_path / f"island{i}.log").read_text()[-3000:]
        theta0 = load_file(str(tmp_path / "init.safetensors"))
        experts = {}
        for i in range(4):
            model, manifest = load_expert(tmp_path / f"out{i}", roster)
            model_id = f"expert{i // 2}"
            assert (manifest["expert_id"], manifest["cluster"]) == (model_id, i // 2)
            assert manifest["version"] >= 1 and manifest["train_steps"] == 20
            experts[i] = (manifest["version"], params_to_numpy(model))
        for g, model_id in enumerate(GROUPS):
            upto = max(experts[2 * g][0], experts[2 * g + 1][0])
            thetas, senders = asyncio.run(
                _versions(address, model_id, idents["admin"], theta0, upto)
            )
            assert senders == {idents[n].peer_id for n in GROUPS[model_id]}, model_id
            for i in (2 * g, 2 * g + 1):
                version, params = experts[i]
                for name, value in params.items():
                    assert value.tobytes() == thetas[version][name].tobytes(), (i, name)
        records = [json.loads(x) for x in (tmp_path / "island0.jsonl").read_text().splitlines()]
        assert records[-1]["step"] == 20 and records[-1]["bytes_sent"] > 0
        a, b = experts[0][1], experts[2][1]
        assert any(a[k].tobytes() != b[k].tobytes() for k in a)  # two different experts
    finally:
        for p in procs:
            _stop(p)
        _stop(root)
