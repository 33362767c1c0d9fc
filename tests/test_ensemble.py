"""EnsembleModel: the full mixture equals the hand-computed one (flow velocities and byte
probabilities), top-1 runs only the chosen experts and counts its calls, mixtures are
normalised, generation and sampling work, experts can be added and removed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from island.workloads.bytelm import ByteGPT, TextBatch
from island.workloads.flow import VelocityMLP
from router.ensemble import EnsembleModel
from router.models import CbtmRouter, FlowRouter, PrefixRouter
from router.partition import TextPartitioner
from router.rules import make_rule

K = 3


def sharpen(router: nn.Module, scale: float = 3.0) -> None:
    """Give a fresh router's head larger weights so its probabilities are far from uniform."""
    with torch.no_grad():
        router.head.weight.normal_(0.0, scale / router.head.in_features**0.5)


@pytest.fixture
def flow_parts():
    torch.manual_seed(0)
    experts = {f"e{k}": VelocityMLP(hidden=16, n_blocks=1, time_dim=8) for k in range(K)}
    router = FlowRouter(K, hidden=32, depth=2, time_dim=8)
    sharpen(router)
    return experts, router


@pytest.fixture
def text_parts():
    torch.manual_seed(0)
    experts = {f"e{k}": ByteGPT(context=32, n_layer=1, n_head=2, d_model=32) for k in range(K)}
    router = PrefixRouter(K, d_model=16, n_layers=1, context=32)
    sharpen(router)
    return experts, router


def flow_inputs(batch=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 64, generator=g), torch.rand(batch, generator=g)


def test_full_velocity_equals_hand_computed_mixture(flow_parts):
    experts, router = flow_parts
    ensemble = EnsembleModel.from_parts("flow", experts, router, "full")
    x_t, t = flow_inputs()
    with torch.no_grad():
        w = torch.softmax(router(x_t, t), dim=-1)  # (B, K)
        expected = sum(w[:, k : k + 1] * experts[f"e{k}"](x_t, t) for k in range(K))
        got = ensemble.velocity(x_t, t)
    assert w.min() > 0.005 and w.max() < 0.995  # a real mixture, not one expert
    assert torch.allclose(got, expected, atol=1e-5)
    assert ensemble.expert_calls == K


def test_top1_runs_only_the_argmax_experts(flow_parts):
    experts, router = flow_parts
    ensemble = EnsembleModel.from_parts("flow", experts, router, make_rule("top1"))
    x_t, t = flow_inputs(batch=32)
    with torch.no_grad():
        choice = router(x_t, t).argmax(-1)
        got = ensemble.velocity(x_t, t)
        for k in choice.unique().tolist():
            rows = choice == k
            assert torch.allclose(got[rows], experts[f"e{k}"](x_t[rows], t[rows]), atol=1e-6)
    assert ensemble.expert_calls == len(choice.unique()) <= K


def test_top1_sampling_calls_one_expert_per_step_when_all_rows_agree(flow_parts):
    experts, router = flow_parts
    with torch.no_grad():  # route everything to expert 2, whatever x_t and t
        router.head.weight.zero_()
        router.head.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    ensemble = EnsembleModel.from_parts("flow", experts, router, "top1")
    steps = 7
    images = ensemble.sample(n=5, steps=steps, seed=3)
    assert images.shape == (5, 8, 8) and np.isfinite(images).all()
    assert ensemble.expert_calls == steps
    assert ensemble.calls_by_expert == {"e0": 0, "e1": 0, "e2": steps}
    assert np.array_equal(images, ensemble.sample(n=5, steps=steps, seed=3))


def test_text_full_mixture_is_normalised_and_matches_hand_computation(text_parts):
    experts, router = text_parts
    ensemble = EnsembleModel.from_parts("bytelm", experts, router, "full")
    context = torch.randint(0, 256, (4, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        w = torch.softmax(router(context)[:, -1], dim=-1)  # (B, K)
        p = sum(
            w[:, k : k + 1] * torch.softmax(experts[f"e{k}"](context)[:, -1], dim=-1)
            for k in range(K)
        )
        got = ensemble.next_byte_log_probs(context)
    assert got.shape == (4, 256)
    assert torch.allclose(torch.logsumexp(got, dim=-1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(got, torch.log(p), atol=1e-5)
    single = ensemble.next_byte_log_probs(context[1])
    assert single.shape == (256,) and torch.allclose(single, got[1], atol=1e-5)


def test_sequence_loss_routes_each_position_on_its_own_prefix(text_parts):
    experts, router = text_parts
    ensemble = EnsembleModel.from_parts("bytelm", experts, router, "full")
    g = torch.Generator().manual_seed(4)
    window = torch.randint(0, 256, (3, 17), generator=g)
    batch = TextBatch(window[:, :-1], window[:, 1:], torch.zeros(3, dtype=torch.long))
    with torch.no_grad():
        loss = ensemble.sequence_loss(batch)
        w = torch.softmax(router(batch.inputs), dim=-1)  # (B, T, K)
        p = sum(
            w[..., k : k + 1] * torch.softmax(experts[f"e{k}"](batch.inputs), dim=-1)
            for k in range(K)
        )
        expected = -torch.log(p.gather(-1, batch.targets.unsqueeze(-1))).mean()
        # the last position agrees with next-byte routing on the whole window
        last = ensemble.next_byte_log_probs(batch.inputs)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(last, ensemble.log_probs(batch.inputs)[:, -1], atol=1e-5)


def test_top1_text_generation_is_seeded_and_rerouted_per_byte(text_parts):
    experts, router = text_parts
    ensemble = EnsembleModel.from_parts("bytelm", experts, router, "top1")
    out = ensemble.generate(b"def f(x):", max_new=12, temperature=1.0, top_p=0.9, seed=5)
    assert len(out) == 12
    assert out == ensemble.generate(b"def f(x):", max_new=12, temperature=1.0, top_p=0.9, seed=5)
    calls = 2 * 12
    assert ensemble.expert_calls == calls  # one expert per byte (batch of one context)
    context = torch.tensor(list(b"def f(x): return x"))
    chosen = int(router.next_probabilities(context[None]).argmax())
    with torch.no_grad():
        expected = torch.log_softmax(experts[f"e{chosen}"](context[None])[0, -1], dim=-1)
    assert torch.allclose(ensemble.next_byte_log_probs(context), expected, atol=1e-6)


def test_add_and_remove_experts_resize_the_router(flow_parts):
    experts, router = flow_parts
    ensemble = EnsembleModel.from_parts("flow", experts, router, "full")
    x_t, t = flow_inputs()
    with torch.no_grad():
        before = router(x_t, t)
    ensemble.add_expert("e3", VelocityMLP(hidden=16, n_blocks=1, time_dim=8), {"cluster": 3})
    assert ensemble.expert_ids == ["e0", "e1", "e2", "e3"] and router.num_experts == 4
    assert ensemble.meta["e3"] == {"cluster": 3}
    ensemble.remove_expert("e1")
    assert ensemble.expert_ids == ["e0", "e2", "e3"] and router.num_experts == 3
    with torch.no_grad():
        after = router(x_t, t)
        assert torch.equal(after[:, :2], before[:, [0, 2]])
        assert torch.isfinite(ensemble.velocity(x_t, t)).all()
    with pytest.raises(ValueError, match="already in the ensemble"):
        ensemble.add_expert("e0", VelocityMLP(hidden=16, n_blocks=1, time_dim=8))
    with pytest.raises(KeyError, match="no expert 'e9'"):
        ensemble.remove_expert("e9")


def test_mismatched_parts_are_rejected(flow_parts, text_parts):
    flow_experts, flow_router = flow_parts
    text_experts, text_router = text_parts
    with pytest.raises(ValueError, match="router has 3 outputs but 2 experts"):
        EnsembleModel.from_parts("flow", dict(list(flow_experts.items())[:2]), flow_router, "full")
    with pytest.raises(TypeError, match="cannot route bytelm"):
        EnsembleModel.from_parts("bytelm", text_experts, flow_router, "full")
    with pytest.raises(ValueError, match="no ensemble for workload"):
        EnsembleModel.from_parts("audio", flow_experts, flow_router, "full")
    ensemble = EnsembleModel.from_parts("bytelm", text_experts, text_router, "top_k:2")
    with pytest.raises(ValueError, match="exceed the context"):
        ensemble.log_probs(torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(TypeError, match="velocity is for flow"):
        ensemble.velocity(*flow_inputs())


def test_cbtm_router_drives_a_text_ensemble(text_parts):
    experts, _ = text_parts
    rng = np.random.default_rng(0)
    vocabularies = ["oven dough whisk garlic skillet", "galaxy nebula comet quasar orbit"]
    docs = [" ".join(rng.choice(v.split(), 30)).encode() for v in vocabularies for _ in range(5)]
    partition = TextPartitioner(k=2, svd_dims=3, seed=0, n_init=2).fit(docs)
    two = dict(list(experts.items())[:2])
    ensemble = EnsembleModel.from_parts("bytelm", two, CbtmRouter(partition), "top1")
    prompt = torch.tensor(list(b"a comet in the nebula"))
    astronomy = f"e{int(partition.labels[5])}"
    log_probs = ensemble.next_byte_log_probs(prompt)
    assert torch.allclose(torch.logsumexp(log_probs, -1), torch.tensor(0.0), atol=1e-5)
    assert ensemble.calls_by_expert[astronomy] == 1 and ensemble.expert_calls == 1
    ensemble.add_expert("e2", experts["e2"], new_centroids=partition.centroids[:1])
    assert ensemble.router.num_experts == 3
    assert len(ensemble.generate(b"whisk the dough", max_new=4, temperature=0.0)) == 4
