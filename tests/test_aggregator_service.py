"""The aggregator service on loopback: a tree of real gRPC servers merging real pushes."""

import asyncio

import grpc
import numpy as np
import pytest
from aggtools import delta_bytes, hand_versions, make_federation, random_delta, rejected_by_reason

from aggregator.outer import NesterovSGD, apply_update
from aggregator.service import AggregatorService
from comms import PROTOCOL_VERSION
from comms.codecs import get_codec
from comms.envelope import Envelope
from comms.errors import (
    DigestMismatchError,
    MalformedError,
    NonFiniteError,
    OversizeError,
    ReadDeniedError,
    ReplayError,
    ShapeMismatchError,
    SignatureError,
    StaleError,
    UnknownPeerError,
)
from comms.identity import Identity
from comms.transport import TransportClient
from comms.update import decode_update, encode_update


def expected_update(theta0, deltas, weights=None):
    """The first outer step (Nesterov, lr 0.7, momentum 0.9) on the weighted mean of deltas."""
    weights = weights or [1.0] * len(deltas)
    g = {k: sum(np.float32(w) * d[k] for w, d in zip(weights, deltas, strict=True)) / np.float32(sum(weights))
         for k in theta0}  # fmt: skip
    return NesterovSGD(lr=0.7, momentum=0.9).step({k: v.copy() for k, v in theta0.items()}, g)


def expected_theta1(theta0, deltas, weights=None):
    theta = {k: v.copy() for k, v in theta0.items()}
    apply_update(theta, expected_update(theta0, deltas, weights))
    return theta


def assert_same_bits(got, want, what=""):
    """Every tensor of either side present in both, with the same shape, dtype and bytes."""
    for k in sorted(got.keys() | want.keys()):
        assert k in got and k in want, f"{what}: tensor {k!r} missing on one side"
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, (what, k)
        assert got[k].tobytes() == want[k].tobytes(), f"{what}: tensor {k!r} differs"


async def start_tree(fed, leaf_k=4, root_k=8, **merge):
    root = AggregatorService(fed.config("root", "root", buffer_k=root_k, **merge))
    root_addr = await root.start()
    leaves = []
    for name in ("leaf0", "leaf1"):
        leaf = AggregatorService(
            fed.config(name, "leaf", parent=root_addr, buffer_k=leaf_k, **merge)
        )
        await leaf.start()
        leaves.append(leaf)
    return root, leaves


async def wait_for(pred, timeout=20.0):
    t0 = asyncio.get_running_loop().time()
    while not pred():
        if asyncio.get_running_loop().time() - t0 > timeout:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def test_tree_replicas_hold_the_roots_bits_under_an_int8_codec(tmp_path):
    """Eight islands, two leaves, one root publishing int8 versions: ``decode(encode(u))`` is
    not ``u``, so leaves, a late subscriber and a fetched snapshot hold the root's bits only
    if the root applies exactly the bytes it publishes."""
    fed = make_federation(tmp_path, 8)
    root, leaves = await start_tree(fed, codec="int8")
    try:
        # an island reads (subscribes, fetches) from its leaf with its own key
        clients = [TransportClient(leaf.address, identity=fed.islands[0]) for leaf in leaves]
        for rnd in (1, 2):  # round 2: momentum and the root's int8 residual are non-zero
            deltas = [random_delta(fed.theta0, 8 * rnd + i) for i in range(8)]
            acks = await asyncio.gather(*(
                clients[i % 2].push(delta_bytes(fed.islands[i], deltas[i], sequence=rnd,
                                                base_version=rnd - 1))
                for i in range(8)
            ))  # fmt: skip
            assert all(a["status"] == "accepted" and a["staleness"] == "0" for a in acks)
            await wait_for(
                lambda r=rnd: all(x.lines["global"].version == r for x in (root, *leaves))
            )
            theta_root = root.lines["global"].theta
            if rnd == 1:  # the tree's merge is the flat weighted mean, up to int8's error on u
                u = expected_update(fed.theta0, deltas)
                int8 = get_codec("int8")
                for k in fed.theta0:
                    err = np.abs(theta_root[k].astype(np.float64) - (fed.theta0[k] + u[k]))
                    assert np.all(err <= int8.error_bound(u[k]) + 1e-6), k
                    assert not np.array_equal(theta_root[k], fed.theta0[k] + u[k])  # lossy
            for leaf in leaves:  # replicas are bit-identical to the root
                assert_same_bits(leaf.lines["global"].theta, theta_root, leaf.config.name)
        # a late subscriber catches up from version 0 and holds the same bits
        theta = {k: v.copy() for k, v in fed.theta0.items()}
        async for v, data in clients[0].subscribe("global", 1):
            env = Envelope.from_bytes(data, max_bytes=1 << 30)
            assert {s.codec["name"] for s in env.header.tensors} == {"int8"}
            apply_update(theta, decode_update(env))
            if v == 2:
                break
        assert_same_bits(theta, theta_root, "late subscriber")
        snap = Envelope.from_bytes(await clients[1].fetch("global", -1), max_bytes=1 << 30)
        assert snap.header.base_version == 2
        assert_same_bits(decode_update(snap), theta_root, "snapshot")
        for c in clients:
            await c.close()
    finally:
        for agg in (*leaves, root):
            await agg.stop()


async def test_reads_are_signed_by_roster_keys_unless_the_model_is_public(tmp_path):
    """A leaf follows its root with signed reads, and an island reads from its leaf the same
    way; a model is public where that aggregator's own config says so: here at the root, not
    at the leaf."""
    fed = make_federation(tmp_path, 2, aggregators=("root", "leaf0"))
    root_cfg = fed.config("root", "root", buffer_k=1)
    root_cfg.models[0].public_read = True
    root = AggregatorService(root_cfg)
    root_addr = await root.start()
    leaf = AggregatorService(fed.config("leaf0", "leaf", parent=root_addr, buffer_k=1))
    await leaf.start()
    try:
        async with TransportClient(leaf.address, identity=fed.islands[0]) as island:
            await island.push(delta_bytes(fed.islands[0], random_delta(fed.theta0, 0), 1))
            await wait_for(lambda: leaf.lines["global"].version == 1)
            snap = Envelope.from_bytes(await island.fetch("global", -1), max_bytes=1 << 30)
            assert snap.header.base_version == 1
            async for version, _ in island.subscribe("global", 1):
                assert version == 1
                break
        for reader, reason in ((None, "unsigned"), (Identity.generate(), "unknown_reader")):
            async with TransportClient(leaf.address, identity=reader) as c:
                with pytest.raises(ReadDeniedError) as info:
                    await c.fetch("global", -1)
            assert info.value.code is grpc.StatusCode.PERMISSION_DENIED
            assert info.value.reason == reason
        async with TransportClient(root_addr) as anyone:  # public at the root
            snap = Envelope.from_bytes(await anyone.fetch("global", -1), max_bytes=1 << 30)
            assert snap.header.base_version == 1
        assert leaf.server.stats.rejected == {"unsigned": 1, "unknown_reader": 1}
        assert root.server.stats.rejected == {}
    finally:
        await leaf.stop()
        await root.stop()


async def test_staleness_weights_and_bound(tmp_path):
    fed = make_federation(tmp_path, 3, aggregators=("root",))
    root = AggregatorService(fed.config("root", "root", buffer_k=1, max_staleness=1))
    await root.start()
    try:
        async with TransportClient(root.address) as c:
            d = [random_delta(fed.theta0, i) for i in range(3)]
            await c.push(delta_bytes(fed.islands[0], d[0], 1, base_version=0))  # -> v1
            await c.push(delta_bytes(fed.islands[1], d[1], 1, base_version=0))  # s=1 -> v2
            assert root.lines["global"].version == 2
            ack = await c.push(delta_bytes(fed.islands[2], d[2], 1, base_version=2))
            assert ack["staleness"] == "0" and ack["weight"] == "1"
            with pytest.raises(StaleError, match="bound is 1"):
                await c.push(delta_bytes(fed.islands[0], d[0], 2, base_version=0))
    finally:
        await root.stop()


def assert_theta_close(got, want, what=""):
    for k in sorted(got.keys() | want.keys()):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=f"{what} {k}")


@pytest.mark.parametrize("engine", ["inline", "pool"])
async def test_mixed_staleness_is_weighted_in_the_merge_and_the_outer_step(tmp_path, engine):
    """K = 3 at the root; versions 2 and 3 each merge updates of staleness 0, 1 and 2, and
    theta follows FedBuff's weighted mean and Nesterov's step computed by hand."""
    fed = make_federation(tmp_path, 4, aggregators=("root",))
    merge = {"engine": engine, "max_workers": 1, "warm_workers": 0} if engine == "pool" else {}
    root = AggregatorService(fed.config("root", "root", buffer_k=3, **merge))
    await root.start()
    seqs = [0] * 4
    rounds = [  # (island, base version) per push; staleness = version at the push - base
        [(0, 0), (1, 0), (2, 0)],
        [(0, 1), (1, 0), (3, 0)],
        [(0, 2), (1, 1), (2, 0)],
    ]
    try:
        async with TransportClient(root.address) as c:
            done = []
            for v_now, pushes in enumerate(rounds):
                merged = []
                for island, base in pushes:
                    seqs[island] += 1
                    d = random_delta(fed.theta0, 10 * seqs[island] + island)
                    ack = await c.push(delta_bytes(fed.islands[island], d, seqs[island], base))
                    s = v_now - base
                    assert ack["staleness"] == str(s)
                    assert float(ack["weight"]) == pytest.approx(1 / np.sqrt(1 + s), rel=1e-5)
                    merged.append((d, s))
                done.append(merged)
                assert root.lines["global"].version == v_now + 1
                want = hand_versions(fed.theta0, done)[-1]
                assert_theta_close(root.lines["global"].theta, want, f"version {v_now + 1}")
    finally:
        await root.stop()


async def test_a_restarted_leaf_replays_its_wal_with_the_weights_first_admitted(tmp_path):
    """A leaf logs two updates (staleness 1 and 0 at their admission) and stops before its
    flush; while it is down the root moves on a version, so on restart the same updates would
    be staleness 2 and 1. The replayed partial must carry the logged weights."""
    fed = make_federation(tmp_path, 5, aggregators=("root", "leaf0"))
    root = AggregatorService(fed.config("root", "root", buffer_k=2))
    root_addr = await root.start()
    leaf_cfg = fed.config("leaf0", "leaf", parent=root_addr, buffer_k=3)
    leaf = AggregatorService(leaf_cfg)
    await leaf.start()
    d = {name: random_delta(fed.theta0, i) for i, name in enumerate("ABCDEFG")}
    A, B, C, D, E = fed.islands
    try:
        async with TransportClient(root_addr) as to_root:
            for ident, delta in ((A, d["A"]), (B, d["B"])):  # v1 from direct pushes
                await to_root.push(delta_bytes(ident, delta, 1, base_version=0))
            await wait_for(lambda: leaf.lines["global"].version == 1)
            async with TransportClient(leaf.address) as to_leaf:
                ack = await to_leaf.push(delta_bytes(C, d["C"], 1, base_version=0))
                assert ack["staleness"] == "1"
                ack = await to_leaf.push(delta_bytes(D, d["D"], 1, base_version=1))
                assert ack["staleness"] == "0"
            await leaf.stop()  # logged and acknowledged, not flushed
            leaf = None
            for ident, delta in ((A, d["F"]), (B, d["G"])):  # v2 while the leaf is down
                await to_root.push(delta_bytes(ident, delta, 2, base_version=1))
            assert root.lines["global"].version == 2
        leaf = AggregatorService(leaf_cfg)  # the same state dir: replays its WAL
        await leaf.start()
        assert leaf.lines["global"].version == 2 and leaf.lines["global"].buffered == 2
        async with TransportClient(leaf.address) as to_leaf:
            ack = await to_leaf.push(delta_bytes(E, d["E"], 1, base_version=2))  # the K-th
            assert ack["staleness"] == "0"
        await wait_for(lambda: root.lines["global"].version == 3)
        want = hand_versions(fed.theta0, [
            [(d["A"], 0), (d["B"], 0)],
            [(d["F"], 0), (d["G"], 0)],
            [(d["C"], 1), (d["D"], 0), (d["E"], 0)],  # the weights logged at admission
        ])[-1]  # fmt: skip
        assert_theta_close(root.lines["global"].theta, want, "version 3")
        await wait_for(lambda: leaf.lines["global"].version == 3)  # the leaf follows the root
        assert_same_bits(leaf.lines["global"].theta, root.lines["global"].theta, "leaf")
    finally:
        if leaf is not None:
            await leaf.stop()
        await root.stop()


async def test_bad_input_rejected_and_service_keeps_serving(tmp_path):
    fed = make_federation(tmp_path, 2, aggregators=("root",))
    cfg = fed.config("root", "root", buffer_k=100)
    cfg.max_update_mb = 0.05
    root = AggregatorService(cfg)
    await root.start()
    good, other = fed.islands
    d = random_delta(fed.theta0, 0)
    try:
        async with TransportClient(root.address) as c:
            await c.push(delta_bytes(good, d, 5))
            with pytest.raises(ReplayError):
                await c.push(delta_bytes(good, d, 5))
            stranger = Identity.generate()
            with pytest.raises(UnknownPeerError):
                await c.push(delta_bytes(stranger, d, 1))
            env = encode_update(d, codec="none", model_id="global", kind="delta",
                                sender=other.peer_id, sequence=1)  # fmt: skip
            forged = Envelope(
                env.header, env.header_bytes, env.payload, stranger.sign(env.header_bytes)
            )
            with pytest.raises(SignatureError):
                await c.push(forged.to_bytes())
            wrong = {"w": np.zeros((31, 16), np.float32), "b": d["b"]}
            with pytest.raises(ShapeMismatchError):
                await c.push(delta_bytes(other, wrong, 2))
            nan = {k: v.copy() for k, v in d.items()}
            nan["b"][3] = np.nan
            raw = Envelope.build(model_id="global", kind="delta", sender=other.peer_id, sequence=3,
                                 tensors=[(k, v.shape, "float32", {"name": "none"}, v) for k, v in nan.items()])  # fmt: skip
            with pytest.raises(NonFiniteError):
                await c.push(raw.sign(other).to_bytes())
            big = {"w": np.ones((32, 16), np.float32), "b": np.ones(16, np.float32)}
            big_env = delta_bytes(other, {**big, "w": np.ones((32, 16), np.float32)}, 4)
            with pytest.raises(OversizeError):
                await c.push(big_env + bytes(60_000))
            tampered = bytearray(delta_bytes(other, d, 5))
            tampered[-1] ^= 1
            with pytest.raises(DigestMismatchError):
                await c.push(bytes(tampered))
            with pytest.raises(MalformedError):
                await c.push(b"ARCP" + PROTOCOL_VERSION.to_bytes(2, "big") + bytes(20))
            # still serving, and the accepted one is buffered exactly once
            ack = await c.push(delta_bytes(other, d, 9))
            assert ack["status"] == "accepted"
            assert root.lines["global"].buffer.count == 2
            rejected = rejected_by_reason(root)
            for reason in ("replay", "unknown_peer", "signature", "shape", "nonfinite",
                           "digest", "malformed"):  # fmt: skip
                assert rejected.get(reason) == 1, (reason, rejected)
            # an oversized upload is refused by the transport before the gateway sees it
            assert root.server.stats.rejected.get("oversize") == 1
            assert root.server.stats.internal_errors == 0
    finally:
        await root.stop()


async def test_merge_pool_scales_with_a_burst_and_back_to_zero(tmp_path):
    """16 logged updates replayed at once after a restart are a burst: the elastic pool scales
    up to merge them, flushes the exact weighted mean, then retires to zero when idle."""
    n = 16
    fed = make_federation(tmp_path, n, aggregators=("root",), shapes={"w": (512, 512)})
    deltas = [random_delta(fed.theta0, i) for i in range(n)]
    blobs = [delta_bytes(fed.islands[i], deltas[i], 1, codec="int8") for i in range(n)]
    cfg = fed.config("root", "root", buffer_k=n, engine="pool", max_workers=3, warm_workers=0,
                     idle_timeout_s=0.5, scale_up_backlog=1)  # fmt: skip
    cfg.merge.buffer_k = 10 * n  # first life: acknowledge and log, never flush
    root = AggregatorService(cfg)
    await root.start()
    try:
        async with TransportClient(root.address) as c:
            await asyncio.gather(*(c.push(b) for b in blobs))
        assert root.lines["global"].version == 0
    finally:
        await root.stop()
    cfg.merge.buffer_k = n  # second life: the replayed backlog is one full buffer
    root = AggregatorService(cfg)
    await root.start()
    line = root.lines["global"]
    try:
        await wait_for(lambda: line.version == 1)
        stats = line.pool.stats()
        assert stats.events_merged == n and stats.workers_peak > 1, stats
        await wait_for(lambda: line.pool.stats().workers_alive == 0, timeout=15)
        decoded = [decode_update(Envelope.from_bytes(b, max_bytes=1 << 30)) for b in blobs]
        want = expected_theta1(fed.theta0, decoded)
        np.testing.assert_allclose(line.theta["w"], want["w"], rtol=1e-5, atol=1e-6)
    finally:
        await root.stop()


async def test_two_models_status_and_metrics_over_http(tmp_path):
    import aiohttp
    from safetensors.numpy import save_file

    from aggregator.config import ModelConfig

    fed = make_federation(tmp_path, 2, aggregators=("root",))
    other = {"v": np.ones(8, np.float32)}
    save_file(other, str(tmp_path / "other.safetensors"))
    cfg = fed.config("root", "root", buffer_k=1)
    cfg.models.append(
        ModelConfig("expert-1", init=str(tmp_path / "other.safetensors"), codec="none")
    )
    cfg.http = "127.0.0.1:0"
    root = AggregatorService(cfg)
    await root.start()
    try:
        async with TransportClient(root.address) as c:
            await c.push(delta_bytes(fed.islands[0], random_delta(fed.theta0, 0), 1))
            # the same island, another model: its own sequence line (replay keyed per model)
            await c.push(delta_bytes(fed.islands[0], {"v": np.full(8, 0.5, np.float32)}, 1,
                                     model_id="expert-1"))  # fmt: skip
            with pytest.raises(ShapeMismatchError):
                await c.push(delta_bytes(fed.islands[1], {"v": np.ones(8, np.float32)}, 1))
        assert root.lines["global"].version == 1 and root.lines["expert-1"].version == 1
        # Nesterov from zero momentum: u = -lr * (g + mu * g) = -0.7 * 1.9 * 0.5
        np.testing.assert_allclose(
            root.lines["expert-1"].theta["v"], 1 - 0.7 * 1.9 * 0.5, rtol=1e-6
        )
        async with aiohttp.ClientSession() as http:
            base = f"http://{root.http_address}"
            async with http.get(base + "/healthz") as r:
                assert r.status == 200
            async with http.get(base + "/status") as r:
                status = await r.json()
            assert status["models"]["global"]["version"] == 1
            assert status["models"]["expert-1"]["version"] == 1
            async with http.get(base + "/metrics") as r:
                text = await r.text()
            assert (
                'archipelago_updates_accepted_total{kind="delta",model_id="expert-1"} 1.0' in text
            )
            assert 'archipelago_updates_rejected_total{reason="shape"} 1.0' in text
    finally:
        await root.stop()
