"""Router networks: small classifiers that say which expert an input belongs to.

Expert mode trains each expert in isolation on one cluster of the data; a router, trained
separately and by plain cross-entropy against the cluster label, then estimates ``p(k | input)``
and its probabilities weigh the experts at inference.

- ``FlowRouter`` (Decentralized Diffusion Models; McAllister et al. 2025, section 3.3 and
  Algorithm 1): a classifier on the noisy sample ``x_t`` and the time ``t``. Trained on
  ``(x_t, t, k)`` with ``x_t`` drawn on the same path the experts train on, its optimum is
  ``p(k | x_t, t)``, which makes ``sum_k p(k | x_t, t) v_k(x_t, t)`` the exact velocity of the
  whole data set (their eq. 5). Here an MLP on the 64 pixels and a sinusoidal time embedding.
  Capacity matters: with a weak router, top-1 routing picks wrong experts at mid noise and the
  ensemble falls behind a single model, so the default is three hidden layers of 256.
- ``PrefixRouter`` (for byte LMs): a learned stand-in for c-BTM's prefix router. Byte
  embedding, a few causal convolutions, then at every position the running mean of the
  features so far joined with the current one, so one forward of (B, T) bytes gives
  ``p(k | prefix[:i+1])`` for every ``i``: the ensemble re-routes as a sequence grows.
- ``CbtmRouter`` (c-BTM; Gururangan et al. 2023, eq. 3): the non-parametric baseline. A prefix
  is embedded exactly like the clustered documents (TF-IDF -> SVD -> L2, ``Partition.embed``)
  and weighted by ``softmax(-||e(prefix) - c_k||^2 / T)`` with T = 0.1.

Every router maps its input to logits over K experts (``forward``) and to probabilities
(``probabilities`` for flow, ``prefix_probabilities`` / ``next_probabilities`` for text).
``resize_head(new_k, keep)`` keeps the output rows of surviving experts (in the order of
``keep``) and appends freshly initialised rows, so adding or removing an expert only means
retraining the router. ``flops_per_forward`` estimates the cost of one routed input (one image
or one byte position), for reporting router cost next to an expert's.

Plain synchronous torch modules; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from island.workloads import Workload
from island.workloads.bytelm import VOCAB
from island.workloads.flow import PIXELS, time_embedding
from router.partition import Partition
from router.rules import cbtm_router_weights

__all__ = [
    "CbtmRouter",
    "FlowRouter",
    "PrefixRouter",
    "Router",
    "expert_forward_flops",
    "linear_flops",
]


def linear_flops(layer: nn.Linear) -> int:
    """Multiply-adds of one input row through ``layer``, counted as 2 FLOPs each (+ bias)."""
    flops = 2 * layer.in_features * layer.out_features
    return flops + (layer.out_features if layer.bias is not None else 0)


def _check_keep(old_k: int, new_k: int, keep: Sequence[int]) -> list[int]:
    keep = [int(k) for k in keep]
    if len(set(keep)) != len(keep) or not all(0 <= k < old_k for k in keep):
        raise ValueError(f"keep must list distinct expert indices in [0, {old_k}); got {keep}")
    if new_k < max(1, len(keep)):
        raise ValueError(
            f"new_k={new_k} cannot hold the {len(keep)} kept experts; it must be at least "
            f"max(1, len(keep))"
        )
    return keep


class Router(nn.Module):
    """Base of the trained routers: a body producing features and a linear ``head`` to K."""

    head: nn.Linear

    @property
    def num_experts(self) -> int:
        return self.head.out_features

    @torch.no_grad()
    def resize_head(self, new_k: int, keep: Sequence[int]) -> None:
        """Output row ``i`` becomes the old row ``keep[i]``; rows ``len(keep)..new_k-1`` are
        new (default ``nn.Linear`` initialisation). Logits of kept experts are unchanged."""
        keep = _check_keep(self.num_experts, new_k, keep)
        old = self.head
        new = nn.Linear(old.in_features, new_k, bias=old.bias is not None)
        new = new.to(device=old.weight.device, dtype=old.weight.dtype)
        if keep:
            new.weight[: len(keep)] = old.weight[keep]
            if old.bias is not None:
                new.bias[: len(keep)] = old.bias[keep]
        self.head = new


class FlowRouter(Router):
    """``p(k | x_t, t)``: (B, 64) noisy images and (B,) times -> (B, K) logits."""

    def __init__(self, num_experts: int, hidden: int = 256, depth: int = 3, time_dim: int = 64):
        super().__init__()
        if num_experts < 1 or hidden < 1 or depth < 1 or time_dim < 2 or time_dim % 2:
            raise ValueError(
                "FlowRouter needs num_experts, hidden, depth >= 1 and an even time_dim >= 2; "
                f"got {num_experts}, {hidden}, {depth}, {time_dim}"
            )
        self.time_dim = time_dim
        layers: list[nn.Module] = [nn.Linear(PIXELS + time_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, num_experts)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x_t.shape[0]
        x = x_t.reshape(batch, PIXELS)
        temb = time_embedding(t.reshape(-1).expand(batch), self.time_dim).to(x.dtype)
        return self.head(self.body(torch.cat([x, temb], dim=1)))  # (B, K)

    def probabilities(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, K) router weights ``softmax(logits)``."""
        return torch.softmax(self(x_t, t).float(), dim=-1)

    def flops_per_forward(self) -> float:
        """FLOPs to route one image (Linear layers only; LayerNorm, SiLU, sin/cos ignored)."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        return float(sum(linear_flops(m) for m in linears))


class CausalConv(nn.Module):
    """Pre-norm residual causal convolution: position i sees positions i-kernel+1 .. i."""

    def __init__(self, d_model: int, kernel_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.conv = nn.Conv1d(d_model, d_model, kernel_size)
        self.pad = kernel_size - 1

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        z = self.norm(h).transpose(1, 2)  # (B, C, T)
        z = self.conv(F.pad(z, (self.pad, 0)))  # left padding only: causal
        return h + F.gelu(z).transpose(1, 2)


class PrefixRouter(Router):
    """``p(k | prefix)`` at every position: (B, T) bytes -> (B, T, K) logits.

    Position ``i`` combines the running mean of the features of bytes ``0..i`` (what the text
    is about so far) with the local features at ``i``; no position embedding, so any length
    works, but the router is trained on windows of ``context`` bytes and the ensemble feeds it
    the last ``context`` bytes of a prefix.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int = 64,
        n_layers: int = 2,
        kernel_size: int = 4,
        context: int = 128,
    ):
        super().__init__()
        if min(num_experts, d_model, n_layers, kernel_size, context) < 1:
            raise ValueError(
                "PrefixRouter needs num_experts, d_model, n_layers, kernel_size and context "
                f">= 1; got {num_experts}, {d_model}, {n_layers}, {kernel_size}, {context}"
            )
        self.context = context
        self.embedding = nn.Embedding(VOCAB, d_model)
        self.convs = nn.ModuleList(CausalConv(d_model, kernel_size) for _ in range(n_layers))
        self.mix = nn.Linear(2 * d_model, d_model)
        self.head = nn.Linear(d_model, num_experts)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embedding(idx.long())  # (B, T, C)
        for conv in self.convs:
            h = conv(h)
        counts = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)
        running_mean = h.cumsum(dim=1) / counts[None, :, None]  # (B, T, C)
        z = F.gelu(self.mix(torch.cat([running_mean, h], dim=-1)))
        return self.head(z)  # (B, T, K)

    def prefix_probabilities(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) bytes -> (B, T, K): position i holds ``p(k | idx[:, :i+1])``."""
        return torch.softmax(self(idx).float(), dim=-1)

    def next_probabilities(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) bytes -> (B, K) weights for the byte after ``idx`` (last ``context`` used)."""
        return self.prefix_probabilities(idx[:, -self.context :])[:, -1]

    def flops_per_forward(self) -> float:
        """FLOPs per byte position: convolutions, the mix and the head (norms ignored)."""
        flops = 0
        for conv in self.convs:
            c = conv.conv
            flops += 2 * c.in_channels * c.out_channels * c.kernel_size[0] + c.out_channels
        return float(flops + linear_flops(self.mix) + linear_flops(self.head))


class CbtmRouter(nn.Module):
    """c-BTM's router: no trained weights, just the partition's embedder and centroids.

    ``forward`` gives log-weights ``log softmax(-||e - c_k||^2 / T)`` so that it composes
    like the trained routers' logits; rows of a prefix with no known term embed to zero and
    get the weights of the zero vector, as in c-BTM.
    """

    context = None  # looks at the whole prefix

    def __init__(self, partition: Partition, temperature: float = 0.1):
        super().__init__()
        if partition.kind != "text":
            raise ValueError(
                "CbtmRouter needs a text partition (TextPartitioner); for images train a "
                "FlowRouter instead"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.partition = partition
        self.temperature = float(temperature)
        self.register_buffer("centroids", torch.as_tensor(partition.centroids, dtype=torch.float64))

    @property
    def num_experts(self) -> int:
        return int(self.centroids.shape[0])

    def weights_of_texts(self, texts: Sequence[bytes | str]) -> torch.Tensor:
        """(n,) texts -> (n, K) float32 c-BTM weights."""
        if not texts:
            return torch.zeros(0, self.num_experts)
        embeddings = torch.from_numpy(self.partition.embed(list(texts)))
        weights = cbtm_router_weights(embeddings, self.centroids.cpu(), self.temperature)
        return weights.float()

    @staticmethod
    def _rows_as_bytes(idx: torch.Tensor) -> list[bytes]:
        return [bytes(row.tolist()) for row in idx.to(device="cpu", dtype=torch.uint8)]

    def next_probabilities(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) bytes -> (B, K) weights of each whole row as a prefix."""
        return self.weights_of_texts(self._rows_as_bytes(idx)).to(idx.device)

    def prefix_probabilities(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) bytes -> (B, T, K): the weights of every prefix ``idx[b, :i+1]``
        (B * T embeddings: meant for evaluation on short windows)."""
        rows = self._rows_as_bytes(idx)
        texts = [row[: i + 1] for row in rows for i in range(len(row))]
        weights = self.weights_of_texts(texts)
        return weights.reshape(idx.shape[0], idx.shape[1], self.num_experts).to(idx.device)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.log(self.prefix_probabilities(idx))

    def resize_head(
        self, new_k: int, keep: Sequence[int], new_centroids: np.ndarray | None = None
    ) -> None:
        """Keep the centroids of surviving experts; experts ``len(keep)..new_k-1`` need their
        centroids in ``new_centroids`` (n_new, D), in the partition's embedding space."""
        keep = _check_keep(self.num_experts, new_k, keep)
        added = new_k - len(keep)
        dims = self.centroids.shape[1]
        new = np.zeros((0, dims)) if new_centroids is None else np.asarray(new_centroids)
        if new.ndim != 2 or new.shape != (added, dims):
            raise ValueError(
                f"c-BTM routing needs a centroid for each of the {added} new experts: pass "
                f"new_centroids of shape ({added}, {dims}), got "
                f"{None if new_centroids is None else tuple(new.shape)}"
            )
        kept = self.partition.centroids[keep]
        self.partition = Partition(
            labels=self.partition.labels,
            centroids=np.concatenate([kept, new.astype(np.float64)]),
            member_distances=self.partition.member_distances,
            embedder=self.partition.embedder,
        )
        self.centroids = torch.as_tensor(self.partition.centroids, dtype=torch.float64)

    def flops_per_forward(self, terms: int = 32) -> float:
        """Rough FLOPs to route one prefix with ``terms`` distinct known terms: the sparse
        TF-IDF times the SVD components (2 D per term), then distances to K centroids."""
        dims = self.centroids.shape[1]
        return float(2 * dims * terms + 3 * self.num_experts * dims)


def expert_forward_flops(workload: Workload) -> float:
    """Forward FLOPs of one expert for one routed input (an image, or a byte position):
    the workload's forward-plus-backward step estimate of one item, divided by 3."""
    per_item = workload.flops_per_step(batch_size=1) / 3.0
    if workload.name == "bytelm":
        per_item /= workload.config.context
    return per_item
