"""The norm bound of island updates in a running AggregatorService on loopback: a 1e6x scaled
update is clipped (after warm-up, and in warm-up by the theta-relative bound), refused with
``clip_action = "reject"``, let through with ``clip = "off"``, and a restart with clipped
updates in the WAL re-merges the same theta bit for bit."""

import asyncio

import numpy as np
import pytest
from aggtools import delta_bytes, make_federation, random_delta

from aggregator.robust import update_norm
from aggregator.service import AggregatorService
from comms.errors import NormBoundError
from comms.transport import TransportClient

MIN_COUNT = 8  # the default clip_min_count
FACTOR = 2.0  # the default clip_factor
WARMUP = 0.5  # the default clip_warmup_ratio


def root_config(fed, name="root", **merge):
    """A root merging every update at once (K = 1) with plain SGD at lr 1 and exact versions,
    so each version moves theta by exactly minus the (clipped) update."""
    cfg = fed.config(name, "root", buffer_k=1, **merge)
    cfg.models[0].outer, cfg.models[0].outer_params = "sgd", {"lr": 1.0}
    return cfg


def honest(fed, i):
    return random_delta(fed.theta0, i, scale=0.01 * (1 + 0.1 * (i % 3)))


def attack(fed):
    return {k: np.float32(1e6) * v for k, v in random_delta(fed.theta0, 99).items()}


def step_norm(before, after):
    return update_norm({k: after[k].astype(np.float64) - before[k] for k in after})


def counter(root, metric, **labels):
    for m in metric.collect():
        for s in m.samples:
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def push_honest(client, fed, n, first_seq=1):
    """n honest updates from island 0 (sequences first_seq..); returns their norms."""
    norms = []
    for i in range(n):
        d = honest(fed, i)
        norms.append(update_norm(d))
        await client.push(delta_bytes(fed.islands[0], d, first_seq + i, base_version=i))
    return norms


@pytest.mark.parametrize("engine", ["inline", "pool"])
async def test_a_scaled_update_after_warm_up_is_clipped_to_the_bound(tmp_path, engine):
    fed = make_federation(tmp_path, 2, aggregators=("root",))
    pool = {"engine": "pool", "max_workers": 1} if engine == "pool" else {}
    root = AggregatorService(root_config(fed, **pool))
    await root.start()
    line = root.lines["global"]
    try:
        async with TransportClient(root.address) as c:
            norms = await push_honest(c, fed, MIN_COUNT)
            assert line.clipped == 0 and not line.norm_bound.warming_up
            bound = FACTOR * float(np.median(norms))
            before = {k: v.copy() for k, v in line.theta.items()}
            evil = attack(fed)
            ack = await c.push(delta_bytes(fed.islands[1], evil, 1, base_version=MIN_COUNT))
            assert ack["status"] == "accepted" and ack["weight"] == "1"
        assert line.version == MIN_COUNT + 1
        # theta moved by exactly the update scaled to the bound (SGD, lr 1, K = 1)
        assert step_norm(before, line.theta) == pytest.approx(bound, rel=1e-5)
        scale = np.float32(bound / update_norm(evil))
        for k in evil:
            want = before[k] - np.multiply(evil[k], scale, dtype=np.float32)
            np.testing.assert_allclose(line.theta[k], want, rtol=1e-6, atol=1e-6)
        # the clipped norm, not the raw one, entered the window
        assert line.norm_bound.state()[-1] == pytest.approx(bound)
        assert line.norm_bound.bound() == pytest.approx(FACTOR * float(np.median([*norms, bound])))
        assert counter(root, root.metrics.clipped, model_id="global", reason="norm_bound") == 1
        status = root.status()["models"]["global"]["clip"]
        assert status["mode"] == "adaptive" and status["clipped"] == 1 and status["window"] == 9
        assert b'archipelago_updates_clipped_total{model_id="global",reason="norm_bound"} 1.0' in (
            root.metrics.exposition()
        )
    finally:
        await root.stop()


async def test_in_warm_up_the_bound_is_relative_to_theta(tmp_path):
    fed = make_federation(tmp_path, 2, aggregators=("root",))
    root = AggregatorService(root_config(fed))
    await root.start()
    line = root.lines["global"]
    try:
        theta0_norm = update_norm(fed.theta0)
        async with TransportClient(root.address) as c:
            await c.push(delta_bytes(fed.islands[0], attack(fed), 1, base_version=0))
            assert step_norm(fed.theta0, line.theta) == pytest.approx(WARMUP * theta0_norm, 1e-5)
            assert line.norm_bound.state() == [pytest.approx(WARMUP * theta0_norm)]
            # the next bound is relative to the new theta (still in warm-up)
            theta1 = {k: v.copy() for k, v in line.theta.items()}
            await c.push(delta_bytes(fed.islands[1], attack(fed), 1, base_version=1))
            want = WARMUP * update_norm(theta1)
            assert step_norm(theta1, line.theta) == pytest.approx(want, rel=1e-5)
        assert counter(root, root.metrics.clipped, model_id="global", reason="warmup") == 2
    finally:
        await root.stop()


async def test_reject_action_refuses_with_a_typed_error_and_keeps_serving(tmp_path):
    fed = make_federation(tmp_path, 2, aggregators=("root",))
    root = AggregatorService(root_config(fed, clip_action="reject"))
    await root.start()
    line = root.lines["global"]
    try:
        async with TransportClient(root.address) as c:
            await push_honest(c, fed, MIN_COUNT)
            with pytest.raises(NormBoundError, match="above this aggregator's bound") as e:
                await c.push(delta_bytes(fed.islands[1], attack(fed), 1, base_version=MIN_COUNT))
            assert e.value.reason == "norm_bound"
            assert line.version == MIN_COUNT and len(line.norm_bound) == MIN_COUNT
            ack = await c.push(delta_bytes(fed.islands[1], honest(fed, 0), 2, MIN_COUNT))
            assert ack["status"] == "accepted"
        assert counter(root, root.metrics.rejected, reason="norm_bound") == 1
        assert root.status()["models"]["global"]["clip"]["rejected"] == 1
    finally:
        await root.stop()


async def test_clip_off_lets_a_scaled_update_through(tmp_path, caplog):
    fed = make_federation(tmp_path, 2, aggregators=("root",))
    with caplog.at_level("WARNING", logger="aggregator.service"):
        root = AggregatorService(root_config(fed, clip="off"))
    assert 'merge.clip = "off"' in caplog.text
    await root.start()
    line = root.lines["global"]
    try:
        async with TransportClient(root.address) as c:
            await push_honest(c, fed, MIN_COUNT)
            before = {k: v.copy() for k, v in line.theta.items()}
            evil = attack(fed)
            await c.push(delta_bytes(fed.islands[1], evil, 1, base_version=MIN_COUNT))
        assert step_norm(before, line.theta) == pytest.approx(update_norm(evil), rel=1e-5)
        assert line.norm_bound is None and line.clipped == 0
    finally:
        await root.stop()


async def test_a_leaf_clips_island_updates_and_its_parent_takes_the_partial(tmp_path):
    fed = make_federation(tmp_path, 2, aggregators=("root", "leaf0"))
    root = AggregatorService(root_config(fed))
    root_addr = await root.start()
    leaf = AggregatorService(fed.config("leaf0", "leaf", parent=root_addr, buffer_k=1))
    await leaf.start()
    try:
        async with TransportClient(leaf.address) as c:
            await c.push(delta_bytes(fed.islands[0], attack(fed), 1, base_version=0))
        await asyncio.wait_for(_until(lambda: root.lines["global"].version == 1), 20)
        want = WARMUP * update_norm(fed.theta0)  # the leaf's replica of theta_0
        assert step_norm(fed.theta0, root.lines["global"].theta) == pytest.approx(want, 1e-5)
        assert leaf.lines["global"].clipped == 1 and root.lines["global"].clipped == 0
        assert len(root.lines["global"].norm_bound) == 0  # partials are not bounded again
    finally:
        await leaf.stop()
        await root.stop()


async def _until(pred):
    while not pred():
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("engine", ["inline", "pool"])
async def test_a_restart_re_merges_clipped_updates_from_the_wal_bit_for_bit(tmp_path, engine):
    """Eight honest updates make versions 1 and 2 (K = 4); two scaled ones (clipped) and an
    honest one are logged above the WAL's mark when the root stops. It restarts with another
    clip factor: the replay must use the scales logged at admission, theta must equal, bit for
    bit, a root that never stopped, and the norm window must come back as it was."""
    fed = make_federation(tmp_path, 3, aggregators=("root", "twin"))
    pool = {"engine": "pool", "max_workers": 1} if engine == "pool" else {}
    pushes = [(0, honest(fed, i), i + 1) for i in range(MIN_COUNT)]
    pushes += [(1, attack(fed), 1), (2, honest(fed, 9), 1), (1, attack(fed), 2)]
    thetas, windows = {}, {}
    for name, restart in (("twin", False), ("root", True)):
        cfg = root_config(fed, name=name, **pool)
        cfg.merge.buffer_k = 4
        root = AggregatorService(cfg)
        await root.start()
        async with TransportClient(root.address) as c:
            for island, d, seq in pushes:
                await c.push(delta_bytes(fed.islands[island], d, seq, base_version=0))
        line = root.lines["global"]
        assert line.version == 2 and line.buffered == 3 and line.clipped == 2
        windows[name] = line.norm_bound.state()
        if restart:
            await root.stop()
            cfg.merge.clip_factor = 1.5  # would clip other updates, and by other scales
            root = AggregatorService(cfg)
            await root.start()
            line = root.lines["global"]
            assert line.buffered == 3 and line.norm_bound.state() == windows[name]
        async with TransportClient(root.address) as c:  # the K-th update: the flush
            await c.push(delta_bytes(fed.islands[2], honest(fed, 10), 2, base_version=2))
        assert line.version == 3
        assert line.clipped == (0 if restart else 2)  # the last one is clipped by neither
        thetas[name] = {n: v.copy() for n, v in line.theta.items()}
        await root.stop()
    assert len(windows["root"]) == MIN_COUNT + 3 and windows["root"] == windows["twin"]
    for n in fed.theta0:
        assert thetas["root"][n].tobytes() == thetas["twin"][n].tobytes(), n


async def test_a_restarted_leaf_rebuilds_its_window_from_its_mark_and_the_wal(tmp_path):
    fed = make_federation(tmp_path, 1, aggregators=("root", "leaf0"))
    root = AggregatorService(root_config(fed))
    root_addr = await root.start()
    cfg = fed.config("leaf0", "leaf", parent=root_addr, buffer_k=2)
    leaf = AggregatorService(cfg)
    await leaf.start()
    try:
        async with TransportClient(leaf.address) as c:
            for i in range(3):  # two go up as one partial (intent, then mark); one stays logged
                await c.push(delta_bytes(fed.islands[0], honest(fed, i), i + 1, base_version=0))
        await asyncio.wait_for(_until(lambda: leaf.lines["global"].wal.mark > 0), 20)
        window = leaf.lines["global"].norm_bound.state()
        assert len(window) == 3
        await leaf.stop()
        leaf = AggregatorService(cfg)
        await leaf.start()
        assert leaf.lines["global"].buffered == 1
        assert leaf.lines["global"].norm_bound.state() == window
    finally:
        await leaf.stop()
        await root.stop()
