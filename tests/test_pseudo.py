"""Pure local-update math: pseudo-gradient, applying versions, model <-> numpy copies."""

import numpy as np
import pytest
import torch

from aggregator.merge import PartialAggregate, accumulate
from aggregator.outer import NesterovSGD
from aggregator.root import RootModel
from comms.codecs import get_codec
from comms.envelope import Envelope
from comms.errors import ShapeMismatchError
from comms.identity import Identity
from comms.update import decode_update
from island.pseudo import (
    apply_version,
    copy_arrays,
    load_numpy_into,
    params_to_numpy,
    pseudo_gradient,
)


def test_pseudo_gradient_is_anchor_minus_params_by_hand():
    anchor = {"w": np.array([1.0, 2.0, 3.0], np.float32), "b": np.array([[0.5]], np.float32)}
    params = {"w": np.array([0.75, 2.5, 3.0], np.float32), "b": torch.tensor([[-0.25]])}
    delta = pseudo_gradient(anchor, params)
    np.testing.assert_array_equal(delta["w"], np.array([0.25, -0.5, 0.0], np.float32))
    np.testing.assert_array_equal(delta["b"], np.array([[0.75]], np.float32))
    assert all(d.dtype == np.float32 for d in delta.values())
    assert anchor["w"][0] == 1.0  # inputs untouched


def test_pseudo_gradient_of_float64_and_bfloat16_params_subtracts_in_float32():
    anchor = {"w": np.array([1.0], np.float32)}
    delta = pseudo_gradient(anchor, {"w": np.array([1.0 + 2.0**-30])})  # rounds to 1.0 in f32
    assert delta["w"][0] == 0.0
    delta = pseudo_gradient(anchor, {"w": torch.tensor([1.5], dtype=torch.bfloat16)})
    assert delta["w"][0] == np.float32(-0.5)


def test_pseudo_gradient_refuses_another_layout():
    anchor = {"w": np.zeros(3, np.float32)}
    with pytest.raises(ShapeMismatchError, match="missing \\['w'\\]"):
        pseudo_gradient(anchor, {"v": np.zeros(3, np.float32)})
    with pytest.raises(ShapeMismatchError, match="shape \\(4,\\)"):
        pseudo_gradient(anchor, {"w": np.zeros(4, np.float32)})


def test_apply_version_adds_in_place_by_hand():
    anchor = {"a": np.array([1.0, -1.0], np.float32), "b": np.array([0.0], np.float32)}
    same_object = anchor["a"]
    out = apply_version(anchor, {"a": np.array([0.5, 0.25], np.float32), "b": np.array([2.0])})
    assert out is anchor and anchor["a"] is same_object
    np.testing.assert_array_equal(anchor["a"], [1.5, -0.75])
    np.testing.assert_array_equal(anchor["b"], [2.0])
    assert anchor["b"].dtype == np.float32


def test_apply_version_checks_everything_before_writing():
    anchor = {"a": np.ones(2, np.float32), "z": np.ones(2, np.float64)}
    with pytest.raises(ValueError, match="'z' must be a writable float32"):
        apply_version(anchor, {"a": np.ones(2, np.float32), "z": np.ones(2, np.float32)})
    np.testing.assert_array_equal(anchor["a"], [1.0, 1.0])  # nothing written
    with pytest.raises(ShapeMismatchError, match="unexpected \\['extra'\\]"):
        apply_version({"a": np.ones(2, np.float32)}, {"a": np.ones(2), "extra": np.ones(1)})


def test_an_anchor_following_the_published_versions_holds_the_roots_theta_bit_for_bit():
    """The real path on both sides: the root's outer step publishes int8 ``u_v`` envelopes;
    the island decodes each published envelope and adopts it with ``apply_version``."""
    rng = np.random.default_rng(7)
    names = ["z.weight", "a.bias", "m.weight"]
    theta0 = {
        n: (rng.standard_normal(257) * 10.0 ** rng.integers(-3, 3)).astype(np.float32)
        for n in names
    }
    identity = Identity.generate()
    root = RootModel("m", theta0, NesterovSGD(), get_codec("int8"), identity)
    anchor = copy_arrays(theta0)
    for _ in range(8):  # a chain of versions, as a replica sees them
        g = {n: (rng.standard_normal(257) * 1e-2).astype(np.float32) for n in names}
        published = root.step(accumulate(PartialAggregate(), g, 1.0)).envelope
        apply_version(anchor, decode_update(Envelope.from_bytes(published, max_bytes=1 << 20)))
    assert root.version == 8
    for n in names:
        assert anchor[n].tobytes() == root.theta[n].tobytes(), n
        assert not np.array_equal(anchor[n], theta0[n])


def test_params_to_numpy_and_back_keep_the_parameter_objects_and_the_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    params_before = list(model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    arrays = params_to_numpy(model)
    assert sorted(arrays) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert all(a.dtype == np.float32 and a.flags.writeable for a in arrays.values())
    arrays["0.bias"][:] = [7.0, 8.0]  # a copy: the model is not changed through it
    assert not torch.equal(model[0].bias.detach(), torch.tensor([7.0, 8.0]))
    load_numpy_into(model, arrays)
    assert list(model.parameters()) == params_before  # same Parameter objects
    assert torch.equal(model[0].bias.detach(), torch.tensor([7.0, 8.0]))
    assert optimizer.state[model[0].bias]["step"].item() == 1  # state found by identity
    optimizer.zero_grad()
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    assert optimizer.state[model[0].bias]["step"].item() == 2
    assert not torch.equal(model[0].bias.detach(), torch.tensor([7.0, 8.0]))


def test_load_numpy_into_is_exact_and_refuses_another_layout():
    model = torch.nn.Linear(2, 2)
    values = {
        "weight": np.frombuffer(np.arange(4, dtype=np.float32).tobytes(), np.float32).reshape(2, 2),
        "bias": np.array([np.float32(1 / 3), -0.0], np.float32),
    }
    load_numpy_into(model, values)  # read-only source arrays are fine
    assert model.bias.detach().numpy().tobytes() == values["bias"].tobytes()
    with pytest.raises(ShapeMismatchError, match="missing \\['bias'\\]"):
        load_numpy_into(model, {"weight": np.zeros((2, 2), np.float32)})
