"""The ``sparse2`` codec: per-chunk top-k at 2 bits, its payload checks, and error feedback.

Shared properties (shapes, dtypes, torch input, NaN refusal, spec round trip, the hypothesis
round trip) run for every codec in ``tests/test_codecs.py``; this file checks what is
particular to ``sparse2``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from comms.codecs import ErrorFeedback, Sparse2Codec, get_codec
from comms.envelope import Envelope
from comms.errors import ConfigError, MalformedError, NonFiniteError
from comms.update import Manifest, decode_update, encode_update, expected_nbytes

F32_U = 2.0**-24  # unit roundoff of float32


def reference_kept(x: np.ndarray, codec: Sparse2Codec) -> np.ndarray:
    """Indices of each chunk's k largest |x|, by a plain sort (the codec uses argpartition)."""
    flat = x.reshape(-1)
    out = []
    for start in range(0, flat.size, codec.chunk):
        part = np.abs(flat[start : start + codec.chunk])
        k = codec.kept_per_chunk(part.size)
        out.append(start + np.sort(np.argsort(-part, kind="stable")[:k]))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Spec, sizes, layout
# --------------------------------------------------------------------------------------------


def test_spec_defaults_and_bad_parameters() -> None:
    assert get_codec("sparse2").spec() == {"name": "sparse2", "density": 0.02, "chunk": 4096}
    assert get_codec("sparse2", density=0.01, chunk=1024).params() == {
        "density": 0.01,
        "chunk": 1024,
    }
    for bad in ({"density": 0.0}, {"density": 1.5}, {"density": True}, {"density": "0.02"},
                {"chunk": 0}, {"chunk": 65537}, {"chunk": 4.5}):  # fmt: skip
        with pytest.raises(ConfigError, match="sparse2"):
            get_codec("sparse2", **bad)


def test_payload_size_by_hand() -> None:
    codec = get_codec("sparse2")  # density 0.02, chunk 4096
    assert [codec.kept_per_chunk(n) for n in (0, 1, 49, 50, 51, 100, 4096)] == [
        0, 1, 1, 1, 2, 2, 82,
    ]  # fmt: skip
    # 10000 = 2 chunks of 4096 (82 kept each) + 1808 (ceil(36.16) = 37 kept): 201 kept
    assert codec.encoded_nbytes(10_000) == 8 * 3 + 2 * 201 + 51
    assert codec.encoded_nbytes(1) == 8 + 2 + 1
    assert codec.encoded_nbytes(0) == 0
    assert get_codec("sparse2", density=0.03, chunk=100).kept_per_chunk(100) == 3  # not 4
    assert get_codec("sparse2", density=1.0, chunk=8).kept_per_chunk(8) == 8


HAND_X = np.array([0.5, -4.0, 0.0, 2.0, 1.0, -1.5, 3.0, 0.25, 7.0], dtype=np.float32)
HAND_CODEC = Sparse2Codec(density=0.5, chunk=4)  # 2 of each chunk of 4, 1 of the tail of 1
HAND_MAGS = [2.5, 3.5, 1.875, 2.625, 7.0, 7.0]  # lo + (hi - lo) / 4, lo + 3 (hi - lo) / 4
HAND_OFFSETS = [1, 3, 1, 2, 0]


def hand_payload(mags=HAND_MAGS, offsets=HAND_OFFSETS, codes=b"\x93\x00") -> bytes:
    return np.array(mags, dtype="<f4").tobytes() + np.array(offsets, dtype="<u2").tobytes() + codes


def test_layout_by_hand() -> None:
    # chunk 0: -4 and 2 kept (lo 2, hi 4): -4 -> -3.5 (code 0b11), 2 -> 2.5 (0b00)
    # chunk 1: -1.5 and 3 kept (lo 1.5, hi 3): -1.5 -> -1.875 (0b01), 3 -> 2.625 (0b10)
    # tail: 7 (lo = hi = 7): 7 (0b00). Codes 3, 0, 1, 2, 0 -> bytes 0b10_01_00_11, 0.
    payload = HAND_CODEC.encode(HAND_X)
    assert payload == hand_payload()
    assert len(payload) == HAND_CODEC.encoded_nbytes(9) == 36
    decoded = HAND_CODEC.decode(payload, (9,))
    np.testing.assert_array_equal(decoded, [0, -3.5, 0, 2.5, 0, -1.875, 2.625, 0, 7])


# --------------------------------------------------------------------------------------------
# Round trip and bytes per parameter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.01, 0.02, 0.03, 0.3])
@pytest.mark.parametrize("n", [1, 7, 4095, 4096, 4097, 3 * 4096 + 1000])
def test_keeps_each_chunks_largest_within_the_bound_and_zero_elsewhere(n, density) -> None:
    codec = get_codec("sparse2", density=density)
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    payload = codec.encode(x)
    assert len(payload) == codec.encoded_nbytes(n)
    y = codec.decode(payload, x.shape)
    kept = reference_kept(x, codec)
    assert kept.size == codec.num_kept(n)
    dropped = np.ones(n, dtype=bool)
    dropped[kept] = False
    assert not y[dropped].any(), "a dropped entry decoded to non-zero"
    for start in range(0, n, codec.chunk):
        idx = kept[(kept >= start) & (kept < start + codec.chunk)]
        mags = np.abs(x[idx]).astype(np.float64)
        lo, hi = mags.min(), mags.max()
        err = np.abs(x[idx].astype(np.float64) - y[idx])
        assert err.max() <= (hi - lo) / 4 + 2.0**-23 * hi + 2.0**-149
        assert (np.sign(y[idx]) == np.sign(x[idx])).all()
    assert (np.abs(x - y) <= codec.error_bound(x)).all()


def test_bytes_per_param_on_the_wire_for_a_million_entries() -> None:
    n = 1 << 20
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    measured = {}
    for density in (0.01, 0.02, 0.03):
        codec = get_codec("sparse2", density=density)
        env = encode_update({"w": x}, codec=codec, model_id="m", kind="delta", sender="s",
                            sequence=1)  # fmt: skip
        wire = env.to_bytes()
        ((_, payload),) = env.tensors()
        assert len(payload) == codec.encoded_nbytes(n)
        measured[density] = (len(payload) / n, len(wire) / n)
        print(f"sparse2 density {density}: {len(payload) / n:.4f} bytes/param payload, "
              f"{len(wire) / n:.4f} with the envelope ({4 * n / len(wire):.0f}x below float32)")  # fmt: skip
    assert measured[0.02][1] < 0.1
    assert measured[0.01][1] < measured[0.02][1] < measured[0.03][1] < 0.1
    assert measured[0.02][0] == (8 * 256 + 2 * 82 * 256 + 82 * 256 // 4) / n  # 0.0470


def test_relative_error_on_the_kept_entries_of_gaussian_data() -> None:
    x = np.random.default_rng(1).standard_normal(1 << 18).astype(np.float32)
    codec = get_codec("sparse2")
    y = codec.decode(codec.encode(x), x.shape)
    kept = y != 0
    assert kept.sum() == codec.num_kept(x.size)
    rel = np.linalg.norm(x[kept] - y[kept]) / np.linalg.norm(x[kept])
    assert 0.05 < rel < 0.12  # (hi - lo) / 4 is about 0.3 sigma on values of about 2.6 sigma


@pytest.mark.parametrize("shape", [(), (1,), (0,), (3, 0), (5,), (2, 3), (100,)])
def test_tiny_tensors(shape) -> None:
    codec = get_codec("sparse2")
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    y = codec.decode(codec.encode(x), shape)
    assert y.shape == shape and y.dtype == np.float32
    if x.size:
        top = np.argmax(np.abs(x.reshape(-1)))
        assert np.count_nonzero(y) == codec.kept_per_chunk(x.size)
        if codec.kept_per_chunk(x.size) == 1:  # a lone kept value (lo == hi) is exact
            assert y.reshape(-1)[top] == x.reshape(-1)[top]
        assert (np.abs(x - y) <= codec.error_bound(x)).all()


# --------------------------------------------------------------------------------------------
# Malformed payloads: typed errors from decode and validate alike
# --------------------------------------------------------------------------------------------


MALFORMED = {
    "offset out of range": (hand_payload(offsets=[1, 4, 1, 2, 0]), MalformedError,
                            "offset 4 is out of range in chunk 0 of 4 entries"),
    "tail offset out of range": (hand_payload(offsets=[1, 3, 1, 2, 1]), MalformedError,
                                 "offset 1 is out of range in chunk 2 of 1 entries"),
    "duplicated": (hand_payload(offsets=[1, 3, 2, 2, 0]), MalformedError,
                   "offsets in chunk 1 are duplicated"),
    "unsorted": (hand_payload(offsets=[3, 1, 1, 2, 0]), MalformedError,
                 "offsets in chunk 0 are not sorted ascending"),
    "truncated": (hand_payload()[:-1], MalformedError, "payload is 35 bytes but"),
    "too long": (hand_payload() + b"\0", MalformedError, "payload is 37 bytes but"),
    "empty": (b"", MalformedError, "payload is 0 bytes but"),
    "NaN magnitude": (hand_payload(mags=[2.5, np.nan, 1.875, 2.625, 7, 7]), NonFiniteError,
                      "chunk magnitudes holds 1 non-finite"),
    "Inf magnitude": (hand_payload(mags=[2.5, 3.5, 1.875, 2.625, 7, np.inf]), NonFiniteError,
                      "chunk magnitudes holds 1 non-finite"),
    "negative magnitude": (hand_payload(mags=[2.5, 3.5, -1.0, 2.625, 7, 7]), MalformedError,
                           "chunk 1 has a negative magnitude"),
    "padding bits": (hand_payload(codes=b"\x93\x04"), MalformedError,
                     "unused code bits after the last of 5 codes are not zero"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_payloads_are_typed_errors(case) -> None:
    payload, error, message = MALFORMED[case]
    with pytest.raises(error, match=f"sparse2: .*{message}"):
        HAND_CODEC.decode(payload, (9,))
    with pytest.raises(error, match=message):
        HAND_CODEC.validate(payload, (9,))
    with pytest.raises(error, match=message):
        HAND_CODEC.decode_sparse(payload, (9,))


@pytest.mark.parametrize("name", ["sparse2", "topk"])
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (3 * 4096 + 500,), (64, 300)])
def test_decode_sparse_holds_the_nonzero_entries_of_decode_to_the_bit(name, shape) -> None:
    """What the merge adds (the entries) is what ``decode`` would have given (the array)."""
    codec = get_codec(name)
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    payload = codec.encode(x)
    dense, sparse = codec.decode(payload, shape), codec.decode_sparse(payload, shape)
    assert sparse.shape == shape and sparse.values.dtype == np.float32
    assert sparse.dense().tobytes() == dense.tobytes()
    assert np.array_equal(sparse.indices, np.flatnonzero(dense))  # sorted, distinct, all kept
    assert sparse.scaled(0.3).dense().tobytes() == np.multiply(dense, np.float32(0.3)).tobytes()


@pytest.mark.parametrize("name", ["none", "fp16", "bf16", "int8", "int4"])
def test_a_dense_codec_has_no_sparse_form(name) -> None:
    codec = get_codec(name)
    assert codec.decode_sparse(codec.encode(np.ones(8, np.float32)), (8,)) is None


def test_malformed_offsets_in_a_large_payload() -> None:
    codec = get_codec("sparse2")
    x = np.random.default_rng(3).standard_normal(3 * 4096 + 500).astype(np.float32)
    payload = bytearray(codec.encode(x))
    at = 8 * codec.num_chunks(x.size) + 2 * (2 * 82 + 5)  # chunk 2's sixth offset
    good = bytes(payload)
    for value, message in ((4096, "out of range in chunk 2"), (0, "chunk 2 are not sorted")):
        payload[at : at + 2] = np.array([value], dtype="<u2").tobytes()
        with pytest.raises(MalformedError, match=message):
            codec.decode(bytes(payload), x.shape)
    payload[at : at + 2] = good[at - 2 : at]  # the same offset as the one before it
    with pytest.raises(MalformedError, match="chunk 2 are duplicated"):
        codec.validate(bytes(payload), x.shape)
    with pytest.raises(MalformedError, match="payload is"):
        codec.decode(good, (x.size + 1,))


# --------------------------------------------------------------------------------------------
# Through envelopes
# --------------------------------------------------------------------------------------------


def test_through_encode_update_and_decode_update_with_error_feedback() -> None:
    rng = np.random.default_rng(4)
    params = {"emb": rng.standard_normal((64, 100)).astype(np.float32),
              "bias": rng.standard_normal(16).astype(np.float32),
              "scalar": np.array(0.5, dtype=np.float32)}  # fmt: skip
    codec = {"name": "sparse2", "density": 0.03, "chunk": 1024}
    ef = ErrorFeedback()
    env = encode_update(params, codec=codec, model_id="m", kind="delta", sender="s",
                        sequence=1, error_feedback=ef)  # fmt: skip
    got = Envelope.from_bytes(env.to_bytes(), max_bytes=1 << 20, expected_nbytes=expected_nbytes)
    out = decode_update(got, Manifest.from_arrays(params))
    bound = get_codec(codec)
    for name, value in params.items():
        assert got.header.tensors[[s.name for s in got.header.tensors].index(name)].codec == codec
        assert (np.abs(out[name] - value) <= bound.error_bound(value)).all()
        np.testing.assert_array_equal(out[name] + ef.residuals()[name], value)
    assert np.count_nonzero(out["emb"]) == 6 * 31 + math.ceil(0.03 * 256)  # 6400 = 6 * 1024 + 256
    assert out["scalar"] == 0.5


# --------------------------------------------------------------------------------------------
# Error feedback
# --------------------------------------------------------------------------------------------


def exact_difference_is(c: np.ndarray, d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Elementwise: is ``c - d == e`` exactly (float32 inputs)? TwoSum in float64 gives the
    exact difference as ``s + err``."""
    a, b = c.astype(np.float64), -d.astype(np.float64)
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    return (s == e.astype(np.float64)) & (err == 0)


def run_feedback(codec, inputs):
    """Send ``inputs`` through ``ErrorFeedback``; return per-round (corrected, decoded,
    residual before, residual after)."""
    ef = ErrorFeedback()
    residual = np.zeros_like(inputs[0])
    rounds = []
    for x in inputs:
        corrected = x + residual  # ErrorFeedback's own float32 add, reproduced bit for bit
        decoded = codec.decode(ef.compress("w", x, codec), x.shape)
        after = ef.residuals()["w"]
        rounds.append((corrected, decoded, residual, after))
        residual = after
    return rounds


@pytest.mark.parametrize("heavy", [False, True], ids=["gaussian", "heavy-tailed"])
def test_error_feedback_is_exact_over_fifty_rounds(heavy) -> None:
    """The residual plus everything sent equals the sum of the corrected inputs
    ``c_t - e_t`` bit for bit; it differs from the sum of the inputs only by the float32
    rounding of ``x_t + e_t`` (and, in chunks whose kept values span more than 5x, of
    ``c_t - d_t``), each at most 2**-24 of its result."""
    codec = get_codec("sparse2", density=0.02)
    rng = np.random.default_rng(5)
    n = 2 * 4096 + 1500
    draw = (lambda: rng.standard_normal(n) ** 5) if heavy else (lambda: rng.standard_normal(n))
    inputs = [draw().astype(np.float32) for _ in range(50)]
    rounds = run_feedback(codec, inputs)
    exact_rounds = [exact_difference_is(c, d, after).all() for c, d, _, after in rounds]
    # Gaussian chunks keep values within 5x of each other: the codec's side is exact. Heavy
    # tails make some chunks span more, and some of those subtractions round.
    assert all(exact_rounds) if not heavy else not all(exact_rounds)
    corrected, sent, before, after = (
        np.stack(a).astype(np.float64) for a in zip(*rounds, strict=True)
    )
    given = np.stack(inputs).astype(np.float64)
    bound = F32_U * np.abs(corrected).sum(axis=0)
    if heavy:
        bound += F32_U * np.abs(after).sum(axis=0)
    worst = 0.0
    for j in range(n):
        held = [*sent[:, j], after[-1, j]]
        gap = math.fsum([*held, *(-given[:, j])])
        assert abs(gap) <= bound[j] * (1 + 1e-9), (j, gap, bound[j])
        worst = max(worst, abs(gap) / max(bound[j], 1e-300))
        if not heavy:  # bit for bit: sent + residual == sum of (c_t - e_t)
            assert math.fsum([*held, *(-corrected[:, j]), *before[:, j]]) == 0.0, j
    print(f"sparse2 error feedback, 50 rounds: largest gap {worst:.3f} of its bound")


def test_error_feedback_sends_every_coordinate_and_its_residual_stays_bounded() -> None:
    """A constant input: each coordinate grows in the residual until its chunk's top-k takes
    it, so all are sent, the residual levels off (about mean |x| / density), and the average
    sent per round tends to the input."""
    codec = get_codec("sparse2", density=0.02)
    rng = np.random.default_rng(6)
    n = 2 * 4096 + 1800
    x = (rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 1.5, n)).astype(np.float32)
    rounds = run_feedback(codec, [x] * 300)
    sent = np.stack([d for _, d, _, _ in rounds])
    first_sent = np.argmax(sent != 0, axis=0)
    assert (sent != 0).any(axis=0).all(), f"{int((~(sent != 0).any(axis=0)).sum())} never sent"
    largest = [float(np.abs(a).max()) for _, _, _, a in rounds]
    assert max(largest[150:]) <= 1.1 * max(largest[50:150]) <= 1.1 * np.abs(x).max() / 0.02
    average = sent.astype(np.float64).mean(axis=0)
    assert np.abs(average - x).max() <= (largest[-1] + 1e-3) / 300  # e_T / T, plus rounding
    print(
        f"sparse2 constant input: every coordinate sent by round {first_sent.max()}, "
        f"residual max {largest[-1]:.1f} (|x| <= 1.5)"
    )


def test_decayed_error_feedback_sends_the_codec_of_the_decayed_buffer_bit_for_bit() -> None:
    """With ``decay`` beta (SparseLoCo's error-feedback buffer) each round sends exactly the
    codec's payload of ``c = x + float32(beta * e)`` and keeps ``c - Q(c)``, bit for bit,
    over 40 rounds; a coordinate left unsent keeps ``beta**k`` of its residual."""
    codec = get_codec("sparse2", density=0.02)
    beta = 0.95
    ef = ErrorFeedback(decay=beta)
    rng = np.random.default_rng(7)
    n = 2 * 4096 + 700
    residual = np.zeros(n, dtype=np.float32)
    for _ in range(40):
        x = rng.standard_normal(n).astype(np.float32)
        corrected = x + residual * np.float32(beta)
        expected = codec.encode(corrected)
        assert ef.compress("w", x, codec) == expected
        residual = corrected - codec.decode(expected, (n,))
        np.testing.assert_array_equal(ef.residuals()["w"], residual)
    # a zero input: what is not sent fades by beta a round
    before = ef.residuals()["w"]
    sent = codec.decode(ef.compress("w", np.zeros(n, np.float32), codec), (n,))
    dropped = sent == 0
    np.testing.assert_array_equal(ef.residuals()["w"][dropped], before[dropped] * np.float32(beta))
    with pytest.raises(ValueError, match="decay must be in"):
        ErrorFeedback(decay=0.0)
    with pytest.raises(ValueError, match="decay must be in"):
        ErrorFeedback(decay=1.5)
