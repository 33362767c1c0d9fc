"""Tests for comms.codecs: error bounds, validation, the registry and error feedback."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from comms.codecs import (
    CODECS,
    FLUSH_BELOW,
    REQUIRED_CODECS,
    Codec,
    ErrorFeedback,
    codec_from_spec,
    get_codec,
    top_k_indices,
)
from comms.errors import ConfigError, MalformedError, NonFiniteError

ALL_CODECS = [get_codec(name) for name in REQUIRED_CODECS] + [
    get_codec("int8", block=64),
    get_codec("int4", block=256),
    get_codec("topk", fraction=0.25),
    get_codec("topk", fraction=1.0),
    get_codec("sparse2", density=0.3, chunk=64),
    get_codec("sparse2", density=1.0, chunk=7),
    get_codec("sign1", block=8),
    get_codec("sign1", block=1000),
]
LOSSY_FOR_EF = ["int8", "int4", "topk", "sparse2", "sign1"]
EF_PARAMS = {"topk": {"fraction": 0.05}, "sparse2": {"density": 0.05, "chunk": 128}}


def codec_id(codec: Codec) -> str:
    return "-".join(str(v) for v in codec.spec().values())


def round_trip(codec: Codec, x) -> np.ndarray:
    payload = codec.encode(x)
    numel = int(np.prod(np.shape(x)))
    assert isinstance(payload, bytes)
    assert len(payload) == codec.encoded_nbytes(numel)
    y = codec.decode(payload, tuple(np.shape(x)))
    assert y.dtype == np.float32
    assert y.shape == tuple(np.shape(x))
    assert y.flags.c_contiguous and y.flags.writeable
    return y


def assert_within_bound(codec: Codec, x, y: np.ndarray) -> None:
    x64 = np.asarray(x, dtype=np.float64)
    bound = codec.error_bound(x)
    assert bound.shape == x64.shape
    err = np.abs(x64 - y.astype(np.float64))
    worst = np.max(err - bound) if err.size else 0.0
    assert worst <= 0.0, f"{codec}: error exceeds its documented bound by {worst}"


def sample_arrays(rng: np.random.Generator) -> list[np.ndarray]:
    """Arrays of several shapes, dtypes, layouts and magnitudes."""
    big = rng.standard_normal((60, 90))
    arrays = [
        np.array(1.5),  # 0-d
        np.zeros((0,)),
        np.zeros((3, 0, 2)),
        np.array([-2.25]),
        rng.standard_normal(7),
        rng.standard_normal((3, 5)) * 1e-3,
        rng.standard_normal(1000) * 1e4,
        rng.standard_normal((257, 3)),
        big[::2, ::3],  # non-contiguous view
        np.asfortranarray(rng.standard_normal((17, 19))),
        np.concatenate([np.zeros(300), rng.standard_normal(300), np.full(100, 1e-39)]),
        rng.standard_normal(5000) ** 5,  # heavy tails
    ]
    out = []
    for arr in arrays:
        for dtype in (np.float16, np.float32, np.float64):
            if dtype is np.float16 and np.abs(arr).max(initial=0) > 6e4:
                continue
            out.append(arr.astype(dtype) if arr.ndim == 0 else arr.astype(dtype, copy=False))
    out.append(big[::2, ::3].astype(np.float32))  # float32 non-contiguous
    return out


# --------------------------------------------------------------------------------------------
# Error bounds and shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ALL_CODECS, ids=codec_id)
def test_error_bound_holds_on_many_shapes_and_dtypes(codec: Codec) -> None:
    rng = np.random.default_rng(42)
    for x in sample_arrays(rng):
        y = round_trip(codec, x)
        assert_within_bound(codec, x, y)
        assert np.isfinite(y).all()


@pytest.mark.parametrize("codec", ALL_CODECS, ids=codec_id)
def test_torch_tensors_including_bf16_and_strided(codec: Codec) -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(40, 30, generator=gen, requires_grad=True)
    for tensor in (
        base,
        base.t(),
        base[::3, 1::2],
        base.to(torch.float16),
        base.to(torch.bfloat16),
    ):
        y = round_trip(codec, tensor)
        reference = tensor.detach().float().numpy()
        assert_within_bound(codec, reference, y)


def test_relative_errors_on_gaussian_data() -> None:
    x = np.random.default_rng(1).standard_normal(1 << 18).astype(np.float32)

    def rel(name: str, **params) -> float:
        codec = get_codec(name, **params)
        y = codec.decode(codec.encode(x), x.shape)
        return float(np.linalg.norm(x - y) / np.linalg.norm(x))

    assert rel("none") == 0.0
    assert rel("fp16") < 3e-4
    assert rel("bf16") < 3e-3
    assert 0.004 < rel("int8") < 0.01
    assert 0.05 < rel("int4") < 0.13
    assert rel("topk", fraction=1.0) == 0.0
    assert 0.9 < rel("sparse2") < 0.95  # 2% of the entries, 2 bits each


def test_payload_sizes() -> None:
    n = 1000
    assert get_codec("none").encoded_nbytes(n) == 4000
    assert get_codec("fp16").encoded_nbytes(n) == 2000
    assert get_codec("bf16").encoded_nbytes(n) == 2000
    assert get_codec("int8").encoded_nbytes(n) == 4 * 4 + 1000  # 4 blocks of 256
    assert get_codec("int4").encoded_nbytes(n) == 4 * 16 + 500  # 16 blocks of 64
    assert get_codec("int4").encoded_nbytes(7) == 4 + 4
    assert get_codec("topk").encoded_nbytes(n) == 8 * 10
    assert get_codec("topk").encoded_nbytes(10) == 8  # at least one element
    assert get_codec("topk").encoded_nbytes(0) == 0
    assert get_codec("sparse2").encoded_nbytes(n) == 8 + 2 * 20 + 5  # one chunk, 20 kept
    assert get_codec("sparse2").encoded_nbytes(1 << 20) == 256 * 8 + 256 * 82 * 9 // 4


def test_int8_hand_computed_block() -> None:
    codec = get_codec("int8", block=4)
    x = np.array([1.0, -0.5, 0.25, 0.0, 2.0, 2.0, -1.0, 0.01], dtype=np.float32)
    payload = codec.encode(x)
    scales = np.frombuffer(payload[:8], dtype="<f4")
    codes = np.frombuffer(payload[8:], dtype=np.int8)
    np.testing.assert_array_equal(scales, np.float32([1 / 127, 2 / 127]))
    np.testing.assert_array_equal(codes, [127, -64, 32, 0, 127, 127, -64, 1])  # rint(63.5) = 64


def test_int4_nibble_layout() -> None:
    codec = get_codec("int4", block=4)
    x = np.array([7.0, -7.0, 1.0, -2.0, 3.0], dtype=np.float32)  # scales 1 and 3/7
    payload = codec.encode(x)
    packed = np.frombuffer(payload[8:], dtype=np.uint8)
    np.testing.assert_array_equal(packed, [0x97, 0xE1, 0x07])
    np.testing.assert_allclose(codec.decode(payload, (5,)), x, rtol=1e-6)


def test_bf16_rounds_to_nearest_even() -> None:
    codec = get_codec("bf16")
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0xBF80FFFF], dtype=np.uint32)
    payload = codec.encode(bits.view(np.float32))
    np.testing.assert_array_equal(np.frombuffer(payload, "<u2"), [0x3F80, 0x3F82, 0x3F81, 0xBF81])


def test_saturation_at_format_limits() -> None:
    x = np.array([1e5, -7e4, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(round_trip(get_codec("fp16"), x), [65504, -65504, 1])
    huge = np.array([3.4e38, -3.4e38], dtype=np.float32)
    y = round_trip(get_codec("bf16"), huge)
    assert np.isfinite(y).all()
    assert_within_bound(get_codec("bf16"), huge, y)
    big = np.array([1e38, -3e37, 5.0], dtype=np.float32)
    y8 = round_trip(get_codec("int8"), big)
    assert np.isfinite(y8).all()
    assert_within_bound(get_codec("int8"), big, y8)
    with pytest.raises(ValueError, match=r"int8: \|x\| reaches"):
        get_codec("int8").encode(np.array([3.4e38], dtype=np.float32))


def test_tiny_blocks_flush_to_zero() -> None:
    x = np.array([1e-38, -5e-39, 2e-45, 0.0], dtype=np.float32)
    codec = get_codec("int8", block=4)
    y = round_trip(codec, x)
    np.testing.assert_array_equal(y, 0.0)
    assert np.abs(x).max() < FLUSH_BELOW


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ALL_CODECS, ids=codec_id)
def test_nan_and_inf_rejected_with_count(codec: Codec) -> None:
    x = np.random.default_rng(3).standard_normal(3000).astype(np.float32)
    x[[5, 700]] = np.nan
    x[2999] = -np.inf
    with pytest.raises(NonFiniteError, match=rf"{codec.name}: .*3 non-finite"):
        codec.encode(x)
    with pytest.raises(NonFiniteError, match="1 non-finite"):
        codec.encode(np.array(np.inf))
    # float64 values beyond float32 range become Inf on conversion and are refused too
    with pytest.raises(NonFiniteError):
        codec.encode(np.array([1e300, 1.0]))


@pytest.mark.parametrize("name", REQUIRED_CODECS)
def test_non_float_inputs_rejected(name: str) -> None:
    codec = get_codec(name)
    for bad in (np.arange(4), np.array([True]), np.ones(2, dtype=np.complex64), torch.arange(3)):
        with pytest.raises(TypeError, match=f"{name}: cannot encode an array of dtype"):
            codec.encode(bad)


@pytest.mark.parametrize("codec", ALL_CODECS, ids=codec_id)
def test_wrong_payload_size_rejected(codec: Codec) -> None:
    x = np.random.default_rng(4).standard_normal((20, 30)).astype(np.float32)
    payload = codec.encode(x)
    for bad in (payload + b"\0", payload[:-1], b""):
        with pytest.raises(MalformedError, match=rf"{codec.name}: payload is {len(bad)} bytes"):
            codec.decode(bad, x.shape)
    with pytest.raises(MalformedError, match="payload is"):
        codec.decode(payload, (20, 60))
    with pytest.raises(MalformedError, match="negative"):
        codec.decode(payload, (-20, -30))


def crafted(codec: Codec, numel: int, scale: float) -> bytes:
    """A payload of the right size whose first scale (or value) is ``scale``."""
    raw = bytearray(codec.encode(np.ones(numel, dtype=np.float32)))
    if codec.name in ("none", "topk", "int8", "int4", "sparse2", "sign1"):
        offset = 4 * codec.num_kept(numel) if codec.name == "topk" else 0
        raw[offset : offset + 4] = np.float32(scale).tobytes()
    else:  # fp16 / bf16: overwrite the first value with the format's own NaN/Inf
        value = np.float16(scale) if codec.name == "fp16" else np.float32(scale)
        raw[0:2] = value.tobytes()[-2:]
    return bytes(raw)


@pytest.mark.parametrize("name", REQUIRED_CODECS)
def test_crafted_nonfinite_payload_rejected(name: str) -> None:
    codec = get_codec(name)
    for bad in (np.nan, np.inf):
        with pytest.raises(NonFiniteError, match=name):
            codec.decode(crafted(codec, 300, bad), (300,))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_crafted_oversized_scale_rejected(name: str) -> None:
    codec = get_codec(name)
    with pytest.raises(MalformedError, match="block scale"):
        codec.decode(crafted(codec, 300, 1e38), (300,))
    # The largest accepted scale with the most negative code still decodes finite.
    raw = bytearray(crafted(codec, 300, codec.max_scale))
    raw[4 * codec._num_blocks(300)] = 0x88 if name == "int4" else 0x80
    assert np.isfinite(codec.decode(bytes(raw), (300,))).all()


def test_topk_crafted_indices_rejected() -> None:
    codec = get_codec("topk", fraction=0.5)
    idx = np.array([0, 2], dtype="<u4")
    vals = np.array([1.0, 2.0], dtype="<f4")
    assert codec.decode(idx.tobytes() + vals.tobytes(), (4,)).tolist() == [1, 0, 2, 0]
    for bad in ([2, 0], [1, 1], [0, 4]):
        payload = np.array(bad, dtype="<u4").tobytes() + vals.tobytes()
        with pytest.raises(MalformedError, match="strictly increasing and below 4"):
            codec.decode(payload, (4,))


# --------------------------------------------------------------------------------------------
# Registry and specs
# --------------------------------------------------------------------------------------------


def test_registry_complete_and_specs_round_trip() -> None:
    assert set(REQUIRED_CODECS) <= set(CODECS)
    for codec in ALL_CODECS:
        spec = codec.spec()
        wire = msgpack.unpackb(msgpack.packb(spec))
        again = codec_from_spec(wire)
        assert again == codec and type(again) is type(codec)
        assert get_codec(wire) == codec
    assert get_codec("int8").spec() == {"name": "int8", "block": 256}
    assert get_codec("int4").spec() == {"name": "int4", "block": 64}
    assert get_codec("topk").spec() == {"name": "topk", "fraction": 0.01}
    assert get_codec("none").spec() == {"name": "none"}


def test_bad_names_and_params() -> None:
    with pytest.raises(ConfigError, match=r"unknown codec 'int3'.*int8"):
        get_codec("int3")
    with pytest.raises(ConfigError, match="block must be"):
        get_codec("int8", block=0)
    with pytest.raises(ConfigError, match="even"):
        get_codec("int4", block=33)
    with pytest.raises(ConfigError, match="fraction"):
        get_codec("topk", fraction=0.0)
    for spec in ({"name": "zip"}, {"block": 4}, {"name": "int8", "block": True}, ["int8"]):
        with pytest.raises(MalformedError):
            codec_from_spec(spec)
    with pytest.raises(MalformedError, match="invalid"):
        codec_from_spec({"name": "none", "level": 3})


def test_module_does_not_import_torch() -> None:
    code = "import sys, comms.codecs; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------------------------
# Property test
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    codec=st.sampled_from(ALL_CODECS),
    x=hnp.arrays(
        dtype=st.sampled_from([np.float16, np.float32, np.float64]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40),
        elements=st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=16),
    ),
)
def test_property_round_trip_within_bound(codec: Codec, x: np.ndarray) -> None:
    y = round_trip(codec, x)
    assert_within_bound(codec, x, y)


# --------------------------------------------------------------------------------------------
# Top-k selection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, fraction", [(1000, 0.01), (1000, 0.3), (1 << 19, 0.01), (1 << 18, 0.001)]
)
def test_topk_keeps_exactly_the_largest(n: int, fraction: float) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    codec = get_codec("topk", fraction=fraction)
    k = codec.num_kept(n)
    y = round_trip(codec, x)
    expected = np.sort(np.argsort(-np.abs(x), kind="stable")[:k])
    np.testing.assert_array_equal(np.flatnonzero(y), expected)
    np.testing.assert_array_equal(y[expected], x[expected])


def test_top_k_indices_exact_when_the_sample_misleads() -> None:
    n = 1 << 18  # large enough for the sampled path; the sample is every 4th element
    rng = np.random.default_rng(9)

    def expected(magnitude: np.ndarray, k: int) -> np.ndarray:
        return np.sort(np.argsort(-magnitude, kind="stable")[:k])

    # The sample sees only zeros: the large values sit between sample points.
    hidden = np.zeros(n, dtype=np.float32)
    hidden[1::4][:100] = np.arange(1, 101)
    np.testing.assert_array_equal(top_k_indices(hidden, 50), expected(hidden, 50))
    # The sample sees only large values: too few candidates, so the full selection runs.
    crowded = rng.random(n, dtype=np.float32)
    crowded[::4] += 10.0
    np.testing.assert_array_equal(top_k_indices(crowded, 10_000), expected(crowded, 10_000))


# --------------------------------------------------------------------------------------------
# Error feedback
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSY_FOR_EF)
def test_error_feedback_conserves_the_sum(name: str) -> None:
    codec = get_codec(name, **EF_PARAMS.get(name, {"block": 32}))
    rng = np.random.default_rng(7)
    ef = ErrorFeedback()
    shapes = {"w": (20, 30), "b": (30,), "s": ()}
    sent = {k: np.zeros(s, dtype=np.float64) for k, s in shapes.items()}
    given_total = {k: np.zeros(s, dtype=np.float64) for k, s in shapes.items()}
    for _ in range(8):
        for key, shape in shapes.items():
            x = rng.standard_normal(shape).astype(np.float32)
            payload = ef.compress(key, x, codec)
            sent[key] += codec.decode(payload, shape)
            given_total[key] += x
    for key in shapes:
        residual = ef.residuals()[key]
        assert residual.shape == shapes[key] and residual.dtype == np.float32
        np.testing.assert_allclose(sent[key] + residual, given_total[key], rtol=0, atol=2e-5)
    # The residual is really carrying something (the codec is lossy).
    assert np.abs(ef.residuals()["w"]).max() > 1e-3


def test_error_feedback_snapshot_restore_and_reset() -> None:
    codec = get_codec("int4")
    rng = np.random.default_rng(8)
    inputs = [rng.standard_normal(500).astype(np.float32) for _ in range(4)]
    straight = ErrorFeedback()
    payloads = [straight.compress("p", x, codec) for x in inputs]
    first = ErrorFeedback()
    for x in inputs[:2]:
        first.compress("p", x, codec)
    resumed = ErrorFeedback()
    resumed.load_residuals(first.residuals())
    assert [resumed.compress("p", x, codec) for x in inputs[2:]] == payloads[2:]
    resumed.reset()
    assert resumed.residuals() == {}
    assert resumed.compress("p", inputs[0], codec) == payloads[0]
    with pytest.raises(NonFiniteError):
        resumed.load_residuals({"p": np.array([np.nan])})


def test_error_feedback_state_unchanged_on_bad_input() -> None:
    codec = get_codec("int8")
    ef = ErrorFeedback()
    ef.compress("p", torch.randn(100), codec)
    before = ef.residuals()["p"]
    bad = np.ones(100, dtype=np.float32)
    bad[3] = np.nan
    with pytest.raises(NonFiniteError):
        ef.compress("p", bad, codec)
    np.testing.assert_array_equal(ef.residuals()["p"], before)
    with pytest.raises(ValueError, match="call reset"):
        ef.compress("p", np.ones(99, dtype=np.float32), codec)


@pytest.mark.parametrize("name", REQUIRED_CODECS)
def test_validate_agrees_with_decode(name):
    from comms.codecs import get_codec as _get

    codec = _get(name)
    x = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    payload = codec.encode(x)
    codec.validate(payload, x.shape)  # a valid payload passes
    with pytest.raises(MalformedError):
        codec.validate(payload[:-1], x.shape)
    if name in ("none", "fp16", "int8", "int4", "sparse2", "sign1"):
        bad = bytearray(payload)
        nan = {"none": np.float32(np.nan).tobytes(), "fp16": np.float16(np.nan).tobytes()}
        bad[: 4 if name != "fp16" else 2] = nan.get(name, np.float32(np.inf).tobytes())
        with pytest.raises(NonFiniteError):
            codec.decode(bytes(bad), x.shape)
        with pytest.raises(NonFiniteError):
            codec.validate(bytes(bad), x.shape)
