"""The decoder fuzzer's targets: every decoder that reads bytes from a peer or a user's file.

A ``Target`` turns one input (bytes, so a failing input can be saved and replayed as a file)
into calls of the real decoder, and names the exceptions that are its typed rejections.
``classify`` runs one input and says what became of it:

- ``accepted``: the decoder returned, and what it returned passed the target's checks;
- ``rejected``: it raised one of the target's typed errors, with a non-empty message;
- ``crash``: anything else: another exception (a bare ``ValueError``, ``MemoryError``,
  ``RecursionError``...), a typed error with an empty message, or an ``InvariantError``
  (accepted input whose result breaks a rule: a non-finite value, a decode that ``validate``
  disagrees with, a config that holds NaN).

Targets with a container format (codec payloads, chunk streams, DHT entries) read it
tolerantly: an input that is not a valid container still reaches the decoder, as derived
arguments. Each target has valid ``seeds`` and ``mutators``: structured edits of a seed
that keep the outer checks passing (a header field changed, then the payload digest
recomputed and the header re-signed by a key in the roster; a WAL record's digest
recomputed), so the deeper checks are reached.

The targets live in ``fuzz_wire_targets`` (what peers send: envelopes, admission, WAL
records and segments, codec payloads, chunk streams, DHT records, signed read requests) and
``fuzz_file_targets`` (what users hand over: configs, the roster, key files, checkpoints; and
the router server's request bodies); ``targets()`` loads both. Used by ``scripts/fuzz.py`` and ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import random
import resource
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fuzz_mutations import havoc, random_bytes

from comms.identity import Identity, Roster

MAX_ENVELOPE_BYTES = 1 << 20


class InvariantError(Exception):
    """An accepted input whose decoded result breaks a rule of the target."""


class Hang(BaseException):
    """Raised by the runner's timer when one input runs past its time limit (a
    ``BaseException``, so that no ``except Exception`` in the product swallows it)."""


@dataclass(frozen=True)
class Target:
    name: str
    decoder: str  # what is exercised, for tables and docs
    run: Callable[[bytes], Any]
    typed: tuple[type[BaseException], ...]
    seeds: Callable[[], list[bytes]]
    mutators: tuple[Callable[[random.Random, bytes], bytes], ...] = ()
    random_input: Callable[[random.Random], bytes] = random_bytes


TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


def targets() -> dict[str, Target]:
    """Every registered target, by name (loads the file and HTTP targets too)."""
    import fuzz_file_targets  # noqa: F401  (each registers its targets on import)
    import fuzz_wire_targets  # noqa: F401

    return TARGETS


# --- running one input ----------------------------------------------------------------------


@dataclass
class Result:
    status: str  # accepted | rejected | crash
    error: str = ""  # exception type name
    message: str = ""
    seconds: float = 0.0
    trace: str = field(default="", repr=False)


def classify(target: Target, data: bytes) -> Result:
    """Run ``target`` on ``data`` and say whether it was accepted, rejected or crashed."""
    started = time.perf_counter()
    try:
        target.run(data)
    except target.typed as e:
        seconds = time.perf_counter() - started
        message = str(e).strip()
        if not message:
            return Result("crash", f"{type(e).__name__}(empty message)", "", seconds,
                          traceback.format_exc())  # fmt: skip
        return Result("rejected", type(e).__name__, message, seconds)
    except Exception as e:  # what the fuzzer is looking for
        seconds = time.perf_counter() - started
        return Result("crash", type(e).__name__, str(e)[:500], seconds, traceback.format_exc())
    return Result("accepted", seconds=time.perf_counter() - started)


def make_input(target: Target, rng: random.Random) -> tuple[str, bytes]:
    """One input for ``target`` and how it was made: ``random`` (bytes, or the target's own
    random generator), ``havoc`` (byte-level edits of a seed) or ``structured`` (a mutator,
    sometimes followed by byte-level edits)."""
    seeds = target_seeds(target.name)
    r = rng.random()
    if r < 0.15:
        return "random", random_bytes(rng)
    if r < 0.25:
        return "random", target.random_input(rng)
    if r < 0.5 or not target.mutators:
        return "havoc", havoc(rng, rng.choice(seeds), seeds)
    seed = rng.choice(seeds)
    try:
        data = rng.choice(target.mutators)(rng, seed)
    except Exception:  # a mutator tripping on an odd draw must not stop a long run
        return "havoc", havoc(rng, seed, seeds)
    if rng.random() < 0.1:
        data = havoc(rng, data, seeds)
    return "structured", data


@cache
def target_seeds(name: str) -> list[bytes]:
    return list(targets()[name].seeds())


@contextlib.contextmanager
def memory_cap(extra_bytes: int = 3 << 30) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``extra_bytes``: a decoder
    that allocates without bound gets a ``MemoryError`` instead of taking the machine down."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    size = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    cap = size + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# --- shared fixtures: keys, roster, a model manifest, scratch space --------------------------


def identity(label: str) -> Identity:
    """A fixed key per label, so a reproducer signed in one process verifies in another."""
    secret = hashlib.sha256(b"archipelago-fuzz/" + label.encode()).digest()
    return Identity(Ed25519PrivateKey.from_private_bytes(secret))


ISLAND, AGGREGATOR, STRANGER = identity("island"), identity("aggregator"), identity("stranger")
KEYS = {ident.peer_id: ident for ident in (ISLAND, AGGREGATOR, STRANGER)}


@cache
def roster() -> Roster:
    r = Roster()
    r.add(ISLAND.public_key, "island", "island")
    r.add(AGGREGATOR.public_key, "aggregator", "aggregator")
    return r


@cache
def scratch() -> Path:
    """A private directory (in memory when /dev/shm exists), removed at exit."""
    shm = Path("/dev/shm")
    path = Path(tempfile.mkdtemp(prefix="archipelago-fuzz-", dir=shm if shm.is_dir() else None))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def fresh_dir(name: str) -> Path:
    path = scratch() / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


SHAPES = {"b": (8,), "w": (4, 8)}


@cache
def manifest():
    from comms.update import Manifest

    return Manifest(tuple((n, s, "float32") for n, s in SHAPES.items()))


def check_arrays(arrays: dict[str, np.ndarray], what: str) -> None:
    """Decoded tensors must be finite float32 arrays of the manifest's shapes."""
    from comms.codecs import SparseTensor

    for name, shape in SHAPES.items():
        a = arrays.get(name)
        if isinstance(a, SparseTensor):  # a sparse codec's entries, as the merge takes them
            idx = a.indices
            if idx.size and (idx[0] < 0 or idx[-1] >= a.size or (np.diff(idx) <= 0).any()):
                raise InvariantError(f"{what}: tensor {name!r} has bad sparse indices")
            a = a.dense()
        if a is None or a.dtype != np.float32 or a.shape != shape:
            raise InvariantError(f"{what}: tensor {name!r} decoded to {a!r:.80}")
        if not np.isfinite(a).all():
            raise InvariantError(f"{what}: tensor {name!r} holds non-finite values")
