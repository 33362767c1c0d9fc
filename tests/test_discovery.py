"""Discovery over a real two-node hivemind DHT on loopback, plus the pure record checks."""

from __future__ import annotations

import time

import pytest

from comms.discovery import (
    KEY_PREFIX,
    MAX_FIELDS_BYTES,
    Discovery,
    decode_record,
    encode_record,
    signed_payload,
)
from comms.errors import (
    ConfigError,
    MalformedError,
    OversizeError,
    SignatureError,
    StaleError,
    UnknownPeerError,
)
from comms.identity import Identity, Roster


@pytest.fixture(scope="module")
def pair():
    """Node A (bootstrap) and node B joined to it, each with its own identity."""
    a = Discovery.start(Identity.generate(), timeout=20)
    try:
        b = Discovery.start(Identity.generate(), initial_peers=a.bootstrap_addresses(), timeout=20)
    except BaseException:
        a.shutdown()
        raise
    yield a, b
    b.shutdown()
    a.shutdown()


def raw_store(node: Discovery, kind: str, name: str, value: dict) -> None:
    """Write a value straight into the DHT, bypassing Discovery's signing."""
    assert node.dht.store(KEY_PREFIX + kind, value, value["exp"], subkey=name)


# ------------------------------------------------------------------ pure record checks


def test_encode_decode_round_trip_and_tamper():
    ident = Identity.generate()
    fields = {"address": "10.0.0.1:5000", "load": 0.5, "model_ids": ("m1", "m2"), "x": b"\x00"}
    value = encode_record(ident, "island", ident.peer_id, fields, expiration=1000.0)
    rec = decode_record("island", ident.peer_id, value, 1000.0, now=999.0)
    assert rec.owner == ident.peer_id
    assert rec.fields == {
        "address": "10.0.0.1:5000",
        "load": 0.5,
        "model_ids": ["m1", "m2"],
        "x": b"\x00",
    }
    assert rec.expiration == 1000.0

    with pytest.raises(StaleError):
        decode_record("island", ident.peer_id, value, 1000.0, now=1000.5)
    with pytest.raises(SignatureError):  # re-stored to live longer than signed
        decode_record("island", ident.peer_id, value, 2000.0, now=999.0)
    tampered = {**value, "fields": {**value["fields"], "address": "6.6.6.6:1"}}
    with pytest.raises(SignatureError):
        decode_record("island", ident.peer_id, tampered, 1000.0, now=999.0)
    with pytest.raises(SignatureError):  # same bytes, read as another kind
        decode_record("expert", ident.peer_id, value, 1000.0, now=999.0)


def test_signed_payload_is_canonical():
    a = signed_payload("model", "m", {"b": 1, "a": (1, 2), "c": {"y": 1, "x": 2}}, 5.0)
    b = signed_payload("model", "m", {"c": {"x": 2, "y": 1}, "a": [1, 2], "b": 1}, 5)
    assert a == b


def test_bad_fields_are_rejected_with_typed_errors():
    ident = Identity.generate()
    with pytest.raises(MalformedError, match="plain data"):
        encode_record(ident, "model", "m", {"w": object()}, 1.0)
    nested: list = []
    for _ in range(100):
        nested = [nested]
    with pytest.raises(MalformedError, match="nested"):
        encode_record(ident, "model", "m", {"w": nested}, 1.0)
    with pytest.raises(MalformedError, match="non-finite"):
        encode_record(ident, "model", "m", {"w": float("nan")}, 1.0)
    with pytest.raises(OversizeError):
        encode_record(ident, "model", "m", {"w": b"x" * (MAX_FIELDS_BYTES + 1)}, 1.0)
    with pytest.raises(MalformedError, match="role"):
        encode_record(ident, "aggregator", "a", {"address": "h:1", "role": "boss"}, 1.0)
    with pytest.raises(MalformedError, match="model_ids"):
        encode_record(
            ident, "aggregator", "a", {"address": "h:1", "role": "root", "model_ids": "lm"}, 1.0
        )
    with pytest.raises(MalformedError, match="address"):
        encode_record(ident, "island", ident.peer_id, {}, 1.0)
    with pytest.raises(MalformedError, match="kind"):
        encode_record(ident, "Bad Kind", "n", {}, 1.0)
    with pytest.raises(MalformedError):
        decode_record("model", "m", "not a dict", 1.0, now=0.0)


# ------------------------------------------------------------------ real DHT


def test_b_finds_records_announced_by_a(pair):
    a, b = pair
    island_fields = {"address": "127.0.0.1:7001", "model_ids": ["lm"], "gpus": 0}
    agg_fields = {"address": "127.0.0.1:7100", "role": "leaf", "load": 0.25, "model_ids": ["lm"]}
    a.announce("island", a.identity.peer_id, island_fields, ttl=30)
    a.announce("aggregator", "leaf-0", agg_fields, ttl=30)

    islands = b.lookup("island", timeout=10)
    mine = [r for r in islands if r.name == a.identity.peer_id]
    assert len(mine) == 1
    assert mine[0].fields == island_fields
    assert mine[0].owner == a.identity.peer_id
    assert mine[0].public_key == a.identity.public_key

    agg = b.lookup_one("aggregator", "leaf-0", timeout=10)
    assert agg is not None
    assert agg.fields == agg_fields
    assert agg.owner == a.identity.peer_id
    assert b.lookup_one("aggregator", "no-such-name") is None


def test_forged_records_are_dropped(pair):
    a, b = pair
    victim, forger = a.identity, Identity.generate()
    exp = time.time() + 30

    # 1. Claims the victim's key, signed by another key.
    value = encode_record(forger, "expert", "forged-key", {"address": "6.6.6.6:1"}, exp)
    raw_store(a, "expert", "forged-key", {**value, "pk": victim.public_key})
    # 2. Signed by the victim, fields changed afterwards.
    value = encode_record(victim, "expert", "tampered", {"address": "127.0.0.1:1"}, exp)
    raw_store(a, "expert", "tampered", {**value, "fields": {"address": "6.6.6.6:1"}})
    # 3. A validly signed island record whose name is someone else's peer id.
    other = Identity.generate().peer_id
    raw_store(a, "island", other, encode_record(forger, "island", other, {"address": "x:1"}, exp))
    # 4. A genuine record next to them survives.
    a.announce("expert", "genuine", {"cluster": 3}, ttl=30)

    before = b.dropped.copy()
    experts = b.lookup("expert", timeout=10)
    assert [r.name for r in experts] == ["genuine"]
    assert experts[0].fields == {"cluster": 3}
    assert all(r.name != other for r in b.lookup("island", timeout=10))
    assert b.dropped["signature"] - before["signature"] == 2
    assert b.dropped["unknown_peer"] - before["unknown_peer"] == 1


def test_expired_record_disappears_and_announcer_keeps_one_alive(pair):
    """TTLs long enough that a busy machine still sees both records before either expires;
    the kept record is checked only after it has outlived its own TTL, so it is there only
    because the announcer renewed it."""
    a, b = pair
    short_ttl, kept_ttl = 2.5, 1.5
    announced_at = time.monotonic()
    a.announce("model", "short-lived", {"version": 7}, ttl=short_ttl)
    kept = a.keep_announced("model", "kept", lambda: {"version": 8}, ttl=kept_ttl, interval=0.25)
    try:
        assert {r.name for r in b.lookup("model", timeout=10)} >= {"short-lived", "kept"}
        deadline = announced_at + short_ttl + 10
        while b.lookup_one("model", "short-lived") is not None:
            assert time.monotonic() < deadline, "expired record still visible"
            time.sleep(0.1)
        assert time.monotonic() - announced_at > kept_ttl  # past the first announcement's TTL
        kept_record = b.lookup_one("model", "kept")
        assert kept_record is not None
        assert kept_record.fields == {"version": 8}
        assert kept.failures == 0
    finally:
        kept.stop()


def test_roster_restricts_owners(pair):
    a, b = pair
    outsider = Discovery(a.dht, Identity.generate())
    insider = Discovery(a.dht, Identity.generate())
    outsider.announce("island", outsider.identity.peer_id, {"address": "o:1"}, ttl=30)
    insider.announce("island", insider.identity.peer_id, {"address": "i:1"}, ttl=30)

    roster = Roster()
    roster.add(insider.identity.public_key, "island")
    roster.add(a.identity.public_key, "aggregator")  # wrong role for an island record
    restricted = Discovery(b.dht, b.identity, roster)
    names = {r.name for r in restricted.lookup("island", timeout=10)}
    assert insider.identity.peer_id in names
    assert outsider.identity.peer_id not in names
    assert a.identity.peer_id not in names
    assert restricted.dropped["unknown_peer"] >= 2
    # Without the roster, B sees the outsider too.
    assert outsider.identity.peer_id in {r.name for r in b.lookup("island", timeout=10)}


def test_bad_ttl_is_a_config_error(pair):
    a, _ = pair
    with pytest.raises(ConfigError, match="ttl"):
        a.announce("model", "m", {}, ttl=0)
    with pytest.raises(UnknownPeerError):
        decode_record(
            "island",
            "someone-else",
            encode_record(a.identity, "island", "someone-else", {"address": "h:1"}, 10.0),
            10.0,
            now=1.0,
        )


def test_dht_links_run_libp2p_tls(pair):
    """The DHT's p2pd (hivemind's libp2p daemon) is started with TLS 1.3 channel security
    (hivemind.P2P's default, ``-tls=1``): records and lookups between nodes are encrypted, and
    each end is authenticated by its libp2p peer ID; records are signed by roster keys on top."""
    from comms.discovery import p2pd_children

    for node in pair:
        daemons = p2pd_children(node.dht.pid)
        assert len(daemons) == 1, daemons
        with open(f"/proc/{daemons[0][0]}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert b"-tls=1" in argv, argv
