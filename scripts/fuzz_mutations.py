"""Input generators for the decoder fuzzer: random bytes, byte-level havoc and tree mutations.

``scripts/fuzz.py`` and ``tests/test_fuzz.py`` share these. Everything takes a
``random.Random`` so that an input is a pure function of a seed (a run can be repeated, and
hypothesis can shrink the seed).

- ``random_bytes``: uniform bytes, lengths skewed towards the short ones a parser trips on.
- ``havoc``: one to four byte-level edits of an input (AFL's havoc stage): bit flips, bytes
  and 16/32/64-bit words set to boundary values, truncation, extension, deleted, inserted
  and duplicated slices, splices with another seed.
- ``interesting_value`` / ``mutate_tree``: values at the edges of each type (0, -1, 2**63,
  NaN, Inf, empty and huge strings, deep nesting, integers beyond Python's 4300-digit
  conversion limit) put in place of, beside or instead of the fields of a parsed document;
  the targets re-serialize the tree (and re-sign it where a signature covers it), so the
  checks behind the parser are reached.
"""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

BIGINT = "\x00bigint\x00"
"""Placeholder for an integer literal of 5000 digits, past ``sys.get_int_max_str_digits()``
(JSON and TOML texts only: ``json_text`` and ``toml_text`` write it as digits)."""
BIGINT_DIGITS = "1" + "0" * 5000
DEEP = "\x00deep\x00"
"""Placeholder for an array nested 3000 deep, past the recursion limit of a recursive
parser (JSON and TOML texts only)."""
DEEP_TEXT = "[" * 3000 + "]" * 3000

INTERESTING_INTS = (
    0, 1, 2, 3, 7, 8, 16, 64, 127, 128, 255, 256, 1023, 1024, 4096, 65535, 65536,
    2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 10**12, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1,
    -1, -2, -128, -(2**31), -(2**63),
)  # fmt: skip
INTERESTING_FLOATS = (
    0.0, -0.0, 5e-324, 1e-300, 1e-12, 0.001, 0.5, 0.999, 1.0, 1.5, -1.0, 2.0, 100.0, 65504.0,
    65520.0, 3.4028235e38, 3.5e38, 1e308, -1e308, math.inf, -math.inf, math.nan,
)  # fmt: skip
INTERESTING_STRS = (
    "", "x", "none", "int8", "topk", "island", "aggregator", "sha256", "delta", "partial",
    "a" * 300, "a" * 5000, "\x00", "\n", "é", "日本", "../../etc/passwd", "/dev/zero",
    "model.safetensors", "manifest.json", "127.0.0.1:0", "top_k:2", "threshold:nan",
)  # fmt: skip

_WORDS = ((">H", 2, 0xFFFF), ("<H", 2, 0xFFFF), (">I", 4, 2**32 - 1), ("<I", 4, 2**32 - 1),
          (">Q", 8, 2**64 - 1), ("<Q", 8, 2**64 - 1))  # fmt: skip


# --- bytes ----------------------------------------------------------------------------------


def random_length(rng: random.Random, cap: int = 4096) -> int:
    """Mostly short (the boundaries of headers), sometimes long."""
    r = rng.random()
    if r < 0.4:
        return rng.randrange(0, 17)
    if r < 0.8:
        return rng.randrange(0, 257)
    return rng.randrange(0, cap + 1)


def random_bytes(rng: random.Random, cap: int = 4096) -> bytes:
    return rng.randbytes(random_length(rng, cap))


def _flip_bits(rng: random.Random, buf: bytearray) -> None:
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        i = rng.randrange(len(buf) * 8)
        buf[i // 8] ^= 1 << (i % 8)


def _set_word(rng: random.Random, buf: bytearray) -> None:
    fmt, size, mask = rng.choice(_WORDS)
    if len(buf) < size:
        return
    at = rng.randrange(len(buf) - size + 1)
    buf[at : at + size] = struct.pack(fmt, rng.choice(INTERESTING_INTS) & mask)


def _edit(rng: random.Random, buf: bytearray, others: list[bytes]) -> bytearray:
    op = rng.randrange(10)
    n = len(buf)
    if n == 0 or op == 0:  # extend
        return buf + rng.randbytes(random_length(rng, 256))
    if op == 1:
        _flip_bits(rng, buf)
    elif op == 2:
        buf[rng.randrange(n)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
    elif op == 3:
        _set_word(rng, buf)
    elif op == 4:  # truncate
        return buf[: rng.randrange(n)]
    elif op == 5:  # delete a slice
        a = rng.randrange(n)
        return buf[:a] + buf[a + rng.randrange(1, n - a + 1) :]
    elif op == 6:  # insert random bytes
        a = rng.randrange(n + 1)
        return buf[:a] + rng.randbytes(rng.randrange(1, 33)) + buf[a:]
    elif op == 7:  # duplicate a slice
        a = rng.randrange(n)
        b = a + rng.randrange(1, min(n - a, 256) + 1)
        return buf[:b] + buf[a:b] + buf[b:]
    elif op == 8 and others:  # splice with another seed
        other = rng.choice(others)
        return buf[: rng.randrange(n + 1)] + other[rng.randrange(len(other) + 1) :]
    else:  # overwrite a run
        a = rng.randrange(n)
        run = rng.randbytes(rng.randrange(1, min(n - a, 64) + 1))
        buf[a : a + len(run)] = run
    return buf


def havoc(rng: random.Random, data: bytes, others: list[bytes] | tuple = ()) -> bytes:
    """One to four byte-level edits of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 4))):
        buf = _edit(rng, buf, list(others))
    return bytes(buf)


# --- values and trees -----------------------------------------------------------------------

FLAVOURS = ("json", "toml", "msgpack")


def interesting_value(rng: random.Random, flavour: str = "json", depth: int = 0) -> Any:
    """A value at some edge of its type that ``flavour`` can carry (``None`` and bytes only in
    msgpack and JSON/msgpack respectively; NaN and Inf in all three, as Python's json reads
    them; ``BIGINT`` and ``DEEP`` in the text formats)."""
    kinds = ["int", "int", "float", "float", "str", "bool", "list", "dict"]
    if flavour != "toml":
        kinds.append("none")
    if flavour == "msgpack":
        kinds.append("bytes")
    else:
        kinds.append("bigint")
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice(INTERESTING_INTS) if rng.random() < 0.8 else rng.randint(-9, 2**20)
    if kind == "float":
        return rng.choice(INTERESTING_FLOATS)
    if kind == "str":
        s = rng.choice(INTERESTING_STRS)
        if flavour == "json" and rng.random() < 0.1:
            s += "\ud800"  # a lone surrogate: valid JSON text, not encodable as UTF-8
        return s
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "bytes":
        return rng.randbytes(rng.choice((0, 1, 31, 32, 33, 64, 65)))
    if kind == "bigint":
        return BIGINT
    if depth > 2 or rng.random() < 0.2:  # deep nesting
        if flavour != "msgpack" and rng.random() < 0.3:
            return DEEP
        return deep_nest(rng.choice((9, 17, 70)), kind)
    n = rng.randrange(4)
    if kind == "list":
        return [interesting_value(rng, flavour, depth + 1) for _ in range(n)]
    return {f"k{i}": interesting_value(rng, flavour, depth + 1) for i in range(n)}


def deep_nest(depth: int, kind: str = "list") -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


def _paths(tree: Any, prefix: tuple = (), depth: int = 0) -> list[tuple]:
    out = [prefix]
    if depth > 6:
        return out
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, (*prefix, k), depth + 1)
    elif isinstance(tree, list):
        for i, v in enumerate(tree[:16]):
            out += _paths(v, (*prefix, i), depth + 1)
    return out


def _parent(tree: Any, path: tuple) -> tuple[Any, Any]:
    node = tree
    for key in path[:-1]:
        node = node[key]
    return node, path[-1]


def mutate_tree(rng: random.Random, tree: Any, flavour: str = "json") -> Any:
    """``tree`` (a parsed document, modified in place where possible) with one node replaced,
    deleted, duplicated or joined by an unknown key; returns the new root."""
    paths = [p for p in _paths(tree) if p] or [()]
    path = rng.choice(paths)
    op = rng.randrange(6)
    if not path:
        return interesting_value(rng, flavour)
    parent, key = _parent(tree, path)
    if op <= 2:  # replace the value
        parent[key] = interesting_value(rng, flavour)
    elif op == 3:  # delete it
        del parent[key]
    elif op == 4:  # wrap it, or change its type while keeping the content
        value = parent[key]
        parent[key] = rng.choice(([value], {"value": value}, str(value)[:64]))
    elif isinstance(parent, dict):  # an unknown key beside it
        parent[rng.choice(("extra", "", "x" * 200, str(key) + "_"))] = interesting_value(
            rng, flavour
        )
    else:
        parent.append(interesting_value(rng, flavour))
    return tree


def set_path(tree: dict, path: tuple, value: Any) -> None:
    """``tree[path[0]]...[path[-1]] = value``, creating tables on the way."""
    node = tree
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def json_text(doc: Any) -> bytes:
    """``doc`` as JSON text, with ``BIGINT`` and ``DEEP`` written out."""
    text = json.dumps(doc, allow_nan=True)
    text = text.replace('"\\u0000bigint\\u0000"', BIGINT_DIGITS)
    return text.replace('"\\u0000deep\\u0000"', DEEP_TEXT).encode()


def expand_placeholders(text: str) -> str:
    """A TOML text with ``BIGINT`` and ``DEEP`` (as written by a TOML dumper) spelled out."""
    return text.replace('"\x00bigint\x00"', BIGINT_DIGITS).replace('"\x00deep\x00"', DEEP_TEXT)
