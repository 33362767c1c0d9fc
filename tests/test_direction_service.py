"""The direction check in running AggregatorServices on loopback: a sign-flipped delta is
refused with a typed error at a root (inline and pool merge) and at a leaf, counted in metrics
and /status; past the version's cap one is admitted and counted; a restart keeps the reference
(from the root's store, from a leaf's parent) and re-merges what the WAL holds bit for bit."""

import asyncio

import numpy as np
import pytest
from aggtools import delta_bytes, make_federation

from aggregator.service import AggregatorService
from comms.errors import DirectionError
from comms.transport import TransportClient


def root_config(fed, name="root", **merge):
    """A root with the direction check on, plain SGD at lr 1 and exact versions: version 1
    from one delta d is u_1 = -d."""
    cfg = fed.config(name, "root", **{"buffer_k": 1, "direction": "reject", **merge})
    cfg.models[0].outer, cfg.models[0].outer_params = "sgd", {"lr": 1.0}
    return cfg


def along(fed, seed, sign=1.0):
    """A delta along one fixed direction plus noise: honest ones agree with each other (and
    with u_v = -their mean), ``sign=-1`` is a sign-flipped one."""
    base = np.random.default_rng(7)
    rng = np.random.default_rng(100 + seed)
    return {k: np.float32(sign) * (0.01 * base.standard_normal(v.shape)
                                   + 0.005 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in fed.theta0.items()}  # fmt: skip


def counter(metric, **labels):
    for m in metric.collect():
        for s in m.samples:
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def _until(pred):
    while not pred():
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("engine", ["inline", "pool"])
async def test_a_sign_flipped_delta_is_refused_and_counted(tmp_path, engine):
    fed = make_federation(tmp_path, 3, aggregators=("root",))
    pool = {"engine": "pool", "max_workers": 1} if engine == "pool" else {}
    root = AggregatorService(root_config(fed, **pool))
    await root.start()
    line = root.lines["global"]
    try:
        async with TransportClient(root.address) as c:
            # version 0 has no reference: even a flipped delta is admitted
            await c.push(delta_bytes(fed.islands[0], along(fed, 0), 1, base_version=0))
            assert line.version == 1 and line.reference.version == 1
            before = {k: v.copy() for k, v in line.theta.items()}
            with pytest.raises(DirectionError, match="against the model's last merged") as e:
                await c.push(delta_bytes(fed.islands[1], along(fed, 1, -1.0), 1, base_version=1))
            assert e.value.reason == "direction"
            assert line.version == 1 and line.wal.last_index == 1  # never logged
            for k in before:
                assert line.theta[k].tobytes() == before[k].tobytes()
            ack = await c.push(delta_bytes(fed.islands[2], along(fed, 2), 1, base_version=1))
            assert ack["status"] == "accepted" and line.version == 2
        assert counter(root.metrics.opposed, model_id="global", decision="refused") == 1
        assert counter(root.metrics.rejected, reason="direction") == 1
        status = root.status()["models"]["global"]["direction"]
        assert status["mode"] == "reject" and status["refused"] == 1
        assert status["reference_version"] == 2 and status["agreement"]["min"] < 0
        assert status["agreement"]["count"] == 2  # the two scored: refused and accepted
    finally:
        await root.stop()


async def test_past_the_versions_cap_an_opposed_delta_is_admitted_and_counted(tmp_path):
    fed = make_federation(tmp_path, 4, aggregators=("root",))
    root = AggregatorService(root_config(fed, buffer_k=4))  # a cap of 1 refusal per version
    await root.start()
    line = root.lines["global"]
    try:
        async with TransportClient(root.address) as c:
            for i in range(4):
                await c.push(delta_bytes(fed.islands[i], along(fed, i), 1, base_version=0))
            assert line.version == 1
            with pytest.raises(DirectionError):
                await c.push(delta_bytes(fed.islands[0], along(fed, 5, -1.0), 2, base_version=1))
            ack = await c.push(delta_bytes(fed.islands[1], along(fed, 6, -1.0), 2, base_version=1))
            assert ack["status"] == "accepted" and line.buffered == 1
        assert counter(root.metrics.opposed, model_id="global", decision="over_cap") == 1
        assert root.status()["models"]["global"]["direction"]["over_cap"] == 1
    finally:
        await root.stop()


async def test_direction_off_merges_a_flipped_delta(tmp_path, caplog):
    fed = make_federation(tmp_path, 2, aggregators=("root",))
    with caplog.at_level("WARNING", logger="aggregator.service"):
        root = AggregatorService(root_config(fed, direction="off"))
    assert 'merge.direction = "off"' in caplog.text
    await root.start()
    try:
        async with TransportClient(root.address) as c:
            await c.push(delta_bytes(fed.islands[0], along(fed, 0), 1, base_version=0))
            ack = await c.push(delta_bytes(fed.islands[1], along(fed, 1, -1.0), 1, 1))
        assert ack["status"] == "accepted" and root.lines["global"].reference is None
    finally:
        await root.stop()


async def test_a_restart_keeps_the_reference_and_re_merges_the_wal_bit_for_bit(tmp_path):
    """Version 1 from four honest deltas (K = 4); then two honest ones are logged and a
    flipped one refused before the root stops. It restarts with the check off (a config that
    would have admitted the flipped one): the replay re-merges exactly what was logged, and
    theta after the next flush equals, bit for bit, a root that never stopped. Restarted with
    the check on, its reference is u_1 again, from its store."""
    fed = make_federation(tmp_path, 4, aggregators=("root", "twin"))
    thetas = {}
    for name, restart in (("twin", None), ("root", "off"), ("root2", "reject")):
        fed.aggregators.setdefault(name, fed.aggregators["root"])
        cfg = root_config(fed, name=name, buffer_k=4)
        cfg.models[0].outer, cfg.models[0].outer_params = "nesterov", {"lr": 0.7, "momentum": 0.9}
        root = AggregatorService(cfg)
        await root.start()
        async with TransportClient(root.address) as c:
            for i in range(4):
                await c.push(delta_bytes(fed.islands[i], along(fed, i), 1, base_version=0))
            for i in range(2):
                await c.push(delta_bytes(fed.islands[i], along(fed, 10 + i), 2, base_version=1))
            with pytest.raises(DirectionError):
                await c.push(delta_bytes(fed.islands[2], along(fed, 12, -1.0), 2, 1))
        line = root.lines["global"]
        reference = {k: v.copy() for k, v in line.reference.update.items()}
        if restart:
            await root.stop()
            cfg.merge.direction = restart
            root = AggregatorService(cfg)
            await root.start()
            line = root.lines["global"]
            assert line.buffered == 2 and line.version == 1
            if restart == "reject":  # the reference comes back from the store, bit for bit
                assert line.reference.version == 1
                for k in reference:
                    assert line.reference.update[k].tobytes() == reference[k].tobytes()
            else:
                assert line.reference is None
        async with TransportClient(root.address) as c:
            for i in (2, 3):
                await c.push(delta_bytes(fed.islands[i], along(fed, 20 + i), 3, base_version=1))
        assert line.version == 2
        thetas[name] = {n: v.copy() for n, v in line.theta.items()}
        await root.stop()
    for name in ("root", "root2"):
        for n in fed.theta0:
            assert thetas[name][n].tobytes() == thetas["twin"][n].tobytes(), (name, n)


async def test_a_leaf_refuses_a_flipped_delta_and_gets_its_reference_back_after_a_restart(
    tmp_path,
):
    fed = make_federation(tmp_path, 2, aggregators=("root", "leaf0"))
    root = AggregatorService(root_config(fed))
    root_addr = await root.start()
    cfg = fed.config("leaf0", "leaf", parent=root_addr, buffer_k=1, direction="reject")
    leaf = AggregatorService(cfg)
    await leaf.start()
    try:
        async with TransportClient(leaf.address) as c:
            await c.push(delta_bytes(fed.islands[0], along(fed, 0), 1, base_version=0))
            await asyncio.wait_for(_until(lambda: leaf.lines["global"].version == 1), 20)
            await asyncio.wait_for(_until(lambda: leaf.lines["global"].reference), 20)
            with pytest.raises(DirectionError):
                await c.push(delta_bytes(fed.islands[1], along(fed, 1, -1.0), 1, base_version=1))
        assert leaf.lines["global"].direction_refused == 1
        assert root.lines["global"].direction_refused == 0  # partials are not scored
        reference = leaf.lines["global"].reference.update
        await leaf.stop()
        leaf = AggregatorService(cfg)
        await leaf.start()
        line = leaf.lines["global"]
        await asyncio.wait_for(_until(lambda: line.reference is not None), 20)
        assert line.reference.version == line.version == 1
        for k in reference:
            assert line.reference.update[k].tobytes() == reference[k].tobytes()
        async with TransportClient(leaf.address) as c:
            with pytest.raises(DirectionError):
                await c.push(delta_bytes(fed.islands[1], along(fed, 2, -1.0), 2, base_version=1))
    finally:
        await leaf.stop()
        await root.stop()
