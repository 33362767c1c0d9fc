"""The update envelope: round trips, signatures, replay, and hostile bytes.

Decoding must never raise anything but a ``comms.errors`` error: random bytes, every
truncation and every single-bit flip of a valid envelope are tried.
"""

from __future__ import annotations

import dataclasses
import math
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comms import PROTOCOL_VERSION
from comms.envelope import (
    DIGEST_ALGORITHM,
    KINDS,
    MAGIC,
    SIGNING_CONTEXT,
    Envelope,
    header_to_wire,
    parse_header,
    payload_digest,
)
from comms.errors import (
    CommsError,
    ConfigError,
    DigestMismatchError,
    MalformedError,
    OversizeError,
    ProtocolVersionError,
    RejectedError,
    ReplayError,
    ShapeMismatchError,
    SignatureError,
    UnknownPeerError,
)
from comms.identity import Identity, ReplayGuard, Roster

MAX = 1 << 20
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALICE = Identity.generate()  # an island
MALLORY = Identity.generate()  # not in the roster


@pytest.fixture(scope="module")
def roster() -> Roster:
    roster = Roster()
    roster.add(ALICE.public_key, "island", "alice")
    return roster


def small_envelope(sender: Identity = ALICE, sequence: int = 1, **overrides) -> Envelope:
    weights = np.arange(6, dtype=np.float32).reshape(2, 3)
    fields = dict(
        model_id="bytelm",
        kind="delta",
        sender=sender.peer_id,
        sequence=sequence,
        base_version=3,
        created_at=1700000000.5,
        meta={"steps": 500, "tokens": 1024000},
        tensors=[
            ("w", weights.shape, "float32", {"codec": "none"}, weights),
            ("b", (3,), "bfloat16", {"codec": "int8", "block": 64}, b"\x01\x02\x03\x04"),
            ("empty", (0, 4), "float32", {"codec": "none"}, b""),
        ],
    )
    fields.update(overrides)
    return Envelope.build(**fields)


def frame(header: dict, payload: bytes, signature: bytes = b"", version: int = PROTOCOL_VERSION):
    """Lay out an envelope by hand, straight from the documented wire layout."""
    header_bytes = msgpack.packb(header, use_bin_type=True)
    preamble = MAGIC + struct.pack(">HI", version, len(header_bytes))
    return preamble + header_bytes + bytes([len(signature)]) + signature + payload


def decode(data, **kwargs) -> Envelope | CommsError:
    """Decode ``data`` or return the comms error; any other exception fails the test."""
    try:
        return Envelope.from_bytes(data, max_bytes=kwargs.pop("max_bytes", MAX), **kwargs)
    except CommsError as e:
        return e


# ---------------------------------------------------------------- round trips

plain_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
plain_values = st.recursive(
    plain_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
names = st.text(min_size=1, max_size=30)
tensor_lists = st.lists(
    st.tuples(
        names,
        st.lists(st.integers(0, 6), max_size=4).map(tuple),
        st.sampled_from(["float32", "bfloat16", "float16", "int64"]),
        st.dictionaries(st.text(max_size=8), plain_values, max_size=3),
        st.binary(max_size=64),
    ),
    max_size=5,
    unique_by=lambda t: t[0],
)


@FUZZ
@given(
    model_id=names,
    kind=st.sampled_from(KINDS),
    base_version=st.integers(0, (1 << 63) - 1),
    sequence=st.integers(0, (1 << 63) - 1),
    created_at=st.floats(0, 4e9),
    tensors=tensor_lists,
    meta=st.dictionaries(st.text(max_size=12), plain_values, max_size=5),
)
def test_round_trip(model_id, kind, base_version, sequence, created_at, tensors, meta):
    built = Envelope.build(
        model_id=model_id,
        kind=kind,
        sender=ALICE.peer_id,
        sequence=sequence,
        base_version=base_version,
        created_at=created_at,
        tensors=tensors,
        meta=meta,
    ).sign(ALICE)
    wire = built.to_bytes()
    assert len(wire) == built.wire_size
    assert b"".join(built.wire_parts()) == wire

    got = Envelope.from_bytes(wire, max_bytes=len(wire))
    assert got.header == built.header
    assert parse_header(wire) == built.header
    assert got.header.model_id == model_id and got.header.kind == kind
    assert got.header.sequence == sequence and got.header.base_version == base_version
    assert got.header.meta == meta
    assert [s.name for s in got.header.tensors] == [t[0] for t in tensors]
    for name, shape, dtype, codec, data in tensors:
        spec = got.header.tensor(name)
        assert (spec.shape, spec.dtype, spec.codec) == (shape, dtype, codec)
        assert bytes(got.tensor_payload(name)) == data
    roster = Roster()
    roster.add(ALICE.public_key, "island")
    assert got.verify(roster).peer_id == ALICE.peer_id


def test_layout_is_contiguous_and_views_share_the_input_buffer():
    env = small_envelope()
    specs = env.header.tensors
    assert [(s.offset, s.nbytes) for s in specs] == [(0, 24), (24, 4), (28, 0)]
    assert env.header.payload_size == 28
    assert env.header.payload_digest == payload_digest(bytes(env.payload))
    assert env.header.digest == DIGEST_ALGORITHM
    wire = bytearray(env.to_bytes())
    got = Envelope.from_bytes(wire, max_bytes=MAX)
    view = got.tensor_payload("w")
    assert view.obj is wire  # zero-copy: a slice of the caller's buffer
    values = np.frombuffer(view, dtype=np.float32).reshape(specs[0].shape)
    np.testing.assert_array_equal(values, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert [s.name for s, _ in got.tensors()] == ["w", "b", "empty"]
    assert bytes(got.tensor_payload("empty")) == b""


def test_missing_tensor_is_a_shape_mismatch():
    with pytest.raises(ShapeMismatchError, match="no tensor 'nope'"):
        small_envelope().tensor_payload("nope")


def test_parse_header_reads_only_the_prefix():
    env = small_envelope().sign(ALICE)
    prefix, _payload = env.wire_parts()
    assert parse_header(prefix) == env.header
    with pytest.raises(MalformedError, match="truncated"):
        parse_header(prefix[:-1])


# ---------------------------------------------------------------- integrity and authenticity


def test_tampered_payload_is_a_digest_mismatch():
    wire = bytearray(small_envelope().sign(ALICE).to_bytes())
    wire[-5] ^= 0x01
    with pytest.raises(DigestMismatchError, match="digest"):
        Envelope.from_bytes(wire, max_bytes=MAX)


def test_tampered_header_fails_verification(roster):
    env = small_envelope().sign(ALICE)
    forged = header_to_wire(env.header)
    forged["base_version"] = 99  # a still well-formed header: it parses
    wire = frame(forged, bytes(env.payload), env.signature)
    got = Envelope.from_bytes(wire, max_bytes=MAX)
    assert got.header.base_version == 99
    with pytest.raises(SignatureError):
        got.verify(roster)


def test_forged_signature_claiming_another_peer_id(roster):
    env = small_envelope(sender=ALICE)
    forged = dataclasses.replace(env, signature=MALLORY.sign(SIGNING_CONTEXT + env.header_bytes))
    got = Envelope.from_bytes(forged.to_bytes(), max_bytes=MAX)
    with pytest.raises(SignatureError, match="does not verify"):
        got.verify(roster)
    with pytest.raises(ValueError, match="sender"):
        env.sign(MALLORY)  # an identity cannot sign for another sender


def test_signature_without_context_does_not_verify(roster):
    env = small_envelope()
    bare = dataclasses.replace(env, signature=ALICE.sign(env.header_bytes))
    with pytest.raises(SignatureError):
        bare.verify(roster)


def test_unknown_sender_and_wrong_role(roster):
    env = small_envelope(sender=MALLORY).sign(MALLORY)
    with pytest.raises(UnknownPeerError, match="not in the roster"):
        env.verify(roster)
    with pytest.raises(UnknownPeerError, match="role"):
        small_envelope().sign(ALICE).verify(roster, roles=("aggregator",))


def test_unsigned_envelope_is_refused(roster):
    env = Envelope.from_bytes(small_envelope().to_bytes(), max_bytes=MAX)
    assert not env.is_signed
    with pytest.raises(SignatureError, match="not signed"):
        env.verify(roster)


def test_replay_is_refused(roster):
    guard = ReplayGuard()
    wire = small_envelope(sequence=7).sign(ALICE).to_bytes()
    first = Envelope.from_bytes(wire, max_bytes=MAX)
    first.verify(roster, replay_guard=guard)
    guard.commit(first.header.sender, first.header.sequence)
    again = Envelope.from_bytes(wire, max_bytes=MAX)
    with pytest.raises(ReplayError, match="sequence 7"):
        again.verify(roster, replay_guard=guard)
    older = Envelope.from_bytes(small_envelope(sequence=6).sign(ALICE).to_bytes(), max_bytes=MAX)
    with pytest.raises(ReplayError):
        older.verify(roster, replay_guard=guard)
    small_envelope(sequence=8).sign(ALICE).verify(roster, replay_guard=guard)


# ---------------------------------------------------------------- limits and framing errors


def test_oversize_is_refused_before_parsing():
    wire = small_envelope().to_bytes()
    with pytest.raises(OversizeError, match=f"{len(wire)} bytes; the limit is 100"):
        Envelope.from_bytes(wire, max_bytes=100)
    # Garbage is refused for its size, which proves nothing was parsed first.
    with pytest.raises(OversizeError):
        Envelope.from_bytes(b"\xff" * 1000, max_bytes=999)


def test_oversize_header_is_refused_before_reading_it():
    wire = MAGIC + struct.pack(">HI", PROTOCOL_VERSION, 0xFFFFFFFF) + b"\x00" * 10
    with pytest.raises(OversizeError, match="header declares 4294967295 bytes"):
        Envelope.from_bytes(wire, max_bytes=MAX)
    with pytest.raises(OversizeError):
        parse_header(wire)


def test_every_truncation_is_malformed():
    wire = small_envelope().sign(ALICE).to_bytes()
    for end in range(len(wire)):
        with pytest.raises(MalformedError):
            Envelope.from_bytes(wire[:end], max_bytes=MAX)


def test_trailing_bytes_are_malformed():
    wire = small_envelope().to_bytes() + b"\x00"
    with pytest.raises(MalformedError, match="payload_size 28"):
        Envelope.from_bytes(wire, max_bytes=MAX)


def test_other_protocol_version():
    wire = bytearray(small_envelope().to_bytes())
    wire[4:6] = struct.pack(">H", PROTOCOL_VERSION + 1)
    with pytest.raises(ProtocolVersionError) as info:
        Envelope.from_bytes(wire, max_bytes=MAX)
    message = str(info.value)
    assert f"version {PROTOCOL_VERSION + 1}" in message
    assert f"version {PROTOCOL_VERSION}" in message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (b"ARC", "truncated"),
        (b"HTTP/1.1 200 OK\r\n", "magic"),
        ("ARCP text", "bytes-like"),
        (MAGIC + struct.pack(">HI", PROTOCOL_VERSION, 1) + b"\xc1\x00", "not valid msgpack"),
        (MAGIC + struct.pack(">HI", PROTOCOL_VERSION, 1) + b"\x90\x07", "signature length"),
    ],
)
def test_bad_framing(data, message):
    with pytest.raises(MalformedError, match=message):
        Envelope.from_bytes(data, max_bytes=MAX)


# ---------------------------------------------------------------- header fields


def _wire_of(env: Envelope) -> dict:
    return header_to_wire(env.header)


def _tensor(wire: dict, i: int, **changes) -> dict:
    wire["tensors"][i].update(changes)
    return wire


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda w: w.update(sequence=-1), "sequence must be in"),
        (lambda w: w.update(base_version="3"), "base_version must be an int"),
        (lambda w: w.update(kind="gossip"), "kind must be one of"),
        (lambda w: w.update(created_at=math.nan), "created_at"),
        (lambda w: w.update(model_id=""), "model_id must be a non-empty str"),
        (lambda w: w.update(sender=b"alice"), "sender must be a str"),
        (lambda w: w.update(meta=[1, 2]), "meta must be a map"),
        (lambda w: w.update(meta={"x": math.inf}), r"meta\['x'\] must be a finite float"),
        (lambda w: w.update(payload_digest=b"\x00" * 8), "payload_digest must be 32 bytes"),
        (lambda w: w.update(digest="blake2b-256"), "digest must be"),
        (lambda w: w.update(protocol=PROTOCOL_VERSION + 1), "disagrees with the preamble"),
        (lambda w: w.update(tensors={}), "tensors must be a list"),
        (lambda w: w.pop("meta"), r"lacks field\(s\) \['meta'\]"),
        (lambda w: w.update(extra=1), r"unknown field\(s\) \['extra'\]"),
        (lambda w: _tensor(w, 0, shape=[2, -3]), r"tensor 'w' shape\[1\] must be in"),
        (lambda w: _tensor(w, 0, shape="2x3"), "tensor 'w' shape must be a list"),
        (lambda w: _tensor(w, 0, dtype=""), "tensor 'w' dtype"),
        (lambda w: _tensor(w, 0, codec=None), "tensor 'w' codec must be a map"),
        (lambda w: _tensor(w, 1, name=""), r"tensors\[1\].name must be a non-empty str"),
        (lambda w: _tensor(w, 1, name="w"), "'w' appears twice"),
        (lambda w: w["tensors"][0].pop("nbytes"), r"lacks field\(s\) \['nbytes'\]"),
        (lambda w: _tensor(w, 1, offset=20), "overlaps the previous tensor, which ends at 24"),
        (lambda w: _tensor(w, 1, offset=25), "leaves a gap"),
        (lambda w: _tensor(w, 2, nbytes=1), "outside the payload of 28 bytes"),
        (lambda w: _tensor(w, 2, offset=1 << 62), "leaves a gap"),
        (lambda w: w.update(payload_size=30), "tensors cover 28 bytes but payload_size is 30"),
    ],
)
def test_bad_header_fields_are_named(mutate, message):
    env = small_envelope()
    wire = _wire_of(env)
    mutate(wire)
    with pytest.raises(MalformedError, match=message):
        Envelope.from_bytes(frame(wire, bytes(env.payload)), max_bytes=MAX)


def test_non_str_map_keys_and_ext_types_are_malformed():
    env = small_envelope()
    wire = _wire_of(env)
    wire["meta"] = {1: "x"}
    with pytest.raises(MalformedError, match="msgpack"):
        Envelope.from_bytes(frame(wire, bytes(env.payload)), max_bytes=MAX)
    wire["meta"] = {"t": msgpack.ExtType(5, b"data")}
    with pytest.raises(MalformedError, match=r"meta\['t'\]"):
        Envelope.from_bytes(frame(wire, bytes(env.payload)), max_bytes=MAX)


def test_build_refuses_what_a_receiver_would():
    with pytest.raises(MalformedError, match="kind"):
        small_envelope(kind="gossip")
    with pytest.raises(MalformedError, match=r"meta\['lr'\]"):
        small_envelope(meta={"lr": math.nan})
    with pytest.raises(MalformedError, match="appears twice"):
        small_envelope(tensors=[("a", (1,), "float32", {}, b"1"), ("a", (1,), "float32", {}, b"2")])
    with pytest.raises(MalformedError, match="sequence"):
        small_envelope(sequence=-1)


def test_expected_nbytes_hook():
    wire = small_envelope().to_bytes()

    def four_bytes_per_element(spec: dict, shape: tuple[int, ...]) -> int | None:
        if spec["codec"] != "none":
            return None  # this hook only knows the identity codec
        return 4 * math.prod(shape)

    assert Envelope.from_bytes(wire, max_bytes=MAX, expected_nbytes=four_bytes_per_element)
    with pytest.raises(MalformedError, match=r"tensor 'w' has 24 payload bytes; .* imply 48"):
        Envelope.from_bytes(wire, max_bytes=MAX, expected_nbytes=lambda spec, shape: 48)
    with pytest.raises(MalformedError, match="codec spec of tensor 'w' is invalid"):
        Envelope.from_bytes(wire, max_bytes=MAX, expected_nbytes=lambda spec, shape: spec["bits"])

    def unknown_codec(spec: dict, shape: tuple[int, ...]) -> int:
        raise ConfigError(f"unknown codec {spec['codec']!r}")  # a local error type...

    with pytest.raises(MalformedError, match="unknown codec 'none'"):  # ...becomes a rejection
        Envelope.from_bytes(wire, max_bytes=MAX, expected_nbytes=unknown_codec)

    def refuse(spec: dict, shape: tuple[int, ...]) -> int:
        raise ShapeMismatchError("no such parameter")

    with pytest.raises(ShapeMismatchError):  # the hook's own rejections pass through
        Envelope.from_bytes(wire, max_bytes=MAX, expected_nbytes=refuse)


# ---------------------------------------------------------------- hostile bytes


def test_every_single_bit_flip_is_caught(roster):
    wire = small_envelope().sign(ALICE).to_bytes()
    for bit in range(len(wire) * 8):
        corrupted = bytearray(wire)
        corrupted[bit // 8] ^= 1 << (bit % 8)
        got = decode(corrupted)
        if isinstance(got, Envelope):
            # It parsed (e.g. a flipped float or signature bit): authentication must catch it.
            with pytest.raises(RejectedError):
                got.verify(roster)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data):
    assert isinstance(decode(data), CommsError)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_after_a_valid_preamble(data):
    wire = MAGIC + struct.pack(">HI", PROTOCOL_VERSION, len(data)) + data
    assert isinstance(decode(wire), CommsError)


@FUZZ
@given(position=st.integers(0, 10_000), junk=st.binary(min_size=1, max_size=16))
def test_random_overwrites(roster, position, junk):
    original = small_envelope().sign(ALICE).to_bytes()  # Ed25519 is deterministic
    wire = bytearray(original)
    at = position % len(wire)
    wire[at : at + len(junk)] = junk
    got = decode(wire)
    if isinstance(got, Envelope) and bytes(wire) != original:
        with pytest.raises(RejectedError):
            got.verify(roster)


@FUZZ
@given(
    key=st.sampled_from(
        [
            *("protocol", "model_id", "kind", "base_version", "sender", "sequence"),
            *("created_at", "tensors", "payload_size", "payload_digest", "digest", "meta"),
        ]
    ),
    value=plain_values,
)
def test_random_field_values(key, value):
    env = small_envelope()
    wire = _wire_of(env)
    wire[key] = value
    assert isinstance(decode(frame(wire, bytes(env.payload))), (CommsError, Envelope))


@FUZZ
@given(
    index=st.integers(0, 2),
    key=st.sampled_from(["name", "shape", "dtype", "codec", "offset", "nbytes"]),
    value=plain_values,
)
def test_random_tensor_field_values(index, key, value):
    env = small_envelope()
    wire = _wire_of(env)
    wire["tensors"][index][key] = value
    got = decode(frame(wire, bytes(env.payload)), expected_nbytes=lambda spec, shape: spec["x"])
    assert isinstance(got, CommsError)  # the hook always trips on these specs


@FUZZ
@given(header=plain_values)
def test_random_headers(header):
    assert isinstance(decode(frame(header, b"")), CommsError)
