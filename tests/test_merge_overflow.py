"""Large-but-finite updates whose float32 merge overflows: the root never publishes a
non-finite version; the updates are dropped deliberately, logged and counted, and the run
goes on (aggregator/merge.py, root.py, flush.py; the pool workers' sums too)."""

import logging

import numpy as np
import pytest
from aggtools import delta_bytes, hand_versions, make_federation, random_delta

from aggregator.merge import NonFiniteMergeError, PartialAggregate, accumulate, finalize
from aggregator.outer import NesterovSGD
from aggregator.root import RootModel
from aggregator.service import AggregatorService
from comms.codecs import get_codec
from comms.identity import Identity
from comms.transport import TransportClient

BIG = np.float32(3.0e38)  # finite; twice it is not


def big_delta(theta0):
    return {k: np.full(v.shape, BIG, np.float32) for k, v in theta0.items()}


def test_finalize_refuses_a_weighted_sum_that_overflowed():
    partial = PartialAggregate()
    x = {"w": np.full(4, BIG, np.float32), "b": np.ones(2, np.float32)}
    accumulate(partial, x, 1.0, update_id=("a", 1))
    accumulate(partial, x, 1.0, update_id=("b", 1))
    assert np.isinf(partial.weighted_sum["w"]).all()  # float32 accumulation overflowed
    with pytest.raises(
        NonFiniteMergeError,
        match=r"weighted mean of 2 update\(s\) is not finite in 1 tensor\(s\) \(w\)",
    ):
        finalize(partial)


def test_the_root_refuses_a_non_finite_step_before_any_state_moves():
    theta0 = {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}
    root = RootModel("m", theta0, NesterovSGD(), get_codec("none"), Identity.generate())
    partial = PartialAggregate()
    for who in "ab":
        accumulate(partial, {"w": np.full(4, BIG, np.float32), "b": np.ones(2, np.float32)},
                   1.0, update_id=(who, 1))  # fmt: skip
    with pytest.raises(NonFiniteMergeError):
        root.step(partial)
    assert root.version == 0 and not root.outer.momentum
    assert all(np.array_equal(root.theta[k], theta0[k]) for k in theta0)


@pytest.mark.parametrize("engine", ["inline", "pool"])
async def test_an_overflowing_merge_is_dropped_with_a_reason_and_the_run_goes_on(
    tmp_path, caplog, engine
):
    caplog.set_level(logging.INFO)
    fed = make_federation(tmp_path, 2, aggregators=("root",))
    merge = {"engine": engine, "max_workers": 1} if engine == "pool" else {}
    cfg = fed.config("root", "root", buffer_k=2, clip="off", **merge)
    root = AggregatorService(cfg)
    await root.start()
    A, B = fed.islands
    d = [random_delta(fed.theta0, i) for i in range(2)]
    try:
        async with TransportClient(root.address, retries=0) as c:
            for ident in (A, B):  # each finite and admitted; their sum is not
                ack = await c.push(delta_bytes(ident, big_delta(fed.theta0), 1))
                assert ack["status"] == "accepted"
            line = root.lines["global"]
            assert line.version == 0 and line.buffered == 0 and line.dropped == 2
            assert all(np.array_equal(line.theta[k], fed.theta0[k]) for k in fed.theta0)
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and "dropped 2 acknowledged update(s)" in errors[0]
            assert "not finite" in errors[0]
            text = root.metrics.exposition().decode()
            assert (
                'archipelago_updates_dropped_total{model_id="global",reason="nonfinite_merge"} 2.0'
                in text
            )
            assert root.status()["models"]["global"]["dropped"] == 2
            for ident, delta in zip((A, B), d, strict=True):  # the run goes on
                await c.push(delta_bytes(ident, delta, 2))
        assert line.version == 1
        want = hand_versions(fed.theta0, [[(d[0], 0), (d[1], 0)]])[-1]
        for k in want:
            np.testing.assert_allclose(line.theta[k], want[k], rtol=1e-5, atol=1e-6)
            assert np.isfinite(line.theta[k]).all()
        await root.stop()
        root = AggregatorService(cfg)  # the drop is marked: a restart does not replay it
        await root.start()
        assert root.lines["global"].version == 1 and root.lines["global"].buffered == 0
    finally:
        await root.stop()


async def test_a_leaf_drops_an_overflowing_partial_instead_of_sending_it(tmp_path, caplog):
    """The check runs before the flush intent: nothing non-finite goes up the tree (the parent
    would refuse it as non-finite and the intent would replay it at every restart)."""
    caplog.set_level(logging.INFO)
    fed = make_federation(tmp_path, 2, aggregators=("root", "leaf0"))
    root = AggregatorService(fed.config("root", "root", buffer_k=1))
    root_addr = await root.start()
    leaf_cfg = fed.config("leaf0", "leaf", parent=root_addr, buffer_k=2, clip="off")
    leaf = AggregatorService(leaf_cfg)
    await leaf.start()
    A, B = fed.islands
    d = [random_delta(fed.theta0, i) for i in range(2)]
    try:
        async with TransportClient(leaf.address, retries=0) as c:
            for ident in (A, B):
                await c.push(delta_bytes(ident, big_delta(fed.theta0), 1))
            line = leaf.lines["global"]
            assert line.dropped == 2 and line.buffered == 0 and line.partial_seq == 0
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and "the partial sum is not finite" in errors[0]
            for ident, delta in zip((A, B), d, strict=True):
                await c.push(delta_bytes(ident, delta, 2))
        await wait_for(lambda: root.lines["global"].version == 1 and line.wal.mark == 4)
        want = hand_versions(fed.theta0, [[(d[0], 0), (d[1], 0)]])[-1]
        for k in want:
            np.testing.assert_allclose(root.lines["global"].theta[k], want[k], rtol=1e-5, atol=1e-6)
        await leaf.stop()
        leaf = AggregatorService(leaf_cfg)  # the mark after the next partial covers them
        await leaf.start()
        assert leaf.lines["global"].buffered == 0
    finally:
        await leaf.stop()
        await root.stop()


async def wait_for(pred, timeout=20.0):
    import asyncio

    t0 = asyncio.get_running_loop().time()
    while not pred():
        if asyncio.get_running_loop().time() - t0 > timeout:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)
