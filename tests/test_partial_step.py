"""A version merged from fewer updates than the root's buffer_k takes that share of an outer
step (aggregator/outer.py, "A partial step"; aggregator/root.py step_fraction), and by default
its momentum waits until a full step's share has arrived ("Deferred momentum").

Without the share, a lone short round at the end of a run (the slow island's last 20 steps,
alone at the deadline) moved the model by a full step of accumulated momentum and the run's
last version was worse than the one before it. With the share but the momentum moving too,
it was still worse, by less: the momentum part alone raised the loss, the gradient part alone
lowered it."""

import asyncio

import numpy as np
import pytest
from aggtools import delta_bytes, hand_versions, make_federation, random_delta

from aggregator.config import MergeConfig
from aggregator.gateway import update_work
from aggregator.merge import PartialAggregate, accumulate
from aggregator.outer import CO2, SGD, NesterovSGD
from aggregator.root import RootModel, step_fraction
from aggregator.service import AggregatorService
from comms.codecs import get_codec
from comms.envelope import Envelope
from comms.errors import ConfigError
from comms.identity import Identity
from comms.transport import TransportClient
from comms.update import encode_update

SHAPES = {"w": (64,), "b": (8,)}
# The service tests below want one version from four pushes and the next from a deadline
# flush: the four pushes must land before the deadline, or a version is cut early. They take
# milliseconds on an idle machine; a loaded one can stretch them past a short deadline.
DEADLINE_S = 2.0


def _norm(u):
    return float(np.sqrt(sum(float(np.dot(x.ravel(), x.ravel())) for x in u.values())))


def _g(scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def test_step_fraction_is_the_share_of_buffer_k_at_most_one():
    assert step_fraction(1, 4) == 0.25
    assert step_fraction(3.4, 4) == pytest.approx(0.85)
    assert step_fraction(4, 4) == step_fraction(9, 4) == 1.0
    assert step_fraction(1, None) == 1.0
    with pytest.raises(ValueError, match="some island work"):
        step_fraction(0, 4)


@pytest.mark.parametrize(
    "meta, work",
    [({"steps": 20, "every": 50}, 0.4), ({"steps": 50, "every": 50}, 1.0),
     ({"steps": 80, "every": 50}, 1.0), ({"steps": 20}, 1.0), ({}, 1.0),
     ({"steps": 0, "every": 50}, 1.0), ({"steps": 20, "every": -5}, 1.0),
     ({"steps": "20", "every": 50}, 1.0), ({"steps": True, "every": 2}, 1.0)],
)  # fmt: skip
def test_an_island_updates_work_is_its_share_of_a_round(meta, work):
    assert update_work(meta) == pytest.approx(work)


@pytest.mark.parametrize("make", [NesterovSGD, SGD, CO2])
def test_a_fraction_near_one_is_the_plain_step(make):
    theta = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    plain, partial = make(), make()
    for seed in range(3):
        g = _g(seed=seed)
        u, v = plain.step(theta, g), partial.step(theta, g, fraction=1 - 1e-7)
        for k in u:
            np.testing.assert_allclose(v[k], u[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), float("inf")])
def test_a_fraction_outside_zero_one_is_refused_before_any_state_moves(bad):
    opt = NesterovSGD()
    theta = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    with pytest.raises(ValueError, match="fraction"):
        opt.step(theta, _g(), fraction=bad)
    assert opt.steps == 0 and not opt.momentum


def test_two_half_steps_move_as_far_as_one_full_step_where_two_full_ones_move_twice():
    """Steady momentum, the same g: two versions of half a buffer each move the model within
    1% of one full version; with every version a full step they move it twice as far."""
    theta = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    g = _g()

    def warmed():
        opt = NesterovSGD()
        for _ in range(60):  # m reaches g / (1 - mu)
            opt.step(theta, g)
        return opt

    full = warmed().step(theta, g)
    halves, plain = warmed(), warmed()
    two_halves = [halves.step(theta, g, fraction=0.5) for _ in range(2)]
    two_full = [plain.step(theta, g) for _ in range(2)]
    moved = {k: two_halves[0][k] + two_halves[1][k] for k in g}
    assert _norm(moved) == pytest.approx(_norm(full), rel=0.01)
    assert _norm({k: two_full[0][k] + two_full[1][k] for k in g}) == pytest.approx(
        2 * _norm(full), rel=0.01
    )


def _version_meta(data: bytes) -> dict:
    return Envelope.from_bytes(data, max_bytes=len(data)).header.meta


def _partial(deltas):
    p = PartialAggregate()
    for i, d in enumerate(deltas):
        accumulate(p, d, 1.0, update_id=(f"island{i}", 1))
    return p


@pytest.mark.parametrize("mode", ["deferred", "scaled", "full"])
def test_a_lone_short_last_round_does_not_move_the_model_by_a_full_momentum_step(mode):
    """The demo's last version: after full versions of four islands pulling one way, the slow
    island's last round of 20 of 50 steps arrives alone. Scaled, that version moves the model
    by about a quarter of the step before it; as a full step, by about as much again;
    deferred, by exactly a quarter of a plain gradient step, no momentum at all."""
    theta0 = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    root = RootModel("m", theta0, NesterovSGD(), get_codec("none"), Identity.generate(),
                     buffer_k=None if mode == "full" else 4,
                     defer=mode == "deferred")  # fmt: skip
    pull = _g()
    for v in range(8):  # full versions: four islands' deltas around the same direction
        nv = root.step(_partial([{k: pull[k] + _g(0.3, 10 * v + i)[k] for k in pull}
                                 for i in range(4)]))  # fmt: skip
        assert nv.fraction == 1.0
    before = _norm(nv.applied)
    g = {k: 0.4 * pull[k] for k in pull}
    last = root.step(_partial([g]))  # 20 of 50 steps
    moved = _norm(last.applied)
    if mode == "full":
        assert last.fraction == 1.0 and moved > 0.8 * before
        return
    assert last.fraction == 0.25 and moved < 0.3 * before
    assert _version_meta(last.envelope)["fraction"] == 0.25
    if mode == "deferred":
        for k in g:
            np.testing.assert_array_equal(last.applied[k], g[k] * np.float32(-0.7 * 0.25))
    else:
        assert moved > 2 * 0.7 * 0.25 * _norm(g)  # the momentum moved it too


def _quadratic_federation(mode: str, full_versions: int, short_steps: int) -> tuple[float, float]:
    """Four islands run 10 steps of gradient descent on the same ill-conditioned quadratic
    from each version; after ``full_versions`` versions one island's round of
    ``short_steps`` steps arrives alone. The loss before and after that last version."""
    curvature = np.array([1.0, 0.3, 0.05], np.float32)

    def loss(theta):
        return float(0.5 * (curvature * theta["w"].astype(np.float64) ** 2).sum())

    def island_delta(theta, steps):
        w = theta["w"].copy()
        for _ in range(steps):
            w = w - np.float32(0.5) * curvature * w
        return {"w": (theta["w"] - w).astype(np.float32)}  # anchor - params

    root = RootModel("m", {"w": np.ones(3, np.float32)}, NesterovSGD(), get_codec("none"),
                     Identity.generate(), buffer_k=4, defer=mode == "deferred")  # fmt: skip
    for _ in range(full_versions):
        root.step(_partial([island_delta(root.theta, 10)] * 4))
    before = loss(root.theta)
    lone = accumulate(PartialAggregate(), island_delta(root.theta, short_steps), 1.0,
                      update_id=("island3", 99), work=short_steps / 10)  # fmt: skip
    last = root.step(lone)
    assert last.fraction == pytest.approx(short_steps / 10 / 4)
    return before, loss(root.theta)


def test_with_deferred_momentum_a_lone_short_last_round_never_undoes_progress():
    """The mechanism behind the demo's worse last version, on a convex loss: the islands'
    progress lowers it, so a plain partial step toward their parameters (a convex combination)
    never raises it, while the momentum's share can point past the minimum. Deferred, no last
    version is worse than the one before it, however many full versions came first; scaled,
    many are."""
    worse = {mode: [] for mode in ("deferred", "scaled")}
    for mode, found in worse.items():
        for full_versions in range(1, 25):
            before, after = _quadratic_federation(mode, full_versions, short_steps=4)
            if after > before:
                found.append(full_versions)
    assert worse["deferred"] == []
    assert len(worse["scaled"]) >= 8, worse["scaled"]


def _hand_deferred(fractions, gs, lr=0.7, mu=0.9):
    """The deferred steps' updates in float64 (aggregator.outer, "Deferred momentum")."""
    m = {k: np.zeros(x.shape) for k, x in gs[0].items()}
    bank, banked, out = {k: np.zeros(x.shape) for k, x in gs[0].items()}, 0.0, []
    for f, g in zip(fractions, gs, strict=True):
        g = {k: x.astype(np.float64) for k, x in g.items()}
        if banked + f < 1.0 - 1e-6:
            out.append({k: -lr * f * g[k] for k in g})
            bank = {k: bank[k] + f * g[k] for k in g}
            banked += f
            continue
        m = {k: mu * m[k] + (bank[k] + f * g[k]) / (banked + f) for k in g}
        out.append({k: -lr * (f * g[k] + mu * m[k]) for k in g})
        bank, banked = {k: np.zeros(x.shape) for k, x in g.items()}, 0.0
    return out


FRACTIONS = (1.0, 0.25, 0.5, 0.25, 1.0, 0.6, 0.6, 1.0, 0.1, 0.1, 1.0, 0.3)


def test_deferred_momentum_moves_once_a_full_steps_share_has_arrived():
    theta = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    gs = [_g(seed=i) for i in range(len(FRACTIONS))]
    opt = NesterovSGD()
    got = [opt.step(theta, g, fraction=f, defer=True) for f, g in zip(FRACTIONS, gs, strict=True)]
    for u, want in zip(got, _hand_deferred(FRACTIONS, gs), strict=True):
        for k in u:
            np.testing.assert_allclose(u[k], want[k], rtol=1e-5, atol=1e-6)
    assert opt.pending_work == pytest.approx(0.3) and set(opt.pending) == set(SHAPES)
    # the bank's short steps carry no momentum: -lr f g exactly
    assert all((got[1][k] == gs[1][k] * np.float32(-0.7 * 0.25)).all() for k in SHAPES)


def test_deferred_full_steps_are_the_plain_step_bit_for_bit():
    theta = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    plain, deferred = NesterovSGD(), NesterovSGD()
    for seed in range(6):
        g = _g(seed=seed)
        u, v = plain.step(theta, g), deferred.step(theta, g, defer=True)
        assert all((u[k] == v[k]).all() for k in u)


@pytest.mark.parametrize("make", [SGD, CO2])
def test_optimizers_without_a_deferred_rule_take_the_scaled_step(make):
    theta = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    scaled, deferred = make(), make()
    for i, f in enumerate(FRACTIONS):
        g = _g(seed=i)
        u, v = scaled.step(theta, g, fraction=f), deferred.step(theta, g, fraction=f, defer=True)
        assert all((u[k] == v[k]).all() for k in u)


def test_a_pending_bank_survives_a_restart_bit_for_bit():
    """The root saves its state after every version; a restart in the middle of a bank
    continues it exactly (the bank is state, not a by-product of the version count)."""
    theta0 = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    ident = Identity.generate()

    def root():
        return RootModel("m", theta0, NesterovSGD(), get_codec("int8"), ident, buffer_k=4,
                         defer=True)  # fmt: skip

    partials = [_partial([_g(seed=10 * v + i) for i in range(n)])
                for v, n in enumerate((4, 1, 2, 4, 3, 3))]  # fmt: skip
    straight, first = root(), root()
    for p in partials:
        straight.step(p)
    for p in partials[:3]:  # banks 1/4 + 2/4
        first.step(p)
    saved = first.state_arrays()
    assert first.outer.pending_work == 0.75 and "outer/pending_work" in saved
    second = root()
    second.load_state_arrays(saved, first.version)
    for p in partials[3:]:
        second.step(p)
    assert second.version == straight.version
    assert all((second.theta[k] == straight.theta[k]).all() for k in SHAPES)


@pytest.mark.parametrize(
    "corrupt",
    [lambda s: s.pop("pending_work"), lambda s: s.pop("pending/w"),
     lambda s: s.__setitem__("pending_work", np.array(1.5)),
     lambda s: s.__setitem__("pending/zz", np.zeros(3, np.float32))],
    ids=["no share", "a sum missing", "share above one", "unknown tensor"],
)  # fmt: skip
def test_a_corrupt_pending_bank_is_refused(corrupt):
    theta = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    opt = NesterovSGD()
    opt.step(theta, _g(), fraction=0.5, defer=True)
    state = opt.state_dict()
    corrupt(state)
    with pytest.raises(ValueError, match="pending"):
        NesterovSGD().load_state_dict(state)


async def _wait_for(cond, timeout=20.0):
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.parametrize("partial_step", ["deferred", "scaled", "full"])
async def test_a_deadline_flush_takes_its_share_of_an_outer_step_at_the_root(
    tmp_path, partial_step
):
    """A real root, buffer_k 4: version 1 from four updates, version 2 from one update that
    the deadline flushed. theta_2 is the hand-computed Nesterov trajectory with a quarter of
    a plain step by default ("deferred"), a quarter of a momentum step with "scaled", and
    DiLoCo's whole step with "full"; each differs from the others."""
    fed = make_federation(tmp_path, 4, aggregators=("root",))
    cfg = fed.config("root", "root", buffer_k=4, deadline_s=DEADLINE_S, clip="off",
                     partial_step=partial_step)  # fmt: skip
    root = AggregatorService(cfg)
    await root.start()
    d = [random_delta(fed.theta0, i) for i in range(5)]
    try:
        async with TransportClient(root.address, retries=0) as c:
            for i, ident in enumerate(fed.islands):
                assert (await c.push(delta_bytes(ident, d[i], 1)))["status"] == "accepted"
            line = root.lines["global"]
            await _wait_for(lambda: line.version == 1)
            ack = await c.push(delta_bytes(fed.islands[0], d[4], 2, base_version=1))
            assert ack["status"] == "accepted"
            await _wait_for(lambda: line.version == 2)
    finally:
        await root.stop()
    rounds = [[(d[i], 0) for i in range(4)], [(d[4], 0)]]
    by_mode = {
        "deferred": hand_versions(fed.theta0, rounds, buffer_k=4, defer=True)[-1],
        "scaled": hand_versions(fed.theta0, rounds, buffer_k=4)[-1],
        "full": hand_versions(fed.theta0, rounds)[-1],
    }
    for mode, want in by_mode.items():
        close = all(np.allclose(line.theta[k], want[k], rtol=1e-5, atol=1e-6) for k in want)
        assert close == (mode == partial_step), mode


def _delta_with_meta(ident, delta, sequence, base_version, meta):
    env = encode_update(delta, codec="none", model_id="global", kind="delta",
                        sender=ident.peer_id, sequence=sequence, base_version=base_version,
                        meta=meta, identity=ident)  # fmt: skip
    return env.to_bytes()


@pytest.mark.parametrize("engine", ["inline", "pool"])
async def test_a_short_round_counts_as_its_steps_through_a_leaf_to_the_root(tmp_path, engine):
    """Islands push through a leaf (buffer 2) to a root (buffer_k 4). Version 1: four full
    rounds. Version 2: one full round and a 20-of-50-step round, flushed by the deadlines:
    work 1.4, so the root takes 1.4 / 4 of a step; its version meta says so."""
    fed = make_federation(tmp_path, 4, aggregators=("root", "leaf0"))
    merge = {"engine": engine, "max_workers": 1} if engine == "pool" else {}
    root = AggregatorService(
        fed.config("root", "root", buffer_k=4, deadline_s=DEADLINE_S, clip="off")
    )
    await root.start()
    leaf = AggregatorService(fed.config("leaf0", "leaf", parent=root.address, buffer_k=2,
                                        deadline_s=DEADLINE_S, clip="off", **merge))  # fmt: skip
    await leaf.start()
    d = [random_delta(fed.theta0, i) for i in range(6)]
    full, short = {"steps": 50, "every": 50}, {"steps": 20, "every": 50}
    try:
        async with TransportClient(leaf.address, retries=0) as c:
            for i, ident in enumerate(fed.islands):
                ack = await c.push(_delta_with_meta(ident, d[i], 1, 0, full))
                assert ack["status"] == "accepted"
            line = root.lines["global"]
            await _wait_for(lambda: line.version == 1)
            for i, meta in ((0, full), (1, short)):
                ack = await c.push(_delta_with_meta(fed.islands[i], d[4 + i], 2, 1, meta))
                assert ack["status"] == "accepted"
            await _wait_for(lambda: line.version == 2)
            store = line.store
    finally:
        await leaf.stop()
        await root.stop()
    metas = [_version_meta(store.get_version(v)) for v in (1, 2)]
    assert [(m["work"], m["fraction"]) for m in metas] == [(4.0, 1.0), (1.4, 0.35)]


def test_a_childs_partial_with_impossible_work_is_malformed(tmp_path):
    from aggregator.gateway import _partial_from_child
    from comms.errors import MalformedError

    ident = Identity.generate()
    arrays = {"w": np.ones(3, np.float32)}
    for work in (0, -1.0, 3.5, "x"):
        env = Envelope.from_bytes(
            encode_update(arrays, codec="none", model_id="m", kind="partial",
                          sender=ident.peer_id, sequence=1, base_version=0, identity=ident,
                          meta={"weight_sum": 2.0, "count": 2, "max_staleness": 0,
                                "work": work}).to_bytes(), max_bytes=1 << 20)  # fmt: skip
        with pytest.raises(MalformedError, match="work"):
            _partial_from_child(env, arrays)


def test_partial_step_is_checked_in_the_config_and_deferred_by_default():
    with pytest.raises(ConfigError, match="partial_step"):
        MergeConfig(partial_step="half").validate()
    assert MergeConfig().partial_step == "deferred"
