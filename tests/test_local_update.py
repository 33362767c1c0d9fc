"""The drop-in API's round boundaries, driven through a real gRPC transport on loopback.

Most tests put test_sync's ``RecordingHandler`` on the server side (a transport-level fixture
that records pushes and serves versions the test builds; not an aggregator); the last one
trains two islands against the real root aggregator service.
"""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch
from aggtools import make_federation
from test_sync import run_in_threads, wait_until

from aggregator.outer import NesterovSGD, apply_update
from aggregator.service import AggregatorService
from comms.aio import LoopThread
from comms.update import decode_update
from island.local_update import LocalUpdate
from island.pseudo import copy_arrays, params_to_numpy, pseudo_gradient
from island.sync import SyncConfig, SyncEngine, SyncTimeoutError


def tiny_model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def random_params(rng, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "weight": (rng.standard_normal((4, 8)) * scale).astype(np.float32),
        "bias": (rng.standard_normal(4) * scale).astype(np.float32),
    }


def inner_step(model, optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def assert_model_holds(model, arrays) -> None:
    for name, value in params_to_numpy(model).items():
        assert value.tobytes() == arrays[name].tobytes(), name


def test_a_late_joiner_starts_from_the_snapshot_and_each_boundary_pushes_then_adopts(harness):
    rng = np.random.default_rng(0)
    theta0 = random_params(rng)
    harness.set_snapshot(5, theta0)
    engine = harness.engine(codec="none", rebase="reset", adopt="boundary")
    model, optimizer = tiny_model()
    with LocalUpdate(model, optimizer, every=3, engine=engine) as lu:
        assert lu.version == 5
        assert_model_holds(model, theta0)
        for i in range(2):
            inner_step(model, optimizer, i)
            assert lu.step(tokens=16) is False
        u6 = random_params(rng, scale=1e-3)
        harness.publish(6, u6)
        engine.wait_for_version(5, timeout=5)  # arrives mid-round
        inner_step(model, optimizer, 2)
        progress = pseudo_gradient(theta0, params_to_numpy(model))
        assert lu.step(tokens=16) is True

        assert lu.last_outcome(timeout=10).status == "accepted"
        push = harness.handler.pushes[0]
        assert (push.header.sequence, push.header.base_version) == (1, 5)
        assert push.header.meta == {"steps": 3, "every": 3, "tokens": 48, "round": 0}
        sent = decode_update(push)
        for name in theta0:
            assert sent[name].tobytes() == progress[name].tobytes()  # codec none: exact
        anchor6 = apply_update(copy_arrays(theta0), u6)  # what the root holds as theta_6
        assert_model_holds(model, anchor6)  # params reset to the adopted anchor
        assert (lu.version, lu.round) == (6, 1)

        for i in range(3):  # a round with no new version: params still reset to the anchor
            inner_step(model, optimizer, 10 + i)
            lu.step()
        assert_model_holds(model, anchor6)
        assert lu.last_outcome(timeout=10).status == "accepted"
        assert [p.header.base_version for p in harness.handler.pushes] == [5, 6]
        assert optimizer.state[model.weight]["step"].item() == 6  # AdamW state kept
        inner_step(model, optimizer, 20)
        lu.step()
    assert lu.last_outcome(timeout=10).status == "accepted"  # the partial round, on exit
    assert harness.handler.pushes[-1].header.meta == {
        "steps": 1,
        "every": 3,
        "tokens": 0,
        "round": 2,
    }
    assert lu.stats["rounds"] == 3 and lu.stats["steps"] == 7


def push_round(lu, model, optimizer, harness, seed: int, steps: int = 2) -> dict:
    """Train one round of ``steps`` inner steps; return the delta it pushed (accepted)."""
    for i in range(steps):
        inner_step(model, optimizer, seed + i)
        lu.step()
    assert lu.last_outcome(timeout=10).status == "accepted"
    return decode_update(harness.handler.pushes[-1])


def test_eager_rebase_starts_from_the_anchor_minus_own_deltas_in_flight(harness):
    """Overlapped: the version merging a round's delta arrives during the next round, so the
    next round starts from anchor - own in-flight delta, until a version lists it."""
    rng = np.random.default_rng(7)
    theta0 = random_params(rng)
    harness.set_snapshot(0, theta0)
    engine = harness.engine(codec="none", adopt="boundary")
    assert engine.config.rebase == "eager"
    model, optimizer = tiny_model(7)
    me = harness.island.peer_id
    with LocalUpdate(model, optimizer, every=2, engine=engine, flush_on_exit=False) as lu:
        d1 = push_round(lu, model, optimizer, harness, 0)
        want = {k: theta0[k] - d1[k] for k in theta0}  # no version yet: own delta applied
        for k in want:
            assert lu.start_point[k].tobytes() == want[k].tobytes()
        assert_model_holds(model, want)
        # version 1 holds another island's update only: ours stays in flight
        u1 = random_params(rng, scale=1e-3)
        harness.publish(1, u1, contributors=[["someone-else", 1]])
        engine.wait_for_version(0, timeout=5)
        d2 = push_round(lu, model, optimizer, harness, 10)
        assert harness.handler.pushes[1].header.base_version == 0  # the round began at 0
        anchor1 = apply_update(copy_arrays(theta0), u1)
        assert_model_holds(model, {k: anchor1[k] - d1[k] - d2[k] for k in theta0})
        # version 2 lists our first push: only the second stays applied locally
        u2 = random_params(rng, scale=1e-3)
        harness.publish(2, u2, contributors=[[me, 1], ["someone-else", 2]])
        engine.wait_for_version(1, timeout=5)
        d3 = push_round(lu, model, optimizer, harness, 20)
        anchor2 = apply_update(anchor1, u2)
        want = {k: (anchor2[k] - d2[k]) - d3[k] for k in theta0}
        assert_model_holds(model, want)
        assert sorted(lu.state_dict()["in_flight"]) == ["2", "3"]
        assert all(lu.anchor[k].tobytes() == anchor2[k].tobytes() for k in theta0)


def test_adopt_on_arrival_moves_the_rounds_progress_onto_a_version_mid_round(harness):
    """adopt = "arrival": the first step after a version arrives shifts the params by
    new start - old start; the round's progress (the delta it pushes) is kept."""
    rng = np.random.default_rng(11)
    theta0 = random_params(rng)
    harness.set_snapshot(0, theta0)
    engine = harness.engine(codec="none", adopt="arrival")
    model, optimizer = tiny_model(11)
    me = harness.island.peer_id
    with LocalUpdate(model, optimizer, every=4, engine=engine, flush_on_exit=False) as lu:
        d1 = push_round(lu, model, optimizer, harness, 0, steps=4)
        old_start = {k: theta0[k] - d1[k] for k in theta0}
        assert_model_holds(model, old_start)  # no version yet: eager start
        moves = []

        def tracked_step(seed: int) -> dict:
            before = params_to_numpy(model)
            inner_step(model, optimizer, seed)
            after = params_to_numpy(model)
            moves.append({k: after[k] - before[k] for k in after})
            return after

        tracked_step(10)
        assert lu.step() is False and lu.version == 0  # nothing arrived: nothing moves
        u1 = random_params(rng, scale=1e-3)
        harness.publish(1, u1, contributors=[[me, 1], ["someone-else", 1]])
        engine.wait_for_version(0, timeout=5)
        trained = tracked_step(11)
        assert lu.step() is False  # mid-round: the version is adopted now
        anchor1 = apply_update(copy_arrays(theta0), u1)
        assert lu.version == 1 and lu.round == 1
        for k in theta0:  # the version holds our first push: the start is the anchor itself
            assert lu.start_point[k].tobytes() == anchor1[k].tobytes()
        assert_model_holds(model, {k: trained[k] + (anchor1[k] - old_start[k]) for k in theta0})
        for seed in (12, 13):  # the round's last two steps
            tracked_step(seed)
            lu.step()
        assert lu.last_outcome(timeout=10).status == "accepted"
        push = harness.handler.pushes[-1]
        assert push.header.base_version == 1  # the round's delta is based on the new version
    d2 = decode_update(push)
    for k in theta0:  # it holds the four inner steps' progress and nothing else
        progress = -np.sum([m[k] for m in moves], axis=0)
        assert np.abs(progress).max() > 1e-3
        np.testing.assert_allclose(d2[k], progress, rtol=0, atol=1e-6)


def test_lookahead_rebase_starts_where_the_roots_nesterov_step_will_go(harness):
    """rebase = "lookahead": the island rebuilds the root's momentum from the versions it
    adopts and starts the next round one outer step ahead, its in-flight delta as proxy."""
    rng = np.random.default_rng(11)
    theta0 = random_params(rng)
    harness.set_snapshot(0, theta0)
    engine = harness.engine(codec="none", rebase="lookahead", outer_lr=0.7, outer_momentum=0.9)
    model, optimizer = tiny_model(11)
    me = harness.island.peer_id
    root = NesterovSGD(lr=0.7, momentum=0.9)  # what the root would run
    with LocalUpdate(model, optimizer, every=2, engine=engine, flush_on_exit=False) as lu:
        d1 = push_round(lu, model, optimizer, harness, 0)
        # no version yet, zero momentum: start = theta0 - lr * (1 + mu) * d1
        want = NesterovSGD(lr=0.7, momentum=0.9).step(theta0, d1)
        for k in theta0:
            np.testing.assert_allclose(lu.start_point[k], theta0[k] + want[k], rtol=1e-6, atol=1e-7)
        # the root merges d1 (and another island's delta) into version 1
        other = random_params(rng, scale=1e-2)
        g1 = {k: (d1[k] + other[k]) / 2 for k in theta0}
        u1 = root.step(theta0, g1)
        harness.publish(1, u1, contributors=[[me, 1], ["someone-else", 1]])
        engine.wait_for_version(0, timeout=5)
        d2 = push_round(lu, model, optimizer, harness, 10)
        theta1 = apply_update(copy_arrays(theta0), u1)
        ahead = copy.deepcopy(root).step(theta1, d2)  # the root's next step if g2 were d2
        for k in theta0:
            assert lu.anchor[k].tobytes() == theta1[k].tobytes()
            np.testing.assert_allclose(
                lu.start_point[k], theta1[k] + ahead[k], rtol=1e-5, atol=1e-6
            )
        assert_model_holds(model, lu.start_point)


def test_every_inner_step_reaches_the_pushes_exactly_once_up_to_the_residual(harness):
    rng = np.random.default_rng(1)
    theta0 = random_params(rng)
    harness.set_snapshot(0, theta0)
    engine = harness.engine(codec="int8")
    model, optimizer = tiny_model(1)
    progress = []
    with LocalUpdate(model, optimizer, every=2, engine=engine, flush_on_exit=False) as lu:
        for r in range(4):
            for i in range(2):
                inner_step(model, optimizer, 100 * r + i)
                if i == 1:
                    progress.append(pseudo_gradient(lu.start_point, params_to_numpy(model)))
                lu.step()
            harness.publish(r + 1, random_params(rng, scale=1e-3))
            engine.wait_for_version(r, timeout=5)
        assert lu.last_outcome(timeout=10).status == "accepted"
    pushes = [decode_update(p) for p in harness.handler.pushes]
    residuals = engine.state_dict()["residuals"]
    assert len(pushes) == 4 and lu.version == 3  # version 4 came after the last boundary
    for name in theta0:
        total = np.sum([p[name] for p in progress], axis=0)
        sent = np.sum([p[name] for p in pushes], axis=0)
        assert np.abs(residuals[name]).max() > 0
        np.testing.assert_allclose(sent + residuals[name], total, rtol=0, atol=1e-6)


def test_sync_mode_waits_at_the_boundary_for_a_newer_version_and_times_out_clearly(harness):
    rng = np.random.default_rng(2)
    theta0 = random_params(rng)
    harness.set_snapshot(0, theta0)
    # long enough for version 1, published 0.3 s in, to arrive however loaded the machine
    engine = harness.engine(codec="none", mode="sync", sync_timeout_s=10.0)
    model, optimizer = tiny_model(2)
    u1 = random_params(rng, scale=1e-3)
    with LocalUpdate(model, optimizer, every=2, engine=engine, flush_on_exit=False) as lu:
        inner_step(model, optimizer, 0)
        lu.step()
        inner_step(model, optimizer, 1)
        threading.Timer(0.3, harness.publish, (1, u1)).start()
        start = time.perf_counter()
        lu.step()
        assert time.perf_counter() - start >= 0.25  # it waited for the version
        assert lu.version == 1
        assert_model_holds(model, apply_update(copy_arrays(theta0), u1))
        assert lu.stats["blocked_s"] >= 0.25
        for i in range(2):
            inner_step(model, optimizer, 2 + i)
            if i == 0:
                lu.step()
        engine.config.sync_timeout_s = 1.0  # no version 2 is coming: a short wait will do
        start = time.perf_counter()
        with pytest.raises(SyncTimeoutError, match="no global version newer than 1"):
            lu.step()
        assert time.perf_counter() - start >= 1.0  # it gave up at its timeout, not before


def test_overlapped_mode_does_not_wait_for_the_push_at_the_boundary(harness):
    """The server holds the ack until the test has seen the boundary return (or for 10 s:
    a boundary that waits for its push takes that long), so however slow a loaded machine
    makes the boundary, the push is still in flight when it returns."""
    rng = np.random.default_rng(3)
    harness.set_snapshot(0, random_params(rng))
    harness.handler.acks_released.clear()
    release = threading.Timer(10.0, harness.handler.acks_released.set)
    release.start()
    engine = harness.engine(codec="int8")
    model, optimizer = tiny_model(3)
    try:
        with LocalUpdate(model, optimizer, every=1, engine=engine, flush_on_exit=False) as lu:
            inner_step(model, optimizer, 0)
            start = time.perf_counter()
            lu.step()
            boundary_s = time.perf_counter() - start
            assert not lu.last_push.done()  # its ack is held
            assert boundary_s < 5.0  # well under the 10 s the ack is held at most
            harness.handler.acks_released.set()
            assert lu.last_outcome(timeout=10).status == "accepted"
    finally:
        release.cancel()
        harness.handler.acks_released.set()
    assert lu.stats["blocked_s"] < 5.0  # the snapshot download only, not the held ack


def test_resuming_from_an_anchor_needs_no_snapshot(harness):
    rng = np.random.default_rng(4)
    anchor = random_params(rng)
    engine = harness.engine(codec="none")  # the handler has no snapshot: a fetch would fail
    model, optimizer = tiny_model(4)
    before = params_to_numpy(model)
    u4 = random_params(rng, scale=1e-3)
    with LocalUpdate(
        model, optimizer, every=1, engine=engine, anchor=anchor, anchor_version=3
    ) as lu:
        assert_model_holds(model, before)  # a resume keeps the model as saved
        harness.publish(4, u4)
        engine.wait_for_version(3, timeout=5)
        inner_step(model, optimizer, 0)
        lu.step()
        assert lu.version == 4
        assert_model_holds(model, apply_update(copy_arrays(anchor), u4))
        assert lu.last_outcome(timeout=10).status == "accepted"
    assert harness.handler.subscriptions == [4]
    assert harness.handler.pushes[0].header.base_version == 3


def test_lost_versions_at_a_boundary_fall_back_to_a_snapshot(harness):
    rng = np.random.default_rng(5)
    harness.set_snapshot(0, random_params(rng))
    engine = harness.engine(codec="none", max_buffered_versions=1)
    model, optimizer = tiny_model(5)
    with LocalUpdate(model, optimizer, every=1, engine=engine, flush_on_exit=False) as lu:
        harness.publish(1, random_params(rng, scale=1e-3))
        harness.publish(2, random_params(rng, scale=1e-3))
        engine.wait_for_version(1, timeout=5)  # version 1 was evicted to hold version 2
        theta2 = random_params(rng)
        harness.set_snapshot(2, theta2)
        inner_step(model, optimizer, 0)
        lu.step()
        assert lu.version == 2
        assert_model_holds(model, theta2)
        wait_until(lambda: harness.handler.subscriptions[-1] == 3)
    assert engine.stats["snapshots_fetched"] == 2


def test_step_before_start_is_a_clear_error(harness):
    model, optimizer = tiny_model()
    lu = LocalUpdate(model, optimizer, every=2, engine=harness.engine())
    with pytest.raises(RuntimeError, match="inside `with LocalUpdate"):
        lu.step()
    with pytest.raises(ValueError, match="both anchor and anchor_version"):
        LocalUpdate(model, optimizer, engine=lu.engine, anchor_version=1)


# ------------------------------------------------------------------ against the real aggregator


def test_two_islands_and_a_real_root_aggregator_end_with_identical_bits(tmp_path):
    fed = make_federation(
        tmp_path, 2, aggregators=("root",), shapes={"weight": (4, 8), "bias": (4,)}
    )
    config = fed.config("root", "root", buffer_k=2, codec="int8")  # u_v published as int8
    rounds, every = 3, 2
    with LoopThread("aggregator") as aggregator_loop:
        root = AggregatorService(config)
        address = aggregator_loop.run(root.start(), 30)
        engines, updates = [], []

        def island(i: int) -> None:
            sync = SyncConfig(model_id="global", every=every, codec="int8",
                              retry_interval_s=0.05)  # fmt: skip
            engine = SyncEngine(sync, fed.islands[i], address, roster=fed.roster)
            engines.append(engine)
            model, optimizer = tiny_model(10 + i)
            with LocalUpdate(model, optimizer, engine=engine) as lu:
                assert lu.version == 0
                for step in range(rounds * every):
                    inner_step(model, optimizer, 1000 * i + step)
                    lu.step(tokens=16)
                assert lu.last_outcome(timeout=10).status == "accepted"
            updates.append((lu, model))

        try:
            run_in_threads(island, 2)
            line = root.lines["global"]
            wait_until(lambda: line.version == rounds, timeout=20)  # 2 islands x 3 rounds / K=2
            for lu, model in updates:
                lu.engine.wait_for_version(rounds - 1, timeout=10)
                assert lu.catch_up() == rounds
                for name, theta in line.theta.items():  # the root's own replica
                    assert lu.anchor[name].tobytes() == theta.tobytes(), name
                assert_model_holds(model, line.theta)
                stats = lu.engine.stats
                assert (stats["pushes_accepted"], stats["pushes_stale"]) == (rounds, 0)
                assert stats["versions_refused"] == 0
        finally:
            for engine in engines:
                engine.close(timeout=2)
            aggregator_loop.run(root.stop(), 10)
