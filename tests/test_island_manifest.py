"""An island refuses versions and snapshots that are not its own model, and keeps training.

``LocalUpdate`` around a small torch model, against a real gRPC transport server on loopback
(test_sync's ``RecordingHandler``) that serves signed, well-formed envelopes of another model:
other tensor names, shapes or dtypes. The island's parameters and anchor stay as they were,
it goes on training and pushing, and adopts the next version that fits.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_local_update import assert_model_holds, inner_step, random_params, tiny_model
from test_sync import wait_until

from aggregator.outer import apply_update
from island.local_update import LocalUpdate, model_manifest
from island.pseudo import copy_arrays, params_to_numpy
from island.sync import SnapshotRefusedError


def foreign(rng, what: str) -> dict[str, np.ndarray]:
    """An update of another model than ``tiny_model``'s Linear(8, 4)."""
    good = random_params(rng, scale=1e-3)
    if what == "shape":
        return {"weight": np.zeros((4, 9), np.float32), "bias": good["bias"]}
    if what == "names":
        return {"weight": good["weight"], "bias": good["bias"], "head.weight": good["bias"]}
    if what == "dtype":
        return {"weight": good["weight"].astype(np.float16), "bias": good["bias"]}
    raise ValueError(what)


def test_the_manifest_is_the_models_parameters_as_synced():
    model, _ = tiny_model()
    assert model_manifest(model).tensors == (
        ("weight", (4, 8), "float32"),
        ("bias", (4,), "float32"),
    )


def test_foreign_versions_are_refused_and_the_island_trains_on_and_adopts_the_next_that_fits(
    harness, caplog
):
    caplog.set_level(logging.INFO)
    rng = np.random.default_rng(30)
    theta0 = random_params(rng)
    harness.set_snapshot(0, theta0)
    engine = harness.engine(codec="none", adopt="arrival")
    model, optimizer = tiny_model(30)
    with LocalUpdate(model, optimizer, every=2, engine=engine, flush_on_exit=False) as lu:
        u1 = random_params(rng, scale=1e-3)
        harness.publish(1, u1)
        engine.wait_for_version(0, timeout=5)
        for i in range(2):
            inner_step(model, optimizer, i)
            lu.step()
        assert lu.version == 1
        anchor1 = apply_update(copy_arrays(theta0), u1)
        for refused, what in enumerate(("shape", "names", "dtype"), start=1):
            harness.publish(2, foreign(rng, what))
            wait_until(lambda n=refused: engine.stats["versions_refused"] >= n)
            for i in range(2):  # a whole round, mid-round adoption included: nothing moves
                inner_step(model, optimizer, 10 * refused + i)
                lu.step()
            assert lu.version == 1 and engine.newest_version() == 1
            for k in theta0:
                assert lu.anchor[k].tobytes() == anchor1[k].tobytes()
        assert lu.last_outcome(timeout=10).status == "accepted"
        assert lu.round == 4 and len(harness.handler.pushes) == 4  # it pushed every round
        assert all(p.header.base_version == 1 for p in harness.handler.pushes[1:])
        assert "'weight' has shape (4, 9), the model (4, 8)" in caplog.text
        assert "1 unexpected tensor(s) ['head.weight']" in caplog.text
        assert "'weight' has dtype float16, the model float32" in caplog.text

        u2 = random_params(rng, scale=1e-3)
        harness.publish(2, u2)  # one that fits: adopted at the next step
        engine.wait_for_version(1, timeout=5)
        inner_step(model, optimizer, 99)
        lu.step()
        assert lu.version == 2
        anchor2 = apply_update(copy_arrays(anchor1), u2)
        for k in theta0:
            assert lu.anchor[k].tobytes() == anchor2[k].tobytes()


def test_a_foreign_snapshot_after_lost_versions_leaves_the_model_and_training_goes_on(harness):
    """The versions are gone (evicted): the boundary fetches a snapshot, which is another
    model's: refused once per boundary, the anchor and the parameters are kept, training goes
    on; the next boundary after a snapshot that fits loads it."""
    rng = np.random.default_rng(31)
    theta0 = random_params(rng)
    harness.set_snapshot(0, theta0)
    engine = harness.engine(codec="none", max_buffered_versions=1, rebase="reset")
    model, optimizer = tiny_model(31)
    with LocalUpdate(model, optimizer, every=1, engine=engine, flush_on_exit=False) as lu:
        harness.set_snapshot(2, foreign(rng, "shape"))
        harness.publish(1, random_params(rng, scale=1e-3))
        harness.publish(2, random_params(rng, scale=1e-3))
        engine.wait_for_version(1, timeout=5)  # version 1 was evicted to hold version 2
        inner_step(model, optimizer, 0)
        before = params_to_numpy(model)
        lu.step()  # the boundary: a gap, then a refused snapshot
        assert lu.version == 0 and engine.stats["snapshots_refused"] == 1
        for k in theta0:
            assert lu.anchor[k].tobytes() == theta0[k].tobytes()
        assert_model_holds(model, theta0)  # reset: the round starts from the kept anchor
        assert any(before[k].tobytes() != theta0[k].tobytes() for k in theta0)  # it trained
        for i in range(2):
            wait_until(lambda: engine.newest_version() == 2)  # followed again from 0
            inner_step(model, optimizer, 1 + i)
            lu.step()  # each boundary tries once more; training goes on
        assert lu.round == 3 and engine.stats["snapshots_refused"] >= 2
        assert lu.version == 0
        theta2 = random_params(rng)
        harness.set_snapshot(2, theta2)
        wait_until(lambda: engine.newest_version() == 2)
        inner_step(model, optimizer, 9)
        lu.step()
        assert lu.version == 2
        assert_model_holds(model, theta2)


def test_a_joiner_waits_for_a_snapshot_that_fits_and_says_why_it_gave_up(harness):
    rng = np.random.default_rng(32)
    harness.set_snapshot(3, foreign(rng, "names"))
    engine = harness.engine(codec="none", snapshot_timeout_s=0.6)
    model, optimizer = tiny_model(32)
    before = params_to_numpy(model)
    lu = LocalUpdate(model, optimizer, every=1, engine=engine)
    with pytest.raises(SnapshotRefusedError, match=r"unexpected tensor\(s\) \['head.weight'\]"):
        lu.start()
    assert_model_holds(model, before)
    assert engine.stats["snapshots_refused"] >= 2  # it tried again before giving up
    theta3 = random_params(rng)
    harness.set_snapshot(3, theta3)
    lu.start()
    assert lu.version == 3
    assert_model_holds(model, theta3)
