"""What the main job shows of its experts: samples, scores and prompts for the report.

flow (Decentralized Diffusion Models' setting, McAllister et al. 2025): every method samples
the same seed, so the same initial noise x_0, with the same Euler steps: the served ensemble
under each rule through ``router.Client`` (the router re-applied at every step), the
compute-matched monolith and each expert alone from their signed checkpoints. Each set is
scored by its Frechet distance to the held-out digits (``frechet.DigitFrechet``, as in
``scripts/bench_ensemble.py``; the floor is as many training digits). The router's held-out
accuracy is measured per band of the noise level t (``router.training.accuracy_by_noise``).
The student distilled from the ensemble (``router distill``) samples the same noise too.

bytelm: the prompts are cut from the held-out documents of the run's data, so a run on a
user's own text is prompted with that text.

Plain functions, run in the launcher's thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

RULES = {"full": "full", "top2": "top_k:2", "top1": "top1"}  # report key -> rule spec
GRID_COLUMNS = 12  # samples per row of the report's grid (the first seeds of every set)
NOISE_BANDS = 10


def sample_alone(directory: str, n: int, steps: int, seed: int, roster=None) -> np.ndarray:
    """(n, 8, 8) samples of one signed flow checkpoint (an expert, the monolith, the student)."""
    from island.checkpoint import load_expert
    from island.workloads.flow import model_velocity, sample

    model, _ = load_expert(directory, roster)
    return sample(model_velocity(model), n, steps, seed)


def sample_all(client, experts: list[str], monolith: str, n: int, steps: int, seed: int,
               roster=None) -> dict[str, np.ndarray]:  # fmt: skip
    """(n, 8, 8) samples of the monolith, the ensemble under each rule (served) and each
    expert alone, all from the same initial noise."""

    def alone(directory: str) -> np.ndarray:
        return sample_alone(directory, n, steps, seed, roster)

    sets = {"monolith": alone(monolith)}
    for key, rule in RULES.items():
        sets[key] = np.asarray(client.sample(n=n, steps=steps, seed=seed, rule=rule))
    for i, directory in enumerate(experts):
        sets[f"expert{i}"] = alone(directory)
    return sets


def flow_quality(sets: dict[str, np.ndarray], model: dict[str, Any], router_dir: str,
                 partition_dir: str, classifier_steps: int, samples_per_band: int, seed: int,
                 roster=None) -> dict[str, Any]:  # fmt: skip
    """Frechet distance of every sample set and the floor; router accuracy by noise band."""
    from frechet import DigitFrechet

    from island.workloads import get_workload
    from router.checkpoint import load_router
    from router.partition import Partition
    from router.training import accuracy_by_noise, held_out_labels

    workload = get_workload("flow", **model)
    scorer = DigitFrechet(workload, classifier_steps, seed)
    n = len(next(iter(sets.values())))
    frechet = {key: scorer.score(images) for key, images in sets.items()}
    frechet["floor"] = scorer.score(scorer.floor_images(n))
    router, _ = load_router(router_dir, roster)
    labels = held_out_labels(Partition.load(partition_dir), workload.validation_documents())
    bands = accuracy_by_noise(router, workload, labels, bins=NOISE_BANDS,
                              samples_per_bin=samples_per_band, seed=seed)  # fmt: skip
    return {
        "frechet": frechet,
        "samples": n,
        "held_out_images": len(workload.val_images),
        "classifier_held_out_accuracy": scorer.held_out_accuracy(),
        "router_accuracy_by_noise": [[lo, hi, acc] for lo, hi, acc in bands],
    }


def save_grid(sets: dict[str, np.ndarray], path: Path) -> list[str]:
    """The first ``GRID_COLUMNS`` samples of each set, one array per row; returns the rows."""
    np.savez_compressed(path, **{k: v[:GRID_COLUMNS].astype(np.float32) for k, v in sets.items()})
    return list(sets)


def held_out_prompts(model: dict[str, Any], count: int = 3, max_bytes: int = 40) -> list[str]:
    """``count`` prompts cut from held-out documents spread over the run's validation split:
    from the first non-blank line after the middle of each, at most ``max_bytes`` bytes,
    ending at a space or a line end where one is found."""
    from island.workloads import get_workload

    documents = get_workload("bytelm", **model).validation_documents()
    if not documents:
        raise ValueError("the data has no held-out documents to cut prompts from")
    picks = np.linspace(0, len(documents) - 1, count).round().astype(int)
    prompts = []
    for i in picks:
        text = bytes(documents[i].content)
        start = text.find(b"\n", len(text) // 2) + 1
        while start < len(text) and text[start : start + 1] in (b"\n", b"\r"):
            start += 1
        piece = text[start : start + max_bytes] or text[:max_bytes]
        cut = max(piece.rfind(b" "), piece.rfind(b"\n"))
        piece = piece[: cut + 1] if cut > 0 else piece
        prompts.append(piece.decode("utf-8", errors="ignore") or "\n")
    return prompts
