"""Train a router to predict each training item's cluster, and measure how well it does.

The router is trained apart from the experts (Decentralized Diffusion Models, McAllister et al.
2025, Algorithm 1; c-BTM, Gururangan et al. 2023): cross-entropy between its logits and the
cluster label of the item the input was drawn from, AdamW. Its optimum is ``p(k | input)``.

- flow: a training image ``x1`` with label ``k`` becomes ``(x_t, t)`` through the workload's
  own ``flow_matching_example`` (x_t = (1 - t) x0 + t x1, t ~ U(0, 1); t = 1 is data), so the
  router sees exactly the inputs the ensemble will route while sampling.
- bytelm: windows of ``router.context`` bytes inside one document, each position labelled
  with the document's cluster; a document shorter than the window fills its start and the
  rest is masked. Positions are weighted uniformly or, with ``position_weighting="linear"``,
  in proportion to the prefix length (late positions have seen more and should be right).

Evaluation draws the same kind of inputs from held-out documents (labels from
``held_out_labels``: the partition's nearest centroid): ``router_accuracy`` overall, and for
flow ``accuracy_by_noise`` per band of ``t``. Draws are functions of ``seed`` only.

Synchronous, single-threaded; the router is moved to the workload's device.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from island.workloads import Document, Workload
from island.workloads.flow import flow_matching_example
from router.partition import Partition

__all__ = [
    "RouterTrainMetrics",
    "accuracy_by_noise",
    "held_out_labels",
    "noisy_examples",
    "router_accuracy",
    "router_train_flops",
    "sample_document_windows",
    "train_router",
]


@dataclasses.dataclass
class RouterTrainMetrics:
    steps: int
    final_loss: float  # mean cross-entropy over the last 10% of steps
    train_accuracy: float  # accuracy on the training draws of the last 10% of steps
    losses: list[float]  # cross-entropy of every step
    train_flops: float  # router_train_flops estimate
    seconds: float


# --- drawing labelled inputs ------------------------------------------------------------------


def noisy_examples(
    rng: np.random.Generator, x1: np.ndarray, t_range: tuple[float, float] = (0.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """(x_t, t) for images ``x1`` (B, 64) via the workload's ``flow_matching_example``, with
    t rescaled to ``t_range``; x_t stays on the same path (x0 = x1 - u)."""
    x_t, t, u = flow_matching_example(rng, x1)
    lo, hi = t_range
    if (lo, hi) != (0.0, 1.0):
        t = (lo + (hi - lo) * t).astype(np.float32)
        x_t = x1 - (1.0 - t[:, None]) * u  # (1 - t) x0 + t x1 with x0 = x1 - u
    return x_t.astype(np.float32), t


def pack_texts(contents: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Documents back to back as uint8, and offsets (n + 1,)."""
    lengths = np.array([len(c) for c in contents], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.frombuffer(b"".join(contents), dtype=np.uint8), offsets


def sample_document_windows(
    rng: np.random.Generator,
    data: np.ndarray,
    offsets: np.ndarray,
    batch_size: int,
    length: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``batch_size`` windows of ``length`` bytes, each inside one document.

    Documents are drawn in proportion to their length (so every byte is equally likely, as in
    the experts' training stream), then a uniform start. Returns windows (B, L) int64, a mask
    (B, L) bool (False past the end of a short document, whose window is zero-filled there)
    and the document of each window (B,).
    """
    lengths = np.diff(offsets)
    if lengths.sum() == 0:
        raise ValueError("the documents are all empty; nothing to draw windows from")
    docs = rng.choice(len(lengths), size=batch_size, p=lengths / lengths.sum())
    spare = np.maximum(lengths[docs] - length, 0)
    starts = offsets[docs] + (rng.random(batch_size) * (spare + 1)).astype(np.int64)
    valid = np.minimum(lengths[docs], length)
    mask = np.arange(length)[None, :] < valid[:, None]  # (B, L)
    positions = np.minimum(starts[:, None] + np.arange(length), len(data) - 1)
    windows = np.where(mask, data[positions], 0).astype(np.int64)
    return windows, mask, docs


def position_weights(mask: np.ndarray, weighting: str) -> np.ndarray:
    """Per-position loss weights (B, L), zero where masked, summing to 1 over the batch."""
    if weighting == "uniform":
        w = mask.astype(np.float32)
    elif weighting == "linear":
        w = mask * np.arange(1, mask.shape[1] + 1, dtype=np.float32)[None, :]
    else:
        raise ValueError(f"position_weighting must be 'uniform' or 'linear', got {weighting!r}")
    return (w / w.sum()).astype(np.float32)


def _images(documents: Sequence[Document]) -> np.ndarray:
    return np.stack([np.asarray(d.content, dtype=np.float32) for d in documents])


def _check_labels(labels, documents: Sequence[Document], num_experts: int) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(documents):
        raise ValueError(
            f"got {len(labels)} labels for {len(documents)} documents; pass one cluster label "
            "per document, in the order of workload.documents() (Partition.labels)"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_experts):
        raise ValueError(
            f"labels span [{labels.min()}, {labels.max()}] but the router has {num_experts} "
            "outputs; resize its head or check the partition"
        )
    return labels


def held_out_labels(partition: Partition, documents: Sequence[Document]) -> np.ndarray:
    """Cluster of each (held-out) document: the partition's nearest centroid."""
    if partition.kind == "text":
        return partition.assign([d.content for d in documents])
    return partition.assign(_images(documents))


def _device(router: nn.Module) -> torch.device:
    tensor = next(iter(router.parameters()), None)
    if tensor is None:
        tensor = next(iter(router.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class _LabelledDraws:
    """Draws a labelled batch of router inputs from documents: ``draw(rng, n)`` returns
    (inputs tuple, targets (n,) or (n, L), loss weights or None)."""

    def __init__(self, workload: Workload, documents, labels, router, t_range, weighting):
        self.kind = workload.name
        self.labels = _check_labels(labels, documents, router.num_experts)
        self.device = _device(router)
        self.t_range = t_range
        self.weighting = weighting
        if self.kind == "flow":
            self.images = _images(documents)
        elif self.kind == "bytelm":
            self.data, self.offsets = pack_texts([bytes(d.content) for d in documents])
            self.length = getattr(router, "context", None) or workload.config.context
        else:
            raise ValueError(
                f"routers are defined for the flow and bytelm workloads, not {self.kind!r}"
            )

    def draw(self, rng: np.random.Generator, n: int):
        if self.kind == "flow":
            rows = rng.integers(0, len(self.images), size=n)
            x_t, t = noisy_examples(rng, self.images[rows], self.t_range)
            inputs = (torch.from_numpy(x_t), torch.from_numpy(t))
            targets, weights = torch.from_numpy(self.labels[rows]), None
        else:
            windows, mask, docs = sample_document_windows(
                rng, self.data, self.offsets, n, self.length
            )
            inputs = (torch.from_numpy(windows),)
            targets = torch.from_numpy(np.repeat(self.labels[docs][:, None], self.length, 1))
            weights = torch.from_numpy(position_weights(mask, self.weighting))
        move = lambda x: x.to(self.device)  # noqa: E731
        return (
            tuple(map(move, inputs)),
            move(targets),
            None if weights is None else move(weights),
        )


def _loss_and_hits(logits, targets, weights) -> tuple[torch.Tensor, float]:
    """Cross-entropy (weighted per position for text) and the weighted accuracy."""
    hits = (logits.argmax(dim=-1) == targets).float()
    if weights is None:
        return F.cross_entropy(logits, targets), float(hits.mean())
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    w = weights.flatten()
    return (ce * w).sum(), float((hits.flatten() * w).sum())


# --- training --------------------------------------------------------------------------------


def train_router(
    router: nn.Module,
    workload: Workload,
    partition_labels,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    *,
    weight_decay: float = 0.01,
    position_weighting: str = "uniform",
    documents: Sequence[Document] | None = None,
) -> RouterTrainMetrics:
    """Train ``router`` in place by cross-entropy against ``partition_labels`` (one per
    document of ``workload.documents()``, or of ``documents`` when given)."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    params = [p for p in router.parameters() if p.requires_grad]
    if not params:
        raise TypeError(f"{type(router).__name__} has no trainable parameters; nothing to train")
    router.to(workload.device)
    docs = documents if documents is not None else workload.documents()
    draws = _LabelledDraws(workload, docs, partition_labels, router, (0.0, 1.0), position_weighting)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng([seed, 7])
    losses, accuracies = [], []
    was_training = router.training
    router.train()
    started = time.perf_counter()
    for _ in range(steps):
        inputs, targets, weights = draws.draw(rng, batch_size)
        loss, accuracy = _loss_and_hits(router(*inputs), targets, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        accuracies.append(accuracy)
    router.train(was_training)
    tail = max(1, steps // 10)
    positions = draws.length if draws.kind == "bytelm" else 1
    return RouterTrainMetrics(
        steps=steps,
        final_loss=float(np.mean(losses[-tail:])),
        train_accuracy=float(np.mean(accuracies[-tail:])),
        losses=losses,
        train_flops=router_train_flops(router, steps, batch_size, positions),
        seconds=time.perf_counter() - started,
    )


def router_train_flops(router: nn.Module, steps: int, batch_size: int, positions: int = 1) -> float:
    """Forward plus backward (3x forward) FLOPs of training: ``positions`` routed inputs per
    example (1 for images, the window length for text)."""
    return 3.0 * router.flops_per_forward() * steps * batch_size * positions


# --- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def _accuracy(router, draws: _LabelledDraws, rng, samples: int, batch_size: int) -> float:
    was_training = router.training
    router.eval()
    hits, total = 0.0, 0.0
    try:
        for start in range(0, samples, batch_size):
            inputs, targets, weights = draws.draw(rng, min(batch_size, samples - start))
            _, accuracy = _loss_and_hits(router(*inputs), targets, weights)
            n = len(targets)
            hits, total = hits + accuracy * n, total + n
    finally:
        router.train(was_training)
    return hits / total


def router_accuracy(
    router: nn.Module,
    workload: Workload,
    labels,
    documents: Sequence[Document] | None = None,
    *,
    samples: int = 2048,
    batch_size: int = 512,
    seed: int = 0,
    t_range: tuple[float, float] = (0.0, 1.0),
) -> float:
    """Share of ``samples`` draws from ``documents`` (default: the held-out ones, labelled by
    ``labels``) whose most likely expert is the label. Flow draws t in ``t_range``; text
    counts every unmasked position of each window."""
    docs = documents if documents is not None else workload.validation_documents()
    lo, hi = t_range
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"t_range must satisfy 0 <= lo < hi <= 1, got {t_range}")
    draws = _LabelledDraws(workload, docs, labels, router, t_range, "uniform")
    return _accuracy(router, draws, np.random.default_rng([seed, 11]), samples, batch_size)


def accuracy_by_noise(
    router: nn.Module,
    workload: Workload,
    labels,
    documents: Sequence[Document] | None = None,
    bins: int | Sequence[float] = 5,
    *,
    samples_per_bin: int = 1024,
    seed: int = 0,
) -> list[tuple[float, float, float]]:
    """Flow only: ``(t_lo, t_hi, accuracy)`` per band of t (``bins`` equal bands of [0, 1],
    or explicit increasing edges). Low t is mostly noise, so accuracy there nears chance."""
    if workload.name != "flow":
        raise ValueError("accuracy_by_noise is for the flow workload (noise levels t)")
    edges = np.linspace(0.0, 1.0, bins + 1) if isinstance(bins, int) else np.asarray(bins)
    if len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bins must be a positive count or increasing edges, got {bins!r}")
    bands = []
    for lo, hi in itertools.pairwise(edges.tolist()):
        accuracy = router_accuracy(
            router,
            workload,
            labels,
            documents,
            samples=samples_per_bin,
            seed=seed,
            t_range=(lo, hi),
        )
        bands.append((lo, hi, accuracy))
    return bands
