"""A multi-process island: the rank group's collectives on 2 gloo processes, and
`torchrun --nproc-per-node 2 -m island run` against a real `aggregator serve` root."""

import asyncio
import datetime
import json
import os
import signal
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.numpy import load_file

from aggregator.config import AggregatorConfig, MergeConfig, ModelConfig
from comms.config import save_config
from comms.identity import Identity, Roster
from island.config import IslandConfig, SnapshotConfig
from island.daemon import export_initial_parameters, params_digest
from island.distributed import (
    RankGroup,
    TorchRankGroup,
    rank_group_from_env,
    receive_anchor,
    replicas_agree,
    send_anchor,
    training_state_digest,
)
from island.sync import SyncConfig
from island.workloads import select_documents
from tests.test_island_daemon import (
    _accepted_updates,
    _root_theta,
    _start,
    _start_root,
    _stop,
    _theta_at,
)

pytestmark = pytest.mark.timeout(180)
TINY = {"d_model": 32, "n_layer": 1, "n_head": 2, "context": 32, "batch_size": 4}


# ---------------------------------------------------------------------- pure parts


def test_rank_slices_are_disjoint_and_make_up_the_islands_shard():
    def group(rank, world):
        g = RankGroup()
        g.rank, g.world_size = rank, world
        return g

    island_docs = select_documents(100, 1, 3, None)  # island shard 1 of 3, one process
    slices = [select_documents(100, *group(r, 2).data_shard(1, 3), None) for r in range(2)]
    assert not set(slices[0]) & set(slices[1])
    assert sorted(slices[0] + slices[1]) == sorted(island_docs)
    assert RankGroup().data_shard(1, 3) == (1, 3)  # one process: the island's own shard


def test_rank_group_from_env():
    assert type(rank_group_from_env(env={})) is RankGroup
    assert type(rank_group_from_env(env={"WORLD_SIZE": "1", "RANK": "0"})) is RankGroup
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        rank_group_from_env(env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})


# ---------------------------------------------------------------------- 2 gloo processes


def _collectives_worker(rank: int, out_dir: str) -> None:
    # The ranks meet through a file store in the test's directory: no port to pick (a port
    # found free and closed again may be taken by another process before rank 0 binds it).
    # TorchRankGroup joins the group that is already initialised.
    import torch.distributed as dist

    store = f"file://{os.path.join(out_dir, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    group = TorchRankGroup(rank, 2, rank, timeout_s=60)
    leader = rank == 0
    results = {}
    try:
        # the anchor protocol: a new version moves the arrays; an unchanged one does not
        anchor = {"b": np.zeros((2, 3), np.float32), "a": np.zeros(4, np.float32)}
        seen = []
        last = None
        for version, fill in [(3, 1.5), (3, 7.0), (5, -2.25)]:
            if leader:
                mine = {k: np.full_like(v, fill) for k, v in anchor.items()}
                last = send_anchor(group, version, mine, last)
            else:
                last = receive_anchor(group, anchor, last)
                seen.append([last, float(anchor["a"][0]), float(anchor["b"][1, 2])])
        results["seen"] = seen
        # agreeing to stop: rank 1 is asked to stop before step 3, rank 0 never is
        steps = 0
        while steps < 10 and not group.any_rank(rank == 1 and steps >= 3):
            steps += 1
        results["stopped_after"] = steps
        results["object"] = group.broadcast_object({"step": 7} if leader else None)
        results["agree_same"] = replicas_agree(group, "same")
        results["agree_differ"] = replicas_agree(group, f"rank{rank}")
        # DDP from different initialisations and on different data keeps replicas identical
        torch.manual_seed(rank)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        ddp = group.wrap_model(model)
        for _ in range(3):
            ddp(torch.randn(4, 3)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        results["ddp_digest"] = training_state_digest(model, optimizer)
        results["ddp_agree"] = replicas_agree(group, results["ddp_digest"])
        del ddp  # the reducer holds the process group: release it before the group goes
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        group.close()
    # gloo's threads may abort the interpreter's own teardown; the results are written
    os._exit(0)


def test_collectives_of_two_gloo_ranks(tmp_path):
    mp.spawn(_collectives_worker, args=(str(tmp_path),), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r1["seen"] == [[3, 1.5, 1.5], [3, 1.5, 1.5], [5, -2.25, -2.25]]
    assert r0["stopped_after"] == r1["stopped_after"] == 3
    assert r0["object"] == r1["object"] == {"step": 7}
    assert r0["agree_same"] and r1["agree_same"]
    assert not r0["agree_differ"] and not r1["agree_differ"]
    assert r0["ddp_agree"] and r1["ddp_agree"] and r0["ddp_digest"] == r1["ddp_digest"]


# ---------------------------------------------------------------------- torchrun island


def _reader(tmp_path) -> Identity:
    """Reads are signed: the island's own key, which the roster lists, reads the root."""
    return Identity.load(tmp_path / "island.pem")


def _setup(tmp_path, steps, every):
    ident, root_id = Identity.generate(), Identity.generate()
    ident.save(tmp_path / "island.pem")
    root_id.save(tmp_path / "root.pem")
    roster = Roster()
    roster.add(ident.public_key, "island", "island0")
    roster.add(root_id.public_key, "aggregator", "root")
    roster.save(tmp_path / "roster.json")
    island = IslandConfig(
        name="island0", key=str(tmp_path / "island.pem"), roster=str(tmp_path / "roster.json"),
        aggregator="", workload="bytelm", workload_config=TINY, steps=steps, threads=1,
        eval_batches=1, http="127.0.0.1:0", metrics_file=str(tmp_path / "island.jsonl"),
        sync=SyncConfig(model_id="global", every=every, codec="int8", mode="sync"),
    )  # fmt: skip
    export_initial_parameters(island, str(tmp_path / "init.safetensors"))
    root = AggregatorConfig(
        name="root", role="root", key=str(tmp_path / "root.pem"),
        roster=str(tmp_path / "roster.json"), state_dir=str(tmp_path / "root-state"),
        http="127.0.0.1:0", merge=MergeConfig(buffer_k=1, deadline_s=5.0),
        models=[ModelConfig("global", init=str(tmp_path / "init.safetensors"), codec="int8")],
    )  # fmt: skip
    save_config(root, tmp_path / "root.toml")
    return island


def test_torchrun_island_pushes_once_per_round_and_matches_the_root(tmp_path):
    steps, every = 12, 4
    cfg = _setup(tmp_path, steps, every)
    root, address, line = _start_root(tmp_path)
    root_http = line.split(" http ")[1].split()[0]
    island = None
    try:
        cfg.aggregator = address
        save_config(cfg, tmp_path / "island.toml")
        island = _torchrun_island(tmp_path)
        out, _ = island.communicate(timeout=150)
        assert island.returncode == 0, (tmp_path / "island.log").read_text()[-3000:]
        lines = out.decode().strip().splitlines()
        assert len(lines) == 1  # one summary: only rank 0 prints
        summary = json.loads(lines[0])
        rounds = steps // every
        assert summary["ranks"] == 2 and summary["replicas_agree"] is True
        assert summary["step"] == steps and summary["round"] == rounds
        # one push per round from the island (not one per rank), each a version (buffer_k=1)
        assert _accepted_updates(root_http) == rounds
        version, theta = asyncio.run(_root_theta(address, _reader(tmp_path)))
        assert version == summary["version"] == rounds
        theta0 = load_file(str(tmp_path / "init.safetensors"))
        rebuilt = asyncio.run(_theta_at(address, theta0, version, _reader(tmp_path)))
        assert params_digest(rebuilt) == params_digest(theta) == summary["anchor_digest"]
        records = [json.loads(x) for x in (tmp_path / "island.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == list(range(1, rounds + 1))  # rank 0 writes
        assert all(np.isfinite(r["val_loss"]) for r in records)
    finally:
        if island is not None:
            _stop(island)
        _stop(root)


def _torchrun_island(tmp_path):
    return _start(["torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "island", "run", str(tmp_path / "island.toml")],
                  tmp_path / "island.log", "training")[0]  # fmt: skip


def test_sigterm_stops_every_rank_after_the_same_step_and_a_restart_resumes(tmp_path):
    cfg = _setup(tmp_path, steps=0, every=4)  # 0: until stopped
    cfg.sync.mode = "overlapped"
    cfg.snapshot = SnapshotConfig(dir=str(tmp_path / "snap"))
    root, address, line = _start_root(tmp_path)
    root_http = line.split(" http ")[1].split()[0]
    cfg.aggregator = address
    save_config(cfg, tmp_path / "island.toml")
    log = tmp_path / "island.log"
    island = None
    try:
        island = _torchrun_island(tmp_path)
        metrics = tmp_path / "island.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert island.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        island.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks
        out, _ = island.communicate(timeout=60)
        first = json.loads(out.decode().strip().splitlines()[-1])
        assert first["replicas_agree"] is True, log.read_text()[-3000:]
        rank1 = log.read_text().split("rank 1 done")[1]
        assert f"'step': {first['step']}," in rank1  # both ranks stopped after the same step
        assert _accepted_updates(root_http) == first["round"]  # the partial round was pushed

        cfg.steps = first["step"] + 6  # a restart resumes every rank from rank 0's snapshot
        save_config(cfg, tmp_path / "island.toml")
        island = _torchrun_island(tmp_path)
        out, _ = island.communicate(timeout=120)
        assert island.returncode == 0, log.read_text()[-3000:]
        second = json.loads(out.decode().strip().splitlines()[-1])
        assert f"resumed from {tmp_path / 'snap'}" in log.read_text()
        assert second["step"] == cfg.steps and second["replicas_agree"] is True
        assert _accepted_updates(root_http) == first["round"] + second["round"]
        theta0 = load_file(str(tmp_path / "init.safetensors"))
        rebuilt = asyncio.run(_theta_at(address, theta0, second["version"], _reader(tmp_path)))
        assert params_digest(rebuilt) == second["anchor_digest"]
    finally:
        if island is not None:
            _stop(island)
        _stop(root)
