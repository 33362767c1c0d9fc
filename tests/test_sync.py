"""The island's sync engine against a real gRPC transport server on loopback.

The server's handler here is ``RecordingHandler``: a transport-level fixture for the island's
side of the protocol. It records the envelopes pushed to it, answers with acks or typed
rejections, and serves version and snapshot envelopes that the test builds. It merges nothing
and is not an aggregator; end-to-end tests against the real aggregator live with it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np
import pytest
import torch

from comms.aio import LoopThread
from comms.codecs import get_codec
from comms.config import config_from_dict
from comms.envelope import Envelope
from comms.errors import (
    ConfigError,
    NotFoundError,
    ReadDeniedError,
    ReplayError,
    ShapeMismatchError,
    StaleError,
)
from comms.identity import Identity, Roster
from comms.reads import ReadGuard
from comms.transport import TransportClient, TransportServer
from comms.update import Manifest, decode_update, encode_update
from island.local_update import LocalUpdate
from island.pseudo import params_to_numpy
from island.sync import SnapshotRefusedError, SyncConfig, SyncEngine, VersionGapError
from island.sync.versions import manifest_differences

MODEL = "lm"


def version_envelope(
    version: int, u: dict, signer: Identity, codec: str = "none", contributors=None
) -> bytes:
    """``u_v`` as the root publishes it: kind "version", base_version v - 1, signed; with
    ``contributors`` ([peer id, sequence] pairs) its meta lists the updates it holds."""
    env = encode_update(
        u,
        codec=codec,
        model_id=MODEL,
        kind="version",
        sender=signer.peer_id,
        sequence=version,
        base_version=version - 1,
        meta=None if contributors is None else {"contributors": contributors},
        identity=signer,
    )
    return env.to_bytes()


def snapshot_envelope(version: int, theta: dict, signer: Identity) -> bytes:
    env = encode_update(
        theta,
        codec="none",
        model_id=MODEL,
        kind="snapshot",
        sender=signer.peer_id,
        sequence=version,
        base_version=version,
        identity=signer,
    )
    return env.to_bytes()


class RecordingHandler:
    """Records pushed envelopes; serves the versions and the snapshot the test sets."""

    def __init__(self):
        self.pushes: list[Envelope] = []
        self.last_sequence: dict[str, int] = {}  # replay guard, per sender
        self.versions: dict[int, bytes] = {}
        self.snapshot: bytes | None = None
        self.ack_delay_s = 0.0
        self.acks_released = threading.Event()  # cleared: every ack waits until it is set
        self.acks_released.set()
        self.stale_sequences: set[int] = set()
        self.skip_once: set[int] = set()  # versions left out of the next subscription
        self.subscriptions: list[int] = []
        self.served = True  # False: the model line is not served (pushes and reads NotFound)
        self.unserved: list[str] = []  # what was answered NotFound for it: push, subscribe, fetch
        self._published = asyncio.Event()

    def _check_served(self, what: str, model_id: str) -> None:
        if not self.served:
            self.unserved.append(what)
            raise NotFoundError(f"model {model_id!r} is not served here")

    async def on_push(self, upload_id, data, metadata):
        env = Envelope.from_bytes(data, max_bytes=1 << 30)
        self._check_served("push", env.header.model_id)
        sender, sequence = env.header.sender, env.header.sequence
        await asyncio.sleep(self.ack_delay_s)
        while not self.acks_released.is_set():
            await asyncio.sleep(0.01)
        if sequence in self.stale_sequences:
            raise StaleError(f"update based on version {env.header.base_version} is too stale")
        if sequence <= self.last_sequence.get(sender, -1):
            raise ReplayError(f"sequence {sequence} of {sender} was accepted already")
        self.last_sequence[sender] = sequence
        self.pushes.append(env)
        v_now = max(self.versions, default=0)
        return {
            "status": "accepted",
            "staleness": v_now - env.header.base_version,
            "weight": 1.0,
            "v_now": v_now,
        }

    async def subscribe(self, model_id, from_version):
        self._check_served("subscribe", model_id)
        self.subscriptions.append(from_version)
        skip, self.skip_once = self.skip_once, set()
        version = from_version
        while True:
            published = self._published
            while version in self.versions:
                if version not in skip:
                    yield version, self.versions[version]
                version += 1
            await published.wait()

    async def fetch(self, model_id, version):
        self._check_served("fetch", model_id)
        if self.snapshot is None:
            raise NotFoundError(f"model {model_id!r} has no snapshot")
        return self.snapshot

    async def publish(self, version: int, data: bytes) -> None:
        self.versions[version] = data
        self._published.set()
        self._published = asyncio.Event()


class ProtocolHarness:
    """A RecordingHandler behind a real TransportServer on its own loop thread, identities,
    a roster, and engines built against it (closed at the end)."""

    def __init__(self):
        self.island, self.root = Identity.generate(), Identity.generate()
        self.roster = Roster()
        self.roster.add(self.island.public_key, "island")
        self.roster.add(self.root.public_key, "aggregator")
        self.handler = RecordingHandler()
        self.server_loop = LoopThread("test-server").start()
        self.server: TransportServer | None = None
        self.port = 0
        self.engines: list[SyncEngine] = []

    def start_server(self, port: int = 0) -> None:
        # reads must be signed by a roster key, as at a real aggregator
        self.server = TransportServer(self.handler, port=port, read_guard=ReadGuard(self.roster))
        self.port = self.server_loop.run(self.server.start(), 10)

    def stop_server(self) -> None:
        self.server_loop.run(self.server.stop(0), 10)

    def client(self, identity: Identity | None = None) -> TransportClient:
        return TransportClient(
            f"127.0.0.1:{self.port}",
            deadline_s=5,
            retries=1,
            backoff_s=0.01,
            identity=identity or self.island,
        )

    def engine(self, identity: Identity | None = None, **config) -> SyncEngine:
        config = {
            "model_id": MODEL,
            "retry_interval_s": 0.05,
            "max_retry_interval_s": 0.2,
            **config,
        }
        engine = SyncEngine(
            SyncConfig(**config),
            identity or self.island,
            lambda: self.client(identity),
            roster=self.roster,
        )
        self.engines.append(engine)
        return engine

    def publish(self, version: int, u: dict, signer: Identity | None = None, contributors=None):
        data = version_envelope(version, u, signer or self.root, contributors=contributors)
        self.server_loop.run(self.handler.publish(version, data), 5)

    def set_snapshot(self, version: int, theta: dict) -> None:
        self.handler.snapshot = snapshot_envelope(version, theta, self.root)

    def close(self) -> None:
        for engine in self.engines:
            engine.close(timeout=1.0)
        if self.server is not None:
            self.stop_server()
        self.server_loop.stop()


def random_delta(rng, scale=1e-2) -> dict[str, np.ndarray]:
    return {
        "w": (rng.standard_normal((4, 300)) * scale).astype(np.float32),
        "b": (rng.standard_normal(3) * scale).astype(np.float32),
    }


def run_in_threads(fn, n: int, timeout: float = 60.0) -> None:
    """Run ``fn(0) ... fn(n - 1)`` in threads, join them, and fail with what any raised."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            fn(i)
        except BaseException as err:  # surfaces in the main thread
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not errors, errors


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# ------------------------------------------------------------------ pushes


def test_pushes_follow_the_protocol_and_error_feedback_accounts_for_codec_loss(harness):
    engine = harness.engine(codec="int8")
    rng = np.random.default_rng(0)
    deltas = [random_delta(rng) for _ in range(4)]
    futures = [
        engine.submit_delta(d, base_version=r, meta={"steps": 10, "tokens": 80, "round": r})
        for r, d in enumerate(deltas)
    ]
    outcomes = [f.result(timeout=10) for f in futures]
    assert [o.status for o in outcomes] == ["accepted"] * 4
    assert outcomes[2].ack["status"] == "accepted" and outcomes[2].ack["staleness"] == "-2"

    pushes = harness.handler.pushes
    assert [p.header.sequence for p in pushes] == [1, 2, 3, 4]
    for r, env in enumerate(pushes):
        assert (env.header.kind, env.header.model_id) == ("delta", MODEL)
        assert env.header.base_version == r
        assert env.header.meta == {"steps": 10, "tokens": 80, "round": r}
        assert env.header.tensors[0].codec["name"] == "int8"
        env.verify(harness.roster, roles=("island",))  # signed by the island

    sent = [decode_update(env) for env in pushes]
    residuals = engine.state_dict()["residuals"]
    for name in ("w", "b"):
        total_true = np.sum([d[name] for d in deltas], axis=0)
        total_sent = np.sum([s[name] for s in sent], axis=0)
        assert np.abs(residuals[name]).max() > 0  # int8 lost something ...
        np.testing.assert_allclose(total_sent + residuals[name], total_true, rtol=0, atol=1e-7)

    stats = engine.stats
    assert stats["pushes_accepted"] == 4 and stats["pushes_pending"] == 0
    assert stats["last_staleness"] == -3 and stats["last_v_now"] == 0
    assert stats["bytes_sent"] >= sum(p.wire_size for p in pushes)


def test_an_islands_ef_decay_scales_what_its_codec_left_unsent(harness):
    """``[sync] ef_decay`` reaches the island's error feedback: each push is the codec's
    encoding of ``delta + beta * residual``, bit for bit, with the residual the previous
    corrected delta less what was sent."""
    beta = np.float32(0.5)
    engine = harness.engine(codec="int4", ef_decay=0.5)
    rng = np.random.default_rng(3)
    deltas = [random_delta(rng) for _ in range(3)]
    for r, d in enumerate(deltas):
        assert (
            engine.submit_delta(d, base_version=0, meta={"steps": 10, "round": r})
            .result(timeout=10)
            .status
            == "accepted"
        )
    codec = get_codec("int4")
    sent = [decode_update(env) for env in harness.handler.pushes]
    for name in ("w", "b"):
        residual = np.zeros_like(deltas[0][name])
        for d, got in zip(deltas, sent, strict=True):
            corrected = d[name] + residual * beta
            expected = codec.decode(codec.encode(corrected), corrected.shape)
            assert got[name].tobytes() == expected.tobytes()
            residual = corrected - expected
        assert engine.state_dict()["residuals"][name].tobytes() == residual.tobytes()


def test_a_stale_rejection_is_counted_and_dropped_and_later_pushes_go_through(harness):
    engine = harness.engine(codec="none")
    harness.handler.stale_sequences = {1}
    rng = np.random.default_rng(1)
    first = engine.submit_delta(random_delta(rng), 0, {"steps": 7, "round": 0})
    second = engine.submit_delta(random_delta(rng), 0, {"steps": 7, "round": 1})
    stale, accepted = first.result(timeout=10), second.result(timeout=10)
    assert stale.status == "stale" and "too stale" in stale.reason
    assert accepted.status == "accepted"
    assert [p.header.sequence for p in harness.handler.pushes] == [2]
    stats = engine.stats
    assert (stats["pushes_stale"], stats["pushes_accepted"], stats["steps_lost"]) == (1, 1, 7)


def test_a_replay_rejection_counts_as_delivered(harness):
    rng = np.random.default_rng(2)
    harness.engine(codec="none").submit_delta(random_delta(rng), 0).result(timeout=10)
    restarted = harness.engine(codec="none")  # same island, its state lost: sequence 1 again
    outcome = restarted.submit_delta(random_delta(rng), 0).result(timeout=10)
    assert outcome.status == "replayed"
    assert restarted.stats["pushes_replayed"] == 1 and restarted.stats["steps_lost"] == 0
    assert len(harness.handler.pushes) == 1


def test_a_down_link_keeps_the_push_queued_and_sends_it_when_the_server_is_back(harness):
    harness.stop_server()
    port = harness.port
    engine = harness.engine(codec="none")
    future = engine.submit_delta(random_delta(np.random.default_rng(3)), 0, {"steps": 5})
    wait_until(lambda: engine.stats["push_link_failures"] >= 2)
    assert not future.done() and engine.stats["pushes_pending"] == 1
    harness.start_server(port)  # the same address comes back
    assert future.result(timeout=10).status == "accepted"
    assert [p.header.sequence for p in harness.handler.pushes] == [1]
    assert engine.stats["pushes_pending"] == 0


def test_a_full_queue_drops_the_oldest_waiting_push_and_keeps_the_order(harness):
    harness.stop_server()
    port = harness.port
    engine = harness.engine(codec="none", max_pending_pushes=2)
    rng = np.random.default_rng(4)
    futures = [engine.submit_delta(random_delta(rng), 0, {"steps": 3}) for _ in range(5)]
    wait_until(lambda: sum(f.done() for f in futures) >= 2)
    harness.start_server(port)
    outcomes = [f.result(timeout=10) for f in futures]
    statuses = [o.status for o in outcomes]
    delivered = [p.header.sequence for p in harness.handler.pushes]
    assert statuses.count("dropped") == engine.stats["pushes_dropped"] >= 2
    assert statuses[-2:] == ["accepted", "accepted"]  # the newest are never the ones dropped
    assert delivered == sorted(delivered) and delivered[-2:] == [4, 5]
    assert len(delivered) + statuses.count("dropped") == 5
    assert engine.stats["steps_lost"] == 3 * statuses.count("dropped")


def test_close_abandons_undelivered_pushes_and_keeps_them_for_a_restart(harness):
    rng = np.random.default_rng(5)
    delta = random_delta(rng)
    first = harness.engine(codec="int8")
    first.submit_delta(delta, 0, {"steps": 4}).result(timeout=10)  # sequence 1, delivered
    harness.stop_server()
    port = harness.port
    pending = first.submit_delta(delta, 1, {"steps": 4, "round": 1})  # sequence 2: link down
    start = time.monotonic()
    first.close(timeout=0.3)
    assert time.monotonic() - start < 3
    assert pending.result(timeout=1).status == "abandoned"
    state = first.state_dict()
    assert state["next_sequence"] == 3 and [p["sequence"] for p in state["pending"]] == [2]
    assert set(state["residuals"]) == {"w", "b"}

    harness.start_server(port)
    second = harness.engine(codec="int8")
    second.load_state_dict(state)
    assert second.state_dict()["residuals"]["w"].tobytes() == state["residuals"]["w"].tobytes()
    third = second.submit_delta(delta, 1, {"steps": 4})
    assert third.result(timeout=10).status == "accepted"
    assert [p.header.sequence for p in harness.handler.pushes] == [1, 2, 3]
    assert harness.handler.pushes[1].header.meta == {"steps": 4, "round": 1}
    with pytest.raises(RuntimeError, match="before the first submit_delta"):
        second.load_state_dict(state)


def test_a_push_resent_after_a_restart_reaches_the_server_exactly_once(harness):
    harness.handler.ack_delay_s = 0.3
    first = harness.engine(codec="int8")
    future = first.submit_delta(random_delta(np.random.default_rng(9)), 0, {"steps": 2})
    state = first.state_dict()  # taken while the push is in flight, as a crash would find it
    assert [p["sequence"] for p in state["pending"]] == [1]
    restarted = harness.engine(codec="int8")
    restarted.load_state_dict(state)
    wait_until(lambda: restarted.stats["pushes_pending"] == 0)
    assert future.result(timeout=5).status == "accepted"
    assert [p.header.sequence for p in harness.handler.pushes] == [1]  # once, not twice
    assert restarted.stats["pushes_accepted"] + restarted.stats["pushes_replayed"] == 1


# ------------------------------------------------------------------ versions


def test_versions_are_verified_and_taken_in_order(harness):
    engine = harness.engine()
    rng = np.random.default_rng(6)
    us = {v: random_delta(rng) for v in (1, 2, 3)}
    harness.publish(1, us[1])
    harness.publish(2, us[2], signer=harness.island)  # not an aggregator: refused
    engine.follow(0)
    assert engine.wait_for_version(0, timeout=5) == 1
    wait_until(lambda: engine.stats["versions_refused"] >= 1)
    assert engine.newest_version() == 1
    harness.publish(2, us[2])  # the real version 2 replaces the forged one
    harness.publish(3, us[3])
    assert engine.wait_for_version(2, timeout=5) == 3
    taken = engine.take_versions(after=0)
    assert [v for v, _ in taken] == [1, 2, 3]
    for v, u in taken:
        assert u["w"].tobytes() == us[v]["w"].tobytes()
    assert engine.take_versions(after=3) == []
    assert engine.stats["newest_version"] == 3 and engine.stats["blocked_s"] > 0


def test_a_skipped_version_on_the_stream_resubscribes_from_the_missing_one(harness):
    engine = harness.engine()
    rng = np.random.default_rng(7)
    for v in (1, 2, 3):
        harness.publish(v, random_delta(rng))
    harness.handler.skip_once = {2}
    engine.follow(0)
    engine.wait_for_version(2, timeout=5)
    assert [v for v, _ in engine.take_versions(after=0)] == [1, 2, 3]
    assert harness.handler.subscriptions == [1, 2]
    assert engine.stats["version_gaps"] == 1


def test_evicted_versions_raise_a_gap_and_a_snapshot_recovers(harness):
    engine = harness.engine(max_buffered_versions=2)
    rng = np.random.default_rng(8)
    for v in (1, 2, 3, 4):
        harness.publish(v, random_delta(rng))
    engine.follow(0)
    engine.wait_for_version(3, timeout=5)
    with pytest.raises(VersionGapError, match="fetch a snapshot"):
        engine.take_versions(after=0)
    theta = random_delta(rng, scale=1.0)
    harness.set_snapshot(4, theta)
    version, params = engine.fetch_snapshot(timeout=10)
    assert version == 4 and params["w"].tobytes() == theta["w"].tobytes()
    harness.publish(5, random_delta(rng))
    engine.wait_for_version(4, timeout=5)
    assert [v for v, _ in engine.take_versions(after=4)] == [5]
    assert harness.handler.subscriptions[-1] == 5
    assert engine.stats["snapshots_fetched"] == 1


def test_a_missing_snapshot_is_a_typed_error(harness):
    engine = harness.engine()
    with pytest.raises(NotFoundError, match="has no snapshot"):
        engine.fetch_snapshot(timeout=10)
    assert engine.newest_version() is None


def test_an_island_outside_the_roster_is_refused_reads_and_told_why(harness, caplog):
    stranger = harness.engine(identity=Identity.generate())
    harness.set_snapshot(4, random_delta(np.random.default_rng(9)))
    with pytest.raises(ReadDeniedError, match="not in this server's roster") as info:
        stranger.fetch_snapshot(timeout=10)
    assert info.value.reason == "unknown_reader"
    harness.publish(1, random_delta(np.random.default_rng(10)))
    stranger.follow(0)
    wait_until(lambda: stranger.stats["subscription_restarts"] >= 1)
    assert stranger.newest_version() == 0
    assert stranger.stats["versions_refused"] == 0  # the versions were never the problem
    assert "refuses this island's reads" in caplog.text
    assert harness.handler.subscriptions == []  # the handler never saw the request
    member = harness.engine()  # the roster's island reads the same server
    member.follow(0)
    assert member.wait_for_version(0, timeout=5) == 1


def test_a_resumed_island_whose_line_is_not_served_trains_on_and_adopts_once_it_is(harness, caplog):
    """An island resumed at version 3 while its aggregator serves no line "lm" (a root whose
    [[models]] entry is gone): the stream and, at each boundary, the snapshot fetch are
    answered NotFound; the boundary logs it, keeps version 3 and the anchor, and training goes
    on. Once the line is served again the next boundary loads its snapshot, and the boundary
    after that adopts the next version from the stream."""
    torch.manual_seed(40)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)

    def train(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    def holds(arrays) -> bool:
        got = params_to_numpy(model)
        return all(got[n].tobytes() == arrays[n].tobytes() for n in arrays)

    anchor = params_to_numpy(model)  # the resumed snapshot's anchor at version 3
    harness.handler.served = False
    engine = harness.engine(codec="none", rebase="reset")
    lu = LocalUpdate(model, optimizer, every=1, engine=engine, anchor=anchor, anchor_version=3)
    with lu:
        for boundary in range(1, 3):
            assert engine.wait_for_version(3, timeout=5) == 3  # returns: the stream was lost
            train(boundary)
            assert not holds(anchor)  # the round trained
            assert lu.step()  # the boundary: the versions and the snapshot are not found
            assert harness.handler.unserved.count("fetch") == boundary
            assert lu.version == 3 and lu.round == boundary
            assert all(lu.anchor[n].tobytes() == anchor[n].tobytes() for n in anchor)
            assert holds(anchor)  # reset: the next round starts from the kept anchor
        warned = [r for r in caplog.records if "serves neither" in r.getMessage()]
        assert len(warned) == 2 and all(r.levelno == logging.WARNING for r in warned)
        said = warned[0].getMessage()
        assert "model lm:" in said and "after 3" in said and "keeping version 3" in said
        assert "is not served here" in said
        assert "push" in harness.handler.unserved  # the pushes were answered NotFound too

        assert engine.wait_for_version(3, timeout=5) == 3  # followed again: lost again
        harness.handler.served = True
        rng = np.random.default_rng(40)
        theta5 = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in anchor.items()}
        harness.set_snapshot(5, theta5)
        train(10)
        assert lu.step()  # this boundary finds the line: its snapshot is loaded
        assert lu.version == 5 and holds(theta5)
        u6 = {n: rng.standard_normal(a.shape).astype(np.float32) * 1e-3 for n, a in anchor.items()}
        harness.publish(6, u6)
        assert engine.wait_for_version(5, timeout=5) == 6
        train(11)
        assert lu.step()  # and the stream after it is followed as usual
        assert lu.version == 6
        assert holds({n: theta5[n] + u6[n] for n in theta5})
    assert harness.handler.pushes  # the pushes after the line came back were accepted


# ------------------------------------------------------------------ the island's own manifest

MANIFEST = Manifest((("b", (3,), "float32"), ("w", (4, 300), "float32")))


def foreign_versions(rng) -> dict[str, dict[str, np.ndarray]]:
    """Signed, well-formed updates that are not this island's model, by what differs."""
    good = random_delta(rng)
    return {
        "an extra tensor": {**good, "head": np.zeros(2, np.float32)},
        "a missing tensor": {"w": good["w"]},
        "a renamed tensor": {"w": good["w"], "bias": good["b"]},
        "another shape": {"w": good["w"][:, :299].copy(), "b": good["b"]},
        "another dtype": {"w": good["w"].astype(np.float16), "b": good["b"]},
    }


def test_manifest_differences_name_what_differs():
    rng, signer = np.random.default_rng(20), Identity.generate()
    said = {}
    for what, u in foreign_versions(rng).items():
        env = Envelope.from_bytes(version_envelope(1, u, signer), max_bytes=1 << 20)
        said[what] = "; ".join(manifest_differences(MANIFEST, env.header.tensors))
    assert said["an extra tensor"] == "1 unexpected tensor(s) ['head']"
    assert said["a missing tensor"] == "missing 1 tensor(s) ['b']"
    assert said["a renamed tensor"] == "missing 1 tensor(s) ['b']; 1 unexpected tensor(s) ['bias']"
    assert said["another shape"] == "'w' has shape (4, 299), the model (4, 300)"
    assert said["another dtype"] == "'w' has dtype float16, the model float32"
    fits = version_envelope(1, random_delta(rng), signer)
    fits = Envelope.from_bytes(fits, max_bytes=1 << 20)
    assert manifest_differences(MANIFEST, fits.header.tensors) == []


def test_a_version_that_does_not_fit_the_islands_model_is_refused_and_the_stream_waits(
    harness, caplog
):
    """Signed by the roster's aggregator and well formed, but not this model: refused on
    arrival with what differs, never buffered (nothing to apply), and the stream keeps asking
    for that version until one that fits is published."""
    engine = harness.engine()
    engine.expect_manifest(MANIFEST)
    rng = np.random.default_rng(21)
    u1, u2, u3 = (random_delta(rng) for _ in range(3))
    harness.publish(1, u1)
    engine.follow(0)
    assert engine.wait_for_version(0, timeout=5) == 1
    for refused, (what, foreign) in enumerate(foreign_versions(rng).items(), start=1):
        harness.publish(2, foreign)
        wait_until(lambda n=refused: engine.stats["versions_refused"] >= n)
        assert engine.newest_version() == 1, what
    assert "refused version 2 from 127.0.0.1:" in caplog.text
    for said in ("unexpected 1 tensor", "'w' has shape (4, 299), the model (4, 300)",
                 "'w' has dtype float16, the model float32", "missing 1 tensor(s) ['b']"):  # fmt: skip
        assert said.replace("unexpected 1", "1 unexpected") in caplog.text
    harness.publish(2, u2)  # a version that fits: the stream takes it and goes on
    harness.publish(3, u3)
    assert engine.wait_for_version(2, timeout=5) == 3
    taken = engine.take_versions(after=0)
    assert [v for v, _ in taken] == [1, 2, 3]
    for (_, u), want in zip(taken, (u1, u2, u3), strict=True):
        assert u["w"].tobytes() == want["w"].tobytes()
    assert engine.stats["versions_received"] == 3


def test_a_buffered_version_that_does_not_fit_is_a_gap_and_none_is_returned(harness):
    """Versions buffered before the manifest was known are checked when taken: none of the
    batch is returned (a caller applies all or nothing) and a snapshot is asked for."""
    engine = harness.engine()
    rng = np.random.default_rng(22)
    harness.publish(1, random_delta(rng))
    harness.publish(2, foreign_versions(rng)["another shape"])
    engine.follow(0)
    engine.wait_for_version(1, timeout=5)
    engine.expect_manifest(MANIFEST)
    with pytest.raises(VersionGapError, match=r"version 2 does not decode .*has shape"):
        engine.take_versions(after=0)
    assert engine.stats["versions_refused"] == 1


def test_a_snapshot_that_does_not_fit_is_refused_and_fetched_again_until_one_does(harness, caplog):
    engine = harness.engine()
    engine.expect_manifest(MANIFEST)
    rng = np.random.default_rng(23)
    harness.set_snapshot(4, foreign_versions(rng)["a renamed tensor"])
    with pytest.raises(SnapshotRefusedError, match="does not fit this island's model") as info:
        engine.fetch_snapshot(timeout=10, retry_refused=False)
    assert info.value.reason == "shape" and isinstance(info.value.__cause__, ShapeMismatchError)
    assert "unexpected tensor(s) ['bias']" in str(info.value)
    assert engine.newest_version() is None  # nothing followed, nothing returned
    assert engine.stats["snapshots_refused"] == 1 and engine.stats["snapshots_fetched"] == 0
    assert "refused the snapshot from 127.0.0.1:" in caplog.text

    theta = random_delta(rng, scale=1.0)
    result: list = []
    fetcher = threading.Thread(target=lambda: result.append(engine.fetch_snapshot(timeout=20)))
    fetcher.start()
    wait_until(lambda: engine.stats["snapshots_refused"] >= 3)  # fetched again, with backoff
    assert not result
    harness.set_snapshot(4, theta)
    fetcher.join(timeout=15)
    version, params = result[0]
    assert version == 4 and params["w"].tobytes() == theta["w"].tobytes()
    assert engine.stats["snapshots_fetched"] == 1

    harness.set_snapshot(5, foreign_versions(rng)["another dtype"])  # the timeout ends a wait
    start = time.monotonic()
    with pytest.raises(SnapshotRefusedError, match="has dtype float16"):
        engine.fetch_snapshot(timeout=0.5)
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------ config


def test_config_loads_from_a_table_and_names_bad_keys():
    config = config_from_dict(SyncConfig, {"model_id": "lm", "every": 50, "mode": "sync"})
    assert (config.every, config.mode, config.codec, config.max_pending_pushes) == (
        50,
        "sync",
        "int8",
        8,
    )
    with pytest.raises(ConfigError, match="every: must be positive"):
        config_from_dict(SyncConfig, {"model_id": "lm", "every": 0})
    with pytest.raises(ConfigError, match="mode: must be one of"):
        config_from_dict(SyncConfig, {"model_id": "lm", "mode": "eager"})
    with pytest.raises(ConfigError, match="model_id: set the id"):
        config_from_dict(SyncConfig, {})
    with pytest.raises(ConfigError, match="adopt: must be 'boundary' or 'arrival'"):
        SyncConfig(model_id="lm", adopt="soon").validate()
    with pytest.raises(ConfigError, match="rebase: must be"):
        SyncConfig(model_id="lm", rebase="ahead").validate()
    with pytest.raises(ConfigError, match="outer_lr/outer_momentum"):
        SyncConfig(model_id="lm", rebase="lookahead", outer_momentum=1.0).validate()
    with pytest.raises(ConfigError, match="unknown codec 'int3'"):
        SyncConfig(model_id="lm", codec="int3").validate()
    assert SyncConfig(model_id="lm", codec="sparse2").error_feedback_decay == 0.95
    assert SyncConfig(model_id="lm", codec="topk").error_feedback_decay == 0.95
    assert SyncConfig(model_id="lm", codec="int4").error_feedback_decay == 1.0
    assert SyncConfig(model_id="lm", codec="sparse2", ef_decay=1).error_feedback_decay == 1.0
    for decay in (0, -0.5, 1.01, True, "0.9"):
        with pytest.raises(ConfigError, match="ef_decay: must be in"):
            SyncConfig(model_id="lm", ef_decay=decay).validate()
