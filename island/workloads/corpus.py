"""Text corpora for the byte-level language model: read once, held as one uint8 array.

The default corpus is the Python standard library's own sources (every ``*.py`` under
``sysconfig.get_paths()["stdlib"]`` except test suites and site-packages, about 12 MB), so
training needs no download. Users pass files or folders instead; folders are walked for text
files (no NUL byte, valid UTF-8 at the start), skipping hidden entries and ``__pycache__``.

Documents are files. The train/validation split is by file, decided by a hash of the
document id (its path relative to the folder it was found in), so two machines holding the
same files agree on it. With a single file there is nothing to split by, so its last
``val_fraction`` of bytes becomes the validation document ``<id>#validation``.

Loading is cached per process, keyed by the resolved paths.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import hashlib
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from comms.errors import ConfigError

# Directory names never read from the standard library: test suites, installed packages.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
)
SNIFF_BYTES = 8192


@dataclasses.dataclass(frozen=True)
class TextDocuments:
    """Documents concatenated into one array; document ``i`` is ``data[offsets[i]:offsets[i+1]]``."""

    ids: tuple[str, ...]
    data: np.ndarray  # (total_bytes,) uint8
    offsets: np.ndarray  # (len(ids) + 1,) int64

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    def content(self, index: int) -> bytes:
        return self.data[self.offsets[index] : self.offsets[index + 1]].tobytes()

    def stream(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The chosen documents back to back, and their start offsets within that stream."""
        pieces = [self.data[self.offsets[i] : self.offsets[i + 1]] for i in indices]
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return np.concatenate(pieces), starts


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    train: TextDocuments
    validation: TextDocuments
    source: str  # what it was read from, for messages and logs


def _pack(named: list[tuple[str, bytes]]) -> TextDocuments:
    lengths = np.array([len(b) for _, b in named], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    data = np.frombuffer(b"".join(b for _, b in named), dtype=np.uint8)
    return TextDocuments(tuple(i for i, _ in named), data, offsets)


def hash_fraction(doc_id: str) -> float:
    """A stable number in [0, 1) from a document id (the first 8 bytes of its BLAKE2b)."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def held_out(ids: Sequence[str], fraction: float) -> list[bool]:
    """Which ids are validation: hash below ``fraction``; with two or more ids, at least one
    on each side (the lowest hash is held out if none was, the highest kept if all were)."""
    scores = [hash_fraction(i) for i in ids]
    held = [s < fraction for s in scores]
    if len(ids) >= 2 and not any(held):
        held[scores.index(min(scores))] = True
    if len(ids) >= 2 and all(held):
        held[scores.index(max(scores))] = False
    return held


def split_by_file(named: list[tuple[str, bytes]], fraction: float) -> TextCorpus:
    """Split documents by a hash of their ids; a lone document is split by its tail."""
    named = sorted(named)
    if len(named) == 1:
        doc_id, text = named[0]
        cut = len(text) - max(1, int(len(text) * fraction))
        return TextCorpus(
            _pack([(doc_id, text[:cut])]), _pack([(f"{doc_id}#validation", text[cut:])]), ""
        )
    held = held_out([i for i, _ in named], fraction)
    train = [d for d, h in zip(named, held, strict=True) if not h]
    validation = [d for d, h in zip(named, held, strict=True) if h]
    return TextCorpus(_pack(train), _pack(validation), "")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[tuple[str, Path]]:
    """``(relative id, path)`` of every standard-library ``*.py`` outside test suites."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d for d in dirs if d not in STDLIB_EXCLUDED_DIRS and not d.startswith((".", "config-"))
        )
        for name in sorted(files):
            if name.endswith(".py"):
                path = Path(folder, name)
                found.append((path.relative_to(root).as_posix(), path))
    return found


def looks_like_text(head: bytes) -> bool:
    """No NUL byte and valid UTF-8 (a multi-byte character cut at the end is allowed)."""
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _walk_text_files(folder: Path) -> list[tuple[str, Path]]:
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(parent, name)
            try:
                with open(path, "rb") as f:
                    head = f.read(SNIFF_BYTES)
            except OSError as e:
                raise ConfigError(f"data: cannot read {path}: {e.strerror}") from e
            if looks_like_text(head):
                found.append((f"{folder.name}/{path.relative_to(folder).as_posix()}", path))
    return found


def user_files(paths: Sequence[str]) -> list[tuple[str, Path]]:
    """Named files as they are, folders walked for text files; ids are relative paths
    prefixed with the folder's name (a named file's id is its file name)."""
    found: dict[Path, str] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ConfigError(f"data: {raw!r} does not exist; give text files or folders")
        if path.is_dir():
            entries = _walk_text_files(path)
            if not entries:
                raise ConfigError(f"data: folder {raw!r} holds no text files")
        else:
            entries = [(path.name, path)]
        for doc_id, file in entries:
            found.setdefault(file.resolve(), doc_id)
    ids: dict[str, int] = {}
    unique = []
    for file, doc_id in found.items():
        ids[doc_id] = ids.get(doc_id, 0) + 1
        unique.append((doc_id if ids[doc_id] == 1 else f"{doc_id}#{ids[doc_id]}", file))
    return unique


def _read_all(files: list[tuple[str, Path]]) -> list[tuple[str, bytes]]:
    named = []
    for doc_id, path in files:
        try:
            text = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"data: cannot read {path}: {e.strerror}") from e
        if text:
            named.append((doc_id, text))
    return named


@functools.lru_cache(maxsize=8)
def _load_cached(paths: tuple[str, ...], val_fraction: float) -> TextCorpus:
    if paths:
        files, source = user_files(paths), ", ".join(paths)
    else:
        root = stdlib_root()
        files, source = stdlib_files(root) if root.is_dir() else [], f"Python stdlib at {root}"
        if not files:
            raise ConfigError(
                f"data: no Python standard library sources at {root}; "
                "pass your own text files or folders in 'data'"
            )
    named = _read_all(files)
    if not named:
        raise ConfigError(f"data: no non-empty text files found in {source}")
    return dataclasses.replace(split_by_file(named, val_fraction), source=source)


def load_text_corpus(paths: Sequence[str] = (), val_fraction: float = 0.05) -> TextCorpus:
    """The corpus at ``paths`` (the standard library when empty), split by file; cached."""
    resolved = tuple(str(Path(p).expanduser().resolve()) for p in paths)
    for raw, full in zip(paths, resolved, strict=True):
        if not Path(full).exists():
            raise ConfigError(f"data: {raw!r} does not exist; give text files or folders")
    return _load_cached(resolved, float(val_fraction))
