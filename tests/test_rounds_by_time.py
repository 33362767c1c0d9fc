"""Rounds sized by time (``sync.every_s``): the config's bad inputs, the round boundary of
``LocalUpdate`` in both modes, islands of different speeds against the real root, and the
``island run`` daemon with ``slowdown``.

Inner steps here sleep a known time (a stand-in for compute whose duration the test sets).
A loaded machine stretches every sleep by an amount no test can predict, so where the wall
clock sizes a round the test measures each step itself and checks the round against those
measurements; where it only needs steps of a known length, the steps say their seconds.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from aggtools import make_federation
from test_island_daemon import _federation
from test_local_update import inner_step, random_params, tiny_model
from test_sync import run_in_threads, wait_until

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from comms.aio import LoopThread
from comms.config import config_from_dict, config_to_dict, load_config
from comms.envelope import Envelope
from comms.errors import ConfigError
from island.config import IslandConfig
from island.daemon import Island
from island.distributed import RankGroup, check_round_size
from island.local_update import LocalUpdate
from island.sync import SyncConfig, SyncEngine

pytestmark = pytest.mark.timeout(120)


def _island_doc(**sync) -> dict:
    return {"name": "i", "aggregator": "127.0.0.1:1", "sync": {"model_id": "m", **sync}}


# ------------------------------------------------------------------ config


def test_every_stays_the_default_and_every_s_replaces_it():
    default = config_from_dict(SyncConfig, {"model_id": "m"})
    assert (default.every, default.every_s, default.by_time) == (100, None, False)
    timed = config_from_dict(SyncConfig, {"model_id": "m", "every_s": 30})
    assert (timed.every, timed.every_s, timed.by_time) == (None, 30.0, True)
    for cfg in (default, timed):  # a written config reads back the same
        assert config_from_dict(SyncConfig, config_to_dict(cfg)) == cfg
    assert config_from_dict(SyncConfig, {"model_id": "m", "every": 7}).every == 7


@pytest.mark.parametrize(
    "sync, match",
    [
        ({"every": 50, "every_s": 10.0}, "sync: every_s: set either every"),
        ({"every": 100, "every_s": 10.0}, "sync: every_s: set either every"),  # H's default
        ({"every_s": 0.0}, "sync: every_s: must be a positive"),
        ({"every_s": -5}, "sync: every_s: must be a positive"),
        ({"every": 0}, "sync: every: must be positive"),
    ],
)
def test_a_bad_round_size_is_a_config_error_naming_the_key(sync, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(IslandConfig, _island_doc(**sync))


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_non_finite_every_s_or_slowdown_is_refused(tmp_path, value):
    path = tmp_path / "island.toml"
    path.write_text(f'name = "i"\naggregator = "h:1"\n[sync]\nmodel_id = "m"\nevery_s = {value}\n')
    with pytest.raises(ConfigError, match=r"sync\.every_s: expected a finite number"):
        load_config(IslandConfig, path)
    with pytest.raises(ConfigError, match="every_s: must be a positive"):
        SyncConfig(model_id="m", every_s=float(value)).validate()  # built in Python
    with pytest.raises(ConfigError, match="slowdown: must be a finite number >= 1"):
        IslandConfig(name="i", aggregator="h:1", slowdown=float(value)).validate()


@pytest.mark.parametrize("slowdown", [0.5, 0.0, -2.0])
def test_a_slowdown_below_one_is_a_config_error(slowdown):
    with pytest.raises(ConfigError, match="slowdown: must be a finite number >= 1"):
        config_from_dict(IslandConfig, {**_island_doc(every_s=1.0), "slowdown": slowdown})


def test_a_multi_rank_island_refuses_every_s():
    class TwoRanks(RankGroup):  # only the size is read; no collective runs
        world_size = 2

    check_round_size(TwoRanks(), None)
    check_round_size(RankGroup(), 5.0)
    with pytest.raises(ConfigError, match=r"sync\.every_s: .* not supported on a multi-rank"):
        check_round_size(TwoRanks(), 5.0)


# ------------------------------------------------------------------ LocalUpdate


def _timed_steps(lu, model, optimizer, step_s: float, rounds: int) -> list[list[float]]:
    """Inner steps that take ``step_s`` each (a sleep) until ``rounds`` rounds have ended.
    Returns each round's steps as the test timed them: from the return of one ``lu.step()``
    to the call of the next, a little less than what ``LocalUpdate`` counts for the step."""
    timed: list[list[float]] = [[]]
    returned = time.perf_counter()
    while lu.round < rounds:
        inner_step(model, optimizer, len(timed) * 1000 + len(timed[-1]))
        time.sleep(step_s)
        called = time.perf_counter()
        timed[-1].append(called - returned)
        if lu.step(tokens=16):
            timed.append([])
        returned = time.perf_counter()
        assert sum(map(len, timed)) < 1000, "rounds never ended"
    return timed[:-1]


@pytest.mark.parametrize("mode", ["overlapped", "sync"])
def test_a_round_ends_after_every_s_seconds_of_compute_not_of_waiting(harness, mode):
    """T = 0.2 s of 20 ms steps: about 10 steps a round. In sync mode every boundary waits
    0.3 s for its version; that wait is not compute, so it does not shorten the next round.
    Each round is checked against the steps as the test timed them (a loaded machine makes
    them longer and the rounds shorter, which is right): its compute is their sum, not the
    0.3 s wait, and it ended at the first step that took it to T."""
    rng = np.random.default_rng(0)
    harness.set_snapshot(0, random_params(rng))
    engine = harness.engine(codec="none", every_s=0.2, mode=mode, sync_timeout_s=5.0)
    model, optimizer = tiny_model()
    done = threading.Event()

    def publish_after_each_push() -> None:  # a version 0.3 s after each push (sync mode)
        seen = 0
        while not done.is_set():
            if len(harness.handler.pushes) > seen:
                seen += 1
                time.sleep(0.3)
                harness.publish(seen, random_params(rng, scale=0.0))
            time.sleep(0.01)

    publisher = threading.Thread(target=publish_after_each_push, daemon=True)
    if mode == "sync":
        publisher.start()
    try:
        with LocalUpdate(model, optimizer, engine=engine, flush_on_exit=False) as lu:
            assert (lu.every, lu.every_s) == (None, 0.2)
            timed = _timed_steps(lu, model, optimizer, step_s=0.02, rounds=3)
            if mode == "sync":
                assert lu.stats["blocked_s"] >= 3 * 0.25  # it did wait at each boundary
        wait_until(lambda: len(harness.handler.pushes) == 3)
    finally:
        done.set()
    metas = [env.header.meta for env in harness.handler.pushes]
    steps = [m["steps"] for m in metas]
    assert steps == [len(t) for t in timed], (metas, timed)
    assert all("every" not in m for m in metas), metas  # the root counts each as one round
    assert [m["tokens"] for m in metas] == [16 * s for s in steps]
    for m, t in zip(metas, timed, strict=True):
        # LocalUpdate's clock runs from inside one step() to inside the next: the test's
        # timing plus a few lines of code per step, far less than the 0.3 s wait
        assert sum(t) - 1e-6 <= m["compute_s"] < sum(t) + 0.1, (m, t)  # meta: 6 decimals
        assert m["compute_s"] >= 0.2 and sum(t[:-1]) < 0.2, (m, t)  # ended on reaching T


def test_without_tokens_the_meta_counts_steps_and_a_step_may_say_its_seconds(harness):
    harness.set_snapshot(0, random_params(np.random.default_rng(1)))
    engine = harness.engine(codec="none", every_s=1.0)
    model, optimizer = tiny_model()
    with LocalUpdate(model, optimizer, engine=engine, flush_on_exit=False) as lu:
        ended = [lu.step(seconds=0.3) for _ in range(4)]  # 1.2 s of compute by its own count
    assert ended == [False, False, False, True]  # the 4th step reaches T = 1 s, instantly
    wait_until(lambda: len(harness.handler.pushes) == 1)
    meta = harness.handler.pushes[0].header.meta
    assert (meta["steps"], meta["tokens"]) == (4, 4) and "every" not in meta
    assert meta["compute_s"] == pytest.approx(1.2)


def test_islands_of_different_speeds_push_equally_often_weighted_by_their_steps(tmp_path):
    """Two islands, 20 ms and 40 ms steps, T = 0.25 s, for the same 1.3 s of compute,
    against the real root (buffer_k 2, weight_by_samples, no staleness discount): both push
    about as often; the slow one's deltas hold about half the steps and weigh that much less;
    every version counts its two updates as two whole rounds of work (a full outer step).
    Each step sleeps its time and says so (``step(seconds=...)``): a loaded machine, which
    stretches sleeps, then changes no round, and a round ends at the first step reaching T:
    13 steps of 20 ms, 7 of 40 ms. The wall clock's own part is the test above."""
    fed = make_federation(
        tmp_path, 2, aggregators=("root",), shapes={"weight": (4, 8), "bias": (4,)}
    )
    config = fed.config("root", "root", buffer_k=2, deadline_s=30.0, weight_by_samples=True,
                        staleness="constant", clip="off")  # fmt: skip
    step_s, period_s = (0.02, 0.04), 0.25
    rounds: dict[int, list] = {0: [], 1: []}  # (steps, push future) per round
    with LoopThread("aggregator") as aggregator_loop:
        root = AggregatorService(config)
        address = aggregator_loop.run(root.start(), 30)
        engines = []

        def island(i: int) -> None:
            sync = SyncConfig(model_id="global", every_s=period_s, codec="none",
                              retry_interval_s=0.05)  # fmt: skip
            engine = SyncEngine(sync, fed.islands[i], address, roster=fed.roster)
            engines.append(engine)
            model, optimizer = tiny_model(10 + i)
            with LocalUpdate(model, optimizer, engine=engine, flush_on_exit=False) as lu:
                in_round = 0
                for k in range(round(1.3 / step_s[i])):  # 65 and 32 steps: 1.3 s of compute
                    inner_step(model, optimizer, 1000 * i + k)
                    time.sleep(step_s[i])  # the two islands' pushes interleave as in a run
                    in_round += 1
                    if lu.step(tokens=16, seconds=step_s[i]):
                        rounds[i].append((in_round, lu.last_push))
                        in_round = 0
                for _, future in rounds[i]:
                    assert future.result(10).status == "accepted"

        try:
            run_in_threads(island, 2)
            line = root.lines["global"]
            versions = (len(rounds[0]) + len(rounds[1])) // 2
            wait_until(lambda: line.version == versions, timeout=10)
            version_metas = [_version_meta(line.store.get_version(v)) for v in
                             range(1, versions + 1)]  # fmt: skip
        finally:
            for engine in engines:
                engine.close(timeout=2)
            aggregator_loop.run(root.stop(), 10)

    steps = {i: [s for s, _ in rounds[i]] for i in (0, 1)}
    # as often: 5 and 4 rounds in 1.3 s (with H fixed: 2 to 1); 7 steps against 13
    assert steps == {0: [13] * 5, 1: [7] * 4}, steps
    for i in (0, 1):  # the merge weight is the round's tokens: 16 a step
        assert [float(f.result(0).ack["weight"]) for _, f in rounds[i]] == [
            16.0 * s for s in steps[i]
        ]
    assert [(m["work"], m["fraction"]) for m in version_metas] == [(2.0, 1.0)] * versions


def _version_meta(data: bytes) -> dict:
    return Envelope.from_bytes(data, max_bytes=len(data)).header.meta


# ------------------------------------------------------------------ the daemon


def test_island_run_with_every_s_a_twice_slowed_island_does_half_the_steps_a_round(tmp_path):
    """Two ``Island`` daemons (bytelm, in threads) against the real root, T = 0.3 s; island 1
    has ``slowdown = 2``. Its rounds hold about half the inner steps of island 0's."""
    configs = _federation(tmp_path, 2, steps=0, every=None)  # 0: until stopped
    root_config = load_config(AggregatorConfig, tmp_path / "root.toml")
    with LoopThread("aggregator") as aggregator_loop:
        root = AggregatorService(root_config)
        address = aggregator_loop.run(root.start(), 30)
        islands = []
        for cfg, slowdown in zip(configs, (1.0, 2.0), strict=True):
            cfg.aggregator, cfg.http, cfg.eval_every, cfg.slowdown = address, "", 0, slowdown
            cfg.sync = SyncConfig(model_id="global", every_s=0.3, codec="int8")
            islands.append(Island(cfg))
        summaries: dict[str, dict] = {}
        threads = [
            threading.Thread(target=lambda i=i: summaries.update({i.config.name: i.run()}))
            for i in islands
        ]
        try:
            for t in threads:
                t.start()
            for island in islands:  # each runs until it has ended 4 rounds
                wait_until(lambda i=island: len(i.round_records) >= 4, timeout=60)
                island.stop()
            for t in threads:
                t.join(60)
        finally:
            for island in islands:
                island.stop()
            aggregator_loop.run(root.stop(), 10)
    assert len(summaries) == 2
    per_round = []
    for island in islands:
        steps = [r["step"] for r in island.round_records[:4]]
        per_round.append(np.diff([0, *steps]).mean())
    assert per_round[0] >= 4, per_round  # T holds several inner steps
    assert 0.25 <= per_round[1] / per_round[0] <= 0.7, per_round  # 0.5; 0.4 measured
