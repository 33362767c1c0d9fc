"""Partitioning by clustering: topic recovery, determinism, balance, save/load, digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from router.partition import (
    META_FILE,
    Partition,
    TextPartitioner,
    VectorPartitioner,
    balanced_cap,
    fill_empty_clusters,
    greedy_capped_assignment,
)

TOPICS = {
    "cooking": "flour butter oven bake dough sugar whisk simmer garlic onion recipe skillet",
    "astronomy": "galaxy orbit telescope nebula planet comet stellar redshift quasar lunar",
    "finance": "equity bond dividend portfolio inflation interest ledger audit hedge yield",
    "football": "goal striker referee penalty midfield keeper tackle league corner offside",
}
SHARED = "the and of with about this that today very really"


def synthetic_corpus(sizes=(10, 10, 10, 10), seed=0) -> tuple[list[bytes], list[int]]:
    """Documents of 40 words: mostly one topic's words, some shared filler."""
    rng = np.random.default_rng(seed)
    docs, topics = [], []
    for topic, (words, size) in enumerate(zip(TOPICS.values(), sizes, strict=True)):
        vocab, filler = words.split(), SHARED.split()
        for _ in range(size):
            tokens = list(rng.choice(vocab, 28)) + list(rng.choice(filler, 12))
            rng.shuffle(tokens)
            docs.append(" ".join(tokens).encode())
            topics.append(topic)
    return docs, topics


def purity(labels, truth, k) -> float:
    labels, truth = np.asarray(labels), np.asarray(truth)
    best = sum(np.bincount(truth[labels == c]).max() for c in range(k) if (labels == c).any())
    return best / len(labels)


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus()


@pytest.fixture(scope="module")
def digits():
    return load_digits().data


def test_text_partition_recovers_topics(corpus) -> None:
    docs, topics = corpus
    part = TextPartitioner(k=4, svd_dims=20).fit(docs)
    assert part.labels.shape == (40,)
    assert set(part.labels.tolist()) == {0, 1, 2, 3}
    assert purity(part.labels, topics, 4) >= 0.95
    assert part.sizes.sum() == 40 and (part.sizes > 0).all()
    # New documents go to the cluster of their topic.
    fresh, fresh_topics = synthetic_corpus((2, 2, 2, 2), seed=7)
    by_topic = {t: np.bincount(part.labels[np.asarray(topics) == t]).argmax() for t in range(4)}
    assert part.assign(fresh).tolist() == [by_topic[t] for t in fresh_topics]


def test_text_partition_is_deterministic(corpus) -> None:
    docs, _ = corpus
    first = TextPartitioner(k=4, svd_dims=20, seed=3).fit(docs)
    second = TextPartitioner(k=4, svd_dims=20, seed=3).fit(list(docs))
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.centroids, second.centroids)


def test_embeddings_unit_norm_and_svd_dims_clipped(corpus) -> None:
    docs, _ = corpus
    partitioner = TextPartitioner(k=2, svd_dims=500)
    partitioner.fit(docs[:12])
    emb = partitioner.embed(docs[:12])
    assert emb.shape == (12, 11)  # clipped to n_docs - 1
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0)
    assert np.array_equal(partitioner.embed(["no known words here"]), np.zeros((1, 11)))


def test_text_bytes_and_str_embed_alike(corpus) -> None:
    docs, _ = corpus
    partitioner = TextPartitioner(k=4, svd_dims=20)
    partitioner.fit(docs)
    np.testing.assert_allclose(
        partitioner.embed(docs[:3]), partitioner.embed([d.decode() for d in docs[:3]])
    )
    # Invalid UTF-8 is replaced, not fatal.
    assert partitioner.assign([b"galaxy \xff\xfe orbit"]).shape == (1,)


def test_balanced_cap_respected_on_skewed_data() -> None:
    docs, topics = synthetic_corpus((25, 5, 5, 5), seed=1)
    cap = balanced_cap(40, 4, 0.1)
    assert cap == 11
    part = TextPartitioner(k=4, svd_dims=20, balanced=True).fit(docs)
    assert part.sizes.max() <= cap
    assert (part.sizes > 0).all() and part.sizes.sum() == 40
    # The three small topics keep their own clusters.
    for topic in (1, 2, 3):
        assert len(set(part.labels[np.asarray(topics) == topic].tolist())) == 1
    unbalanced = TextPartitioner(k=4, svd_dims=20).fit(docs)
    assert unbalanced.sizes.max() > cap  # without the cap the big topic stays whole


def test_balanced_without_slack_is_equal_sized(corpus) -> None:
    docs, _ = synthetic_corpus((25, 5, 5, 5), seed=1)
    part = TextPartitioner(k=4, svd_dims=20, balanced=True, balance_slack=0.0).fit(docs)
    assert part.sizes.tolist() == [10, 10, 10, 10]


def test_greedy_capped_assignment_by_hand() -> None:
    # Three points all nearest cluster 0, cap 2: the two nearest take it, the third goes to 1.
    d = np.array([[0.1, 5.0], [0.2, 0.3], [0.05, 4.0]])
    assert greedy_capped_assignment(d, cap=2).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="cannot hold"):
        greedy_capped_assignment(d, cap=1)


def test_weighted_capped_assignment_by_hand() -> None:
    # Weights 3, 1, 1 all nearest cluster 0, cap 3 units: the heavy row nearest takes it whole.
    d = np.array([[0.1, 5.0], [0.2, 0.3], [0.05, 4.0]])
    assert greedy_capped_assignment(d, cap=3, weights=np.array([1.0, 1.0, 3.0])).tolist() == [
        1,
        1,
        0,
    ]
    # A row heavier than any room left goes to the least-loaded cluster after the walk.
    got = greedy_capped_assignment(d, cap=2.5, weights=np.array([1.0, 1.0, 3.0]))
    assert got.tolist() == [0, 1, 1] or got.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="positive"):
        greedy_capped_assignment(d, cap=3, weights=np.array([1.0, 0.0, 1.0]))


def test_balance_by_bytes_evens_out_the_bytes_not_the_files() -> None:
    docs, _ = synthetic_corpus((10, 10, 10, 10), seed=2)
    # topic 0's documents made ten times longer: one cluster would hold most of the bytes
    docs = [d * 10 if i < 10 else d for i, d in enumerate(docs)]
    sizes = np.array([len(d.encode()) if isinstance(d, str) else len(d) for d in docs])
    by_docs = TextPartitioner(k=4, svd_dims=20, balanced=True).fit(docs)
    by_bytes = TextPartitioner(k=4, svd_dims=20, balanced=True, balance_by="bytes").fit(docs)

    def byte_shares(part):
        return np.bincount(part.labels, weights=sizes, minlength=4) / sizes.sum()

    assert byte_shares(by_docs).max() > 0.5
    assert byte_shares(by_bytes).max() <= 0.25 * 1.1 + max(sizes) / sizes.sum()
    with pytest.raises(ValueError, match="balance_by"):
        TextPartitioner(k=4, balance_by="tokens")


def test_fill_empty_clusters_takes_nearest_member_of_largest() -> None:
    labels = np.array([0, 0, 0, 1])
    d = np.array([[0.0, 1.0, 9.0], [0.1, 1.0, 2.0], [0.2, 1.0, 3.0], [1.0, 0.0, 0.5]])
    assert fill_empty_clusters(labels, d, 3).tolist() == [0, 2, 0, 1]


# sklearn warns that duplicates leave fewer distinct clusters than k; the partition fixes that.
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_duplicate_documents_still_fill_every_cluster() -> None:
    docs = ["alpha beta gamma"] * 6 + ["delta epsilon zeta"] * 2
    part = TextPartitioner(k=4, svd_dims=5).fit(docs)
    assert (part.sizes > 0).all() and part.sizes.sum() == 8


def test_save_load_round_trip(tmp_path, corpus) -> None:
    docs, _ = corpus
    part = TextPartitioner(k=4, svd_dims=20).fit(docs)
    part.save(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / META_FILE).read_text())
    assert meta["kind"] == "text" and meta["k"] == 4
    loaded = Partition.load(tmp_path / "p")
    prefixes = [d[:60] for d in docs] + [b"telescope orbit", b"penalty keeper goal"]
    np.testing.assert_allclose(loaded.embed(prefixes), part.embed(prefixes), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(loaded.assign(prefixes), part.assign(prefixes))
    np.testing.assert_array_equal(loaded.labels, part.labels)
    np.testing.assert_array_equal(loaded.centroids, part.centroids)
    assert loaded.report() == part.report()


def test_load_errors_are_actionable(tmp_path, corpus) -> None:
    with pytest.raises(FileNotFoundError, match="no saved partition"):
        Partition.load(tmp_path)
    VectorPartitioner(k=2).fit(np.arange(12.0).reshape(6, 2)).save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["format_version"] = 99
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99"):
        Partition.load(tmp_path)


def test_report_lists_sizes_terms_and_nearest_names(corpus) -> None:
    docs, topics = corpus
    part = TextPartitioner(k=4, svd_dims=20).fit(docs)
    names = [f"{list(TOPICS)[t]}_{i}.txt" for i, t in enumerate(topics)]
    text = part.report(names=names, examples=2)
    lines = text.splitlines()
    assert lines[0] == "text partition: 4 clusters over 40 items"
    assert len(lines) == 5
    for line in lines[1:]:
        topic = line.split("nearest: ")[1].split("_")[0]
        assert "items (25.0%)" in line
        assert all(name.startswith(topic) for name in line.split("nearest: ")[1].split(", "))
        terms = line.split("terms: ")[1].split("  nearest")[0].split(", ")
        assert set(terms) <= set(TOPICS[topic].split())
    with pytest.raises(ValueError, match="names"):
        part.report(names=["x"])


def test_bad_inputs_get_clear_errors(corpus) -> None:
    docs, _ = corpus
    with pytest.raises(ValueError, match="k=5"):
        TextPartitioner(k=5).fit(docs[:4])
    with pytest.raises(ValueError, match="positive integer"):
        TextPartitioner(k=0).fit(docs)
    with pytest.raises(TypeError, match="single str"):
        TextPartitioner(k=1).fit("one document")
    with pytest.raises(TypeError, match="document 1 is int"):
        TextPartitioner(k=1).fit(["ok words", 3])
    with pytest.raises(ValueError, match="no usable terms"):
        TextPartitioner(k=1).fit(["1 2 3", "!!"])
    with pytest.raises(RuntimeError, match="not fitted"):
        TextPartitioner(k=2).assign(["x"])
    with pytest.raises(ValueError, match="NaN"):
        VectorPartitioner(k=2).fit(np.array([[0.0, np.nan], [1.0, 1.0]]))


def test_vector_partition_digits_deterministic(digits) -> None:
    first = VectorPartitioner(k=4, seed=0).fit(digits)
    second = VectorPartitioner(k=4, seed=0).fit(digits.copy())
    np.testing.assert_array_equal(first.labels, second.labels)
    assert first.labels.min() == 0 and first.labels.max() == 3
    assert (first.sizes > 0).all() and first.sizes.sum() == len(digits)
    # Training samples are assigned to their own cluster (unbalanced k-means is consistent).
    np.testing.assert_array_equal(first.assign(digits), first.labels)


def test_vector_partition_pca_balanced_round_trip(tmp_path, digits) -> None:
    part = VectorPartitioner(k=4, seed=0, pca_dims=16, balanced=True).fit(digits)
    assert part.centroids.shape == (4, 16)
    assert part.sizes.max() <= balanced_cap(len(digits), 4, 0.1)
    assert (part.sizes > 0).all()
    loaded = Partition.load(part.save(tmp_path))
    images = digits[:50].reshape(50, 8, 8)  # (n, 8, 8) images flatten like (n, 64) rows
    np.testing.assert_allclose(loaded.embed(images), part.embed(digits[:50]), atol=1e-12)
    np.testing.assert_array_equal(loaded.assign(digits), part.assign(digits))
    with pytest.raises(ValueError, match="fitted on 64"):
        loaded.assign(np.zeros((2, 10)))
