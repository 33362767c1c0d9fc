"""`island run` processes against real `aggregator serve` processes on loopback."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from safetensors.numpy import load_file

from aggregator.config import AggregatorConfig, MergeConfig, ModelConfig
from aggregator.outer import apply_update
from comms.config import save_config
from comms.envelope import Envelope
from comms.fragments import fragment_model_id
from comms.http import url_of
from comms.identity import Identity, Roster
from comms.transport import TransportClient
from comms.update import decode_update
from island.config import IslandConfig, SnapshotConfig
from island.daemon import export_initial_parameters, params_digest
from island.snapshot import latest_complete, read_snapshot
from island.sync import SyncConfig

pytestmark = pytest.mark.timeout(240)
TINY = {"d_model": 32, "n_layer": 1, "n_head": 2, "context": 32, "batch_size": 4}


def _start(args, log, ready):
    logf = open(log, "ab")
    p = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=logf,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    line = p.stdout.readline().decode()
    if ready not in line:
        p.kill()
        raise RuntimeError(f"{args} did not start: {line!r}; see {log}")
    return p, line


def _start_root(tmp_path):
    """``aggregator serve root.toml`` (written by ``_federation``): the process, its gRPC
    address and the line it printed when ready."""
    root, line = _start(["aggregator", "serve", str(tmp_path / "root.toml")],
                        tmp_path / "root.log", "serving on")  # fmt: skip
    return root, line.split("serving on ")[1].split()[0], line


def _stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def _federation(tmp_path, n_islands, steps, every, codec="int8", root_http=False, fragments=1):
    """Keys, roster, island configs and the root's config (root.toml). With ``fragments`` > 1
    the islands stream the model as that many fragments and the root serves one line each."""
    idents = [Identity.generate() for _ in range(n_islands)]
    root_id = Identity.generate()
    roster = Roster()
    for i, ident in enumerate(idents):
        ident.save(tmp_path / f"island{i}.pem")
        roster.add(ident.public_key, "island", f"island{i}")
    root_id.save(tmp_path / "root.pem")
    roster.add(root_id.public_key, "aggregator", "root")
    admin = Identity.generate()  # the test reads the root's model with an operator's key
    admin.save(tmp_path / "admin.pem")
    roster.add(admin.public_key, "admin", "operator")
    roster.save(tmp_path / "roster.json")
    islands = [
        IslandConfig(
            name=f"island{i}",
            key=str(tmp_path / f"island{i}.pem"),
            roster=str(tmp_path / "roster.json"),
            aggregator="",
            workload="bytelm",
            workload_config=TINY,
            steps=steps,
            shard=i,
            num_shards=n_islands,
            threads=1,
            eval_batches=1,
            http="127.0.0.1:0",
            metrics_file=str(tmp_path / f"island{i}.jsonl"),
            sync=SyncConfig(model_id="global", every=every, codec=codec, fragments=fragments),
            snapshot=SnapshotConfig(dir=str(tmp_path / f"snap{i}")),
        )
        for i in range(n_islands)
    ]
    export_initial_parameters(islands[0], str(tmp_path / "init.safetensors"))
    init = str(tmp_path / "init.safetensors")
    models = [ModelConfig("global", init=init, codec="int8")]
    if fragments > 1:
        models = [
            ModelConfig(fragment_model_id("global", p), init=init, codec="int8",
                        fragment=[p, fragments])
            for p in range(fragments)
        ]  # fmt: skip
    root = AggregatorConfig(
        name="root", role="root", key=str(tmp_path / "root.pem"),
        roster=str(tmp_path / "roster.json"), state_dir=str(tmp_path / "root-state"),
        http="127.0.0.1:0" if root_http else "",
        merge=MergeConfig(buffer_k=n_islands, deadline_s=5.0),
        models=models,
    )  # fmt: skip
    save_config(root, tmp_path / "root.toml")
    return islands


def _admin(tmp_path) -> Identity:
    return Identity.load(tmp_path / "admin.pem")


async def _root_theta(address, reader, model_id="global"):
    async with TransportClient(address, identity=reader) as c:
        env = Envelope.from_bytes(await c.fetch(model_id, -1), max_bytes=1 << 30)
        return env.header.base_version, decode_update(env)


async def _theta_at(address, theta0, version, reader, model_id="global"):
    """theta_version rebuilt from theta_0 and the published u_1..u_version."""
    theta = {k: v.copy() for k, v in theta0.items()}
    if version == 0:
        return theta
    async with TransportClient(address, identity=reader) as c:
        async for v, data in c.subscribe(model_id, 1):
            apply_update(theta, decode_update(Envelope.from_bytes(data, max_bytes=1 << 30)))
            if v == version:
                return theta


def _accepted_updates(http_address: str) -> float:
    """The root's count of the island updates it accepted (its /metrics)."""
    with urllib.request.urlopen(url_of(http_address) + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("archipelago_updates_accepted_total{")
    )


def test_two_islands_end_bit_identical_with_the_root(tmp_path):
    islands = _federation(tmp_path, 2, steps=30, every=10)
    root, address, _ = _start_root(tmp_path)
    procs = []
    try:
        for i, cfg in enumerate(islands):
            cfg.aggregator = address
            cfg.snapshot.dir = ""
            save_config(cfg, tmp_path / f"island{i}.toml")
            procs.append(_start(["island", "run", str(tmp_path / f"island{i}.toml")],
                                tmp_path / f"island{i}.log", "training")[0])  # fmt: skip
        summaries = []
        for p in procs:
            out, _ = p.communicate(timeout=180)
            assert p.returncode == 0, (tmp_path / "island0.log").read_text()[-3000:]
            summaries.append(json.loads(out.decode().strip().splitlines()[-1]))
        reader = _admin(tmp_path)
        version, theta = asyncio.run(_root_theta(address, reader))
        assert version >= 2
        theta0 = load_file(str(tmp_path / "init.safetensors"))
        for s in summaries:  # every island's anchor holds exactly the root's bits at its version
            rebuilt = asyncio.run(_theta_at(address, theta0, s["version"], reader))
            assert params_digest(rebuilt) == s["anchor_digest"]
        final = asyncio.run(_theta_at(address, theta0, version, reader))
        assert params_digest(final) == params_digest(theta)
        for i in range(2):
            records = [
                json.loads(x) for x in (tmp_path / f"island{i}.jsonl").read_text().splitlines()
            ]
            assert records[-1]["step"] == 30 and records[-1]["bytes_sent"] > 0
            losses = [r["val_loss"] for r in records if r["val_loss"] is not None]
            assert all(np.isfinite(losses))
        assert all(s["step"] == 30 for s in summaries)
        assert max(s["version"] for s in summaries) <= version
    finally:
        for p in procs:
            _stop(p)
        _stop(root)


def test_island_killed_with_sigkill_resumes_from_its_snapshot(tmp_path):
    """kill -9 mid-run, then a restart: the island resumes from its newest complete snapshot,
    whose anchor holds the root's bits at its version; the root accepts each round's push
    exactly once (K = 1: one version per push), and the final anchor is the root's theta.
    (A record's "round" counts the rounds of one run of the process; "step" goes on.)"""
    every = 5
    (cfg,) = _federation(tmp_path, 1, steps=400, every=every, root_http=True)
    root, address, line = _start_root(tmp_path)
    root_http = line.split(" http ")[1].split()[0]
    cfg.aggregator = address
    save_config(cfg, tmp_path / "island.toml")
    try:
        p, _ = _start(["island", "run", str(tmp_path / "island.toml")], tmp_path / "island.log",
                      "training")  # fmt: skip
        deadline = time.time() + 120
        metrics = tmp_path / "island0.jsonl"
        while time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        before = [json.loads(x) for x in metrics.read_text().splitlines()]
        done_before = [r["step"] for r in before]
        assert done_before and max(done_before) >= 10
        snap = latest_complete(cfg.snapshot.dir)
        assert snap is not None
        state = read_snapshot(snap)
        snap_step, snap_version = int(state.meta["step"]), int(state.meta["base_version"])
        assert snap_step >= every and snap_step % every == 0
        theta0 = load_file(str(tmp_path / "init.safetensors"))
        at_snapshot = asyncio.run(_theta_at(address, theta0, snap_version, _admin(tmp_path)))
        assert params_digest(state.anchor) == params_digest(at_snapshot)  # the root's bits

        cfg.steps = max(done_before) + 10
        save_config(cfg, tmp_path / "island.toml")
        p, _ = _start(["island", "run", str(tmp_path / "island.toml")], tmp_path / "island.log",
                      "training")  # fmt: skip
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        log = (tmp_path / "island.log").read_text()
        assert f"resumed from {snap} at step {snap_step}" in log
        after = [json.loads(x) for x in metrics.read_text().splitlines()][len(before) :]
        assert after[0]["step"] == snap_step + every  # the first round after the snapshot's
        summary = json.loads(out.decode().strip().splitlines()[-1])
        assert summary["step"] == cfg.steps
        # every round's push accepted once: a round pushed before the kill and trained again
        # after it goes up under the same sequence, a replay, not a second update
        rounds = cfg.steps // every
        assert _accepted_updates(root_http) == rounds
        version, theta = asyncio.run(_root_theta(address, _admin(tmp_path)))
        assert version == rounds
        final = asyncio.run(_theta_at(address, theta0, summary["version"], _admin(tmp_path)))
        assert params_digest(final) == summary["anchor_digest"]
        if summary["version"] == version:
            assert params_digest(theta) == summary["anchor_digest"]
    finally:
        _stop(root)


def test_status_endpoint_reports_progress_while_training(tmp_path):
    import threading
    import urllib.request

    from island.daemon import Island

    (cfg,) = _federation(tmp_path, 1, steps=100_000, every=5)
    root, cfg.aggregator, _ = _start_root(tmp_path)
    cfg.snapshot.dir = ""
    island = Island(cfg)
    thread = threading.Thread(target=island.run, daemon=True)
    thread.start()
    try:
        assert island.ready.wait(60)
        deadline = time.time() + 60
        while island.lu.round < 2 and time.time() < deadline:
            time.sleep(0.05)
        base = f"http://{island.http_address}"
        assert urllib.request.urlopen(base + "/healthz", timeout=10).read() == b"ok\n"
        status = json.loads(urllib.request.urlopen(base + "/status", timeout=10).read())
        assert status["step"] >= 10 and status["bytes_sent"] > 0 and status["version"] >= 0
        assert 0 < status["utilization"] <= 1 and status["tokens_per_s"] > 0
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        assert 'archipelago_island_step{island="island0"}' in metrics
        assert "archipelago_island_sent_bytes_total" in metrics
    finally:
        island.stop()
        thread.join(60)
        _stop(root)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def two_clusters(tmp_path_factory):
    from island.workloads import get_workload
    from router.partition import TextPartitioner

    directory = tmp_path_factory.mktemp("partition")
    docs = get_workload("bytelm", **TINY).documents()
    TextPartitioner(2, seed=0).fit([d.content for d in docs]).save(directory)
    return str(directory)


def _expert(tmp_path, partition: str, **expert) -> IslandConfig:
    from island.config import ExpertConfig

    return IslandConfig(
        name="expert0", mode="expert", workload="bytelm", workload_config=TINY, steps=3,
        threads=1, eval_batches=1, http="",
        expert=ExpertConfig(partition=partition, cluster=0, output=str(tmp_path / "out"), **expert),
    )  # fmt: skip


def test_an_expert_branches_from_the_seed_parameters_given_as_init(tmp_path, two_clusters):
    """expert.init: the expert starts from those parameters (Branch-Train-Merge's seed), not
    from the seed initialisation, and trains its cluster from there."""
    from safetensors.numpy import save_file

    from island.checkpoint import load_expert
    from island.daemon import Island
    from island.pseudo import params_to_numpy
    from island.workloads import get_workload

    seed_model = get_workload("bytelm", **TINY).build_model(seed=123)  # stands in for a seed
    seed = params_to_numpy(seed_model)
    save_file(seed, str(tmp_path / "seed.safetensors"))
    fresh = params_to_numpy(get_workload("bytelm", **TINY).build_model(seed=0))

    config = _expert(tmp_path, two_clusters, init=str(tmp_path / "seed.safetensors"))
    config.validate()
    Island(config).run()
    model, manifest = load_expert(tmp_path / "out")
    out = params_to_numpy(model)
    assert manifest["train_steps"] == 3
    # three small AdamW steps from the seed: close to it, far from the default initialisation
    moved = max(float(np.abs(out[k] - seed[k]).max()) for k in seed)
    assert 0 < moved < 0.05
    assert max(float(np.abs(out[k] - fresh[k]).max()) for k in seed) > 10 * moved


def test_a_bad_expert_init_is_a_clear_config_error(tmp_path, two_clusters):
    from comms.errors import ConfigError
    from island.daemon import Island

    with pytest.raises(ConfigError, match=r"expert\.init: no such file"):
        _expert(tmp_path, two_clusters, init=str(tmp_path / "missing.safetensors")).validate()
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((2, 2), np.float32)}, str(wrong))
    with pytest.raises(ConfigError, match="does not fit the model"):
        Island(_expert(tmp_path, two_clusters, init=str(wrong))).run()
    with pytest.raises(ConfigError, match="only in expert mode"):
        IslandConfig(name="i", aggregator="x:1", sync=SyncConfig(model_id="m"),
                     expert=_expert(tmp_path, two_clusters, init=str(wrong)).expert).validate()  # fmt: skip
