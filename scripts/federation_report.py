"""The federation run's report: figures from what the run measured, plots, md/html/json.

``write_report(out, facts)`` turns the facts ``scripts/federation.py`` collected (island round
records, exit summaries and logs, the root's final model, the partition, the router's
manifest, ``router eval``'s losses, the ensemble's answers; for flow experts the samples of
every method at the same seeds, in ``OUT/samples.npz``, their Frechet distances and the
router's accuracy by noise level) into:

- ``OUT/report.json``: the headline figures (``islands``, ``local_update``, ``experts``,
  ``ensemble``, ``wall_seconds``) for other tools;
- ``OUT/report.md`` with the plots as PNG files in ``OUT/plots/``, and ``OUT/report.html``,
  self-contained (the same PNGs embedded as base64);
- a short headline table (returned as text; the launcher prints it), whose "experts vs
  monolith" row says which is better (``experts_verdict``: the ensemble's best sparse rule
  against the monolith, by Frechet distance for flow, by held-out loss for bytelm).

What synchronous data-parallel training would have sent: a ring all-reduce of fp32 gradients
every step moves ``2 (N - 1) / N * 4 * params`` bytes per island per step (Patarasuk & Yuan
2009), so an island that did ``s`` steps would have sent ``s`` times that
(``ddp_equivalent_bytes``). Nothing here is pasted: every number comes from the run.

``Progress`` is the launcher's progress bar (a redrawn line on a terminal, a line per quarter
otherwise). Pure functions plus file writes; single-threaded.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from island.plots import (
    _figure,
    _png,
    ddp_bytes_per_step,
    finite,
    plot_bars,
    plot_bytes,
    plot_staleness,
    plot_utilization,
    plot_val_loss,
    staleness_from_log,
    version_times,
)

# --------------------------------------------------------------------------- progress


class Progress:
    """``label [#####.....] done/total``: redrawn in place on a terminal, else every 25%."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label = max(1, total), label
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.shown = -1

    def update(self, done: int) -> None:
        done = min(done, self.total)
        if self.tty:
            filled = int(30 * done / self.total)
            bar = "#" * filled + "." * (30 - filled)
            self.stream.write(f"\r  {self.label} [{bar}] {done}/{self.total} steps")
            self.stream.flush()
        elif (quarter := 4 * done // self.total) > self.shown:
            self.shown = quarter
            self.stream.write(f"  {self.label}: {done}/{self.total} steps ({25 * quarter}%)\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- pure figures


def local_update_figures(facts: dict[str, Any]) -> dict[str, Any]:
    lu, n = facts["local_update"], facts["islands"]
    params = lu["global"]["params"]
    names = [c["name"] for c in lu["island_configs"]]
    summaries = {s["name"]: s for s in lu["summaries"] if s}
    steps = [summaries[x]["step"] for x in names]
    sent = [summaries[x]["bytes_sent"] for x in names]
    ddp = [s * ddp_bytes_per_step(params, n) for s in steps]
    staleness = {}
    for name in names:
        try:
            staleness[name] = staleness_from_log(Path(lu["logs"][name]).read_text(errors="replace"))
        except OSError:
            staleness[name] = []
    every = [x for v in staleness.values() for x in v]
    return {
        "params": params,
        "steps": steps,
        "slowdown": [c["slowdown"] for c in lu["island_configs"]],
        "val_loss_start": lu["global"]["val_loss_start"],
        "val_loss_end": lu["global"]["val_loss_end"],
        "global_versions": lu["global"]["version"],
        "global_curve": lu["global"]["curve"],
        "global_best": best_version(lu["global"]["curve"]),
        "bytes_sent": int(sum(sent)),
        "bytes_sent_per_island": sent,
        "bytes_received": int(sum(summaries[x]["bytes_received"] for x in names)),
        "ddp_equivalent_bytes": float(sum(ddp)),
        "ddp_equivalent_per_island": ddp,
        "utilization": [summaries[x]["utilization"] for x in names],
        "staleness": {
            "per_island": staleness,
            "mean": float(np.mean(every)) if every else None,
            "max": max(every) if every else None,
        },
        "contributions": island_contributions(names, lu.get("acks", {}), steps),
        "link": lu["link"],
        "outer": lu.get("outer"),
        "every": lu["every"],
        "seconds": lu["seconds"],
    }


def island_contributions(
    names: list[str], acks: dict[str, list[dict]], steps: list[int]
) -> list[dict[str, Any]]:
    """What each island put into the global model, from the pushes it saw answered: deltas
    merged (``accepted``, or ``replayed``: delivered before and counted once), the inner steps
    in them and their share of all merged steps, the merge weights the root gave them (mean
    and range), and what was lost (stale or rejected deltas and their steps)."""
    merged_steps = {}
    rows = []
    for name, total in zip(names, steps, strict=True):
        answered = acks.get(name, [])
        merged = [a for a in answered if a.get("status") in ("accepted", "replayed")]
        lost = [a for a in answered if a.get("status") in ("stale", "rejected")]
        weights = []
        for a in merged:
            with contextlib.suppress(KeyError, TypeError, ValueError):  # replayed: no weight
                weights.append(float(a["weight"]))
        merged_steps[name] = sum(int(a.get("steps") or 0) for a in merged)
        rows.append({
            "island": name,
            "steps": int(total),
            "deltas_merged": len(merged),
            "steps_merged": merged_steps[name],
            "weight_mean": float(np.mean(weights)) if weights else None,
            "weight_min": min(weights) if weights else None,
            "weight_max": max(weights) if weights else None,
            "deltas_lost": len(lost),
            "steps_lost": sum(int(a.get("steps") or 0) for a in lost),
        })  # fmt: skip
    everything = sum(merged_steps.values())
    for row in rows:
        row["share_of_merged_steps"] = row["steps_merged"] / everything if everything else None
    return rows


def contributions_markdown(rows: list[dict[str, Any]], slowdowns: list[float]) -> list[str]:
    """The report's table of each island's contribution."""
    if not rows:
        return []

    def weight(r: dict[str, Any]) -> str:
        if r["weight_mean"] is None:
            return "-"
        return f"{r['weight_mean']:.3f} ({r['weight_min']:.3f}-{r['weight_max']:.3f})"

    lines = [
        "## Each island's contribution", "",
        "From the pushes each island saw answered (its `acks.jsonl`): deltas merged into the "
        "global model (accepted, or delivered earlier and counted once), the inner steps in them "
        "and their share of all merged steps, the merge weight the root gave them (staleness "
        "penalty; mean and range), and deltas lost (stale or rejected) with their steps.", "",
        "| island | slowdown | steps | deltas merged | steps merged | share | weight | lost |",
        "|---|--:|--:|--:|--:|--:|---|--:|",
    ]  # fmt: skip
    for r, slow in zip(rows, slowdowns, strict=True):
        share = "-" if r["share_of_merged_steps"] is None else f"{r['share_of_merged_steps']:.1%}"
        lines.append(
            f"| {r['island']} | {slow:g}x | {r['steps']} | {r['deltas_merged']} | "
            f"{r['steps_merged']} | {share} | {weight(r)} | {r['deltas_lost']} "
            f"({r['steps_lost']} steps) |"
        )
    return [*lines, ""]


def experts_figures(facts: dict[str, Any]) -> dict[str, Any]:
    ex = facts["experts"]
    router = ex["router"]
    return {
        "workload": ex.get("workload", facts["workload"]),
        "model": ex.get("model"),
        "branched_from_global": ex.get("branched", True),
        "batches": ex.get("batches"),
        "cluster_sizes": ex["cluster_sizes"],
        "partition": ex["partition_report"],
        "router_accuracy": router.get("held_out_accuracy"),
        "router_train_accuracy": router.get("train_accuracy"),
        "router_steps": router.get("steps"),
        "steps": ex["steps"],
        "final_val_loss": {k: (r[-1]["val_loss"] if r else None) for k, r in ex["records"].items()},
        "seconds": ex["seconds"],
    }


def ensemble_figures(facts: dict[str, Any]) -> dict[str, Any]:
    en = facts["ensemble"]
    losses = en["eval"]["losses"]
    figures = {
        "loss_unit": "flow-matching MSE per pixel" if en["eval"].get("workload") == "flow"
        else "nats per byte",
        "monolith_loss": losses.get("monolith"),
        "full_loss": losses.get("ensemble full"),
        "top2_loss": losses.get("ensemble top_k:2"),
        "top1_loss": losses.get("ensemble top1"),
        "expert_losses": {
            k[len("expert ") :]: v for k, v in losses.items() if k.startswith("expert ")
        },
        "samples": en["samples"],
        "seconds": en["seconds"],
    }  # fmt: skip
    if "flow" in en:
        flow = en["flow"]
        figures["frechet"] = flow["frechet"]
        figures["frechet_detail"] = {
            k: v for k, v in flow.items() if k not in ("frechet", "router_accuracy_by_noise")
        }
        figures["router_accuracy_by_noise"] = flow["router_accuracy_by_noise"]
    figures["verdict"] = experts_verdict(figures)
    figures["student"] = student_figures(en)
    return figures


def student_figures(en: dict[str, Any]) -> dict[str, Any] | None:
    """The dense student distilled from the ensemble (``router distill``): its Frechet
    distance (flow) or held-out loss (bytelm, the same batches as ``router eval``'s) and the
    compute its distillation took."""
    d = en.get("distill")
    if not d:
        return None
    keys = ("rule", "steps", "batch_size", "flops", "student_flops", "teacher_flops", "seconds",
            "wall_seconds", "validation_loss", "gap_before", "gap_after", "experts_train_flops",
            "monolith_train_flops")  # fmt: skip
    figures = {k: d.get(k) for k in keys}
    figures["frechet"] = en.get("flow", {}).get("frechet", {}).get("student")
    return figures


RULE_NAMES = {"full": "full", "top2": "top-2", "top1": "top-1"}


def experts_verdict(en: dict[str, Any]) -> dict[str, Any] | None:
    """Which is better, the ensemble's best sparse rule (top-1 or top-2) or the monolith:
    by Frechet distance where there are samples (flow), else by held-out loss (lower wins)."""
    if "frechet" in en:
        measure, scores, digits = "FD", en["frechet"], 1
    else:
        measure, digits = "loss", 3
        scores = {k: en[f"{k}_loss"] for k in ("monolith", "full", "top2", "top1")}
    sparse = [k for k in ("top2", "top1") if finite(scores.get(k))]
    if not sparse or not finite(scores.get("monolith")):
        return None
    rule = min(sparse, key=scores.get)
    best, mono = scores[rule], scores["monolith"]
    sign, outcome = (
        ("<", "the ensemble wins")
        if best < mono
        else (">", "the monolith wins")
        if best > mono
        else ("=", "a tie")
    )
    others = [f"{RULE_NAMES[k]} {scores[k]:.{digits}f}" for k in ("full", "top2", "top1")
              if k != rule and finite(scores.get(k))]  # fmt: skip
    text = (
        f"ensemble {RULE_NAMES[rule]} {measure} {best:.{digits}f} {sign} monolith "
        f"{mono:.{digits}f}: {outcome}" + (f" ({', '.join(others)})" if others else "")
    )
    return {"measure": measure, "rule": rule, "ensemble": best, "monolith": mono,
            "ensemble_wins": bool(best < mono), "text": text}  # fmt: skip


def summarize(facts: dict[str, Any]) -> dict[str, Any]:
    """The report.json document."""
    return {
        "islands": facts["islands"],
        "workload": facts["workload"],
        "experts_workload": facts.get("experts_workload", facts["workload"]),
        "quick": facts["quick"],
        "model": facts["plan"]["model"],
        "local_update": local_update_figures(facts),
        "experts": experts_figures(facts),
        "ensemble": ensemble_figures(facts),
        "wall_seconds": facts["wall_seconds"],
    }


def phase_summary(facts: dict[str, Any], phase: str) -> str:
    """The one-line summary printed when a phase ends."""
    if phase == "local_update":
        f = local_update_figures(facts)
        st = f["staleness"]
        return (
            f"local-update done: global val loss {global_loss_text(f)}; "
            f"{megabytes(f['bytes_sent'])} sent (sync data-parallel: "
            f"{megabytes(f['ddp_equivalent_bytes'])}); staleness mean "
            f"{st['mean'] if st['mean'] is None else round(st['mean'], 2)} max {st['max']}; "
            f"{f['seconds']:.0f} s"
        )
    if phase == "experts":
        f = experts_figures(facts)
        vals = " ".join(loss(v) for v in f["final_val_loss"].values())
        return (
            f"experts done: cluster sizes {f['cluster_sizes']}; router held-out accuracy "
            f"{loss(f['router_accuracy'])}; final val loss (experts, monolith) {vals}; "
            f"{f['seconds']:.0f} s"
        )
    f = ensemble_figures(facts)
    verdict = f"; {f['verdict']['text']}" if f["verdict"] else ""
    return (
        f"ensemble done: held-out loss full {loss(f['full_loss'])}, top2 {loss(f['top2_loss'])}, "
        f"top1 {loss(f['top1_loss'])} vs monolith {loss(f['monolith_loss'])}{verdict}; "
        f"{f['seconds']:.0f} s"
    )


def megabytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def loss(x: Any) -> str:
    return f"{x:.3f}" if finite(x) else "-"


def best_version(curve: list) -> list | None:
    """``[version, val_loss]`` of the curve's lowest finite loss (the earliest on a tie)."""
    finite_points = [(v, x) for v, x in curve if finite(x)]
    return list(min(finite_points, key=lambda p: p[1])) if finite_points else None


def global_loss_text(lu: dict[str, Any]) -> str:
    """``start -> final (N versions)``, and the best version where it is lower than the final."""
    text = (
        f"{loss(lu['val_loss_start'])} -> {loss(lu['val_loss_end'])} "
        f"({lu['global_versions']} versions)"
    )
    best = lu.get("global_best")
    if best and finite(lu["val_loss_end"]) and loss(best[1]) != loss(lu["val_loss_end"]):
        text += f"; best {loss(best[1])} at version {best[0]}"
    return text


def headline_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    lu, ex, en = r["local_update"], r["experts"], r["ensemble"]
    util = lu["utilization"]
    st = lu["staleness"]
    ratio = lu["ddp_equivalent_bytes"] / max(1, lu["bytes_sent"])
    return [
        ("islands", f"{r['islands']} ({r['workload']}, {lu['params']:,} parameters)"),
        ("global val loss", global_loss_text(lu)),
        ("bytes sent (all islands)", megabytes(lu["bytes_sent"])),
        (
            "sync data-parallel would send",
            f"{megabytes(lu['ddp_equivalent_bytes'])} ({ratio:.0f}x)",
        ),
        ("utilization per island", " ".join(f"{u:.2f}" for u in util)),
        (
            "staleness mean / max",
            f"{st['mean']:.2f} / {st['max']}" if st["mean"] is not None else "-",
        ),
        ("experts", experts_text(r)),
        ("expert cluster sizes", " ".join(str(s) for s in ex["cluster_sizes"])),
        (
            "router held-out accuracy",
            f"{ex['router_accuracy']:.3f} (chance {1 / len(ex['cluster_sizes']):.2f})"
            if finite(ex["router_accuracy"])
            else "-",
        ),
        (
            f"ensemble loss full / top2 / top1 ({en['loss_unit']})",
            f"{loss(en['full_loss'])} / {loss(en['top2_loss'])} / {loss(en['top1_loss'])}",
        ),
        ("monolith loss (same FLOPs)", loss(en["monolith_loss"])),
        *frechet_rows(en),
        ("experts vs monolith", en["verdict"]["text"] if en["verdict"] else "-"),
        *student_rows(en),
        (
            "wall time",
            f"{r['wall_seconds']:.0f} s (phases {lu['seconds']:.0f} / "
            f"{ex['seconds']:.0f} / {en['seconds']:.0f} s)",
        ),
    ]


def experts_text(r: dict[str, Any]) -> str:
    ex = r["experts"]
    origin = "branched from the global model" if ex["branched_from_global"] else "from theta_0"
    return f"{len(ex['cluster_sizes'])} x {ex['workload']}, trained alone, {origin}"


def batches_text(batches: dict[str, int] | None) -> str:
    """``experts 13 18 16 17, monolith 64``: per-step batches (the monolith sees all data)."""
    if not batches:
        return "-"
    experts = " ".join(str(b) for name, b in batches.items() if name != "monolith")
    return f"experts {experts}, monolith {batches.get('monolith')}"


def student_rows(en: dict[str, Any]) -> list[tuple[str, str]]:
    """``distilled student``: its score next to the teacher's and the monolith's, and the
    compute distillation added (one forward per step to serve, not a router and k experts)."""
    s = en.get("student")
    if not s:
        return []
    rule = {"top_k:2": "top2", "full": "full", "top1": "top1"}.get(s["rule"])
    if finite(s.get("frechet")):
        fd = en["frechet"]
        teacher = f", teacher {fd[rule]:.1f}" if rule in fd else ""
        score = f"FD {s['frechet']:.1f} (monolith {fd['monolith']:.1f}{teacher})"
    else:
        teacher = f", teacher {loss(en[f'{rule}_loss'])}" if rule else ""
        score = (f"held-out loss {loss(s['validation_loss'])} (monolith "
                 f"{loss(en['monolith_loss'])}{teacher})")  # fmt: skip
    share = ""
    if finite(s.get("experts_train_flops")) and s["experts_train_flops"]:
        share = f", {s['flops'] / s['experts_train_flops']:.0%} of the experts' training"
    cost = (f"{s['steps']} steps at batch {s['batch_size']} on the {s['rule']} ensemble: "
            f"{s['flops']:.2g} FLOPs{share}, {s['wall_seconds']:.0f} s")  # fmt: skip
    return [("distilled student (one model, one forward)", score),
            ("distillation compute", cost)]  # fmt: skip


def frechet_rows(en: dict[str, Any]) -> list[tuple[str, str]]:
    if "frechet" not in en:
        return []
    fd = en["frechet"]
    keys = ("monolith", "full", "top2", "top1")
    return [
        (
            "Frechet distance monolith / full / top2 / top1",
            " / ".join(f"{fd[k]:.1f}" for k in keys) + f" (floor {fd['floor']:.1f})",
        ),
        ("Frechet distance of each expert alone",
         " ".join(f"{v:.1f}" for k, v in fd.items() if k.startswith("expert"))),
    ]  # fmt: skip


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"{'figure'.ljust(width)}  value", f"{'-' * width}  {'-' * 30}"]
    return "\n".join([*lines, *(f"{k.ljust(width)}  {v}" for k, v in rows)])


# --------------------------------------------------------------------------- plots


def report_val_loss(facts: dict[str, Any]) -> bytes:
    """Islands on the launcher's clock, and the global model where the root published it."""
    lu = facts["local_update"]
    when = version_times(Path(lu["root_log"]).read_text(errors="replace")
                         if Path(lu.get("root_log", "")).is_file() else "",
                         lu.get("wall_start", 0.0))  # fmt: skip
    curve = [(when[v], val) for v, val in lu["global"]["curve"] if v in when]
    return plot_val_loss(lu["records"], lu.get("started_at", {}), curve)


SAMPLE_ROW_NAMES = {"monolith": "monolith", "full": "ensemble full", "top2": "ensemble top-2",
                    "top1": "ensemble top-1", "student": "distilled student"}  # fmt: skip


def plot_sample_grid(grid: dict[str, np.ndarray], frechet: dict[str, float]) -> bytes:
    """One row of samples per method (the same noise in every column), its FD at the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(grid)
    cols, pad = max(len(v) for v in grid.values()), 1
    cell = 8 + pad
    canvas = np.full((len(names) * cell + pad, cols * cell + pad), -1.0, np.float32)
    for r, name in enumerate(names):
        for c, image in enumerate(np.clip(np.nan_to_num(grid[name]), -1, 1)):
            canvas[pad + r * cell : pad + r * cell + 8, pad + c * cell : pad + c * cell + 8] = image
    fig, ax = plt.subplots(figsize=(8.0, 6.4 * canvas.shape[0] / canvas.shape[1] + 0.5), dpi=100)
    ax.imshow(canvas, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    labels = [f"{SAMPLE_ROW_NAMES.get(n, n + ' alone')}  FD {frechet[n]:.1f}" for n in names]
    ax.set_yticks([pad + r * cell + 3.5 for r in range(len(names))], labels, fontsize=8)
    ax.set_xticks([])
    ax.set_title("Samples at the same seeds (each column: one initial noise)", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # room for the row labels
    plt.close(fig)
    return buf.getvalue()


def plot_frechet(en: dict[str, Any]) -> bytes:
    fd = en["frechet"]
    names = [n for n in fd if n != "floor"]
    return plot_bars([SAMPLE_ROW_NAMES.get(n, n).replace("ensemble ", "") for n in names],
                     [fd[n] for n in names], f"Frechet distance, lower is better (dashed: floor "
                     f"{fd['floor']:.1f})", "Frechet distance to held-out digits",
                     hline=fd["floor"])  # fmt: skip


def plot_router_noise(en: dict[str, Any], k: int) -> bytes:
    plt, fig, ax = _figure()
    bands = en["router_accuracy_by_noise"]
    ax.plot([(lo + hi) / 2 for lo, hi, _ in bands], [a for _, _, a in bands], marker="o")
    ax.axhline(1 / k, color="gray", linestyle="--", linewidth=1, label=f"chance 1/{k}")
    ax.set(xlabel="t (0: pure noise, 1: data)", ylabel="held-out accuracy", ylim=(0, 1.05),
           title="Router accuracy by noise level of x_t")  # fmt: skip
    ax.legend(fontsize=8)
    return _png(plt, fig)


def load_grid(out: Path, en: dict[str, Any]) -> dict[str, np.ndarray] | None:
    grids = [s["grid"] for s in en["samples"] if "grid" in s]
    if not grids or not (out / grids[0]).exists():
        return None
    with np.load(out / grids[0]) as data:
        return {name: data[name] for name in data.files}


def make_plots(
    facts: dict[str, Any], r: dict[str, Any], out: Path | None = None
) -> dict[str, tuple[str, bytes]]:
    lu, ex, en = r["local_update"], r["experts"], r["ensemble"]
    k = len(ex["cluster_sizes"])
    names = [f"island{i}" for i in range(len(lu["steps"]))]
    plots: dict[str, tuple[str, bytes]] = {}
    grid = load_grid(out, en) if out is not None and "frechet" in en else None
    if grid:
        plots["samples"] = (SAMPLES_TITLE, plot_sample_grid(grid, en["frechet"]))
    if "frechet" in en:
        plots["frechet"] = ("Frechet distance of each method", plot_frechet(en))
        plots["router_noise"] = ("Router accuracy by noise level", plot_router_noise(en, k))
    plots |= {
        "val_loss": ("Validation loss over time", report_val_loss(facts)),
        "bytes": ("Bytes sent vs synchronous data-parallel", plot_bytes(
            names, lu["steps"], lu["bytes_sent_per_island"], lu["ddp_equivalent_per_island"])),
        "utilization": ("Compute utilization per island",
                        plot_utilization(names, lu["utilization"])),
        "staleness": ("Staleness histogram", plot_staleness(lu["staleness"]["per_island"])),
        "clusters": ("Expert cluster sizes", plot_bars(
            [f"cluster {i}" for i in range(k)], ex["cluster_sizes"], "Documents per cluster",
            "documents")),
    }  # fmt: skip
    acc = [(n, v) for n, v in (("train", ex["router_train_accuracy"]),
                               ("held-out", ex["router_accuracy"])) if finite(v)]  # fmt: skip
    if acc:
        plots["router"] = (
            "Router accuracy",
            plot_bars(
                [n for n, _ in acc],
                [v for _, v in acc],
                f"Router accuracy (dashed: chance 1/{k})",
                "accuracy",
                hline=1 / k,
                ylim=(0, 1.1),
            ),
        )
    names = [("monolith", en["monolith_loss"]), ("full", en["full_loss"]),
             ("top2", en["top2_loss"]), ("top1", en["top1_loss"])]  # fmt: skip
    names += [(e, v) for e, v in en["expert_losses"].items()]
    names = [(n, v) for n, v in names if finite(v)]
    plots["ensemble"] = (
        "Ensemble vs monolith",
        plot_bars(
            [n for n, _ in names],
            [v for _, v in names],
            "Held-out loss: monolith, ensemble rules, single experts",
            f"loss ({en['loss_unit']})",
        ),
    )
    return plots


# --------------------------------------------------------------------------- documents

SAMPLES_TITLE = "Samples: monolith, ensemble under each rule, each expert alone"
CAPTIONS = {
    "samples": "Each row samples from the same initial noise per column, with the same Euler "
    "steps: the compute-matched monolith, the served ensemble under each rule (through "
    "router.Client, the router re-applied at every step), each expert alone, and the dense "
    "student distilled from the ensemble (router distill). FD: Frechet distance of the row's "
    "full sample set to the held-out digits.",
    "frechet": "Frechet distance (the FID formula) to the held-out digits in the features of a "
    "small digit classifier trained on the training digits; the floor is as many training "
    "digits scored the same way, what a perfect sampler would reach.",
    "router_noise": "Share of held-out (x_t, t) whose most likely expert is the image's cluster, "
    "per band of t. Near t = 0 x_t is mostly noise, so the router falls to chance there and "
    "the ensemble mixes its experts.",
    "val_loss": "Black: the global model theta_v, rebuilt from theta_0 and the versions the root "
    "published, at the time the root published it. Colours: each island's model at its round "
    "boundaries (the newest version it holds, plus its own deltas still in flight).",
    "bytes": "Synchronous data-parallel: a ring all-reduce of fp32 gradients every step, "
    "2 (N - 1) / N x 4 bytes x parameters per island per step, for the steps each island did.",
    "utilization": "Time in forward, backward and optimizer over wall time (evaluation "
    "excluded); the slow island's emulated slowness counts as compute.",
    "staleness": "s = v_now - base version of every accepted push, from the islands' logs.",
    "ensemble": "Held-out loss (router eval; flow: flow-matching MSE per pixel at fixed noise "
    "draws, bytelm: nats per byte): the monolith trained on all data with the same "
    "total FLOPs as the experts together; the ensemble under each rule; each expert alone.",
}


def samples_markdown(r: dict[str, Any]) -> list[str]:
    lines = []
    for s in r["ensemble"]["samples"]:
        if "grid" in s:
            lines += [f"The first figure (seed {s['seed']}, {s['steps']} Euler steps; rows "
                      f"{', '.join(s['rows'])}).", ""]  # fmt: skip
            continue
        counts = ", ".join(f"{k}: {v}" for k, v in s["expert_counts"].items())
        lines += [f"Prompt `{s['prompt']!r}`, cut from the held-out text (bytes per top expert: "
                  f"{counts}):", "", "```", s["prompt"] + s["completion"], "```", ""]  # fmt: skip
    return lines


def render_markdown(r: dict[str, Any], plots: dict[str, tuple[str, bytes]]) -> str:
    lu = r["local_update"]
    model = {k: v for k, v in r["model"].items() if k != "data"}
    data = ", ".join(Path(d).name for d in r["model"].get("data", []))
    data = f"data: {data}" if data else "data: the Python standard library"
    lines = [
        "# Archipelago federation run", "",
        f"{r['islands']} islands, workload `{r['workload']}` with model config `{json.dumps(model)}` ({data}) "
        f"({lu['params']:,} parameters; smaller than the workload's default so that every island "
        f"and aggregator shares this machine's cores){' (--quick)' if r['quick'] else ''}. "
        f"Links: {lu['link']['rate_mbit']:g} Mbit/s, {lu['link']['latency_ms']:g} ms "
        f"({lu['link']['shaper']}); H = {lu['every']} inner steps per round; outer optimizer "
        f"{lu['outer']}; island slowdowns "
        f"{lu['slowdown']}. Experts: {experts_text(r)}, model config "
        f"`{json.dumps(r['experts']['model'])}`, batches {batches_text(r['experts']['batches'])}. Every figure below was measured "
        "in this run.", "",
        "## Headline", "", "| figure | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in headline_rows(r)), "",
    ]  # fmt: skip
    lines += contributions_markdown(lu.get("contributions", []), lu["slowdown"])
    for key, (title, _) in plots.items():
        lines += [f"## {title}", "", f"![{title}](plots/{key}.png)", ""]
        if key in CAPTIONS:
            lines += [CAPTIONS[key], ""]
    lines += ["## Partition", "", "```", *r["experts"]["partition"], "```", ""]
    lines += ["## Samples from the served ensemble", ""]
    lines += samples_markdown(r)
    return "\n".join(lines)


def render_html(markdown: str, plots: dict[str, tuple[str, bytes]], out: Path) -> str:
    """A self-contained page from the markdown: headings, tables, code and embedded images."""
    body, in_code, table = [], False, []

    def image(src: str, alt: str) -> str:
        key = Path(src).stem
        data = plots[key][1] if key in plots else (out / src).read_bytes()
        return (
            f'<img alt="{html.escape(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode()}">'
        )

    def flush_table() -> None:
        if table:
            rows = [f"<tr>{''.join(f'<td>{html.escape(c)}</td>' for c in t)}</tr>" for t in table]
            body.append(f"<table>{''.join(rows)}</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("```"):
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
        elif in_code:
            body.append(html.escape(line))
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                table.append(cells)
        else:
            flush_table()
            if m := re.fullmatch(r"!\[(.*)\]\((.*)\)", line):
                body.append(image(m.group(2), m.group(1)))
            elif line.startswith("#"):
                level = len(line) - len(line.lstrip("#"))
                body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
            elif line:
                body.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}td{padding:2px 10px;"
        "border-bottom:1px solid #ddd}pre{background:#f4f4f4;padding:8px;white-space:pre-wrap}"
        "img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Archipelago federation"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
    )


def write_report(out: Path, facts: dict[str, Any]) -> dict[str, Any]:
    """Write report.json, report.md (+ plots/) and report.html; returns the summary plus the
    printed headline table under ``headline``."""
    out = Path(out)
    r = summarize(facts)
    plots = make_plots(facts, r, out)
    (out / "plots").mkdir(exist_ok=True)
    for key, (_, data) in plots.items():
        (out / "plots" / f"{key}.png").write_bytes(data)
    md = render_markdown(r, plots)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(render_html(md, plots, out))
    (out / "report.json").write_text(json.dumps(r, indent=2))
    table = format_table(headline_rows(r))
    return {**r, "headline": f"\n{table}\n\nreport: {out / 'report.md'} and {out / 'report.html'}"}
