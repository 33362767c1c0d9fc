"""Checking what peers tell the dashboard: an island's push report and a child's summary.

Both arrive inside signed envelopes' ``meta`` from roster members, but a signature says who
sent them, not that they are sane: an island's ``report`` (``island.daemon``'s
``_push_report``, in its pushes) and a child aggregator's ``summary``
(:mod:`aggregator.dashboard.view`, sent by :mod:`aggregator.dashboard.summaries`)
are rebuilt here field by field, each value type-checked and bounded, strings cut to
``MAX_TEXT`` characters, lists to a fixed length. What is wrong raises ``MalformedError``
naming the field; the caller logs it and drops the report (never the update an island's
report came with; a summary is refused to its sender).
Pure functions.
"""

from __future__ import annotations

import math
from typing import Any

from comms.errors import MalformedError

MAX_TEXT = 64  # characters of a name, a reason, an address
MAX_MESSAGE = 200  # characters of a rejection's message
MAX_ISLANDS = 512  # island records in one summary
MAX_AGGREGATORS = 64  # aggregator records in one summary
MAX_REJECTIONS = 16  # recent rejections in one summary
MAX_REASONS = 16  # distinct rejection reasons counted per island
MAX_POINTS = 8  # an island's latest loss reports, per record
MAX_COUNT = 2**53  # counters: bytes, steps, pushes
MAX_AGE_S = 365 * 86400.0

# island report: field -> (kind, lower bound, upper bound)
REPORT_FIELDS = {
    "step": ("int", 0, MAX_COUNT),
    "steps_per_s": ("float", 0.0, 1e9),
    "utilization": ("float", 0.0, 1.0),
    "train_loss": ("float", -1e9, 1e9),
    "val_loss": ("float", -1e9, 1e9),
    "val_version": ("int", 0, MAX_COUNT),
    "bytes_down": ("int", 0, MAX_COUNT),
    "cluster": ("int", 0, 2**31 - 1),  # the partition cluster it trains on (an expert's island)
}

# what one island record of a summary holds besides its report's fields
ISLAND_FIELDS = {
    **REPORT_FIELDS,
    "age_s": ("float", 0.0, MAX_AGE_S),  # seconds since its last push, when the summary left
    "interval_s": ("float", 0.0, MAX_AGE_S),  # mean seconds between its pushes
    "pushes": ("int", 0, MAX_COUNT),
    "bytes_up": ("int", 0, MAX_COUNT),
    "steps_pushed": ("int", 0, MAX_COUNT),
    "base_version": ("int", 0, MAX_COUNT),
    "staleness": ("int", 0, MAX_COUNT),
}
ISLAND_TEXT = ("name", "peer", "leaf", "model_id")

AGGREGATOR_FIELDS = {
    "age_s": ("float", 0.0, MAX_AGE_S),
    "uptime_s": ("float", 0.0, MAX_AGE_S),
    "version": ("int", 0, MAX_COUNT),
    "buffered": ("int", 0, MAX_COUNT),
    "outbox": ("int", 0, MAX_COUNT),
    "workers": ("int", 0, 4096),
    "wal_bytes": ("int", 0, MAX_COUNT),
    "wal_records": ("int", 0, MAX_COUNT),
    "versions_per_min": ("float", 0.0, 1e9),
    "children": ("int", 0, MAX_COUNT),
    "partials_sent": ("int", 0, MAX_COUNT),
}
AGGREGATOR_TEXT = ("name", "role", "peer", "parent", "address")

POINT_FIELDS = {
    "age_s": ("float", 0.0, MAX_AGE_S),
    **{k: REPORT_FIELDS[k] for k in ("step", "train_loss", "val_loss", "val_version")},
}

REJECTION_FIELDS = {"age_s": ("float", 0.0, MAX_AGE_S)}
REJECTION_TEXT = ("at", "sender", "model_id", "reason")


def _number(value: Any, kind: str, low: float, high: float, field: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedError(f"{field}: expected a number, got {type(value).__name__}")
    if kind == "int" and not (isinstance(value, int) or float(value).is_integer()):
        raise MalformedError(f"{field}: expected an integer, got {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        raise MalformedError(f"{field}: {value!r} is outside [{low}, {high}]")
    return int(value) if kind == "int" else float(value)


def text(value: Any, field: str, limit: int = MAX_TEXT) -> str:
    """A printable string of at most ``limit`` characters (longer ones are cut)."""
    if not isinstance(value, str):
        raise MalformedError(f"{field}: expected a string, got {type(value).__name__}")
    return "".join(c if c.isprintable() else "?" for c in value[:limit])


def _record(obj: Any, numbers: dict, texts: tuple[str, ...], what: str) -> dict[str, Any]:
    """The known fields of ``obj`` (a dict), checked; unknown keys are ignored, absent ones
    left out."""
    if not isinstance(obj, dict):
        raise MalformedError(f"{what}: expected a map, got {type(obj).__name__}")
    out: dict[str, Any] = {}
    for key, (kind, low, high) in numbers.items():
        if obj.get(key) is not None:
            out[key] = _number(obj[key], kind, low, high, f"{what}.{key}")
    for key in texts:
        if obj.get(key) is not None:
            out[key] = text(obj[key], f"{what}.{key}")
    return out


def _list(obj: Any, limit: int, what: str) -> list:
    if obj is None:
        return []
    if not isinstance(obj, list):
        raise MalformedError(f"{what}: expected a list, got {type(obj).__name__}")
    if len(obj) > limit:
        raise MalformedError(f"{what}: {len(obj)} entries, more than {limit}")
    return obj


def island_report(meta: dict) -> dict[str, Any]:
    """The checked ``report`` of an island's push meta ({} when it sends none)."""
    report = meta.get("report")
    if report is None:
        return {}
    return _record(report, REPORT_FIELDS, (), "report")


def reasons(obj: Any, what: str) -> dict[str, int]:
    """A ``{reason: count}`` map of at most ``MAX_REASONS`` entries."""
    if obj is None:
        return {}
    if not isinstance(obj, dict) or len(obj) > MAX_REASONS:
        raise MalformedError(f"{what}: expected a map of at most {MAX_REASONS} reasons")
    return {
        text(k, f"{what} key"): _number(v, "int", 0, MAX_COUNT, f"{what}[{k!r}]")
        for k, v in obj.items()
    }


def child_summary(obj: Any) -> dict[str, Any]:
    """A child aggregator's ``summary`` (``meta["summary"]`` of its summary envelopes), checked:
    ``{"aggregators": [...], "islands": [...], "rejections": [...]}``."""
    if not isinstance(obj, dict):
        raise MalformedError(f"summary: expected a map, got {type(obj).__name__}")
    aggregators = []
    for i, a in enumerate(_list(obj.get("aggregators"), MAX_AGGREGATORS, "summary.aggregators")):
        rec = _record(a, AGGREGATOR_FIELDS, AGGREGATOR_TEXT, f"summary.aggregators[{i}]")
        if "name" not in rec or "peer" not in rec:
            raise MalformedError(f"summary.aggregators[{i}]: needs a name and a peer")
        aggregators.append(rec)
    islands = []
    for i, isl in enumerate(_list(obj.get("islands"), MAX_ISLANDS, "summary.islands")):
        rec = _record(isl, ISLAND_FIELDS, ISLAND_TEXT, f"summary.islands[{i}]")
        if "name" not in rec or "age_s" not in rec:
            raise MalformedError(f"summary.islands[{i}]: needs a name and age_s")
        rec["rejected"] = reasons(isl.get("rejected"), f"summary.islands[{i}].rejected")
        points = _list(isl.get("points"), MAX_POINTS, f"summary.islands[{i}].points")
        rec["points"] = [
            _record(p, POINT_FIELDS, (), f"summary.islands[{i}].points[{j}]")
            for j, p in enumerate(points)
        ]
        if any("step" not in p or "age_s" not in p for p in rec["points"]):
            raise MalformedError(f"summary.islands[{i}].points: each needs a step and age_s")
        islands.append(rec)
    rejections = []
    for i, r in enumerate(_list(obj.get("rejections"), MAX_REJECTIONS, "summary.rejections")):
        rec = _record(r, REJECTION_FIELDS, REJECTION_TEXT, f"summary.rejections[{i}]")
        if r.get("message") is not None:
            rec["message"] = text(r["message"], f"summary.rejections[{i}].message", MAX_MESSAGE)
        rejections.append(rec)
    return {"aggregators": aggregators, "islands": islands, "rejections": rejections}
