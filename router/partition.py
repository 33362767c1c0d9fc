"""Partition training data into K clusters, one per expert, and assign new inputs to them.

Expert mode trains each expert in isolation on one cluster of the data, so the partition decides
what every expert learns. Two recipes:

- Text (c-BTM; Gururangan et al. 2023, "Scaling Expert Language Models with Unsupervised Domain
  Discovery", section 2.1): TF-IDF over documents -> truncated SVD (100 dimensions) -> L2
  normalisation -> balanced k-means. At inference a prefix is embedded the same way and the
  ensemble weights are ``softmax(-||e(prefix) - c_k||^2 / T)`` (see
  ``router.rules.cbtm_router_weights``).
- Vectors (Decentralized Diffusion Models; McAllister et al. 2025, section 3.2): k-means on
  features of each sample; here the raw pixels, or a PCA of them, of the bundled 8x8 digits.

Balanced k-means. c-BTM balances clusters so that no expert is starved of data. Here each
cluster holds at most ``cap = ceil(n / k * (1 + slack))`` members: starting from ordinary
k-means centroids, every (document, cluster) pair is sorted by squared distance (a stable sort,
ties broken by document then cluster index) and walked in that order; a document takes the
first cluster that still has room. Centroids are then recomputed as member means and the
assignment repeated until the labels stop changing (at most ``max_iter`` rounds). The walk is
greedy, not an optimal transport, and it is deterministic. With ``slack = 0`` the clusters are
as equal as ``n`` allows; with ``slack > 0`` the smallest cluster still holds at least
``n - (k - 1) * cap`` members.

Every document gets exactly one label in ``[0, k)`` and no cluster is empty (an empty one, which
duplicate inputs can cause, takes the member of the largest cluster nearest its centroid).
Everything is deterministic for a fixed input and seed.

A fitted ``Partition`` saves to a directory as ``partition.safetensors`` (labels, centroids, the
IDF vector, the SVD or PCA components) plus ``partition.json`` (kind, the vocabulary in index
order, tokenizer settings): plain arrays and JSON, no pickle. Loading rebuilds an embedder that
gives the same embeddings, so new prefixes are assigned at inference without refitting.

Pure numpy / scikit-learn; no threads of its own; no I/O except ``save`` and ``load``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load_file, save_file
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.preprocessing import normalize

# Identifiers of two or more characters (letters, digits, underscores; not starting with a digit):
# keeps `asyncio`, `__init__` and `HTTPServer` whole and drops bare numbers and punctuation.
IDENTIFIER_TOKEN_PATTERN = r"(?u)\b[^\W\d]\w+\b"
FORMAT_VERSION = 1
ARRAYS_FILE = "partition.safetensors"
META_FILE = "partition.json"
TextLike = bytes | str


# ---------------------------------------------------------------------------------------------
# Clustering math
# ---------------------------------------------------------------------------------------------


def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances, (n, D) x (k, D) -> (n, k), clipped at 0."""
    x_sq = np.einsum("nd,nd->n", x, x)[:, None]
    c_sq = np.einsum("kd,kd->k", centroids, centroids)[None, :]
    return np.maximum(x_sq - 2.0 * (x @ centroids.T) + c_sq, 0.0)


def balanced_cap(n: int, k: int, slack: float) -> int:
    """Largest cluster size allowed by balanced k-means: ceil(n / k * (1 + slack))."""
    return math.ceil(n / k * (1.0 + slack) - 1e-9)


def greedy_capped_assignment(
    distances: np.ndarray, cap: float, weights: np.ndarray | None = None
) -> np.ndarray:
    """Assign each row to a column, nearest pairs first, no column above ``cap`` rows.

    ``distances`` is (n, k); needs ``cap * k >= n``. Cost O(n k log(n k)). Deterministic: pairs
    are visited in a stable sort order, ties going to the lower document, then cluster, index.

    With ``weights`` (n,), positive: a column's load is the sum of its rows' weights and
    ``cap`` is in weight units (e.g. bytes); a row that fits in no column (one heavier than
    any room left) goes, after the walk, to the column with the least load, heaviest first.
    """
    n, k = distances.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not (w > 0).all():
        raise ValueError("weights must be one positive number per row")
    if cap * k < w.sum() - 1e-9 * w.sum():
        raise ValueError(f"cap {cap} x {k} clusters cannot hold {w.sum():g} (documents or bytes)")
    labels = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.float64)
    assigned = 0
    for flat in np.argsort(distances, axis=None, kind="stable"):
        row, col = divmod(int(flat), k)
        if labels[row] >= 0 or load[col] + w[row] > cap + 1e-9:
            continue
        labels[row] = col
        load[col] += w[row]
        assigned += 1
        if assigned == n:
            break
    for row in sorted(np.flatnonzero(labels < 0), key=lambda r: (-w[r], r)):
        col = int(np.argmin(load))
        labels[row] = col
        load[col] += w[row]
    return labels


def fill_empty_clusters(labels: np.ndarray, distances: np.ndarray, k: int) -> np.ndarray:
    """Give every empty cluster the member of the currently largest cluster nearest to it."""
    labels = labels.copy()
    for cluster in range(k):
        sizes = np.bincount(labels, minlength=k)
        if sizes[cluster] > 0:
            continue
        donor = int(np.argmax(sizes))
        members = np.flatnonzero(labels == donor)
        labels[members[np.argmin(distances[members, cluster])]] = cluster
    return labels


def cluster_means(x: np.ndarray, labels: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Mean of each cluster's members; an empty cluster keeps its ``previous`` centroid."""
    k = previous.shape[0]
    sums = np.zeros_like(previous)
    np.add.at(sums, labels, x)
    sizes = np.bincount(labels, minlength=k)
    means = previous.copy()
    filled = sizes > 0
    means[filled] = sums[filled] / sizes[filled, None]
    return means


def kmeans_partition(
    x: np.ndarray,
    k: int,
    *,
    balanced: bool,
    slack: float,
    seed: int,
    n_init: int,
    max_iter: int = 50,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the rows of ``x`` (n, D) -> (labels (n,), centroids (k, D)), no cluster empty.

    ``weights`` (balanced only): balance the clusters' summed weights (e.g. bytes per
    document) instead of their member counts."""
    kmeans = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
    centroids = kmeans.cluster_centers_.astype(np.float64)
    labels = kmeans.labels_.astype(np.int64)
    if balanced:
        if weights is None:
            cap: float = balanced_cap(len(x), k, slack)
        else:
            cap = float(np.sum(weights)) / k * (1.0 + slack)
        labels = np.full(len(x), -1, dtype=np.int64)
        for _ in range(max_iter):
            new_labels = greedy_capped_assignment(squared_distances(x, centroids), cap, weights)
            if np.array_equal(new_labels, labels):
                break
            labels = new_labels
            centroids = cluster_means(x, labels, centroids)
    if np.bincount(labels, minlength=k).min() == 0:
        labels = fill_empty_clusters(labels, squared_distances(x, centroids), k)
    return labels, cluster_means(x, labels, centroids)


# ---------------------------------------------------------------------------------------------
# Embedders: turn raw inputs into the vectors that were clustered
# ---------------------------------------------------------------------------------------------


def decode_texts(texts: Sequence[TextLike]) -> list[str]:
    """Decode bytes as UTF-8 (bad bytes replaced); pass strings through."""
    if isinstance(texts, str | bytes):
        raise TypeError("expected a list of documents, got a single str/bytes; wrap it in a list")
    out = []
    for i, text in enumerate(texts):
        if isinstance(text, bytes):
            out.append(text.decode("utf-8", errors="replace"))
        elif isinstance(text, str):
            out.append(text)
        else:
            raise TypeError(f"document {i} is {type(text).__name__}; expected str or bytes")
    return out


def l2_normalise_rows(x: np.ndarray) -> np.ndarray:
    """Scale each row to unit L2 norm; all-zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


@dataclass
class TextEmbedder:
    """TF-IDF (fixed vocabulary and IDF) -> SVD projection -> L2 normalisation.

    Mirrors sklearn's ``TfidfVectorizer`` (norm="l2", optional sublinear tf) followed by
    ``TruncatedSVD.transform``, rebuilt from plain arrays so it can be saved without pickle.
    """

    vocabulary: list[str]  # term of each TF-IDF column, in column order
    idf: np.ndarray  # (V,)
    components: np.ndarray  # (D, V) SVD components
    token_pattern: str = IDENTIFIER_TOKEN_PATTERN
    lowercase: bool = True
    sublinear_tf: bool = True

    def __post_init__(self) -> None:
        self._counter = CountVectorizer(
            vocabulary={term: i for i, term in enumerate(self.vocabulary)},
            token_pattern=self.token_pattern,
            lowercase=self.lowercase,
            dtype=np.float64,
        )

    def tfidf(self, texts: Sequence[TextLike]) -> sp.csr_matrix:
        """(n, V) sparse TF-IDF rows, L2 normalised."""
        counts = self._counter.transform(decode_texts(texts)).tocsr()
        if self.sublinear_tf:
            counts.data = np.log(counts.data) + 1.0
        return normalize(sp.csr_matrix(counts.multiply(self.idf[None, :])), norm="l2")

    def embed(self, texts: Sequence[TextLike]) -> np.ndarray:
        """(n, D) unit-norm embeddings (all-zero for a text with no known term)."""
        return l2_normalise_rows(np.asarray(self.tfidf(texts) @ self.components.T))

    def top_terms(self, centroid: np.ndarray, count: int = 5) -> list[str]:
        """Terms weighing most in a centroid, read back through the SVD components."""
        weights = centroid @ self.components
        return [self.vocabulary[i] for i in np.argsort(-weights, kind="stable")[:count]]

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {"idf": self.idf, "components": self.components}
        meta = {
            "vocabulary": self.vocabulary,
            "token_pattern": self.token_pattern,
            "lowercase": self.lowercase,
            "sublinear_tf": self.sublinear_tf,
        }
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict) -> TextEmbedder:
        return cls(
            vocabulary=list(meta["vocabulary"]),
            idf=arrays["idf"],
            components=arrays["components"],
            token_pattern=meta["token_pattern"],
            lowercase=bool(meta["lowercase"]),
            sublinear_tf=bool(meta["sublinear_tf"]),
        )


@dataclass
class VectorEmbedder:
    """Flatten each sample to a vector; optionally project it on PCA components."""

    input_dim: int
    mean: np.ndarray | None = None  # (d,) PCA mean
    components: np.ndarray | None = None  # (D, d) PCA components

    def embed(self, x: np.ndarray) -> np.ndarray:
        """(n, ...) samples -> (n, D) float64 vectors."""
        x = np.asarray(x, dtype=np.float64)
        x = x.reshape(len(x), -1)
        if x.shape[1] != self.input_dim:
            raise ValueError(
                f"samples have {x.shape[1]} features; this partition was fitted on {self.input_dim}"
            )
        if self.components is None:
            return x
        return (x - self.mean) @ self.components.T

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {}
        if self.components is not None:
            arrays = {"mean": self.mean, "components": self.components}
        return arrays, {"input_dim": self.input_dim}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict) -> VectorEmbedder:
        return cls(int(meta["input_dim"]), arrays.get("mean"), arrays.get("components"))


EMBEDDERS: dict[str, type[TextEmbedder] | type[VectorEmbedder]] = {
    "text": TextEmbedder,
    "vector": VectorEmbedder,
}


# ---------------------------------------------------------------------------------------------
# The fitted partition
# ---------------------------------------------------------------------------------------------


@dataclass
class Partition:
    """A fitted partition: which cluster each training item is in, and how to place new ones."""

    labels: np.ndarray  # (n,) int64 in [0, k)
    centroids: np.ndarray  # (k, D)
    member_distances: np.ndarray  # (n,) squared distance of each item to its own centroid
    embedder: TextEmbedder | VectorEmbedder

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def kind(self) -> str:
        return "text" if isinstance(self.embedder, TextEmbedder) else "vector"

    @property
    def sizes(self) -> np.ndarray:
        """(k,) number of training items in each cluster."""
        return np.bincount(self.labels, minlength=self.k)

    def embed(self, inputs) -> np.ndarray:
        """Embed new texts (or samples) exactly as the training data was embedded: (n, D)."""
        return self.embedder.embed(inputs)

    def assign(self, inputs) -> np.ndarray:
        """Nearest-centroid cluster of each new input: (n,) int64. No balancing cap here."""
        return np.argmin(squared_distances(self.embed(inputs), self.centroids), axis=1)

    def members(self, cluster: int) -> np.ndarray:
        """Indices of the training items in ``cluster``, nearest to its centroid first."""
        idx = np.flatnonzero(self.labels == cluster)
        return idx[np.argsort(self.member_distances[idx], kind="stable")]

    def report(self, names: Sequence[str] | None = None, examples: int = 3) -> str:
        """Cluster sizes, top terms (text) and the ``examples`` members nearest each centroid."""
        n = len(self.labels)
        if names is not None and len(names) != n:
            raise ValueError(f"got {len(names)} names for {n} partitioned items")
        lines = [f"{self.kind} partition: {self.k} clusters over {n} items"]
        for cluster, size in enumerate(self.sizes):
            line = f"cluster {cluster}: {size} items ({100.0 * size / n:.1f}%)"
            if isinstance(self.embedder, TextEmbedder):
                terms = self.embedder.top_terms(self.centroids[cluster])
                line += f"  terms: {', '.join(terms)}"
            nearest = self.members(cluster)[:examples]
            shown = [names[i] if names is not None else f"#{i}" for i in nearest]
            lines.append(f"{line}  nearest: {', '.join(shown)}")
        return "\n".join(lines)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``partition.safetensors`` and ``partition.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        embedder_arrays, embedder_meta = self.embedder.state()
        arrays = {
            "labels": self.labels.astype(np.int64),
            "centroids": self.centroids,
            "member_distances": self.member_distances,
            **{f"embedder.{key}": value for key, value in embedder_arrays.items()},
        }
        arrays = {key: np.ascontiguousarray(value) for key, value in arrays.items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "k": self.k,
            "embedder": embedder_meta,
        }
        # Write both files beside their final names, then rename: a crash leaves no half file.
        save_file(arrays, str(directory / (ARRAYS_FILE + ".tmp")))
        (directory / (META_FILE + ".tmp")).write_text(json.dumps(meta, ensure_ascii=False))
        os.replace(directory / (ARRAYS_FILE + ".tmp"), directory / ARRAYS_FILE)
        os.replace(directory / (META_FILE + ".tmp"), directory / META_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Partition:
        """Read a partition written by ``save``."""
        directory = Path(directory)
        meta_path, arrays_path = directory / META_FILE, directory / ARRAYS_FILE
        if not meta_path.is_file() or not arrays_path.is_file():
            raise FileNotFoundError(
                f"no saved partition in {directory}: expected {META_FILE} and {ARRAYS_FILE} "
                "(run `router partition CONFIG` to create them)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path} has format_version {meta.get('format_version')!r}; this code "
                f"reads version {FORMAT_VERSION}. Re-run the partition step."
            )
        if meta.get("kind") not in EMBEDDERS:
            raise ValueError(f"{meta_path}: unknown partition kind {meta.get('kind')!r}")
        arrays = load_file(str(arrays_path))
        prefix = "embedder."
        embedder_arrays = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        embedder = EMBEDDERS[meta["kind"]].from_state(embedder_arrays, meta["embedder"])
        return cls(
            labels=arrays["labels"],
            centroids=arrays["centroids"],
            member_distances=arrays["member_distances"],
            embedder=embedder,
        )


def _fitted_partition(
    x: np.ndarray, embedder, settings: _Partitioner, weights: np.ndarray | None = None
) -> Partition:
    """Cluster the embedded training items ``x`` (n, D) with a partitioner's settings."""
    labels, centroids = kmeans_partition(
        x,
        settings.k,
        balanced=settings.balanced,
        slack=settings.balance_slack,
        seed=settings.seed,
        n_init=settings.n_init,
        weights=weights,
    )
    member_distances = ((x - centroids[labels]) ** 2).sum(axis=1)
    return Partition(labels, centroids, member_distances, embedder)


def _check_k(k: int, n: int, what: str) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if n < k:
        raise ValueError(f"cannot split {n} {what} into k={k} non-empty clusters")


class _Partitioner:
    """Clustering settings and the shared ``embed`` / ``assign`` of a fitted partitioner."""

    k: int
    balanced: bool
    balance_slack: float
    seed: int
    n_init: int
    partition: Partition | None = None

    def _fitted(self) -> Partition:
        if self.partition is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(...) first")
        return self.partition

    def embed(self, inputs) -> np.ndarray:
        return self._fitted().embed(inputs)

    def assign(self, inputs) -> np.ndarray:
        return self._fitted().assign(inputs)


class TextPartitioner(_Partitioner):
    """c-BTM text clustering: TF-IDF -> SVD(svd_dims) -> L2 -> (balanced) k-means."""

    def __init__(
        self,
        k: int,
        svd_dims: int = 100,
        max_features: int | None = 50_000,
        balanced: bool = False,
        seed: int = 0,
        *,
        balance_slack: float = 0.1,
        n_init: int = 10,
        token_pattern: str = IDENTIFIER_TOKEN_PATTERN,
        lowercase: bool = True,
        sublinear_tf: bool = True,
        min_df: int | float = 1,
        max_df: int | float = 1.0,
        balance_by: str = "documents",
    ):
        if balance_by not in ("documents", "bytes"):
            raise ValueError(f"balance_by must be 'documents' or 'bytes', got {balance_by!r}")
        self.balance_by = balance_by
        if svd_dims < 1:
            raise ValueError(f"svd_dims must be >= 1, got {svd_dims}")
        if balance_slack < 0:
            raise ValueError(f"balance_slack must be >= 0, got {balance_slack}")
        self.k = k
        self.svd_dims = svd_dims
        self.max_features = max_features
        self.balanced = balanced
        self.balance_slack = balance_slack
        self.seed = seed
        self.n_init = n_init
        self.token_pattern = token_pattern
        self.lowercase = lowercase
        self.sublinear_tf = sublinear_tf
        self.min_df = min_df
        self.max_df = max_df

    def fit(self, texts: Sequence[TextLike]) -> Partition:
        """Cluster ``texts``; returns (and keeps) the ``Partition``."""
        docs = decode_texts(texts)
        _check_k(self.k, len(docs), "documents")
        vectorizer = TfidfVectorizer(
            token_pattern=self.token_pattern,
            lowercase=self.lowercase,
            sublinear_tf=self.sublinear_tf,
            max_features=self.max_features,
            min_df=self.min_df,
            max_df=self.max_df,
        )
        try:
            vectorizer.fit(docs)
        except ValueError as exc:  # sklearn: empty vocabulary, or min_df/max_df prune all
            raise ValueError(
                f"no usable terms in {len(docs)} documents ({exc}); check token_pattern, "
                "min_df and max_df"
            ) from exc
        vocabulary = [""] * len(vectorizer.vocabulary_)
        for term, column in vectorizer.vocabulary_.items():
            vocabulary[column] = term
        if len(vocabulary) < 2:
            raise ValueError(f"the documents share fewer than 2 distinct terms: {vocabulary}")
        # SVD rank is bounded by the data; components past it would be arbitrary directions.
        dims = max(1, min(self.svd_dims, len(docs) - 1, len(vocabulary) - 1))
        embedder = TextEmbedder(
            vocabulary,
            vectorizer.idf_.astype(np.float64),
            np.zeros((dims, len(vocabulary))),
            self.token_pattern,
            self.lowercase,
            self.sublinear_tf,
        )
        tfidf = embedder.tfidf(docs)
        svd = TruncatedSVD(n_components=dims, algorithm="randomized", random_state=self.seed)
        embedder.components = svd.fit(tfidf).components_.astype(np.float64)
        x = embedder.embed(docs)
        weights = None
        if self.balance_by == "bytes":  # each cluster about 1/k of the bytes, not of the files
            weights = np.array([max(1, len(d.encode("utf-8"))) for d in docs], dtype=np.float64)
        self.partition = _fitted_partition(x, embedder, self, weights)
        return self.partition


class VectorPartitioner(_Partitioner):
    """k-means on flattened samples (n, ...), optionally after PCA to ``pca_dims``."""

    def __init__(
        self,
        k: int,
        balanced: bool = False,
        seed: int = 0,
        pca_dims: int | None = None,
        *,
        balance_slack: float = 0.1,
        n_init: int = 10,
    ):
        if pca_dims is not None and pca_dims < 1:
            raise ValueError(f"pca_dims must be >= 1 or None, got {pca_dims}")
        if balance_slack < 0:
            raise ValueError(f"balance_slack must be >= 0, got {balance_slack}")
        self.k = k
        self.balanced = balanced
        self.seed = seed
        self.pca_dims = pca_dims
        self.balance_slack = balance_slack
        self.n_init = n_init

    def fit(self, samples: np.ndarray) -> Partition:
        """Cluster the rows of ``samples``; returns (and keeps) the ``Partition``."""
        x = np.asarray(samples, dtype=np.float64)
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"expected samples of shape (n, d, ...), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("samples contain NaN or Inf")
        x = x.reshape(len(x), -1)
        _check_k(self.k, len(x), "samples")
        embedder = VectorEmbedder(input_dim=x.shape[1])
        if self.pca_dims is not None:
            dims = min(self.pca_dims, *x.shape)
            pca = PCA(n_components=dims, svd_solver="full", random_state=self.seed).fit(x)
            embedder.mean = pca.mean_.astype(np.float64)
            embedder.components = pca.components_.astype(np.float64)
        self.partition = _fitted_partition(embedder.embed(x), embedder, self)
        return self.partition
