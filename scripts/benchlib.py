"""Shared helpers for ``scripts/bench_*.py``: a plain-text table, the machine, and JSON output.

Every benchmark prints a table and writes a JSON file whose top level holds the figures the
issue names plus a ``"meta"`` entry (date, machine, command) that ``scripts/gen_benchmarks.py``
turns into the header of each section of BENCHMARKS.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def meta() -> dict[str, Any]:
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": "python " + shlex.join(sys.argv),
    }


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v != v:  # NaN
                return "nan"
            if abs(v) >= 100 or v == 0:
                return f"{v:,.1f}" if abs(v) < 1e6 else f"{v:.3g}"
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    text = [[cell(v) for v in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in text]
    return "\n".join(out)


def write_json(path: str | os.PathLike | None, result: dict[str, Any]) -> None:
    if not path:
        return
    result = {**result, "meta": meta()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}")
