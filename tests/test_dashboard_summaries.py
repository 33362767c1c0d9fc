"""Dashboard summaries on their own channel (``aggregator.dashboard.summaries``): a leaf's
summary reaches the root on a timer, through a mid and across a root restart, never enters a
WAL, and a forged, unsigned, malformed, oversized or replayed one is refused with its typed
error while the root carries on. Real aggregator services on loopback (port 0)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from aggtools import make_federation, random_delta
from test_aggregator_service import wait_for
from test_dashboard import leaf_config, push_bytes, seen_at_root

from aggregator.dashboard.summaries import summary_envelope
from aggregator.service import AggregatorService
from comms.envelope import Envelope, _pack_header
from comms.errors import (
    MalformedError,
    OversizeError,
    ReplayError,
    SignatureError,
    UnknownPeerError,
)
from comms.identity import Identity
from comms.transport import TransportClient


async def test_an_idle_leafs_islands_stay_on_the_roots_page(tmp_path):
    """An island pushes once to a leaf that will not flush for a minute (K = 10): no partial
    goes up, yet the root lists the island, and the leaf's record there stays fresh."""
    fed = make_federation(tmp_path, 1)
    root = AggregatorService(fed.config("root", "root", buffer_k=1))
    leaf = AggregatorService(leaf_config(fed, await root.start(), buffer_k=10))
    await leaf.start()
    try:
        async with TransportClient(leaf.address, identity=fed.islands[0]) as c:
            report = {"step": 7, "train_loss": 2.5}
            await c.push(push_bytes(fed.islands[0], random_delta(fed.theta0, 0), 1,
                                    {"report": report}))  # fmt: skip
        await wait_for(lambda: [r["name"] for r in root.view.snapshot(root)["islands"]] != [])
        await asyncio.sleep(0.5)  # the summary that first listed the island is now 0.5 s old
        snaps = []  # a busy machine may delay a summary, not stop them: wait for a fresh one

        def leaf_record_fresh() -> bool:
            snaps[:] = [root.view.snapshot(root)]
            leaf_rec = next(a for a in snaps[-1]["aggregators"] if a["name"] == "leaf0")
            return leaf_rec["age_s"] < 0.4  # refreshed on the timer, not by a partial

        await wait_for(leaf_record_fresh)
        snap = snaps[-1]
        assert leaf.lines["global"].partial_seq == 0 and root.lines["global"].version == 0
    finally:
        await leaf.stop()
        await root.stop()
    [island] = snap["islands"]
    assert island["name"] == "island0" and island["leaf"] == "leaf0" and island["step"] == 7
    assert island["alive"] and island["pushes"] == 1
    leaf_rec = next(a for a in snap["aggregators"] if a["name"] == "leaf0")
    assert leaf_rec["parent"] == "root" and leaf_rec["buffered"] == 1


async def test_a_mid_forwards_its_leafs_summary_so_the_root_draws_the_whole_tree(tmp_path):
    """root <- mid0 <- leaf0 <- island0, no partial sent anywhere (K = 10): the root's page
    holds the island (at leaf0), leaf0 under mid0 and mid0 under the root."""
    fed = make_federation(tmp_path, 1, aggregators=("root", "mid0", "leaf0"))
    root = AggregatorService(fed.config("root", "root", buffer_k=10))
    mid_cfg = fed.config("mid0", "mid", parent=await root.start(), buffer_k=10)
    mid_cfg.summary_interval_s = 0.1
    mid = AggregatorService(mid_cfg)
    leaf = AggregatorService(leaf_config(fed, await mid.start(), buffer_k=10))
    await leaf.start()
    try:
        async with TransportClient(leaf.address, identity=fed.islands[0]) as c:
            await c.push(push_bytes(fed.islands[0], random_delta(fed.theta0, 0), 1,
                                    {"report": {"step": 4}}))  # fmt: skip
        await wait_for(lambda: len(root.view.snapshot(root)["islands"]) == 1)
        await wait_for(lambda: seen_at_root(root, "leaf0", parent="mid0", buffered=1))
        snap = root.view.snapshot(root)
    finally:
        await leaf.stop()
        await mid.stop()
        await root.stop()
    parents = {a["name"]: a.get("parent") for a in snap["aggregators"]}
    assert parents == {"root": None, "mid0": "root", "leaf0": "mid0"}
    [island] = snap["islands"]
    assert island["name"] == "island0" and island["leaf"] == "leaf0" and island["step"] == 4


async def test_a_restarted_root_sees_the_leaf_again_at_its_next_summary(tmp_path):
    """The root stops while its leaf keeps sending summaries (each refused by a dead link,
    logged once); the restarted root, which kept nothing of them, lists the island again."""
    fed = make_federation(tmp_path, 1)
    root_cfg = fed.config("root", "root", buffer_k=10)
    root = AggregatorService(root_cfg)
    root_cfg.listen = await root.start()  # the restarted root listens where the leaf dials
    leaf = AggregatorService(leaf_config(fed, root_cfg.listen, buffer_k=10))
    await leaf.start()
    try:
        async with TransportClient(leaf.address, identity=fed.islands[0]) as c:
            await c.push(push_bytes(fed.islands[0], random_delta(fed.theta0, 0), 1))
        await wait_for(lambda: len(root.view.snapshot(root)["islands"]) == 1)
        await root.stop()
        await asyncio.sleep(0.5)  # summaries fail meanwhile
        root = AggregatorService(root_cfg)
        await root.start()
        assert root.view.snapshot(root)["islands"] == []  # nothing of them was kept
        await wait_for(lambda: len(root.view.snapshot(root)["islands"]) == 1)
        assert leaf._tasks and not any(t.done() for t in leaf._tasks)  # the leaf carried on
    finally:
        await leaf.stop()
        await root.stop()


async def test_the_roots_wal_holds_no_summary_bytes(tmp_path):
    """Partials flow (K = 1 at the leaf) while summaries go up every 0.1 s: the root's
    dashboard shows the islands, and nothing the summaries carry is in the root's WAL or
    anywhere in its state directory."""
    fed = make_federation(tmp_path, 2)
    root = AggregatorService(fed.config("root", "root", buffer_k=1))
    leaf = AggregatorService(leaf_config(fed, await root.start(), buffer_k=1))
    await leaf.start()
    try:
        async with TransportClient(leaf.address, identity=fed.islands[0]) as c:
            for i in range(2):
                report = {"step": 5, "steps_per_s": 1.5, "train_loss": 3.0}
                await c.push(push_bytes(fed.islands[i], random_delta(fed.theta0, i), 1,
                                        {"steps": 5, "every": 5, "report": report}))  # fmt: skip
                await wait_for(lambda i=i: root.lines["global"].version == i + 1)
        await wait_for(lambda: len(root.view.snapshot(root)["islands"]) == 2)
        await wait_for(lambda: seen_at_root(root, "leaf0", partials_sent=2))
        wal_records = root.lines["global"].wal.last_index
    finally:
        await leaf.stop()
        await root.stop()
    assert wal_records == 2  # the two partials, and nothing else
    wal = b"".join(p.read_bytes() for p in (tmp_path / "state" / "root" / "wal").rglob("*")
                   if p.is_file())  # fmt: skip
    assert len(wal) > 2 * 4 * (32 * 16 + 16)  # the partials' tensors are there
    state = b"".join(p.read_bytes() for p in (tmp_path / "state" / "root").rglob("*")
                     if p.is_file())  # fmt: skip
    for telltale in (b"summary", b"island0", b"island1", b"leaf0", b"steps_per_s", b"train_loss"):
        assert telltale not in wal and telltale not in state, telltale


def summary_bytes(ident, summary, sequence, sign=True) -> bytes:
    env = Envelope.build(model_id="*", kind="summary", sender=ident.peer_id, sequence=sequence,
                         tensors=[], meta={"summary": summary})  # fmt: skip
    return (env.sign(ident) if sign else env).to_bytes()


async def test_a_forged_unsigned_or_bad_summary_is_refused_and_the_root_carries_on(tmp_path):
    """Straight at the root's Report call: every bad summary gets its typed error, nothing of
    it shows or reaches the WAL, and a good one is still taken after them."""
    fed = make_federation(tmp_path, 1)
    root = AggregatorService(fed.config("root", "root", buffer_k=1))
    await root.start()
    leaf_key, stranger = fed.aggregators["leaf0"], Identity.generate()
    fake = {
        "aggregators": [{"name": "fake", "peer": "p"}],
        "islands": [{"name": "x", "age_s": 1.0}],
    }
    summary_envelope(leaf_key, fake, 1)  # the leaf's own encoder takes it
    forged = Envelope.from_bytes(summary_bytes(stranger, fake, 1), max_bytes=1 << 20)
    claimed = dataclasses.replace(forged.header, sender=leaf_key.peer_id)  # leaf0's name, not key
    forged = Envelope(claimed, _pack_header(claimed), forged.payload, forged.signature)
    huge = {"islands": [{"name": "x" * 60, "age_s": 1.0, "peer": "p" * 60}] * 20_000}
    cases = [
        (summary_bytes(leaf_key, fake, 1, sign=False), SignatureError, "not signed"),
        (summary_bytes(stranger, fake, 1), UnknownPeerError, "not in the roster"),
        (summary_bytes(fed.islands[0], fake, 1), UnknownPeerError, "role"),
        (forged.to_bytes(), SignatureError, "signature"),
        (
            summary_bytes(leaf_key, {"islands": [{"name": "x", "age_s": -1.0}]}, 2),
            MalformedError,
            r"islands\[0\]\.age_s",
        ),
        (push_bytes(leaf_key, random_delta(fed.theta0, 0), 3), MalformedError, "summary"),
        (summary_bytes(leaf_key, huge, 4, sign=False), OversizeError, "at most"),
        (b"not an envelope" * 4, MalformedError, "magic"),
    ]
    try:
        async with TransportClient(root.address, identity=leaf_key) as c:
            for data, error, match in cases:
                with pytest.raises(error, match=match):
                    await c.report(data, retries=0)
            assert await c.report(summary_bytes(leaf_key, fake, 5), retries=0) == {"status": "kept"}
            with pytest.raises(ReplayError):  # the same summary again
                await c.report(summary_bytes(leaf_key, fake, 5), retries=0)
            with pytest.raises(MalformedError, match="not Push"):
                await c.push(summary_bytes(leaf_key, fake, 6), retries=0)
            snap = root.view.snapshot(root)
            assert root.lines["global"].wal.last_index == 0
            assert root.server.stats.rejected.get("oversize") == 1  # refused before parsing
    finally:
        await root.stop()
    assert {a["name"] for a in snap["aggregators"]} == {"root", "fake"}  # the good one alone
    assert [r["name"] for r in snap["islands"]] == ["x"]
    # each refusal the handler saw, with the replay; the transport refused the oversized one
    assert snap["bad_reports"] == len(cases) - 1 + 1
    reasons = [r["reason"] for r in snap["rejections"]]
    assert {"signature", "unknown_peer", "malformed", "replay"} <= set(reasons)
