"""Sample quality as a Frechet distance in the feature space of a small digit classifier
(the FID formula of Heusel et al. 2017 on 8x8 digits), for ``scripts/bench_ensemble.py``."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn


class DigitClassifier(nn.Module):
    """MLP on 8x8 digits, (B, 64) -> (B, 10); ``features`` is its penultimate layer."""

    def __init__(self, hidden: int = 128, features: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, features), nn.SiLU()
        )
        self.head = nn.Linear(features, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32).reshape(len(images), 64))
        return self.body(x).double().numpy()


def train_digit_classifier(images: np.ndarray, labels: np.ndarray, steps: int, seed: int):
    """AdamW, batch 128, light Gaussian input noise so features stay sane on imperfect samples."""
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    rng = np.random.default_rng([seed, 17])
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    for _ in range(steps):
        rows = torch.from_numpy(rng.integers(0, len(images), size=128))
        x = x_all[rows] + 0.1 * torch.randn(len(rows), 64)
        loss = F.cross_entropy(model(x), y_all[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` of two feature sets (n, D)."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # near-singular product: regularise both sides
        eps = 1e-6 * np.eye(len(cov_a))
        root = scipy.linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    root = np.real(root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * root))


class DigitFrechet:
    """Frechet distances to a flow workload's held-out digits, in the features of a
    ``DigitClassifier`` trained on its training digits; ``floor_images(n)`` draws ``n``
    training digits (once, from ``seed``), whose distance is the floor a perfect sampler
    would reach with as many samples."""

    def __init__(self, workload, classifier_steps: int, seed: int):
        self.workload, self.seed = workload, seed
        self.classifier = train_digit_classifier(
            workload.train_images, workload.train_labels, classifier_steps, seed
        )
        self.held_out = self.classifier.features(workload.val_images)

    def held_out_accuracy(self) -> float:
        with torch.no_grad():
            logits = self.classifier(torch.from_numpy(self.workload.val_images))
        return float((logits.argmax(dim=1).numpy() == self.workload.val_labels).mean())

    def score(self, images: np.ndarray) -> float:
        """The distance of ``images`` (n, 8, 8) or (n, 64), clipped to [-1, 1]."""
        images = np.clip(np.asarray(images).reshape(len(images), -1), -1.0, 1.0)
        return frechet_distance(self.classifier.features(images), self.held_out)

    def floor_images(self, n: int) -> np.ndarray:
        train = self.workload.train_images
        rows = np.random.default_rng([self.seed, 19]).permutation(len(train))[:n]
        return train[rows]
