"""Plots of a run from the JSON lines its daemons write, for ``island plot RUN_DIR`` and for the
federation report (``scripts/federation_report.py``, which draws the same figures).

A run directory holds, anywhere below it:

- island round records (``metrics_file``, one JSON object per round or expert checkpoint:
  ``t`` (seconds since the island started), ``wall_time`` (seconds since the epoch),
  ``island``, ``step``, ``val_loss``, ``bytes_sent``, ``utilization``, ...);
- ack logs (``acks.jsonl`` in an island's snapshot directory: every push its aggregator
  answered, with the staleness it was admitted at); the directory names the island;
- daemon logs (``*.log``, JSON lines or text, ``comms.logs``): a root's published versions.

``read_run(run_dir)`` collects them; ``render_run`` draws what they hold: validation loss per
island against inner steps and against seconds since the run's first island started (islands
lined up by their records' wall clock; each island's own ``t`` where a record has none), bytes
sent per island (against synchronous data-parallel training when the model's parameter count is
known), utilization, and the staleness histogram. What synchronous data-parallel training would
have sent: a ring all-reduce of fp32 gradients every step moves ``2 (N - 1) / N * 4 * params``
bytes per island per step (Patarasuk & Yuan 2009).

Single-threaded; matplotlib with the Agg backend, imported on first use.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from comms.logs import read_log

ROOT_VERSION = re.compile(r"^root: version (\d+) of (\S+) from ")
PUSH_ACCEPTED = re.compile(r"push of sequence \d+ accepted \(staleness (-?\d+)")


def ddp_bytes_per_step(params: int, islands: int) -> float:
    """Bytes one island sends per step in a ring all-reduce of fp32 gradients."""
    return 2.0 * (islands - 1) / islands * 4.0 * params


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


# --------------------------------------------------------------------------- reading a run


@dataclass
class RunRecords:
    """What a run directory's JSON lines say, by island name."""

    rounds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    acks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)  # file stem -> log text
    params: int | None = None  # of the model, where the run kept its theta_0

    def staleness(self) -> dict[str, list[int]]:
        """The staleness of every accepted push per island: from its ack log, else its own
        log's lines, else the last staleness its round records carry."""
        out = {}
        for name, records in self.rounds.items():
            if self.acks.get(name):
                out[name] = [int(a["staleness"]) for a in self.acks[name]
                             if a.get("status") == "accepted" and "staleness" in a]  # fmt: skip
            elif name in self.logs:
                out[name] = staleness_from_log(self.logs[name])
            else:
                out[name] = [int(r["staleness"]) for r in records
                             if isinstance(r.get("staleness"), int)]  # fmt: skip
        return out

    def last(self, name: str, key: str) -> Any:
        """The newest value of ``key`` an island recorded."""
        values = [r[key] for r in self.rounds[name] if r.get(key) is not None]
        return values[-1] if values else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a file, one a line; a torn last line (a killed writer) is skipped."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def read_run(run_dir: str | Path) -> RunRecords:
    run = RunRecords()
    for path in sorted(Path(run_dir).rglob("*.jsonl")):
        records = read_jsonl(path)
        if path.name == "acks.jsonl":
            run.acks.setdefault(path.parent.name, []).extend(records)
            continue
        for r in records:
            if "island" in r and "step" in r and "t" in r:
                run.rounds.setdefault(str(r["island"]), []).append(r)
    for path in sorted(Path(run_dir).rglob("*.log")):
        run.logs[path.stem] = path.read_text(errors="replace")
    for path in sorted(Path(run_dir).rglob("init.safetensors"))[:1]:
        run.params = safetensors_params(path)
    return run


def safetensors_params(path: Path) -> int | None:
    """The number of parameters in a safetensors file, from its header alone."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    shapes = [v["shape"] for k, v in header.items() if k != "__metadata__"]
    return int(sum(math.prod(s) for s in shapes))


def staleness_from_log(text: str) -> list[int]:
    """The staleness of every accepted push, from an island's log (either format)."""
    found = (PUSH_ACCEPTED.search(line["message"]) for line in read_log(text))
    return [int(m.group(1)) for m in found if m]


def loss_over_time(run: RunRecords) -> tuple[dict[str, list[tuple[float, float]]], bool]:
    """Each island's (seconds, validation loss) in name order, seconds counted from the run's
    first island's start on the records' wall clock (``wall_time``; a start is ``wall_time -
    t``, and a resumed island's ``t`` starts again at 0), so islands that started or resumed at
    different moments line up; and whether every island could be placed so. An island without
    ``wall_time`` in its records (written before it existed) counts from its own start
    (``t``), and the second value is False."""

    def timed(r: dict[str, Any]) -> bool:
        return finite(r.get("wall_time")) and finite(r.get("t"))

    starts = [r["wall_time"] - r["t"] for rs in run.rounds.values() for r in rs if timed(r)]
    origin = min(starts, default=None)
    out = {
        name: [(r["wall_time"] - origin if origin is not None and finite(r.get("wall_time"))
                else r["t"], r["val_loss"])
               for r in run.rounds[name] if finite(r.get("val_loss")) and finite(r.get("t"))]
        for name in sorted(run.rounds)
    }  # fmt: skip
    return out, all(any(timed(r) for r in rs) for rs in run.rounds.values())


def version_times(root_log: str, wall_start: float) -> dict[int, float]:
    """Seconds after ``wall_start`` at which the root published each version (its log)."""
    times = {0: 0.0}
    for line in read_log(root_log):
        if m := ROOT_VERSION.match(line["message"]):
            times[int(m.group(1))] = line["time"] - wall_start
    return times


# --------------------------------------------------------------------------- figures


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_val_loss(
    records: dict[str, list[dict[str, Any]]],
    offsets: dict[str, float] | None = None,
    global_points: list[tuple[float, float]] | None = None,
    x: str = "t",
    title: str = "Local-update: validation loss, islands and global model",
    xlabel: str | None = None,
) -> bytes:
    """Each island's validation loss at its round boundaries against ``x`` (``t``: seconds,
    shifted by ``offsets``; or ``step``), and the global model's points if given."""
    plt, fig, ax = _figure()
    offsets = offsets or {}
    for name, rs in records.items():
        rs = [r for r in rs if finite(r.get("val_loss"))]
        xs = [r[x] + (offsets.get(name, 0.0) if x == "t" else 0) for r in rs]
        ax.plot(xs, [r["val_loss"] for r in rs], marker=".", label=name, alpha=0.6)
    if global_points:
        ax.plot(*zip(*global_points, strict=True), color="black", marker="o", linewidth=2,
                label="global model (root)")  # fmt: skip
    xlabel = xlabel or ("seconds since the islands started" if x == "t" else "inner steps")
    ax.set(xlabel=xlabel, ylabel="validation loss", title=title)
    ax.legend(fontsize=8)
    return _png(plt, fig)


def plot_bytes(names: list[str], steps: list[int], sent: list[float], ddp=None) -> bytes:
    """Bytes each island sent, beside what synchronous data-parallel training would have."""
    plt, fig, ax = _figure()
    x = np.arange(len(names))
    width = 0.4 if ddp is not None else 0.6
    ax.bar(x - (0.2 if ddp is not None else 0), sent, width, label="sent (pseudo-gradients)")
    if ddp is not None:
        ax.bar(x + 0.2, ddp, 0.4, label="sync data-parallel, fp32 ring")
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{n}\n{s} steps" for n, s in zip(names, steps, strict=True)])
    title = "Bytes sent per island" + (" vs synchronous data-parallel" if ddp is not None else "")
    ax.set(ylabel="bytes", title=title)
    ax.legend(fontsize=8)
    return _png(plt, fig)


def plot_bars(labels, values, title, ylabel, hline=None, ylim=None) -> bytes:
    plt, fig, ax = _figure()
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), labels)
    for i, v in enumerate(values):
        ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", linewidth=1)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set(title=title, ylabel=ylabel)
    return _png(plt, fig)


def plot_utilization(names: list[str], utilization: list[float]) -> bytes:
    return plot_bars(names, utilization, "Compute utilization (training time / wall time)",
                     "fraction", ylim=(0, 1.1))  # fmt: skip


def plot_staleness(per_island: dict[str, list[int]]) -> bytes:
    plt, fig, ax = _figure()
    top = max([0, *(x for v in per_island.values() for x in v)])
    bins = np.arange(-0.5, top + 1.5)
    ax.hist(list(per_island.values()), bins=bins, stacked=True, label=list(per_island))
    ax.set(xlabel="staleness s = v_now - base version", ylabel="accepted pushes",
           title="Staleness of accepted pushes")  # fmt: skip
    ax.legend(fontsize=8)
    return _png(plt, fig)


# --------------------------------------------------------------------------- a whole run


TITLES = {
    "val_loss": "Validation loss",
    "val_loss_time": "Validation loss over time",
    "bytes": "Bytes sent per island",
    "utilization": "Compute utilization per island",
    "staleness": "Staleness histogram",
}


def run_figures(run: RunRecords, params: int | None = None) -> dict[str, Any]:
    """The numbers ``render_run`` draws, per island in name order. The data-parallel
    comparison counts the islands that push (local-update ones: experts send nothing)."""
    names = sorted(run.rounds)
    steps = [int(run.last(n, "step") or 0) for n in names]
    sent = [run.last(n, "bytes_sent") for n in names]
    params = params or run.params
    pushing = sum(b is not None for b in sent)
    ddp = None
    if params and pushing:
        per_step = ddp_bytes_per_step(params, pushing)
        ddp = [s * per_step if b is not None else None for s, b in zip(steps, sent, strict=True)]
    return {
        "islands": names,
        "records": {n: len(run.rounds[n]) for n in names},
        "steps": steps,
        "bytes_sent": sent,
        "ddp_equivalent_bytes": ddp,
        "utilization": [run.last(n, "utilization") for n in names],
        "staleness": run.staleness(),
        "params": params,
    }


def render_run(run_dir: str | Path, out: str | Path, params: int | None = None) -> dict:
    """Write ``out/<plot>.png`` for every plot the run's records allow; returns the figures
    and ``plots``, the files written. Raises ValueError when the run holds no round records."""
    run = read_run(run_dir)
    if not run.rounds:
        raise ValueError(
            f"{run_dir}: no island round records (*.jsonl with t, island and step) below it; "
            "point at a run directory, or set metrics_file in the islands' configs"
        )
    f = run_figures(run, params)
    records = {n: run.rounds[n] for n in f["islands"]}
    plots = {"val_loss": plot_val_loss(records, x="step", title="Validation loss per island")}
    over_time, shared = loss_over_time(run)
    plots["val_loss_time"] = plot_val_loss(
        {n: [{"t": t, "val_loss": v} for t, v in pts] for n, pts in over_time.items()},
        title="Validation loss per island over time",
        xlabel="seconds since the run's first island started" if shared else (
            "seconds since each island started (its records have no wall clock)"),
    )  # fmt: skip
    f["loss_over_time"] = {n: [list(p) for p in pts] for n, pts in over_time.items()}
    f["shared_clock"] = shared
    with_bytes = [i for i, b in enumerate(f["bytes_sent"]) if b is not None]
    if with_bytes:  # local-update islands (experts send nothing)
        ddp = f["ddp_equivalent_bytes"]
        plots["bytes"] = plot_bytes(
            [f["islands"][i] for i in with_bytes], [f["steps"][i] for i in with_bytes],
            [f["bytes_sent"][i] for i in with_bytes],
            [ddp[i] for i in with_bytes] if ddp else None,
        )  # fmt: skip
    util = [(n, u) for n, u in zip(f["islands"], f["utilization"], strict=True) if finite(u)]
    if util:
        plots["utilization"] = plot_utilization([n for n, _ in util], [u for _, u in util])
    if any(f["staleness"].values()):
        plots["staleness"] = plot_staleness(f["staleness"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for key, data in plots.items():
        (out / f"{key}.png").write_bytes(data)
    return {**f, "plots": {k: str(out / f"{k}.png") for k in plots}}
