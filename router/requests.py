"""Parsing and validating the server's JSON requests; every refusal is a ``RequestError``.

A bad request (wrong type, missing or unknown field, out-of-range value, unknown rule) raises
``RequestError`` with its HTTP status, a short ``type``, a message a user can act on and the
offending field; ``router.server`` answers it as ``{"error": {"type", "message", "field"}}``.
Pure functions of the decoded body and the configured ``LimitsConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from router.serve_config import LimitsConfig


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, a short ``type``, the offending field."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.field = status, kind, message, field

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.kind, "message": self.message, "field": self.field}}


def invalid(field: str | None, message: str) -> RequestError:
    """A 400 for a bad request field (``field`` None: the body as a whole)."""
    return RequestError(400, "invalid_request", message, field)


def parse_json_body(raw: bytes) -> Any:
    """The decoded JSON of a request body; a 400 ``invalid_json`` for anything JSON cannot
    read: bad syntax or UTF-8, nesting past the recursion limit, or an integer past Python's
    digit limit (``json.loads`` raises a plain ValueError for it)."""
    try:
        return json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
        raise RequestError(400, "invalid_json", f"the body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise RequestError(400, "invalid_json", "the body's JSON is nested too deeply") from e


_MISSING = object()
_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,)}


def take(
    body: dict[str, Any],
    name: str,
    kind: str,
    default: Any = _MISSING,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> Any:
    """``body[name]`` checked to be a ``kind`` in [lo, hi] (``(lo, hi]`` with ``lo_open``);
    ``default`` when absent or null (required when no default)."""
    value = body.get(name)
    if value is None:
        if default is _MISSING:
            raise invalid(name, f"'{name}' is required")
        return default
    if isinstance(value, bool) != (kind == "boolean") or not isinstance(value, _TYPES[kind]):
        raise invalid(name, f"'{name}' must be a {kind}, got {_shown(json.dumps(value))}")
    if kind == "number" and not _finite(value):
        raise invalid(name, f"'{name}' must be a finite number, got {_shown(value)}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise invalid(name, f"'{name}' must be {bound}, got {_shown(value)}")
    if hi is not None and value > hi:
        raise invalid(name, f"'{name}' must be <= {hi}, got {_shown(value)}")
    return float(value) if kind == "number" else value


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float range (JSON integers have no bound)
        return False


def _shown(value: Any) -> str:
    """``value`` for a message, cut short (a JSON value may be 60 KiB long)."""
    text = str(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def check_fields(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed))
        raise invalid(unknown[0], f"unknown field '{unknown[0]}' (known: {known})")
    return body


def take_rule(body: dict[str, Any], default: str):
    from router.rules import parse_rule

    spec = take(body, "rule", "string", default)
    try:
        return spec, parse_rule(spec)
    except ValueError as e:
        raise invalid("rule", f"'rule': {e}") from e


def take_seed(body: dict[str, Any]) -> int:
    seed = take(body, "seed", "integer", None, lo=0, hi=2**63 - 1)
    return secrets.randbelow(2**31) if seed is None else seed


@dataclasses.dataclass
class GenerateParams:
    prompt: bytes
    max_bytes: int
    temperature: float
    top_p: float
    seed: int
    rule_spec: str
    rule: Any
    stream: bool
    raw: bool


MIN_TEMPERATURE = 1e-3
GENERATE_FIELDS = {"prompt", "max_bytes", "temperature", "top_p", "seed", "rule", "stream", "raw"}
SAMPLE_FIELDS = {"n", "steps", "seed", "rule", "format"}


def parse_generate(body: Any, limits: LimitsConfig, default_rule: str) -> GenerateParams:
    body = check_fields(body, GENERATE_FIELDS)
    prompt = take(body, "prompt", "string").encode("utf-8", errors="surrogatepass")
    if len(prompt) > limits.max_prompt_bytes:
        limit = limits.max_prompt_bytes
        raise invalid("prompt", f"'prompt' is {len(prompt)} bytes; the limit is {limit}")
    spec, rule = take_rule(body, default_rule)
    temperature = take(body, "temperature", "number", 1.0, lo=0.0, hi=100.0)
    if 0 < temperature < MIN_TEMPERATURE:  # logits / T would overflow to inf
        least = f"0 (greedy) or at least {MIN_TEMPERATURE}"
        raise invalid("temperature", f"'temperature' must be {least}, got {temperature}")
    return GenerateParams(
        prompt=prompt,
        max_bytes=take(
            body,
            "max_bytes",
            "integer",
            min(64, limits.max_new_bytes),
            lo=1,
            hi=limits.max_new_bytes,
        ),
        temperature=temperature,
        top_p=take(body, "top_p", "number", 1.0, lo=0.0, hi=1.0, lo_open=True),
        seed=take_seed(body),
        rule_spec=spec,
        rule=rule,
        stream=take(body, "stream", "boolean", False),
        raw=take(body, "raw", "boolean", False),
    )
