"""Rounds sized to the island's link (``[sync] auto``): the plan by hand, and an island on a
shaped loopback link that compresses harder and syncs less often while a fast one does not."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from comms.errors import ConfigError
from comms.identity import Identity
from comms.shaper import TokenBucketShaper
from comms.transport import TransportClient
from comms.update import encode_update
from island.distributed import RankGroup, check_round_size
from island.local_update import LocalUpdate
from island.sync import SyncConfig, SyncEngine
from island.sync.auto import UplinkEstimate, plan_round, push_nbytes

SIZES = {"int8": 100_000, "int4": 50_000}  # bytes of one push under each codec of the ladder


def test_the_first_codec_that_keeps_up_with_the_round_is_chosen():
    # 1 Mbit/s: int8 takes 0.8 s, int4 0.4 s
    fits = plan_round(SIZES, 1e6, 0.01, every=100, every_s=None)  # a 1-s round
    assert (fits.codec, fits.every, fits.reason) == ("int8", 100, "fits")
    assert fits.push_s == pytest.approx(0.8) and fits.round_s == pytest.approx(1.0)
    squeezed = plan_round(SIZES, 1e6, 0.005, every=100, every_s=None)  # a 0.5-s round
    assert (squeezed.codec, squeezed.every, squeezed.reason) == ("int4", 100, "compressed")
    by_time = plan_round(SIZES, 1e6, 0.005, every=None, every_s=0.5)
    assert (by_time.codec, by_time.every_s, by_time.reason) == ("int4", 0.5, "compressed")


def test_a_link_too_thin_for_any_codec_lengthens_the_round_up_to_the_cap():
    # 0.1 Mbit/s: int4 takes 4 s; the round must compute that long
    longer = plan_round(SIZES, 1e5, 0.01, every=100, every_s=None)
    assert (longer.codec, longer.every, longer.reason) == ("int4", 400, "lengthened")
    by_time = plan_round(SIZES, 1e5, 0.01, every=None, every_s=1.0)
    assert (by_time.every_s, by_time.reason) == (pytest.approx(4.0), "lengthened")
    halved = plan_round(SIZES, 1e5, 0.01, every=100, every_s=None, target=0.5)
    assert halved.every == 800  # the push may take half the round
    capped = plan_round(SIZES, 1e4, 0.01, every=100, every_s=None)  # int4: 40 s
    assert (capped.every, capped.reason) == (800, "capped")  # 8 x every at most
    assert plan_round(SIZES, 1e4, 0.01, every=100, every_s=None, max_factor=2).every == 200


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 10, "every_s": 1.0}, "exactly one"),
        ({"every": None, "every_s": None}, "exactly one"),
        ({"every": 10, "every_s": None, "target": 0}, "target"),
        ({"every": 10, "every_s": None, "max_factor": 0.5}, "max_factor"),
    ],
)
def test_plan_round_refuses_what_has_no_plan(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_round(SIZES, 1e6, 0.01, **kwargs)
    with pytest.raises(ValueError, match="rate_bps"):
        plan_round(SIZES, float("nan"), 0.01, every=10, every_s=None)


def test_uplink_estimate_is_bits_over_seconds_of_the_last_pushes():
    est = UplinkEstimate(window=2)
    assert est.rate_bps is None
    est.observe(1000, 1.0)
    est.observe(3000, 1.0)
    assert est.rate_bps == pytest.approx(16_000)
    est.observe(1000, 3.0)  # the first falls out of the window
    assert est.rate_bps == pytest.approx(8 * 4000 / 4.0)
    est.observe(0, 1.0)  # nothing measured
    est.observe(10, float("inf"))
    assert est.rate_bps == pytest.approx(8000)


def test_push_nbytes_covers_a_real_envelope():
    arrays = {"w": np.ones((64, 300), np.float32), "b": np.ones(300, np.float32)}
    for codec in ("int8", "int4", "sparse2"):
        ident = Identity.generate()
        env = encode_update(arrays, codec=codec, model_id="m", kind="delta", sender=ident.peer_id,
                            sequence=1, meta={"steps": 100, "every": 100, "round": 7},
                            identity=ident)  # fmt: skip
        real = len(env.to_bytes())
        predicted = push_nbytes(codec, [a.size for a in arrays.values()])
        assert real <= predicted <= real + 1024, codec


@pytest.mark.parametrize(
    ("auto", "message"),
    [
        ({"auto_codecs": []}, "auto_codecs"),
        ({"auto_codecs": ["int8", "int8"]}, "named twice"),
        ({"auto_codecs": ["int8", "int3"]}, "int3"),
        ({"auto_target": 0}, "auto_target"),
        ({"auto_max_factor": 0.5}, "auto_max_factor"),
    ],
)
def test_auto_config_errors_name_the_key(auto, message):
    with pytest.raises(ConfigError, match=message):
        SyncConfig(model_id="m", auto=True, **auto).validate()


def run_island(harness, shaper, rounds: int) -> tuple[SyncEngine, LocalUpdate]:
    """An island of a 65,792-parameter model, 5 inner steps of 10 ms per round, with auto on,
    its pushes through ``shaper`` (None: plain loopback); at least ``rounds`` rounds, and two
    pushed under a plan."""

    def client():
        return TransportClient(f"127.0.0.1:{harness.port}", deadline_s=30, retries=1,
                               backoff_s=0.01, identity=harness.island, shaper=shaper)  # fmt: skip

    engine = SyncEngine(
        SyncConfig(model_id="lm", every=5, codec="int8", auto=True, retry_interval_s=0.05),
        harness.island, client, roster=harness.roster,
    )  # fmt: skip
    harness.engines.append(engine)
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    theta = {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
    harness.set_snapshot(0, theta)
    lu = LocalUpdate(model, torch.optim.SGD(model.parameters(), lr=0.01), engine=engine)
    planned_at = None  # the round at whose end the first plan was made
    with lu:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if planned_at is None and engine.stats["round_plan"] is not None:
                planned_at = lu.round
            if lu.round >= rounds and planned_at is not None and lu.round >= planned_at + 2:
                break  # two rounds pushed under a plan
            time.sleep(0.01)
            with torch.no_grad():
                model.weight.add_(1e-3)
            lu.step(seconds=0.01)  # an inner step computes 10 ms, however loaded the machine
            if lu.round >= 2:  # plans need a delivered push: let one through
                lu.last_outcome(timeout=30)
        assert lu.last_outcome(timeout=30).status == "accepted"
    return engine, lu


def test_an_island_on_a_thin_link_compresses_harder_and_syncs_less_often(harness):
    """1 Mbit/s: an int8 push (about 67 kB) takes about 0.55 s against 50 ms of compute per
    5-step round, int4 about 0.28 s: the island moves to int4 and to rounds long enough to
    cover that (about 30 steps of 10 ms; 40 at most), and says so in its stats; the pushes carry the codec and the new every."""
    shaper = TokenBucketShaper(1e6, burst_bytes=4096)
    engine, lu = run_island(harness, shaper, rounds=5)
    plan = engine.stats["round_plan"]
    assert plan is not None and plan["codec"] == "int4", plan
    assert plan["reason"] in ("lengthened", "capped") and 5 < lu.every <= 40, plan
    if plan["reason"] == "lengthened":  # the longer round's compute covers its push
        assert plan["round_s"] >= plan["push_s"] > 0.1
    assert 0.3e6 < engine.stats["uplink_bps"] < 1.1e6
    last = harness.handler.pushes[-1]
    assert {t.codec["name"] for t in last.header.tensors} == {"int4"}
    assert last.header.meta["every"] == last.header.meta["steps"] > 5  # a lengthened round


def test_an_island_on_a_fast_link_keeps_its_codec_and_round(harness):
    engine, lu = run_island(harness, None, rounds=4)
    plan = engine.stats["round_plan"]
    assert plan is not None and (plan["codec"], plan["reason"]) == ("int8", "fits"), plan
    assert lu.every == 5
    assert {t.codec["name"] for t in harness.handler.pushes[-1].header.tensors} == {"int8"}


def test_a_multi_rank_island_refuses_auto():
    class TwoRanks(RankGroup):  # only the size is read; no collective runs
        world_size = 2

    check_round_size(RankGroup(), None, auto=True)
    check_round_size(TwoRanks(), None, auto=False)
    with pytest.raises(ConfigError, match=r"sync\.auto: .* not supported on a multi-rank"):
        check_round_size(TwoRanks(), None, auto=True)
