"""The ``sign1`` codec (comms/codecs/sign.py): a sign bit per element, the mean |x| per block."""

from __future__ import annotations

import numpy as np
import pytest

from comms.codecs import ErrorFeedback, get_codec
from comms.errors import ConfigError, MalformedError


def test_a_block_decodes_to_plus_or_minus_its_mean_magnitude() -> None:
    codec = get_codec("sign1", block=8)
    x = np.array([1.0, -3.0, 0.0, -0.0, 2.0, -2.0, 0.5, 0.5,  # block 0: mean |x| = 9 / 8
                  -4.0, 2.0, 0.0], dtype=np.float32)  # short block 1: mean 2  # fmt: skip
    payload = codec.encode(x)
    assert len(payload) == codec.encoded_nbytes(11) == 4 * 2 + 2
    scales = np.frombuffer(payload[:8], dtype="<f4")
    assert scales.tolist() == [9 / 8, 2.0]
    out = codec.decode(payload, x.shape)
    s0, s1 = 9 / 8, 2.0
    assert out.tolist() == [s0, -s0, s0, s0, s0, -s0, s0, s0, -s1, s1, s1]  # 0 and -0 positive
    assert (np.abs(out - x) <= codec.error_bound(x)).all()
    # the bits, little-endian within a byte: negatives at 1, 5 and 8
    assert payload[8:] == bytes([0b00100010, 0b00000001])


def test_sizes_and_error_on_gaussian_data() -> None:
    codec = get_codec("sign1")
    assert codec.spec() == {"name": "sign1", "block": 256}
    assert codec.encoded_nbytes(1 << 20) == 4 * 4096 + (1 << 17)  # 0.141 bytes per parameter
    x = np.random.default_rng(1).standard_normal(100_000).astype(np.float32)
    out = codec.decode(codec.encode(x), x.shape)
    rel = np.linalg.norm(out - x) / np.linalg.norm(x)
    assert abs(rel - np.sqrt(1 - 2 / np.pi)) < 0.01  # the best a sign code with one scale does
    assert (np.sign(out) == np.where(x < 0, -1, 1)).all()


def test_a_crafted_payload_is_refused_with_the_reason() -> None:
    codec = get_codec("sign1", block=8)
    x = np.linspace(-1, 1, 11, dtype=np.float32)
    good = bytearray(codec.encode(x))
    negative = bytearray(good)
    negative[4:8] = np.float32(-0.5).tobytes()
    for bad, match in ((negative, "block 1's scale is -0.5"),
                       (good[:-1] + bytes([good[-1] | 0b1000]), "unused bits must be zero")):  # fmt: skip
        with pytest.raises(MalformedError, match=match):
            codec.decode(bytes(bad), x.shape)
        with pytest.raises(MalformedError, match=match):
            codec.validate(bytes(bad), x.shape)
    with pytest.raises(ConfigError, match="block must be an integer in"):
        get_codec("sign1", block=4)


def test_with_error_feedback_the_mean_sent_tends_to_a_constant_input() -> None:
    """A biased compressor made whole by the residual: feeding the same x round after round,
    the residual grows until it levels off and the average of what was sent converges to x.
    The contraction is weak (a block's error is ``sum c^2 - L s^2``, so one large entry among
    256 is corrected slowly): on this Gaussian input the residual's largest entry levels off
    near 400 |x|-units after about 1,000 rounds."""
    codec = get_codec("sign1")
    ef = ErrorFeedback()
    x = np.random.default_rng(2).standard_normal(3000).astype(np.float32)
    sent = np.zeros(3000)
    largest = []
    for _ in range(1500):
        sent += codec.decode(ef.compress("w", x, codec), x.shape)
        largest.append(float(np.abs(ef.residuals()["w"]).max()))
    assert max(largest[1000:]) <= 1.1 * max(largest[500:1000])
    assert np.abs(sent / 1500 - x).max() <= largest[-1] / 1500 + 1e-4
