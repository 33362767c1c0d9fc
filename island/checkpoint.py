"""Signed model checkpoints: weights, a manifest, and an Ed25519 signature.

A checkpoint is a directory::

    model.safetensors   the module's state_dict (tied weights stored once; safetensors, no pickle)
    manifest.json       what the weights are, who signed them, and the digest of every file

The manifest of an expert names its workload and the workload config that rebuilds the model,
the expert id, the partition it was trained on (``partition_id``, a digest of the partition's
files) and its cluster in it, a version, training steps and FLOPs, ``created_at``, the
BLAKE2b-256 digest of each file (``files``), the signer's peer id and public key, and
``signature``: the signer's Ed25519 signature over the canonical JSON of every other field
(sorted keys, no whitespace, UTF-8).

Loading checks, in order: the signature (``SignatureError``), that the signer is known when a
roster or a set of trusted keys is given (``UnknownPeerError``), each file's digest
(``DigestMismatchError``), that the workload exists (``ConfigError``) and that the model its
config describes fits its weights file (built first on the meta device, where nothing is
allocated: a manifest cannot make a loader allocate more than about twice the weights;
``ConfigError``); only then is the model built and the weights read, strictly (every tensor
named, no extra one). Without a roster or trusted keys the signature only proves the files
were not changed since some key signed them.

Experts are rebuilt from their workload's config without reading the workload's data (the
corpus may exist only on the machine that trained them): ``build_model`` of a workload uses
only its config and device. An island in expert mode writes these; ``router.checkpoint``
reads them and adds router checkpoints in the same format.

Files are written beside their final names and renamed into place, weights first, manifest
last, so a crash leaves either the old checkpoint or a digest mismatch, never silent garbage.
Synchronous file I/O; no threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from comms.config import config_from_dict
from comms.errors import ConfigError, DigestMismatchError, SignatureError, UnknownPeerError
from comms.identity import Identity, Roster, peer_id_of, verify_signature

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
PARTITION_FILES = ("partition.json", "partition.safetensors")  # router.partition's files
_CHUNK = 1 << 20


# --- signing and digests (pure but for reading files) -------------------------------------------


def canonical_json(doc: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def file_digest(path: str | os.PathLike) -> str:
    """Hex BLAKE2b-256 of a file's bytes."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def partition_id(directory: str | os.PathLike) -> str:
    """A short content id of a saved partition: BLAKE2b of its two files."""
    digest = hashlib.blake2b(digest_size=8)
    for name in PARTITION_FILES:
        path = Path(directory) / name
        if not path.is_file():
            raise ConfigError(f"{directory}: no saved partition (missing {name})")
        digest.update(bytes.fromhex(file_digest(path)))
    return digest.hexdigest()


def sign_manifest(fields: Mapping[str, Any], identity: Identity) -> dict[str, Any]:
    """``fields`` plus the signer's peer id and public key, and the signature over all of it."""
    doc = {k: v for k, v in fields.items() if k != "signature"}
    doc["signer"] = identity.peer_id
    doc["signer_public_key"] = identity.public_key.hex()
    doc["signature"] = identity.sign(canonical_json(doc)).hex()
    return doc


def _as_public_key(key: bytes | str) -> bytes:
    return bytes(key) if isinstance(key, bytes | bytearray) else bytes.fromhex(key)


def verify_manifest(
    doc: Mapping[str, Any],
    roster: Roster | None = None,
    trusted_keys: Iterable[bytes | str] | None = None,
) -> None:
    """Raise ``SignatureError`` unless ``doc`` carries a valid signature by the key it names,
    and ``UnknownPeerError`` if that key is not in ``roster`` / ``trusted_keys`` (raw 32-byte
    keys or their hex) when those are given."""
    try:
        signature = bytes.fromhex(doc["signature"])
        public_key = bytes.fromhex(doc["signer_public_key"])
        signer = str(doc["signer"])
    except (KeyError, TypeError, ValueError) as e:
        raise SignatureError(f"manifest is unsigned or its signature fields are bad ({e})") from e
    if peer_id_of(public_key) != signer:
        raise SignatureError(f"manifest signer {signer} does not match its public key")
    try:
        signed = canonical_json({k: v for k, v in doc.items() if k != "signature"})
    except ValueError as e:  # a lone surrogate: text no signer could have encoded
        raise SignatureError(f"manifest holds text that is not valid Unicode ({e})") from e
    if roster is not None:
        entry = roster.require(signer)
        if entry.public_key != public_key:
            raise SignatureError(f"manifest signer {signer} names a key other than the roster's")
    if trusted_keys is not None and public_key not in {_as_public_key(k) for k in trusted_keys}:
        raise UnknownPeerError(f"checkpoint signer {signer} is not among the trusted keys")
    verify_signature(public_key, signature, signed)


# --- writing ------------------------------------------------------------------------------------


def write_checkpoint(
    directory: str | os.PathLike,
    module: nn.Module,
    fields: Mapping[str, Any],
    identity: Identity,
    extra_files: Iterable[str] = (),
) -> dict[str, Any]:
    """Save ``module``'s weights and a signed manifest of ``fields`` into ``directory``.
    ``extra_files`` (paths relative to ``directory``, already written) are digested too."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_weights = directory / (WEIGHTS_FILE + ".tmp")
    save_model(module, str(tmp_weights))
    files = {WEIGHTS_FILE: file_digest(tmp_weights)}
    for name in extra_files:
        files[name] = file_digest(directory / name)
    doc = {"format_version": FORMAT_VERSION, **fields, "files": files}
    doc.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    manifest = sign_manifest(doc, identity)
    tmp_manifest = directory / (MANIFEST_FILE + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp_weights, directory / WEIGHTS_FILE)
    os.replace(tmp_manifest, directory / MANIFEST_FILE)
    return manifest


def save_expert(
    directory: str | os.PathLike,
    model: nn.Module,
    *,
    workload: str,
    workload_config: Mapping[str, Any],
    expert_id: str,
    cluster: int | None,
    version: int = 0,
    identity: Identity,
    partition: str | None = None,
    train_steps: int = 0,
    train_flops: float = 0.0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write an expert checkpoint; returns its signed manifest. ``partition`` is the id of the
    partition the expert was trained on (``partition_id(dir)``); ``cluster`` its index there
    (the router output that selects it)."""
    if not isinstance(expert_id, str) or not expert_id or "." in expert_id:
        raise ValueError(f"expert_id must be a non-empty string without '.', got {expert_id!r}")
    fields = {
        "kind": "expert",
        "workload": workload,
        "workload_config": dict(workload_config),
        "expert_id": expert_id,
        "partition_id": partition,
        "cluster": None if cluster is None else int(cluster),
        "version": int(version),
        "train_steps": int(train_steps),
        "train_flops": float(train_flops),
        "extra": dict(extra or {}),
    }
    check_json_fields(fields)
    return write_checkpoint(directory, model, fields, identity)


def check_json_fields(fields: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``fields`` is plain JSON data that can be signed (what
    ``canonical_json`` accepts); call before writing anything, so a bad field fails early."""
    try:
        canonical_json(fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"manifest fields must be plain JSON data: {e}") from e


# --- reading ------------------------------------------------------------------------------------


def read_manifest(
    directory: str | os.PathLike,
    kind: str,
    roster: Roster | None = None,
    trusted_keys: Iterable[bytes | str] | None = None,
) -> dict[str, Any]:
    """The verified manifest of the checkpoint in ``directory``: signature, signer, digests
    of every file it lists, format version and ``kind`` (``expert`` or ``router``)."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise ConfigError(
            f"{directory}: no {kind} checkpoint here (expected {MANIFEST_FILE} and {WEIGHTS_FILE})"
        )
    try:
        doc = json.loads(path.read_bytes())
    except ValueError as e:  # bad JSON or UTF-8, or an integer past the digit limit
        raise SignatureError(f"{path}: not valid JSON ({e}); the manifest is damaged") from e
    except RecursionError as e:
        raise SignatureError(
            f"{path}: not valid JSON (nested too deep); the manifest is damaged"
        ) from e
    if not isinstance(doc, dict):
        raise SignatureError(f"{path}: expected a JSON object")
    verify_manifest(doc, roster, trusted_keys)
    if doc.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: format_version {doc.get('format_version')!r}; this code reads "
            f"{FORMAT_VERSION}"
        )
    if doc.get("kind") != kind:
        raise ConfigError(f"{directory}: is a {doc.get('kind')!r} checkpoint, not a {kind}")
    files = doc.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise ConfigError(f"{path}: lists no digest for {WEIGHTS_FILE}")
    for name, expected in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ConfigError(f"{path}: file {name!r} lies outside the checkpoint directory")
        file = directory / name
        if not file.is_file():
            raise DigestMismatchError(f"{directory}: {name} is listed in the manifest but missing")
        got = file_digest(file)
        if got != expected:
            raise DigestMismatchError(
                f"{file}: BLAKE2b {got[:16]}... differs from the signed {str(expected)[:16]}...; "
                "the file was changed or damaged after signing"
            )
    return doc


def build_workload_model(
    name: str, config: Mapping[str, Any], device: str = "cpu", seed: int = 0
) -> nn.Module:
    """A fresh model of workload ``name`` from its config dict, without loading its data."""
    from island.workloads import WORKLOADS, Workload, get_workload

    if name not in WORKLOADS:
        raise ConfigError(f"workload: unknown name {name!r}; known: {', '.join(sorted(WORKLOADS))}")
    cls = WORKLOADS[name]
    settings = {**config, "device": device}
    typed = config_from_dict(cls.Config, settings, f"workload {name}")
    workload = cls.__new__(cls)
    Workload.__init__(workload, typed)  # config and device only: the data is not read
    try:
        return workload.build_model(seed)
    except AttributeError:  # a workload whose model needs its data: build it in full
        return get_workload(name, **settings).build_model(seed)


class _AllocationBudget(TorchDispatchMode):
    """Counts the tensors ops create and their bytes (in place ops and views create none) and
    raises ``ConfigError`` past ``max_tensors`` or ``max_bytes``: on the meta device a
    model's size is known before anything of that size is allocated, and the count stops a
    config of a billion tiny layers after a few."""

    def __init__(self, max_tensors: int, max_bytes: int):
        super().__init__()
        self.max_tensors, self.max_bytes = max_tensors, max_bytes
        self.tensors = self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.name.endswith("_") and not func.is_view:
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    self.tensors += 1
                    self.bytes += t.numel() * t.element_size()
        if self.tensors > self.max_tensors or self.bytes > self.max_bytes:
            raise ConfigError(
                f"the model the manifest describes holds more than {self.tensors} tensors "
                f"and {self.bytes} bytes, more than its weights file could hold; refused "
                "before building it"
            )
        return out


def check_model_fits_weights(build: Callable[[], nn.Module], directory: Path) -> None:
    """Refuse a manifest whose config describes a model larger than its weights file.

    The config decides the model's size and a real build allocates all of it before a weight
    is read, so ``build`` runs first on the meta device (no memory), counting the tensors it
    creates and their bytes: at most twice the verified weights file's (a model may replace a
    tensor while it is built, as a tied output layer does), plus 16 tensors and 64 KiB."""
    path = directory / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = len(list(f.keys()))
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"{path} is not a safetensors file: {e}") from e
    budget = _AllocationBudget(2 * stored + 16, 2 * path.stat().st_size + (64 << 10))
    try:
        with torch.device("meta"), budget:
            build()
    except ConfigError:
        raise
    except Exception as e:  # the config is file input: whatever it trips on means "bad config"
        raise ConfigError(
            f"the model the manifest describes cannot be built to check it against its "
            f"weights: {type(e).__name__}: {e}"
        ) from e


def load_weights(module: nn.Module, directory: Path, device: str) -> None:
    """Load ``directory``'s verified weights into ``module`` on ``device``, strictly (every
    tensor named, no extra one); ``ConfigError`` when they do not fit it. Call after
    ``read_manifest`` has checked the file's digest."""
    try:
        load_model(module, directory / WEIGHTS_FILE, strict=True, device=device)
    except RuntimeError as e:
        raise ConfigError(
            f"{directory}: weights do not fit the model the manifest names: {e}"
        ) from e


def load_expert(
    directory: str | os.PathLike,
    roster: Roster | None = None,
    trusted_keys: Iterable[bytes | str] | None = None,
    device: str = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Verify and load an expert checkpoint: (model in eval mode on ``device``, manifest)."""
    directory = Path(directory)
    manifest = read_manifest(directory, "expert", roster, trusted_keys)
    config = manifest.get("workload_config")
    if not isinstance(config, dict):
        raise ConfigError(f"{directory}: workload_config must be a table, got {config!r}")
    name = str(manifest.get("workload"))
    try:
        check_model_fits_weights(lambda: build_workload_model(name, config, "meta"), directory)
        model = build_workload_model(name, config, device)
    except ConfigError as e:
        raise ConfigError(f"{directory}/{MANIFEST_FILE}: {e}") from e
    load_weights(model, directory, device)
    return model.eval(), manifest
