"""Router networks and their training: flow and prefix routers learn the cluster well above
chance on held-out data, heads resize without touching kept experts, the c-BTM baseline
weighs the right cluster, prefix routing is causal, windows stay inside documents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from island.workloads import get_workload
from router.models import CbtmRouter, FlowRouter, PrefixRouter, expert_forward_flops
from router.partition import TextPartitioner, VectorPartitioner
from router.training import (
    accuracy_by_noise,
    held_out_labels,
    router_accuracy,
    router_train_flops,
    sample_document_windows,
    train_router,
)

TOPICS = [
    "flour butter oven bake dough sugar whisk simmer garlic onion recipe skillet",
    "galaxy orbit telescope nebula planet comet stellar redshift quasar lunar",
    "equity bond dividend portfolio inflation interest ledger audit hedge yield",
]


def write_topic_corpus(folder, files_per_topic=10, words=70, seed=0):
    """Files of one topic's words each, as ``topic<i>_<j>.txt``."""
    rng = np.random.default_rng(seed)
    for topic, vocab in enumerate(TOPICS):
        for j in range(files_per_topic):
            text = " ".join(rng.choice(vocab.split(), words)) + "\n"
            (folder / f"topic{topic}_{j:02d}.txt").write_text(text)


@pytest.fixture(scope="module")
def digits():
    workload = get_workload("flow", hidden=32, n_blocks=1, time_dim=16)
    partition = VectorPartitioner(k=4, seed=0, n_init=2).fit(workload.train_images)
    return workload, partition


def test_flow_router_beats_chance_on_held_out_images_and_improves_with_t(digits):
    workload, partition = digits
    torch.manual_seed(0)
    router = FlowRouter(num_experts=4)  # 3 x 256
    metrics = train_router(router, workload, partition.labels, steps=150, batch_size=256, lr=2e-3)
    assert metrics.losses[-1] < metrics.losses[0]
    assert metrics.train_flops == pytest.approx(3 * router.flops_per_forward() * 150 * 256)
    labels = held_out_labels(partition, workload.validation_documents())
    accuracy = router_accuracy(router, workload, labels, t_range=(0.5, 1.0), samples=1024)
    assert accuracy > 0.6, accuracy  # chance is 0.25
    bands = accuracy_by_noise(router, workload, labels, bins=4, samples_per_bin=512)
    assert [(lo, hi) for lo, hi, _ in bands] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert bands[-1][2] > bands[0][2] + 0.2  # near-pure noise is hard to route, data is easy


def test_prefix_router_learns_topics_of_held_out_windows(tmp_path):
    write_topic_corpus(tmp_path)
    workload = get_workload(
        "bytelm",
        data=[str(tmp_path)],
        context=32,
        d_model=32,
        n_layer=1,
        n_head=2,
        val_fraction=0.25,
    )
    train_docs = workload.documents()
    partition = TextPartitioner(k=3, svd_dims=8, seed=0, n_init=2).fit(
        [d.content for d in train_docs]
    )
    torch.manual_seed(0)
    router = PrefixRouter(num_experts=3, d_model=32, n_layers=2, context=32)
    metrics = train_router(
        router,
        workload,
        partition.labels,
        steps=120,
        batch_size=32,
        lr=3e-3,
        position_weighting="linear",
    )
    assert metrics.final_loss < metrics.losses[0]
    held_out = workload.validation_documents()
    labels = held_out_labels(partition, held_out)
    assert len(set(labels.tolist())) >= 2  # the held-out files span several topics
    accuracy = router_accuracy(router, workload, labels, samples=256, batch_size=64)
    assert accuracy > 0.7, accuracy  # chance is about 1/3


def test_prefix_router_is_causal_and_per_position():
    torch.manual_seed(0)
    router = PrefixRouter(num_experts=3, d_model=16, n_layers=2, kernel_size=3, context=16)
    idx = torch.randint(0, 256, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = torch.randint(0, 256, (2, 5))
    logits, logits_changed = router(idx), router(changed)
    assert logits.shape == (2, 12, 3)
    assert torch.allclose(logits[:, :7], logits_changed[:, :7], atol=1e-6)
    assert not torch.allclose(logits[:, 7:], logits_changed[:, 7:])
    probs = router.prefix_probabilities(idx)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 12))
    assert torch.allclose(router.next_probabilities(idx), probs[:, -1])


@pytest.mark.parametrize("kind", ["flow", "prefix"])
def test_resize_head_keeps_kept_experts_logits(kind):
    torch.manual_seed(0)
    if kind == "flow":
        router = FlowRouter(4, hidden=32, depth=2, time_dim=8)
        inputs = (torch.randn(5, 64), torch.rand(5))
    else:
        router = PrefixRouter(4, d_model=16, n_layers=1, context=8)
        inputs = (torch.randint(0, 256, (5, 8)),)
    before = router(*inputs).detach()
    router.resize_head(5, keep=[3, 0, 2])  # expert 1 removed, two new ones appended
    after = router(*inputs).detach()
    assert router.num_experts == 5 and after.shape[-1] == 5
    assert torch.equal(after[..., :3], before[..., [3, 0, 2]])
    with pytest.raises(ValueError, match="distinct expert indices"):
        router.resize_head(3, keep=[0, 0])
    with pytest.raises(ValueError, match="cannot hold"):
        router.resize_head(1, keep=[0, 1])


def test_cbtm_router_weights_sum_to_one_and_pick_the_topic():
    rng = np.random.default_rng(1)
    docs = [" ".join(rng.choice(vocab.split(), 40)).encode() for vocab in TOPICS for _ in range(6)]
    partition = TextPartitioner(k=3, svd_dims=5, seed=0, n_init=2).fit(docs)
    router = CbtmRouter(partition, temperature=0.1)
    prefixes = [b"the telescope saw a comet near the nebula", b"whisk the dough and bake it"]
    idx = torch.tensor([list(p[:25]) for p in prefixes])
    weights = router.next_probabilities(idx)
    assert weights.shape == (2, 3)
    assert torch.allclose(weights.sum(1), torch.ones(2), atol=1e-6)
    expected = [int(partition.labels[6]), int(partition.labels[0])]  # astronomy, cooking docs
    assert weights.argmax(1).tolist() == expected
    assert weights.max(1).values.min() > 0.5
    per_position = router.prefix_probabilities(idx)
    assert per_position.shape == (2, 25, 3)
    assert torch.allclose(per_position[:, -1], weights)
    assert torch.allclose(per_position.sum(-1), torch.ones(2, 25), atol=1e-6)
    with pytest.raises(ValueError, match="centroid for each of the 1 new"):
        router.resize_head(4, keep=[0, 1, 2])
    router.resize_head(2, keep=[expected[1], expected[0]])
    assert router.next_probabilities(idx).argmax(1).tolist() == [1, 0]


def test_document_windows_stay_inside_one_document():
    data = np.frombuffer(b"aaaaaaaaaa" + b"bbb" + b"cccccccccccc", dtype=np.uint8)
    offsets = np.array([0, 10, 13, 25])
    rng = np.random.default_rng(0)
    windows, mask, docs = sample_document_windows(rng, data, offsets, 200, 5)
    assert set(docs.tolist()) == {0, 1, 2}
    for window, valid, doc in zip(windows, mask, docs, strict=True):
        letter = ord("abc"[doc])
        assert (window[valid] == letter).all()
        assert valid.sum() == (3 if doc == 1 else 5)
        assert (window[~valid] == 0).all()


def test_router_flops_are_reported_against_an_expert():
    flow = get_workload("flow")  # default expert: hidden 256, 2 blocks
    router = FlowRouter(4)
    ratio = router.flops_per_forward() / expert_forward_flops(flow)
    assert 0.05 < ratio < 1.0
    prefix = PrefixRouter(4)
    assert prefix.flops_per_forward() > 0
    assert router_train_flops(prefix, 10, 4, positions=32) == pytest.approx(
        3 * prefix.flops_per_forward() * 10 * 4 * 32
    )
