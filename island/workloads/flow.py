"""``flow``: flow matching on scikit-learn's bundled 8x8 digits (no download).

Conditional flow matching with the rectified-flow (linear) path: Lipman et al. 2023, "Flow
Matching for Generative Modeling", eq. 22-23 with sigma_min = 0, and Liu et al. 2023,
"Flow Straight and Fast". With x0 ~ N(0, I) noise, x1 a data image and t ~ U(0, 1)::

    x_t = (1 - t) * x0 + t * x1          # t = 0 is noise, t = 1 is data
    u   = x1 - x0                        # the target velocity, d x_t / d t
    loss = mean over pixels of (v_theta(x_t, t) - u)^2

``sample`` integrates dx/dt = v(x, t) from t = 0 to 1 with Euler steps. The velocity field
is any callable, so an ensemble of experts (Decentralized Diffusion Models, McAllister et
al. 2025: a router's weights mixing expert velocities) plugs in directly.

The images (1797, 8x8, values 0..16) are scaled to [-1, 1]; a stable ~15% are held out for
validation by a hash of their id ``digits/<index>``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from comms.errors import ConfigError
from island.workloads import (
    TRAIN_STREAM,
    VALIDATION_STREAM,
    BatchIterator,
    Document,
    Workload,
    check_seed,
    documents_fingerprint,
    mean_loss_no_grad,
    register_workload,
    select_documents,
)
from island.workloads.corpus import held_out

PIXELS = 64  # 8 x 8


@dataclasses.dataclass
class FlowConfig:
    hidden: int = 256  # width of the velocity MLP
    n_blocks: int = 2  # residual MLP blocks
    time_dim: int = 64  # size of the sinusoidal time embedding (even)
    val_fraction: float = 0.15  # share of images held out for validation (by id hash)
    batch_size: int = 64  # images per training step
    val_seed: int = 0  # fixes the validation noise and times
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto" (CUDA when available)

    def validate(self) -> None:
        for key in ("hidden", "n_blocks", "time_dim", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be at least 1, got {getattr(self, key)}")
        if self.time_dim % 2:
            raise ConfigError(f"time_dim: must be even, got {self.time_dim}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.val_seed < 0:
            raise ConfigError(f"val_seed: must be non-negative, got {self.val_seed}")


class FlowBatch(NamedTuple):
    x_t: torch.Tensor  # (B, 64) points on the noise-to-data path
    t: torch.Tensor  # (B,) times in [0, 1)
    velocity: torch.Tensor  # (B, 64) target u = x1 - x0
    doc_index: torch.Tensor  # (B,) int64, which training image each row comes from

    def to(self, device: torch.device | str) -> FlowBatch:
        return FlowBatch(*(v.to(device) for v in self))


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal features of t in [0, 1]: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t[:, None].float() * freqs[None, :]  # t is scaled as a step index
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.silu(self.fc1(self.norm(h) + temb)))


class VelocityMLP(nn.Module):
    """v_theta(x_t, t): (B, 64) and (B,) -> (B, 64); the time embedding enters every block."""

    def __init__(self, hidden: int = 256, n_blocks: int = 2, time_dim: int = 64):
        super().__init__()
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.input = nn.Linear(PIXELS, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden) for _ in range(n_blocks))
        self.output = nn.Linear(hidden, PIXELS)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = x_t.shape
        x = x_t.reshape(shape[0], PIXELS)
        temb = self.time_mlp(time_embedding(t.reshape(-1).expand(shape[0]), self.time_dim))
        h = self.input(x)  # (B, hidden)
        for block in self.blocks:
            h = block(h, temb)
        return self.output(F.silu(h)).reshape(shape)


@functools.lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 (N, 64) in [-1, 1], and their labels (N,) int64."""
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import

    digits = load_digits()
    images = (digits.data.astype(np.float32) / 8.0 - 1.0).astype(np.float32)
    return images, digits.target.astype(np.int64)


def flow_matching_example(
    rng: np.random.Generator, x1: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw x0 ~ N(0, I) and t ~ U(0, 1) for the data rows ``x1`` (B, 64); return
    (x_t, t, u) on the linear path x_t = (1 - t) x0 + t x1 with u = x1 - x0."""
    x0 = rng.standard_normal(x1.shape, dtype=np.float32)
    t = rng.random(len(x1), dtype=np.float32)
    x_t = (1.0 - t[:, None]) * x0 + t[:, None] * x1
    return x_t, t, x1 - x0


@register_workload("flow")
class FlowWorkload(Workload):
    Config = FlowConfig

    def __init__(self, config: FlowConfig | None = None):
        super().__init__(config)
        images, labels = load_digit_images()
        ids = [f"digits/{i}" for i in range(len(images))]
        held = np.array(held_out(ids, self.config.val_fraction))
        self.train_images, self.train_labels = images[~held], labels[~held]
        self.val_images, self.val_labels = images[held], labels[held]
        self.train_ids = [i for i, h in zip(ids, held, strict=True) if not h]
        self.val_ids = [i for i, h in zip(ids, held, strict=True) if h]

    def build_model(self, seed: int) -> VelocityMLP:
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(check_seed(seed))
            model = VelocityMLP(c.hidden, c.n_blocks, c.time_dim)
        return model.to(self.device)

    def documents(self) -> list[Document]:
        return [
            Document(i, x, int(y))
            for i, x, y in zip(self.train_ids, self.train_images, self.train_labels, strict=True)
        ]

    def validation_documents(self) -> list[Document]:
        return [
            Document(i, x, int(y))
            for i, x, y in zip(self.val_ids, self.val_images, self.val_labels, strict=True)
        ]

    def _example_source(self, images: np.ndarray, chosen: list[int]):
        rows = np.asarray(chosen, dtype=np.int64)

        def make_batch(rng: np.random.Generator) -> FlowBatch:
            picked = rows[rng.integers(0, len(rows), size=self.config.batch_size)]
            x_t, t, u = flow_matching_example(rng, images[picked])
            batch = FlowBatch(*(torch.from_numpy(a) for a in (x_t, t, u, picked)))
            return batch.to(self.device) if self.device.type != "cpu" else batch

        return make_batch

    def train_batches(
        self,
        seed: int,
        shard: int = 0,
        num_shards: int = 1,
        doc_indices: Sequence[int] | None = None,
    ) -> BatchIterator[FlowBatch]:
        seed = check_seed(seed)
        chosen = select_documents(len(self.train_images), shard, num_shards, doc_indices)
        fingerprint = documents_fingerprint("flow", seed, shard, num_shards, chosen)
        make_batch = self._example_source(self.train_images, chosen)
        return BatchIterator(make_batch, [seed, TRAIN_STREAM, shard], fingerprint)

    def loss(self, model: nn.Module, batch: FlowBatch) -> torch.Tensor:
        return F.mse_loss(model(batch.x_t, batch.t), batch.velocity)

    def validation_loss(
        self,
        model: nn.Module,
        max_batches: int = 8,
        doc_indices: Sequence[int] | None = None,
    ) -> float:
        chosen = select_documents(len(self.val_images), 0, 1, doc_indices)
        make_batch = self._example_source(self.val_images, chosen)
        batches = BatchIterator(make_batch, [self.config.val_seed, VALIDATION_STREAM, 0], "val")
        return mean_loss_no_grad(self, model, batches, max_batches)

    def flops_per_step(self, batch_size: int | None = None) -> float:
        """6 N per image (2 N forward, 4 N backward), N the weights and biases of the Linear
        layers (every one is used once per image; LayerNorm and activations are ignored)."""
        c = self.config
        n = (
            (c.time_dim + 1) * c.hidden
            + (c.hidden + 1) * c.hidden
            + (PIXELS + 1) * c.hidden
            + c.n_blocks * 2 * (c.hidden + 1) * c.hidden
            + (c.hidden + 1) * PIXELS
        )
        return float(6 * n * (batch_size or c.batch_size))


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample(
    velocity_fn: VelocityFn,
    n: int,
    steps: int = 50,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """``n`` images (n, 8, 8) by Euler integration of dx/dt = velocity_fn(x, t) from noise
    at t = 0 to data at t = 1; ``velocity_fn`` takes x (n, 64) and t (n,) on ``device``."""
    if n < 1 or steps < 1:
        raise ValueError(f"sample: n and steps must be positive, got n={n}, steps={steps}")
    rng = np.random.default_rng([check_seed(seed), 2])
    x = torch.from_numpy(rng.standard_normal((n, PIXELS), dtype=np.float32)).to(device)
    dt = 1.0 / steps
    for k in range(steps):
        t = torch.full((n,), k * dt, device=device)
        x = x + dt * velocity_fn(x, t).reshape(n, PIXELS)
    return x.float().cpu().numpy().reshape(n, 8, 8)


def model_velocity(model: nn.Module) -> VelocityFn:
    """A single model as a velocity field for ``sample`` (puts it in eval mode)."""
    model.eval()
    return lambda x, t: model(x, t)
