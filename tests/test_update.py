"""Named tensors through codecs, envelopes and signatures, checked against a manifest."""

import numpy as np
import pytest
import torch

from comms.codecs import ErrorFeedback, codec_from_spec
from comms.envelope import Envelope
from comms.errors import MalformedError, ShapeMismatchError, SignatureError
from comms.identity import Identity, Roster
from comms.update import Manifest, decode_update, encode_update, expected_nbytes


@pytest.fixture
def params():
    rng = np.random.default_rng(0)
    return {
        "emb": rng.standard_normal((64, 16)).astype(np.float32),
        "bias": rng.standard_normal(16).astype(np.float32),
        "scalar": np.array(0.5, dtype=np.float32),
    }


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "int4", "topk", "sparse2", "sign1"])
def test_round_trip_signed(params, codec):
    ident = Identity.generate()
    roster = Roster()
    roster.add(ident.public_key, "island")
    env = encode_update(
        params, codec=codec, model_id="m", kind="delta", sender=ident.peer_id, sequence=3,
        base_version=2, meta={"steps": 10}, identity=ident,
    )  # fmt: skip
    got = Envelope.from_bytes(env.to_bytes(), max_bytes=1 << 20, expected_nbytes=expected_nbytes)
    got.verify(roster)
    out = decode_update(got, Manifest.from_arrays(params))
    assert set(out) == set(params)
    assert got.header.base_version == 2 and got.header.meta == {"steps": 10}
    specs = {s.name: s for s in got.header.tensors}
    for name, value in params.items():
        assert out[name].shape == value.shape and out[name].dtype == np.float32
        assert specs[name].codec["name"] == codec
        # each value within its codec's documented error bound (exact for "none")
        bound = codec_from_spec(specs[name].codec).error_bound(value)
        err = np.abs(out[name].astype(np.float64) - value.astype(np.float64))
        assert np.all(err <= bound), (name, float(np.max(err - bound)))
    if codec == "none":
        for name, value in params.items():
            np.testing.assert_array_equal(out[name], value)


def test_torch_tensors_and_bf16_dtype_recorded():
    params = {"w": torch.randn(4, 4, dtype=torch.bfloat16)}
    env = encode_update(params, codec="bf16", model_id="m", kind="delta", sender="x", sequence=0)
    assert env.header.tensors[0].dtype == "bfloat16"
    out = decode_update(env, Manifest.from_arrays(params))
    np.testing.assert_array_equal(out["w"], params["w"].float().numpy())


def test_manifest_mismatch_named(params):
    env = encode_update(params, codec="none", model_id="m", kind="delta", sender="x", sequence=0)
    wrong = dict(params, bias=np.zeros(17, np.float32))
    with pytest.raises(ShapeMismatchError, match=r"'bias'.*shape"):
        decode_update(env, Manifest.from_arrays(wrong))
    with pytest.raises(ShapeMismatchError, match="missing"):
        decode_update(env, Manifest.from_arrays({**params, "extra": np.zeros(1, np.float32)}))
    assert Manifest.from_dict(Manifest.from_arrays(params).to_dict()) == Manifest.from_arrays(
        params
    )


def test_size_hook_rejects_inconsistent_codec(params):
    env = encode_update(params, codec="int8", model_id="m", kind="delta", sender="x", sequence=0)
    forged = Envelope.build(
        model_id="m", kind="delta", sender="x", sequence=0,
        tensors=[(s.name, s.shape, s.dtype, {"name": "none"}, p) for s, p in env.tensors()],
    )  # fmt: skip
    with pytest.raises(MalformedError):
        Envelope.from_bytes(forged.to_bytes(), max_bytes=1 << 20, expected_nbytes=expected_nbytes)


def test_forged_signature(params):
    owner, forger = Identity.generate(), Identity.generate()
    roster = Roster()
    roster.add(owner.public_key, "island")
    env = encode_update(params, codec="int8", model_id="m", kind="delta", sender=owner.peer_id,
                        sequence=1)  # fmt: skip
    forged = Envelope(env.header, env.header_bytes, env.payload, forger.sign(env.header_bytes))
    with pytest.raises(SignatureError):
        Envelope.from_bytes(forged.to_bytes(), max_bytes=1 << 20).verify(roster)


def test_error_feedback_accounts_everything(params):
    ef = ErrorFeedback()
    sent = {n: np.zeros_like(v) for n, v in params.items()}
    for seq in range(5):
        env = encode_update(params, codec="int4", model_id="m", kind="delta", sender="x",
                            sequence=seq, error_feedback=ef)  # fmt: skip
        for n, v in decode_update(env).items():
            sent[n] += v
    for n, v in params.items():
        np.testing.assert_allclose(sent[n] + ef.residuals()[n], 5 * v, rtol=1e-5, atol=1e-5)
