"""Workloads: registry, deterministic models and batches, sharding, resumable iterators,
training that learns, deterministic validation, the stdlib corpus and user data, sampling."""

import numpy as np
import pytest
import torch

from comms.errors import ConfigError
from island.workloads import WORKLOADS, Document, get_workload, resolve_device
from island.workloads.bytelm import (
    ByteGPT,
    count_parameters,
    generate,
    next_byte_logits,
)
from island.workloads.corpus import STDLIB_EXCLUDED_DIRS, load_text_corpus
from island.workloads.flow import flow_matching_example, model_velocity, sample

TINY = {
    "bytelm": {"d_model": 32, "n_layer": 1, "n_head": 2, "context": 32, "batch_size": 8},
    "flow": {"hidden": 32, "n_blocks": 1, "time_dim": 16, "batch_size": 32},
}


def tiny(name, **overrides):
    return get_workload(name, **{**TINY[name], **overrides})


def same_batch(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


# --- registry and config --------------------------------------------------------------


def test_registry_knows_both_workloads_and_rejects_bad_config():
    assert {"bytelm", "flow"} <= set(WORKLOADS)
    assert get_workload("flow", **TINY["flow"]).name == "flow"
    with pytest.raises(ConfigError, match="unknown name 'nope'"):
        get_workload("nope")
    with pytest.raises(ConfigError, match="d_modle: unknown key"):
        get_workload("bytelm", d_modle=32)
    with pytest.raises(ConfigError, match="not divisible"):
        get_workload("bytelm", d_model=30, n_head=4)
    with pytest.raises(ConfigError, match="batch_size: expected an integer"):
        get_workload("flow", batch_size="many")


def test_device_resolution():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("abacus")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_default_bytelm_size_is_as_documented():
    workload = get_workload("bytelm")
    model = workload.build_model(seed=0)
    n = count_parameters(model)
    # 4 blocks of 12 d^2 (+ biases, norms) + byte table (tied with the head) + positions
    assert 800_000 < n < 900_000
    assert model.lm_head.weight is model.token_embedding.weight
    assert workload.batch_size == 16


# --- determinism, sharding, resuming --------------------------------------------------


@pytest.mark.parametrize("name", ["bytelm", "flow"])
def test_same_seed_same_model_and_batches(name):
    workload = tiny(name)
    a, b, c = workload.build_model(1), workload.build_model(1), workload.build_model(2)
    for (_, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb)
    assert any(
        not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )
    first, again = take(workload.train_batches(5), 3), take(workload.train_batches(5), 3)
    assert all(same_batch(x, y) for x, y in zip(first, again, strict=True))
    other = next(workload.train_batches(6))
    assert not same_batch(first[0], other)


@pytest.mark.parametrize("name", ["bytelm", "flow"])
def test_shards_draw_from_disjoint_documents(name):
    workload = tiny(name, batch_size=64)
    seen = []
    for shard in range(3):
        batches = take(workload.train_batches(0, shard=shard, num_shards=3), 4)
        seen.append({int(i) for b in batches for i in b.doc_index})
    assert all(seen)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    with pytest.raises(ConfigError, match="shard"):
        workload.train_batches(0, shard=3, num_shards=3)


def test_bytelm_doc_indices_restrict_windows_to_those_documents():
    workload = tiny("bytelm")
    docs = workload.documents()
    chosen = [5, 17]
    joined = docs[5].content + docs[17].content
    for batch in take(workload.train_batches(0, doc_indices=chosen), 5):
        assert set(batch.doc_index.tolist()) <= set(chosen)
        for inputs, targets in zip(batch.inputs, batch.targets, strict=True):
            window = bytes(inputs.tolist()) + bytes(targets[-1:].tolist())
            assert window in joined
            assert torch.equal(inputs[1:], targets[:-1])
    with pytest.raises(ConfigError, match="out of range"):
        workload.train_batches(0, doc_indices=[len(docs)])


def test_flow_doc_indices_restrict_images():
    workload = tiny("flow")
    images = np.stack([d.content for d in workload.documents()])
    chosen = [3, 4, 100]
    for batch in take(workload.train_batches(0, doc_indices=chosen), 3):
        assert set(batch.doc_index.tolist()) <= set(chosen)
        # x_t and u are consistent with the stored images: x1 = x_t + (1 - t) u
        x1 = batch.x_t + (1 - batch.t[:, None]) * batch.velocity
        assert np.allclose(x1.numpy(), images[batch.doc_index.numpy()], atol=1e-5)


@pytest.mark.parametrize("name", ["bytelm", "flow"])
def test_iterator_state_round_trip(name):
    workload = tiny(name)
    original = workload.train_batches(3, shard=1, num_shards=2)
    take(original, 4)
    state = original.state_dict()
    expected = take(original, 3)
    resumed = workload.train_batches(3, shard=1, num_shards=2)
    resumed.load_state_dict(state)
    assert all(same_batch(x, y) for x, y in zip(expected, take(resumed, 3), strict=True))
    with pytest.raises(ConfigError, match="other data"):
        workload.train_batches(3, shard=0, num_shards=2).load_state_dict(state)


# --- training and validation ----------------------------------------------------------


@pytest.mark.parametrize("name, lr", [("bytelm", 1e-2), ("flow", 3e-3)])
def test_a_few_dozen_steps_lower_the_training_loss(name, lr):
    torch.manual_seed(0)
    workload = tiny(name)
    model = workload.build_model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for batch in take(workload.train_batches(0), 40):
        loss = workload.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


@pytest.mark.parametrize("name", ["bytelm", "flow"])
def test_validation_loss_is_deterministic_and_restores_mode(name):
    workload = tiny(name)
    model = workload.build_model(0)
    model.train()
    first = workload.validation_loss(model, max_batches=3)
    assert np.isfinite(first) and first > 0
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    assert workload.validation_loss(model, max_batches=3) == first
    assert not model.training
    subset = workload.validation_loss(model, max_batches=3, doc_indices=[0, 1])
    assert np.isfinite(subset) and subset != first


@pytest.mark.parametrize("name", ["bytelm", "flow"])
def test_flops_per_step_positive_and_linear_in_batch(name):
    workload = tiny(name)
    one = workload.flops_per_step(1)
    assert one > 0
    assert workload.flops_per_step(8) == pytest.approx(8 * one)
    params = count_parameters(workload.build_model(0))
    assert one >= 6 * params * 0.9  # at least 6 N per example (per token for the LM)


# --- corpus ---------------------------------------------------------------------------


def test_stdlib_corpus_split_by_file_and_without_tests():
    corpus = load_text_corpus()
    train, validation = set(corpus.train.ids), set(corpus.validation.ids)
    assert not train & validation
    total = len(train) + len(validation)
    assert total > 400 and 0.02 < len(validation) / total < 0.1
    assert 6e6 < corpus.train.nbytes + corpus.validation.nbytes < 25e6
    for doc_id in train | validation:
        parts = doc_id.split("/")
        assert doc_id.endswith(".py")
        assert not set(parts[:-1]) & STDLIB_EXCLUDED_DIRS, doc_id
    assert "asyncio/tasks.py" in train | validation
    assert load_text_corpus() is corpus  # read once per process


def test_user_data_folder(tmp_path):
    notes = tmp_path / "notes"
    (notes / "deep").mkdir(parents=True)
    (notes / ".hidden").mkdir()
    for i in range(12):
        (notes / "deep" / f"n{i}.txt").write_text(f"note {i}: " + "lorem ipsum dolor " * 20)
    (notes / ".hidden" / "secret.txt").write_text("x" * 500)
    (notes / "image.bin").write_bytes(bytes(range(256)) * 4)
    workload = tiny("bytelm", data=[notes])
    ids = [d.id for d in workload.documents()] + [d.id for d in workload.validation_documents()]
    assert sorted(ids) == sorted(f"notes/deep/n{i}.txt" for i in range(12))
    assert workload.validation_documents() and workload.documents()
    assert workload.documents()[0].text.startswith("note ")
    batch = next(workload.train_batches(0))
    assert batch.inputs.shape == (8, 32)
    assert np.isfinite(workload.validation_loss(workload.build_model(0), max_batches=1))


def test_single_user_file_is_split_by_its_tail(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"abcdefghij" * 100)
    workload = tiny("bytelm", data=[str(path)])
    (train,), (validation,) = workload.documents(), workload.validation_documents()
    assert (train.id, validation.id) == ("book.txt", "book.txt#validation")
    assert train.content + validation.content == path.read_bytes()
    assert len(validation.content) == 50


def test_bad_data_paths_raise_clear_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="does not exist"):
        tiny("bytelm", data=[str(missing)])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blob.bin").write_bytes(b"\0\1\2" * 10)
    with pytest.raises(ConfigError, match="no text files"):
        tiny("bytelm", data=[str(empty)])
    short = tmp_path / "short.txt"
    short.write_text("too short for a window")
    with pytest.raises(ConfigError, match="context"):
        next(tiny("bytelm", data=[str(short)]).train_batches(0))


# --- inference helpers ----------------------------------------------------------------


def test_generate_is_seeded_and_top_p_tiny_is_greedy():
    model = ByteGPT(context=16, n_layer=1, n_head=2, d_model=32)
    model.train()
    one = generate(model, b"def ", max_new=20, temperature=1.0, seed=3)
    assert len(one) == 20
    assert one == generate(model, b"def ", max_new=20, temperature=1.0, seed=3)
    greedy = generate(model, b"def ", max_new=20, temperature=0)
    assert generate(model, b"def ", max_new=20, top_p=1e-9, seed=9) == greedy
    assert model.training
    logits = next_byte_logits(model, torch.tensor(list(b"x" * 40)))
    assert logits.shape == (256,)
    assert next_byte_logits(model, torch.zeros(3, 5, dtype=torch.long)).shape == (3, 256)


def test_flow_path_and_euler_sampler():
    rng = np.random.default_rng(0)
    x1 = rng.uniform(-1, 1, size=(5, 64)).astype(np.float32)
    x_t, t, u = flow_matching_example(np.random.default_rng(1), x1)
    x0 = x1 - u
    assert np.allclose(x_t, (1 - t[:, None]) * x0 + t[:, None] * x1, atol=1e-6)
    # a constant unit field moves every pixel by exactly 1 between t = 0 and t = 1
    start = sample(lambda x, t: torch.zeros_like(x), n=4, steps=1, seed=7)
    moved = sample(lambda x, t: torch.ones_like(x), n=4, steps=10, seed=7)
    assert np.allclose(moved, start + 1.0, atol=1e-5)
    workload = tiny("flow")
    images = sample(model_velocity(workload.build_model(0)), n=6, steps=4, seed=0)
    assert images.shape == (6, 8, 8) and np.isfinite(images).all()


def test_documents_carry_content_and_labels():
    flow_docs = tiny("flow").documents()
    assert all(isinstance(d, Document) for d in flow_docs[:5])
    assert flow_docs[0].content.shape == (64,) and flow_docs[0].label in range(10)
    assert flow_docs[0].content.min() >= -1 and flow_docs[0].content.max() <= 1
    assert len(flow_docs) + len(tiny("flow").validation_documents()) == 1797
