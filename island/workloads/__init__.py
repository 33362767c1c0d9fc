"""Workloads: a model plus its data, registered by name.

A workload answers everything the training machinery needs without knowing what it trains:
``build_model(seed)``, the training ``documents()`` (so a partitioner can cluster them for
expert mode), an infinite resumable iterator of training batches that can be sharded across
data-parallel islands and restricted to a partition's documents, the training ``loss``, a
deterministic ``validation_loss`` and a ``flops_per_step`` estimate.

Usage::

    workload = get_workload("bytelm", d_model=64, batch_size=8)
    model = workload.build_model(seed=0)
    batches = workload.train_batches(seed=0, shard=1, num_shards=4)
    loss = workload.loss(model, next(batches))
    state = batches.state_dict()          # put it in a snapshot; load_state_dict resumes

Batches are pure functions of ``(seed, shard, step)`` (a numpy ``SeedSequence`` keyed on all
three), so an iterator's state is just its step counter, and a restored iterator yields
exactly the batches the original would have. Everything here is synchronous and
single-threaded; an iterator is not shared between threads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch

from comms.config import config_from_dict
from comms.errors import ConfigError

__all__ = [
    "WORKLOADS",
    "BatchIterator",
    "Document",
    "Workload",
    "get_workload",
    "register_workload",
    "resolve_device",
]

Batch = TypeVar("Batch")

# SeedSequence stream tags, so training and validation draws never coincide.
TRAIN_STREAM = 0
VALIDATION_STREAM = 1


@dataclasses.dataclass(frozen=True)
class Document:
    """One unit of training data: a source file (text) or an image (a flat float vector)."""

    id: str  # stable name: a relative path ("asyncio/tasks.py") or "digits/17"
    content: bytes | np.ndarray  # raw bytes for text; a float32 vector for images
    label: int | None = None  # kept for reference (the digit class); never used in training

    @property
    def text(self) -> str:
        """The content as text (undecodable bytes replaced); for images, the numbers."""
        if isinstance(self.content, bytes):
            return self.content.decode("utf-8", errors="replace")
        return " ".join(f"{v:.3f}" for v in np.asarray(self.content).ravel())


class BatchIterator(Iterator[Batch], Generic[Batch]):
    """An infinite iterator whose batch ``k`` is ``make_batch(rng_k)``, rng_k keyed on
    ``(seed, stream, shard, k)``; its state is the step counter plus a fingerprint of what it
    draws from, so loading a state saved by a differently configured iterator fails loudly."""

    def __init__(
        self,
        make_batch: Callable[[np.random.Generator], Batch],
        key: Sequence[int],
        fingerprint: str,
    ):
        self._make_batch = make_batch
        self._key = [int(k) for k in key]
        self.fingerprint = fingerprint
        self.step = 0

    def __iter__(self) -> BatchIterator[Batch]:
        return self

    def __next__(self) -> Batch:
        rng = np.random.default_rng([*self._key, self.step])
        self.step += 1
        return self._make_batch(rng)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                "batch iterator state was saved by an iterator over other data "
                f"({state.get('fingerprint')!r}, this one is {self.fingerprint!r}); "
                "rebuild the iterator with the same seed, shard, num_shards and doc_indices"
            )
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(
                f"batch iterator state: step must be a non-negative int, got {step!r}"
            )
        self.step = step


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"device: {name!r} is not a torch device ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available; use 'cpu'")
    return device


def select_documents(
    num_documents: int, shard: int, num_shards: int, doc_indices: Sequence[int] | None
) -> list[int]:
    """The documents shard ``shard`` of ``num_shards`` trains on: ``doc_indices`` (all when
    None), sorted, then dealt round-robin, so shards are disjoint and near equal in count."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ConfigError(f"num_shards: must be a positive integer, got {num_shards!r}")
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < num_shards:
        raise ConfigError(f"shard: must be an integer in [0, {num_shards}), got {shard!r}")
    if doc_indices is None:
        chosen = list(range(num_documents))
    else:
        chosen = sorted({int(i) for i in doc_indices})
        bad = [i for i in chosen if not 0 <= i < num_documents]
        if bad:
            raise ConfigError(
                f"doc_indices: {bad[:5]} out of range; there are {num_documents} documents"
            )
    mine = chosen[shard::num_shards]
    if not mine:
        raise ConfigError(
            f"shard {shard} of {num_shards} has no documents ({len(chosen)} selected); "
            "use fewer shards or more data"
        )
    return mine


def documents_fingerprint(kind: str, seed: int, shard: int, num_shards: int, docs: list[int]):
    digest = hashlib.blake2b(np.asarray(docs, dtype=np.int64).tobytes(), digest_size=6)
    return f"{kind}:seed={seed}:shard={shard}/{num_shards}:docs={len(docs)}:{digest.hexdigest()}"


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")
    return int(seed)


class Workload(ABC):
    """A model and its data. Subclasses set ``name`` and ``Config`` (a dataclass with a
    ``batch_size`` and a ``device`` field) and implement the abstract methods."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()
        validate = getattr(self.config, "validate", None)
        if callable(validate):
            validate()
        self.device = resolve_device(self.config.device)

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @abstractmethod
    def build_model(self, seed: int) -> torch.nn.Module:
        """A freshly initialised model on ``self.device``; same seed, same weights."""

    @abstractmethod
    def documents(self) -> list[Document]:
        """The training documents; ``doc_indices`` elsewhere index into this list."""

    @abstractmethod
    def validation_documents(self) -> list[Document]:
        """The held-out documents; ``validation_loss(doc_indices=...)`` indexes this list."""

    @abstractmethod
    def train_batches(
        self,
        seed: int,
        shard: int = 0,
        num_shards: int = 1,
        doc_indices: Sequence[int] | None = None,
    ) -> BatchIterator:
        """An infinite, resumable iterator of batches on ``self.device``."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The scalar training loss of ``model`` on ``batch``."""

    @abstractmethod
    def validation_loss(
        self,
        model: torch.nn.Module,
        max_batches: int = 8,
        doc_indices: Sequence[int] | None = None,
    ) -> float:
        """Mean loss on fixed held-out batches, under no_grad, in eval mode, mode restored."""

    @abstractmethod
    def flops_per_step(self, batch_size: int | None = None) -> float:
        """Forward plus backward floating-point operations of one step of ``batch_size``."""


def mean_loss_no_grad(
    workload: Workload, model: torch.nn.Module, batches: Iterator[Any], count: int
) -> float:
    """Mean of ``workload.loss`` over ``count`` batches in eval mode; mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = [float(workload.loss(model, next(batches))) for _ in range(count)]
    finally:
        model.train(was_training)
    return float(np.mean(losses))


WORKLOADS: dict[str, type[Workload]] = {}


def register_workload(name: str) -> Callable[[type[Workload]], type[Workload]]:
    """Class decorator: make a ``Workload`` subclass available as ``get_workload(name)``."""

    def register(cls: type[Workload]) -> type[Workload]:
        if name in WORKLOADS and WORKLOADS[name] is not cls:
            raise ValueError(f"workload {name!r} is already registered by {WORKLOADS[name]}")
        cls.name = name
        WORKLOADS[name] = cls
        return cls

    return register


def _plain(value: Any) -> Any:
    """Paths become strings and tuples lists, so typed config checking accepts them."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def get_workload(name: str, **config: Any) -> Workload:
    """Build the workload registered as ``name`` from config keys (checked like a TOML file:
    an unknown key or a wrong type raises ConfigError naming it)."""
    if name not in WORKLOADS:
        raise ConfigError(f"workload: unknown name {name!r}; known: {', '.join(sorted(WORKLOADS))}")
    cls = WORKLOADS[name]
    typed = config_from_dict(
        cls.Config, {k: _plain(v) for k, v in config.items()}, f"workload {name}"
    )
    return cls(typed)


# Imported last: these modules register themselves and need the names defined above.
from island.workloads import bytelm, flow  # noqa: E402, F401
