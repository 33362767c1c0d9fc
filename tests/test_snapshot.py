"""Async lazy snapshots: exact resume of a real bytelm run, RNG states, skipping incomplete or
corrupt snapshots, kill -9 in a real subprocess, retention, skip/wait while a write is in
flight, writer errors surfacing, and the loop's stall against the background write time."""

import argparse
import copy
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from comms.errors import ConfigError
from island.snapshot import (
    MANIFEST_FILE,
    TENSORS_FILE,
    AsyncSnapshotter,
    CorruptSnapshotError,
    SnapshotMismatchError,
    SnapshotState,
    SnapshotWriteError,
    check_snapshot,
    latest_complete,
    load_snapshot,
    make_meta,
    read_snapshot,
    snapshot_path,
)
from island.workloads import get_workload

REPO = Path(__file__).resolve().parents[1]
# One real text file keeps corpus loading instant; the model is tiny so steps are too.
TINY = {
    "data": [argparse.__file__],
    "d_model": 32,
    "n_layer": 1,
    "n_head": 2,
    "context": 32,
    "batch_size": 4,
}


def tiny_workload(**overrides):
    return get_workload("bytelm", **{**TINY, **overrides})


def make_run(workload, model_seed=0):
    model = workload.build_model(seed=model_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    return model, optimizer, workload.train_batches(seed=7)


def train(workload, model, optimizer, batches, steps):
    losses = []
    for _ in range(steps):
        loss = workload.loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def params_digest(model):
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def assert_same_optimizer_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key, state in a["state"].items():
        assert state.keys() == b["state"][key].keys()
        for name, value in state.items():
            assert torch.equal(value, b["state"][key][name]), (key, name)


def snap_dirs(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("snap-"))


# --- exact resume --------------------------------------------------------------------------


def test_resume_restores_everything_and_training_continues_bit_identically(tmp_path):
    workload = tiny_workload()
    model, optimizer, batches = make_run(workload)
    train(workload, model, optimizer, batches, 5)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    residuals = {"blocks.0.mlp.0.weight": np.random.default_rng(1).random((4, 3), np.float32)}
    meta = make_meta(
        island_id="island-3",
        round=2,
        base_version=11,
        last_pushed_seq=9,
        workload="bytelm",
        workload_config=workload.config,
    )
    expected_params = copy.deepcopy(model.state_dict())
    expected_optimizer = copy.deepcopy(optimizer.state_dict())

    with AsyncSnapshotter(tmp_path) as snapshotter:
        state = SnapshotState.capture(
            model, optimizer, anchor=anchor, residuals=residuals, batches=batches, meta=meta
        )
        assert snapshotter.snapshot(state, step=5)
        # Training goes on while the write is in flight: the snapshot must hold step 5.
        later_losses = train(workload, model, optimizer, batches, 4)
    later_params = model.state_dict()

    path = latest_complete(tmp_path)
    assert path == snapshot_path(tmp_path, 5)
    model2, optimizer2, batches2 = make_run(workload, model_seed=1)
    assert params_digest(model2) != params_digest(model)
    anchor2, residuals2 = {}, {}
    loaded_meta = load_snapshot(
        path, model2, optimizer2, anchor=anchor2, residuals=residuals2, batches=batches2
    )

    assert loaded_meta["step"] == 5 and loaded_meta["round"] == 2
    assert loaded_meta["base_version"] == 11 and loaded_meta["last_pushed_seq"] == 9
    assert loaded_meta["island_id"] == "island-3" and loaded_meta["workload"] == "bytelm"
    assert loaded_meta["workload_config"]["d_model"] == 32
    for name, value in expected_params.items():
        assert torch.equal(model2.state_dict()[name], value), name
    assert_same_optimizer_state(optimizer2.state_dict(), expected_optimizer)
    assert optimizer2.state_dict()["param_groups"][0]["betas"] == (0.9, 0.999)  # a tuple again
    assert all(float(s["step"]) == 5.0 for s in optimizer2.state_dict()["state"].values())
    assert anchor2.keys() == anchor.keys()
    assert all(torch.equal(anchor2[n], anchor[n]) for n in anchor)
    np.testing.assert_array_equal(
        residuals2["blocks.0.mlp.0.weight"], residuals[next(iter(residuals))]
    )
    assert batches2.step == 5

    assert train(workload, model2, optimizer2, batches2, 4) == later_losses
    for name, value in later_params.items():
        assert torch.equal(model2.state_dict()[name], value), name


def test_anchor_and_residuals_are_copied_in_place_into_existing_buffers(tmp_path):
    workload = tiny_workload()
    model, _, _ = make_run(workload)
    anchor = {"w": torch.arange(6.0).reshape(2, 3), "b": np.full(4, 2.5, np.float32)}
    with AsyncSnapshotter(tmp_path) as snapshotter:
        snapshotter.snapshot(SnapshotState.capture(model, anchor=anchor), step=1)
    target = {"w": torch.zeros(2, 3), "b": np.zeros(4, np.float32)}
    w_before, b_before = target["w"], target["b"]
    load_snapshot(tmp_path / "snap-0000000001", anchor=target)
    assert target["w"] is w_before and torch.equal(w_before, anchor["w"])
    assert target["b"] is b_before and np.array_equal(b_before, anchor["b"])
    with pytest.raises(SnapshotMismatchError, match="shape"):
        load_snapshot(tmp_path / "snap-0000000001", anchor={"w": torch.zeros(3), "b": b_before})
    with pytest.raises(SnapshotMismatchError, match="missing"):
        load_snapshot(tmp_path / "snap-0000000001", anchor={"w": w_before})
    with pytest.raises(SnapshotMismatchError, match="model does not fit"):
        load_snapshot(tmp_path / "snap-0000000001", tiny_workload(d_model=16).build_model(0))


def test_rng_states_are_restored(tmp_path):
    workload = tiny_workload()
    model, _, _ = make_run(workload)
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.random(), np.random.rand(), torch.rand(2)  # advance each generator
    with AsyncSnapshotter(tmp_path) as snapshotter:
        snapshotter.snapshot(SnapshotState.capture(model), step=1)
    expected = (random.random(), np.random.rand(3), np.random.randn(), torch.rand(4))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    load_snapshot(latest_complete(tmp_path))
    got = (random.random(), np.random.rand(3), np.random.randn(), torch.rand(4))
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    assert torch.equal(got[3], expected[3])


def test_odd_values_round_trip_exactly_and_tied_weights_are_stored_once(tmp_path):
    workload = tiny_workload()
    model, _, _ = make_run(workload)
    data = {
        "tuple": (1, 2.5, "x", None, True),
        "int_keys": {0: "a", 3: (4, 5)},
        "dollar": {"$tensor": "not a reference"},
        "bytes": b"\x00\xff",
        "uint32": np.arange(5, dtype=np.uint32),
        "scalar": np.float32(0.1),
        "nan": float("nan"),
        "empty": torch.zeros(0, 3),
        "bf16": torch.ones(3, dtype=torch.bfloat16),
    }
    with AsyncSnapshotter(tmp_path) as snapshotter:
        snapshotter.snapshot(SnapshotState(model=model.state_dict(), data=data), step=1)
    state = read_snapshot(tmp_path / "snap-0000000001")
    got = state.data
    assert got["tuple"] == (1, 2.5, "x", None, True)
    assert got["int_keys"] == {0: "a", 3: (4, 5)}
    assert got["dollar"] == {"$tensor": "not a reference"}
    assert got["bytes"] == b"\x00\xff"
    assert got["uint32"].dtype == np.uint32 and got["uint32"].tolist() == [0, 1, 2, 3, 4]
    assert got["scalar"] == np.float32(0.1) and got["scalar"].dtype == np.float32
    assert np.isnan(got["nan"])
    assert got["empty"].shape == (0, 3)
    assert got["bf16"].dtype == torch.bfloat16
    manifest = json.loads((tmp_path / "snap-0000000001" / MANIFEST_FILE).read_text())
    tree = manifest["state"]["model"]
    assert tree["lm_head.weight"] == tree["token_embedding.weight"]  # one copy on disk
    assert torch.equal(state.model["lm_head.weight"], model.lm_head.weight.detach())


def test_unstorable_values_and_bad_config_fail_in_the_caller(tmp_path):
    workload = tiny_workload()
    model, _, _ = make_run(workload)
    with AsyncSnapshotter(tmp_path) as snapshotter:
        with pytest.raises(TypeError, match="data/oops"):
            snapshotter.snapshot(SnapshotState(model=model.state_dict(), data={"oops": {1}}), 1)
        assert snapshotter.snapshot(SnapshotState(model=model.state_dict()), 2)  # still works
    with pytest.raises(ConfigError, match="keep"):
        AsyncSnapshotter(tmp_path, keep=0)
    with pytest.raises(ConfigError, match="when_busy"):
        AsyncSnapshotter(tmp_path, when_busy="later")
    with pytest.raises(ConfigError, match="JSON"):
        make_meta(island_id="a", round=0, base_version=0, last_pushed_seq=0, workload={1, 2})


# --- incomplete and corrupt snapshots, kill -9 ----------------------------------------------


def test_incomplete_and_corrupt_snapshots_are_skipped(tmp_path):
    workload = tiny_workload()
    model, optimizer, batches = make_run(workload)
    with AsyncSnapshotter(tmp_path, keep=10) as snapshotter:
        for step in (1, 2):
            train(workload, model, optimizer, batches, 1)
            snapshotter.snapshot(SnapshotState.capture(model, optimizer, batches=batches), step)
            snapshotter.wait()
    assert latest_complete(tmp_path) == snapshot_path(tmp_path, 2)

    # A temp dir left by a killed writer, a snapshot without a manifest, a corrupted tensor
    # file and a truncated manifest, all newer than step 2.
    shutil.copytree(snapshot_path(tmp_path, 2), tmp_path / ".tmp-snap-0000000009-dead")
    missing = snapshot_path(tmp_path, 3)
    shutil.copytree(snapshot_path(tmp_path, 2), missing)
    (missing / MANIFEST_FILE).unlink()
    flipped = snapshot_path(tmp_path, 4)
    shutil.copytree(snapshot_path(tmp_path, 2), flipped)
    blob = bytearray((flipped / TENSORS_FILE).read_bytes())
    blob[-5] ^= 0xFF
    (flipped / TENSORS_FILE).write_bytes(bytes(blob))
    truncated = snapshot_path(tmp_path, 5)
    shutil.copytree(snapshot_path(tmp_path, 2), truncated)
    text = (truncated / MANIFEST_FILE).read_text()
    (truncated / MANIFEST_FILE).write_text(text[: len(text) // 2])

    assert latest_complete(tmp_path) == snapshot_path(tmp_path, 2)
    with pytest.raises(CorruptSnapshotError, match="does not match") as info:
        read_snapshot(flipped)
    assert info.value.path == flipped
    with pytest.raises(CorruptSnapshotError, match=r"no manifest\.json"):
        check_snapshot(missing)

    # Corrupt step 2 as well: step 1 is what remains.
    blob = bytearray((snapshot_path(tmp_path, 2) / TENSORS_FILE).read_bytes())
    blob[100] ^= 0x01
    (snapshot_path(tmp_path, 2) / TENSORS_FILE).write_bytes(bytes(blob))
    path = latest_complete(tmp_path)
    assert path == snapshot_path(tmp_path, 1)
    model2, optimizer2, batches2 = make_run(workload, model_seed=1)
    assert load_snapshot(path, model2, optimizer2, batches=batches2)["step"] == 1
    assert batches2.step == 1

    # A new snapshotter clears the dead temp dir.
    AsyncSnapshotter(tmp_path).close()
    assert not list(tmp_path.glob(".tmp-snap-*"))
    assert latest_complete(tmp_path / "nothing-here") is None


CHILD = """
import hashlib, json, sys, torch
from island.snapshot import AsyncSnapshotter, SnapshotState
from island.workloads import get_workload

workload = get_workload("bytelm", **json.loads(sys.argv[2]))
model = workload.build_model(seed=0)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
batches = workload.train_batches(seed=7)
snapshotter = AsyncSnapshotter(sys.argv[1], keep=2, when_busy="wait")
step = 0
while True:
    loss = workload.loss(model, next(batches))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    step += 1
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().numpy().tobytes())
    print(step, h.hexdigest(), flush=True)  # before the snapshot, so every one on disk is known
    snapshotter.snapshot(SnapshotState.capture(model, optimizer, batches=batches), step)
"""


def test_kill_9_during_writes_leaves_a_complete_loadable_snapshot(tmp_path):
    directory = tmp_path / "snaps"
    config = {**TINY, "d_model": 64, "n_layer": 2}  # a few hundred KB per snapshot
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), json.dumps(config)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    digests = {}
    try:
        for line in child.stdout:
            step, digest = line.split()
            digests[int(step)] = digest
            if int(step) >= 12:
                child.send_signal(signal.SIGKILL)  # a write is in flight at almost every moment
                break
    finally:
        child.kill()
        rest, _ = child.communicate(timeout=30)
    for line in rest.splitlines():
        step, digest = line.split()
        digests[int(step)] = digest
    assert child.returncode == -signal.SIGKILL
    assert len(digests) >= 12

    path = latest_complete(directory)
    assert path is not None
    model, optimizer, batches = make_run(get_workload("bytelm", **config), model_seed=1)
    meta = load_snapshot(path, model, optimizer, batches=batches)
    assert meta["step"] > 0
    assert params_digest(model) == digests[meta["step"]]
    assert batches.step == meta["step"]
    assert len(snap_dirs(directory)) <= 3  # keep=2, plus at most one being replaced


# --- the snapshotter's policies ------------------------------------------------------------


class GatedSnapshotter(AsyncSnapshotter):
    """Holds each write until ``gate`` is set, so a write is reliably in flight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def _write(self, job, final):
        assert self.gate.wait(timeout=30)
        return super()._write(job, final)


def test_keep_retains_only_the_newest_snapshots(tmp_path):
    workload = tiny_workload()
    model, optimizer, batches = make_run(workload)
    with AsyncSnapshotter(tmp_path, keep=2, when_busy="wait") as snapshotter:
        for step in range(1, 6):
            train(workload, model, optimizer, batches, 1)
            assert snapshotter.snapshot(SnapshotState.capture(model, optimizer), step)
    assert snap_dirs(tmp_path) == ["snap-0000000004", "snap-0000000005"]
    stats = snapshotter.stats
    assert stats.written == 5 and stats.skipped == 0 and stats.last_step == 5
    # Snapshotting a step again (a resumed run) replaces it.
    with AsyncSnapshotter(tmp_path, keep=2) as snapshotter:
        snapshotter.snapshot(SnapshotState.capture(model, meta={"again": True}), 5)
    assert read_snapshot(snapshot_path(tmp_path, 5)).meta["again"] is True
    assert snap_dirs(tmp_path) == ["snap-0000000004", "snap-0000000005"]


def test_a_snapshot_requested_during_a_write_is_skipped_or_waits(tmp_path):
    workload = tiny_workload()
    model, _, _ = make_run(workload)
    state = SnapshotState(model=model.state_dict())
    with GatedSnapshotter(tmp_path / "skip") as snapshotter:
        assert snapshotter.snapshot(state, 1)
        assert snapshotter.busy
        assert not snapshotter.snapshot(state, 2)
        assert snapshotter.stats.skipped == 1
        snapshotter.gate.set()
        assert snapshotter.wait(timeout=30) == snapshot_path(tmp_path / "skip", 1)
        assert snapshotter.snapshot(state, 3)
    assert snap_dirs(tmp_path / "skip") == ["snap-0000000001", "snap-0000000003"]

    with GatedSnapshotter(tmp_path / "wait", when_busy="wait") as snapshotter:
        assert snapshotter.snapshot(state, 1)
        opener = threading.Timer(0.05, snapshotter.gate.set)
        opener.start()
        assert snapshotter.snapshot(state, 2)  # blocks until the first write is done
        assert snapshotter.stats.written == 1
        assert snapshotter.stats.last_stall_s >= 0.04
    assert snap_dirs(tmp_path / "wait") == ["snap-0000000001", "snap-0000000002"]


def test_writer_errors_surface_on_the_next_call_with_the_path(tmp_path):
    workload = tiny_workload()
    model, _, _ = make_run(workload)
    state = SnapshotState(model=model.state_dict())
    directory = tmp_path / "snaps"
    snapshotter = AsyncSnapshotter(directory, when_busy="wait")
    # The snapshot directory vanishes and a file takes its place: every write must fail.
    shutil.rmtree(directory)
    directory.write_text("not a directory")
    assert snapshotter.snapshot(state, 1)  # the copy works; the write fails in the background
    with pytest.raises(SnapshotWriteError) as info:
        snapshotter.snapshot(state, 2)
    assert info.value.path == snapshot_path(directory, 1) and info.value.step == 1
    assert str(directory) in str(info.value)
    # Step 2 was not taken; the error was raised once, and the loop can go on.
    directory.unlink()
    directory.mkdir()
    assert snapshotter.snapshot(state, 3)
    assert snapshotter.wait() == snapshot_path(directory, 3)
    assert snapshotter.stats.failed == 1 and snapshotter.stats.written == 1
    # An error of the last write comes out of close().
    shutil.rmtree(directory)
    snapshotter.snapshot(state, 4)
    with pytest.raises(SnapshotWriteError, match="snap-0000000004"):
        snapshotter.close()
    with pytest.raises(RuntimeError, match="after close"):
        snapshotter.snapshot(state, 5)


def test_the_loop_stalls_for_less_than_the_background_write(tmp_path):
    # About 0.8 M parameters: 3 MB of weights and 6 MB of AdamW moments.
    workload = tiny_workload(d_model=128, n_layer=4, n_head=4, context=16, batch_size=2)
    model, optimizer, batches = make_run(workload)
    train(workload, model, optimizer, batches, 1)
    with AsyncSnapshotter(tmp_path) as snapshotter:
        for step in (1, 2, 3):
            snapshotter.snapshot(SnapshotState.capture(model, optimizer, batches=batches), step)
            snapshotter.wait()
        stats = snapshotter.stats
    assert stats.last_bytes > 9_000_000
    assert stats.written == 3
    assert stats.total_stall_s < stats.total_write_s
