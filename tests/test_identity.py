"""Ed25519 identities, the roster and replay protection (comms/identity.py)."""

from __future__ import annotations

import json
import stat
import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448

from comms.errors import ConfigError, ReplayError, SignatureError, UnknownPeerError
from comms.identity import (
    ROLES,
    Identity,
    ReplayGuard,
    Roster,
    RosterEntry,
    peer_id_of,
    verify_signature,
)


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.generate()


# ---------------------------------------------------------------- identities and signatures


def test_peer_id_is_derived_from_the_public_key(alice, bob):
    assert len(alice.public_key) == 32
    assert alice.peer_id == peer_id_of(alice.public_key)
    assert len(alice.peer_id) == 32 and int(alice.peer_id, 16) >= 0
    assert alice.peer_id != bob.peer_id


def test_sign_and_verify(alice, bob):
    signature = alice.sign(b"hello")
    assert len(signature) == 64
    verify_signature(alice.public_key, signature, b"hello")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(alice.public_key, signature, b"hellO")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(bob.public_key, signature, b"hello")
    with pytest.raises(SignatureError, match="64 bytes"):
        verify_signature(alice.public_key, signature[:63], b"hello")
    with pytest.raises(SignatureError):
        verify_signature(b"\x00" * 5, signature, b"hello")  # not a public key at all


def test_save_load_round_trip_with_0600(tmp_path, alice):
    path = tmp_path / "keys" / "node.pem"
    alice.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Identity.load(path)
    assert loaded.public_key == alice.public_key
    assert loaded.peer_id == alice.peer_id
    verify_signature(alice.public_key, loaded.sign(b"x"), b"x")
    assert not path.with_suffix(".pem.tmp").exists()


def test_load_or_create_is_stable(tmp_path):
    path = tmp_path / "id.pem"
    first = Identity.load_or_create(path)
    assert path.exists()
    assert Identity.load_or_create(path).peer_id == first.peer_id


def _pem(key, password: bytes | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda: _pem(ed448.Ed448PrivateKey.generate()), "not an Ed25519 key"),
        (lambda: _pem(ec.generate_private_key(ec.SECP256R1())), "not an Ed25519 key"),
        (lambda: b"just some text", "not an unencrypted PEM"),
        (lambda: _pem(Identity.generate()._key, b"secret"), "not an unencrypted PEM"),
    ],
    ids=["ed448", "ecdsa", "garbage", "encrypted"],
)
def test_load_refuses_wrong_key_files(tmp_path, content, message):
    path = tmp_path / "key.pem"
    path.write_bytes(content())
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=message) as info:
        Identity.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_a_key_file_that_group_or_others_may_read(tmp_path, alice, mode):
    path = tmp_path / "node.pem"
    alice.save(path)
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        Identity.load(path)
    message = str(info.value)
    assert str(path) in message
    assert f"{mode:04o}" in message
    assert f"chmod 600 {path}" in message
    path.chmod(0o600)
    assert Identity.load(path).peer_id == alice.peer_id


def test_open_key_files_are_accepted_when_the_environment_allows_them(tmp_path, alice, monkeypatch):
    path = tmp_path / "node.pem"
    alice.save(path)
    path.chmod(0o644)
    monkeypatch.setenv("ARCHIPELAGO_ALLOW_OPEN_KEYS", "1")
    assert Identity.load(path).peer_id == alice.peer_id
    monkeypatch.setenv("ARCHIPELAGO_ALLOW_OPEN_KEYS", "0")  # only "1" opens the hatch
    with pytest.raises(ConfigError, match="chmod 600"):
        Identity.load(path)


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="cannot read key file"):
        Identity.load(tmp_path / "absent.pem")


# ---------------------------------------------------------------- roster


def test_roster_json_round_trip(tmp_path, alice, bob):
    roster = Roster()
    assert roster.add(alice.public_key, "island", "alice") == alice.peer_id
    roster.add(bob.public_key, "aggregator")
    path = tmp_path / "roster.json"
    roster.save(path)
    loaded = Roster.load(path)
    assert len(loaded) == 2
    assert loaded.get(alice.peer_id) == RosterEntry(
        alice.peer_id, alice.public_key, "island", "alice"
    )
    assert loaded.get(bob.peer_id).role == "aggregator"
    assert json.loads(loaded.to_json()) == json.loads(roster.to_json())


def test_roster_role_checks(alice, bob):
    roster = Roster()
    roster.add(alice.public_key, "island")
    assert alice.peer_id in roster and bob.peer_id not in roster
    assert roster.require(alice.peer_id).role == "island"
    assert roster.require(alice.peer_id, ("island", "admin")).peer_id == alice.peer_id
    with pytest.raises(UnknownPeerError, match="needs one of"):
        roster.require(alice.peer_id, ("aggregator",))
    with pytest.raises(UnknownPeerError, match="not in the roster"):
        roster.require(bob.peer_id)


def test_roster_verify(alice, bob):
    roster = Roster()
    roster.add(alice.public_key, "aggregator")
    data = b"partial sum"
    assert roster.verify(alice.peer_id, alice.sign(data), data).role == "aggregator"
    with pytest.raises(SignatureError):
        roster.verify(alice.peer_id, bob.sign(data), data)  # bob claims alice's id
    with pytest.raises(UnknownPeerError):
        roster.verify(alice.peer_id, alice.sign(data), data, roles=("admin",))
    with pytest.raises(UnknownPeerError):
        roster.verify(bob.peer_id, bob.sign(data), data)


def test_roster_refuses_bad_entries(alice):
    roster = Roster()
    with pytest.raises(ConfigError, match="role must be one of"):
        roster.add(alice.public_key, "king")
    with pytest.raises(ConfigError, match="not 32 bytes"):
        roster.add(alice.public_key[:31], "island")
    with pytest.raises(ConfigError, match="does not match"):
        Roster([RosterEntry("0" * 32, alice.public_key, "island")])
    assert set(ROLES) == {"island", "aggregator", "admin"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"peers": [{"role": "island"}]}', r"peers\[0\] is invalid"),
        ('{"peers": [{"public_key": "zz", "role": "island"}]}', r"peers\[0\] is invalid"),
        ('{"peers": [{"public_key": 7, "role": "island"}]}', r"peers\[0\] is invalid"),
    ],
)
def test_roster_load_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "roster.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        Roster.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match="cannot read roster"):
        Roster.load(tmp_path / "absent.json")


# ---------------------------------------------------------------- replay guard


def test_replay_guard_check_only_reads():
    guard = ReplayGuard()
    guard.check("a", 5)
    guard.check("a", 5)  # not committed: the same message may be offered again
    assert guard.last("a") is None
    guard.commit("a", 5)
    assert guard.last("a") == 5
    for seq in (5, 4, 0):
        with pytest.raises(ReplayError, match="not above the last accepted"):
            guard.check("a", seq)
    guard.check("a", 6)
    guard.check("b", 0)  # senders are independent


def test_replay_guard_commit_never_moves_back():
    guard = ReplayGuard()
    guard.commit("a", 9)
    guard.commit("a", 3)
    assert guard.last("a") == 9


def test_replay_guard_check_and_commit():
    guard = ReplayGuard()
    guard.check_and_commit("a", 1)
    with pytest.raises(ReplayError):
        guard.check_and_commit("a", 1)
    guard.check_and_commit("a", 7)
    assert guard.last("a") == 7


def test_replay_guard_state_round_trip():
    guard = ReplayGuard()
    guard.commit("a", 3)
    guard.commit("b", 10)
    state = guard.state()
    assert state == {"a": 3, "b": 10}
    state["a"] = 100  # a copy: mutating it does not touch the guard
    assert guard.last("a") == 3
    restored = ReplayGuard(json.loads(json.dumps(guard.state())))
    with pytest.raises(ReplayError):
        restored.check("b", 10)
    restored.check("b", 11)
    assert restored.state() == guard.state()


def test_replay_guard_check_and_commit_admits_each_sequence_once_across_threads():
    guard = ReplayGuard()
    accepted: list[int] = []
    lock = threading.Lock()

    def offer(seq: int) -> None:
        try:
            guard.check_and_commit("a", seq)
        except ReplayError:
            return
        with lock:
            accepted.append(seq)

    threads = [threading.Thread(target=offer, args=(1,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert accepted == [1]
