"""Write BENCHMARKS.md from the JSON files of ``scripts/bench_*.py``.

    python scripts/gen_benchmarks.py [--dir docs/benchmarks] [--out BENCHMARKS.md]

Each section gives the date, the machine and the command that produced the figures, the
table, the targets with their status, and the figures the projects we compare with report.
Nothing here is measured: it only formats what the benchmark scripts wrote.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.{digits}g}" if abs(v) < 1e3 else f"{v:,.0f}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _meta(doc: dict) -> str:
    m = doc.get("meta", {})
    mach = m.get("machine", {})
    return (
        f"*{m.get('date', '?')}; {mach.get('cpu', '?')}, {mach.get('cores', '?')} cores, "
        f"{mach.get('mem_gib', '?')} GiB; `{m.get('command', '?')}`*"
    )


def _status(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def comms(doc: dict) -> str:
    rows = [
        [name, c.get("gbps"), c.get("rel_error"), c.get("bytes_per_param")]
        for name, c in doc.get("codecs", {}).items()
    ]
    hm = doc.get("hivemind_fp16", {})
    rows.append(["hivemind fp16 (same tensor, same run)", hm.get("gbps"), hm.get("rel_error"), 2.0])
    int8 = doc.get("codecs", {}).get("int8", {})
    ratio = (int8.get("gbps") or 0) / hm["gbps"] if hm.get("gbps") else None
    targets = _table(
        ["target", "measured", "status"],
        [
            ["int8 encode+decode >= 3x hivemind fp16", f"{_f(ratio)}x",
             _status(None if ratio is None else ratio >= 3)],
            ["int8 relative error <= 1% (Gaussian)", int8.get("rel_error"),
             _status(None if int8.get("rel_error") is None else int8["rel_error"] <= 0.01)],
        ],
    )  # fmt: skip
    return "\n\n".join(
        [
            "## Comms: codecs and transport",
            _meta(doc),
            _table(["codec", "encode+decode GB/s", "rel. error", "bytes/param"], rows),
            f"gRPC push on loopback: {_f(doc.get('grpc_push_mbps'))} MB/s.",
            targets,
        ]
    )


def aggregator(doc: dict) -> str:
    rs = doc.get("round_seconds", {})
    ns = sorted({n for v in rs.values() for n in v}, key=int)
    rows = [[topo, *[rs.get(topo, {}).get(n) for n in ns]] for topo in ("flat", "tree", "hivemind")]
    merge, numpy_add = doc.get("merge_gbps"), doc.get("numpy_add_gbps")
    frac = merge / numpy_add if merge and numpy_add else None
    tree16, hm16 = rs.get("tree", {}).get("16"), rs.get("hivemind", {}).get("16")
    speedup = hm16 / tree16 if tree16 and hm16 else None
    targets = _table(
        ["target", "measured", "status"],
        [
            ["merge >= 50% of numpy a += b", f"{_f(frac)} ({_f(merge)} vs {_f(numpy_add)} GB/s)",
             _status(None if frac is None else frac >= 0.5)],
            ["tree >= 2x faster than hivemind (N=16)", f"{_f(speedup)}x",
             _status(None if speedup is None else speedup >= 2)],
            ["idle CPU near zero", f"{_f(doc.get('idle_cpu_percent'))}% of a core",
             _status(None if doc.get("idle_cpu_percent") is None else doc["idle_cpu_percent"] < 1)],
        ],
    )  # fmt: skip
    notes = "\n".join(f"- {n}" for n in doc.get("notes", []))
    rc = doc.get("round_cpu_seconds") or {}
    cpu_table = ""
    if rc:
        cpu_rows = [[t, *[rc.get(t, {}).get(n) for n in ns]] for t in ("flat", "tree", "hivemind")]
        cpu_table = (
            "CPU seconds one round costs all processes together (the work a deployment with a "
            "core per participant would spread out):\n\n"
            + _table(["topology", *[f"N={n}" for n in ns]], cpu_rows)
        )
    return "\n\n".join(
        x
        for x in [
            "## Aggregator: merge throughput and one full round",
            _meta(doc),
            "Seconds for one round (N islands push a 16 MiB update, fp16 on the wire; the round "
            "ends when the new version has reached all N):",
            _table(["topology", *[f"N={n}" for n in ns]], rows),
            cpu_table,
            targets,
            notes,
        ]
        if x
    )


def island(doc: dict) -> str:
    u = doc.get("utilization", {})
    ov, sy = u.get("overlapped"), u.get("sync")
    rows = [[k, v, doc.get("round_seconds", {}).get(k)] for k, v in u.items()]
    targets = _table(
        ["target", "measured", "status"],
        [
            ["overlapped utilization >= 95%", ov, _status(None if ov is None else ov >= 0.95)],
            ["sync visibly lower", sy, _status(None if sy is None or ov is None else sy < ov - 0.05)],
        ],
    )  # fmt: skip
    return "\n\n".join(
        [
            "## Island: compute utilization, overlapped vs synchronous",
            _meta(doc),
            f"Link {doc.get('link_mbit')} Mbit/s, {doc.get('latency_ms')} ms; H = {doc.get('H')}.",
            _table(["mode", "utilization", "seconds per round"], rows),
            targets,
        ]
    )


def ensemble(doc: dict) -> str:
    parts = ["## Experts and router vs a compute-matched monolith", _meta(doc)]
    for wl in ("bytelm", "flow"):
        d = doc.get(wl)
        if not d:
            continue
        e = d.get("ensemble", {})
        rows = [["monolith", _f(d.get("monolith_loss"), 4)]]
        rows += [[f"expert {i}", _f(x, 4)] for i, x in enumerate(d.get("expert_losses", []))]
        rows += [[f"ensemble {k}", _f(v, 4)] for k, v in e.items()]
        if d.get("student"):
            rows.append([f"student distilled from {d['student']['teacher_rule']}",
                         _f(d["student"]["loss"], 4)])  # fmt: skip
        parts += [f"### {wl}", _table(["model", "held-out loss"], rows)]
        settings = d.get("settings", {})
        how = (
            f"Monolith batch {settings.get('batch')} for {settings.get('steps')} steps; experts "
            f"at batches {d.get('expert_batches')} ({settings.get('split')} split) for as many"
        )
        if d.get("branch_step"):
            how += (
                f", branched (weights and AdamW state) from the monolith at step "
                f"{d['branch_step']}, a shared seed phase as in Branch-Train-Merge"
            )
        parts.append(how + ": equal total training FLOPs.")
        if "frechet" in d:
            parts.append(_table(["samples", "Fréchet distance"], list(d["frechet"].items())))
        if d.get("student"):
            parts.append(_student(d))
        acc = d.get("router_accuracy")
        overall = acc.get("overall") if isinstance(acc, dict) else acc
        parts.append(
            f"Router overhead: {_f(d.get('router_overhead'))} of one expert's forward time; "
            f"router held-out accuracy {_f(overall)}."
        )
        if isinstance(acc, dict):
            bins = acc.get("by_noise") or acc.get("by_position") or []
            key = "t" if "by_noise" in acc else "pos"
            parts.append(
                _table(
                    [f"{key} from", f"{key} to", "router accuracy"],
                    [[b[f"{key}_lo"], b[f"{key}_hi"], b["accuracy"]] for b in bins],
                )
            )
        t = d.get("targets", {})
        if t:
            parts.append(
                _table(
                    ["target", "measured", "status"],
                    [
                        [
                            "a sparse ensemble (top-1 or top-2) beats the monolith",
                            f"best sparse / monolith {_f(t.get('best_sparse_over_monolith'))} "
                            f"({t.get('measure')})",
                            _status(t.get("sparse_ensemble_beats_monolith")),
                        ],
                        [
                            "router overhead <= 5%",
                            d.get("router_overhead"),
                            _status(t.get("router_overhead_at_most_5pct")),
                        ],
                    ],
                )
            )
    return "\n\n".join(parts)


def _student(d: dict) -> str:
    """The distilled student's training compute on top of the experts', and what each way to
    serve costs per input (`bench_ensemble.py`, step 7 of its docstring)."""
    st, flops = d["student"], d.get("train_flops", {})
    experts, distill = flops.get("experts", 0.0), flops.get("distill", 0.0)
    total = experts + flops.get("router", 0.0) + distill
    text = (
        f"Distillation: a dense student of the experts' architecture, trained from scratch for "
        f"{st['steps']} steps at batch {st['batch']} on the {st['teacher_rule']} ensemble's "
        f"outputs (its gap to the teacher on unseen draws: {_f(st['teacher_gap'], 4)}), took "
        f"{distill:.3g} FLOPs ({distill / experts:.0%} of the experts' training, the teacher's "
        f"forwards included), so experts, router and student together cost "
        f"{total / flops['monolith']:.2f}x the monolith's training."
        if experts and flops.get("monolith")
        else "Distillation figures incomplete."
    )
    teacher = {"top_k:2": "top2", "top1": "top1", "full": "full"}.get(st["teacher_rule"])
    if "frechet" in d and "student" in d["frechet"]:
        measure, mine = "Fréchet distance", d["frechet"]
        scores = (mine["student"], mine.get("monolith"), mine.get(teacher))
    else:
        measure = "held-out loss"
        scores = (st["loss"], d.get("monolith_loss"), d.get("ensemble", {}).get(teacher))
    if None not in scores:
        text += (
            f" On {measure} the student ({_f(scores[0], 4)}) is "
            f"{_compare(scores[0], scores[1])} the monolith ({_f(scores[1], 4)}) and "
            f"{_compare(scores[0], scores[2])} its teacher ({_f(scores[2], 4)})."
        )
    serving = st.get("serving", {})
    base = serving.get("monolith")
    if not base:
        return text
    rows = [
        [key, f"{c['flops_per_input']:,.0f}", f"{c['flops_per_input'] / base['flops_per_input']:.2f}x",
         f"{c['batch_s'] * 1e3:.2f}", f"{c['batch_s'] / base['batch_s']:.2f}x"]
        for key, c in serving.items()
    ]  # fmt: skip
    head = ["serve with", "FLOPs per input", "vs monolith", "ms per batch", "vs monolith"]
    return (
        text
        + f" Serving one batch {st.get('serving_batch')} (an ensemble counts the rows its router "
        "and experts actually ran"
        + (
            ""
            if "frechet" in d
            else "; a window runs through an expert whole if any of its "
            "positions routes to it, so top-2 costs more than two forwards"
        )
        + "):\n\n"
        + _table(head, rows)
    )


HYBRID_ARMS = {
    "isolated": "(a) experts, one island each, twice the steps",
    "groups": "(b) experts, a group of local-update islands each",
    "global": "(c) one model, every island in local-update mode",
    "monolith": "(d) monolith",
}


def _compare(a: float, b: float) -> str:
    """How ``a`` stands against ``b`` where lower is better."""
    if a == b:
        return "the same as"
    return f"{abs(1 - a / b):.0%} {'better' if a < b else 'worse'} than"


def hybrid(doc: dict) -> str:
    """``bench_ensemble.py --hybrid``: four ways to spend the islands, and what they mean."""
    parts = ["## Expert groups: islands spent four ways at equal compute", _meta(doc)]
    for wl in ("flow", "bytelm"):
        d = doc.get(wl)
        if not d:
            continue
        s, arms, flow = d["settings"], d["arms"], wl == "flow"
        parts.append(
            f"### {wl}\n\n{s['islands']} islands, {s['clusters']} clusters (sizes "
            f"{s['cluster_sizes']}), groups of {s['group']}; every arm trains "
            f"{s['steps'] * s['monolith_batch']:,} examples ({s['steps']} steps at the monolith's "
            f"batch {s['monolith_batch']}; island batches: (a), (b) {arms['groups']['island_batches']} "
            f"by cluster, (c) {arms['global']['island_batches'][0]}). Local update: H = "
            f"{s['every']} inner steps, {s['codec']} pushes and versions, outer "
            f"{s['outer']['name']} lr {s['outer']['lr']} momentum {s['outer']['momentum']}; "
            f"{s['simulation']} (`scripts/ensemble_hybrid.py`). Model {s['model']}."
        )  # fmt: skip
        rows = []
        for arm, label in HYBRID_ARMS.items():
            a = arms[arm]
            rows.append([label, a["islands"], _f(a["loss"], 4), *([a["frechet"]] if flow else []),
                         a["bytes_sent"], a["measured_seconds"], a["modelled_wall_seconds"]])  # fmt: skip
        if flow:
            rows.append(["floor: training vs held-out digits", None, None, d["frechet_floor"],
                         None, None, None])  # fmt: skip
        head = ["method", "islands", "held-out loss", *(["Fréchet"] if flow else []),
                "bytes sent", "measured s", "wall s, islands in parallel (modelled)"]  # fmt: skip
        parts.append(_table(head, rows))
        detail = []
        for arm in ("isolated", "groups"):
            a = arms[arm]
            fd = a.get("frechet_by_rule", {})
            detail.append(f"{arm}: ensemble loss " + ", ".join(f"{k} {_f(v, 4)}" for k, v in
                          a["ensemble"].items()) + ("; Fréchet " + ", ".join(
                              f"{k} {_f(v)}" for k, v in fd.items()) if fd else "")
                          + "; experts alone " + ", ".join(_f(v, 4) for v in a["expert_losses"]))  # fmt: skip
        parts.append(
            "The experts' arms are scored by the better of their top-1 and top-2 ensembles "
            "(one router, trained on the partition, for both); in detail: " + "; ".join(detail)
            + f". Link for the modelled wall time: {s['link']['rate_mbit']:g} Mbit/s, "
            f"{s['link']['latency_s'] * 1e3:g} ms, one push and one version per round."
        )  # fmt: skip
        parts.append(_hybrid_meaning(arms, "frechet" if flow else "loss"))
    return "\n\n".join(parts)


def _hybrid_meaning(arms: dict, key: str) -> str:
    """What the figures say, whichever way they came out (lower ``key`` is better)."""
    q = {arm: arms[arm][key] for arm in HYBRID_ARMS}
    name = "Fréchet distance" if key == "frechet" else "held-out loss"
    best = min(q, key=q.get)
    b, a, c, d = q["groups"], q["isolated"], q["global"], q["monolith"]
    wall_a = arms["isolated"]["modelled_wall_seconds"]
    wall_b = arms["groups"]["modelled_wall_seconds"]
    lines = [
        f"What it means ({name}; lower is better). Best: {HYBRID_ARMS[best]}.",
        f"- Groups against isolated experts, the same experts on the same clusters with the "
        f"same compute, spent as two islands for S steps instead of one for 2S: {_f(b)} is "
        f"{_compare(b, a)} {_f(a)}, in {_f(wall_b)} s against {_f(wall_a)} s of modelled wall "
        f"time ({wall_b / wall_a:.2f}x: half the steps per island, plus "
        f"{_f(arms['groups']['modelled_link_seconds'])} s on the link) and "
        f"{_f(arms['groups']['bytes_sent'])} bytes against none; "
        + ("a group trains an expert as well or better, sooner." if b <= a and wall_b < wall_a
           else "a group trains an expert as well or better, but not sooner at this link."
           if b <= a else
           "averaging two islands' pseudo-gradients every H steps costs quality against one "
           "island's uninterrupted 2S steps: a group buys wall time, not quality."
           if wall_b < wall_a else
           "at this size the link costs more than the halved steps save, and quality too."),
        f"- Groups against one global model trained by all {arms['global']['islands']} islands "
        f"in local-update mode (the same bytes per round): {_f(b)} is {_compare(b, c)} {_f(c)}; "
        + ("splitting the data by cluster into experts beats one model on all of it."
           if b < c else "one shared model beats experts split by cluster here."),
        f"- Groups against the compute-matched monolith: {_f(b)} is {_compare(b, d)} {_f(d)}"
        + (", with no gradient traffic beyond each group's rounds." if b < d else
           "; the monolith needs every step's gradients in one place, which islands on slow "
           "links cannot give it."),
    ]  # fmt: skip
    g = arms["groups"]
    if g["rounds"]:
        compute, link = (
            g["modelled_compute_seconds"] / g["rounds"],
            g["modelled_link_seconds"] / g["rounds"],
        )
        lines.append(
            f"- Per round an island of a group computes {_f(compute)} s and its push and version "
            f"take {_f(link)} s on the link; the rounds here are synchronous, and overlapped "
            "rounds (Archipelago's default) would hide at most the smaller of the two."
        )  # fmt: skip
    if key != "loss":
        order = sorted(HYBRID_ARMS, key=lambda arm: arms[arm]["loss"])
        lines.append(
            "- On held-out loss the order is "
            + ", ".join(f"{HYBRID_ARMS[arm][:3]} {_f(arms[arm]['loss'], 4)}" for arm in order)
            + (
                ": the loss and the samples' distance agree on the best."
                if order[0] == best
                else ": the loss and the samples' distance disagree on the best, as in the "
                "experts-and-router section above, where the monolith's loss is the lowest "
                "while the sparse ensembles sample closer to the held-out digits."
            )
        )
    return "\n".join(lines)


def quality(doc: dict, title: str = "Quality per byte and time to target (headline)") -> str:
    rows = []
    for name in ("ddp", "sync_diloco", "hivemind"):
        if name in doc:
            rows.append([name, *_quality_row(doc[name], doc)])
    for name, d in doc.get("archipelago", {}).items():
        rows.append([f"archipelago {name}", *_quality_row(d, doc)])
    return "\n\n".join(
        [
            f"## {title}",
            _meta(doc),
            f"Target loss (DDP's final held-out loss): {_f(doc.get('target_loss'))}. Settings: "
            f"`{json.dumps(doc.get('config', {}))}`.",
            _table(
                [
                    "method",
                    "final loss",
                    "steps to target",
                    "bytes to target",
                    "DDP bytes / bytes",
                    "s to target @100 Mbit/s",
                    "s to target @10 Mbit/s",
                ],
                rows,
            ),
            _quality_targets(doc),
            *_shaped_tables(doc),
            "\n".join(f"- {n}" for n in doc.get("notes", [])),
            "\n".join(
                f"![{key.replace('_', ' ')}]({path})" for key, path in doc.get("plots", {}).items()
            ),
        ]
    )


def quality_longer(doc: dict) -> str:
    config = doc.get("config") or {}
    return quality(
        doc,
        f"Quality per byte at a longer budget (S = {config.get('S')}, H = "
        f"{', '.join(map(str, config.get('H', [])))}, codecs {', '.join(config.get('codecs', []))})",
    )


def quality_medium(doc: dict) -> str:
    config = doc.get("config") or {}
    w = config.get("workload") or {}
    return quality(
        doc,
        f"Quality per byte on the workload's default model (--preset medium: "
        f"{config.get('params', 0):,} parameters, d_model {w.get('d_model')}, "
        f"{w.get('n_layer')} layers, context {w.get('context')}; S = {config.get('S')}, "
        f"H = {', '.join(map(str, config.get('H', [])))}, device {config.get('device', 'cpu')})",
    )


def _shaped_tables(doc: dict) -> list[str]:
    """The MEASURED times over real shaped links, beside the modelled ones."""
    out = []
    for link, entries in (doc.get("shaped") or {}).items():
        if link == "error":
            out.append(f"Shaped links: not run ({entries}).")
            continue
        rows = []
        for name, e in entries.items():
            if not isinstance(e, dict):
                continue
            key = name.removeprefix("archipelago ")
            model = doc["archipelago"].get(key, {}) if name.startswith("archipelago ") else (
                doc.get(name, {}))  # fmt: skip
            modelled = (model.get("seconds_to_target") or {}).get(link)
            rows.append([name, e.get("seconds_to_target"), modelled, e.get("steps_to_target"),
                         e.get("error") or e.get("how") or ""])  # fmt: skip
        out.append(
            f"Measured over real shaped links ({link} Mbit/s"
            f"{' + 50 ms' if link == '10' else ''}, network namespaces, {entries.get('backend')} "
            "backend), beside the modelled figure:\n\n"
            + _table(
                ["method", "measured s to target", "modelled s", "steps to target", "note"], rows
            )
        )
    return out


def _quality_targets(doc: dict) -> str:
    arch = doc.get("archipelago", {})
    ratios = [(d["ddp_bytes_ratio"], n) for n, d in arch.items() if d.get("ddp_bytes_ratio")]
    best, best_slot = max(ratios) if ratios else (None, None)
    shaped = (doc.get("shaped") or {}).get("10")

    def t10(d: dict) -> float | None:
        return (d.get("seconds_to_target") or {}).get("10")

    ours = [t10(d) for d in arch.values() if t10(d)]
    fastest = min(ours) if ours else None
    ddp10 = t10(doc.get("ddp", {}))
    others = [t10(doc.get(k, {})) for k in ("sync_diloco", "hivemind")]
    how = "modelled"
    if shaped:  # measured on real links: those figures decide
        how = "measured on shaped links"
        ours = [e.get("seconds_to_target") for n, e in shaped.items()
                if n.startswith("archipelago") and isinstance(e, dict)]  # fmt: skip
        fastest = min([s for s in ours if s], default=None)
        ddp10 = (shaped.get("ddp") or {}).get("seconds_to_target")
        others = [(shaped.get(k) or {}).get("seconds_to_target")
                  for k in ("sync_diloco", "hivemind")]  # fmt: skip
    beats_others = (
        None if fastest is None else all(o is None or fastest < o for o in others if o is not None)
    )
    return _table(
        ["target", "measured", "status"],
        [
            ["bytes to DDP's loss: >= 300x fewer than DDP (goal 1000x)", f"{_f(best)}x" + (f" ({best_slot})" if best_slot else ""),
             _status(None if best is None else best >= 300)],
            [f"time to DDP's loss at 10 Mbit/s ({how}): >= 10x shorter than DDP's",
             f"{_f(ddp10 / fastest if fastest and ddp10 else None)}x",
             _status(None if fastest is None or ddp10 is None else ddp10 / fastest >= 10)],
            ["... and shorter than sync DiLoCo and hivemind", f"{_f(fastest)} s vs " + ", ".join(
                f"{n} {_f(o)} s" if o is not None else f"{n} not run or not reached"
                for n, o in zip(("sync DiLoCo", "hivemind"), others, strict=True)),
             _status(beats_others)],
        ],
    )  # fmt: skip


def _quality_row(d: dict, doc: dict) -> list[Any]:
    ddp_bytes = doc.get("ddp", {}).get("bytes_to_target")
    b = d.get("bytes_to_target")
    s = d.get("seconds_to_target") or {}
    return [d.get("final_loss"), d.get("steps_to_target"), b,
            ddp_bytes / b if b and ddp_bytes else None, s.get("100"), s.get("10")]  # fmt: skip


SECTIONS = {
    "bench_quality.json": quality,
    "bench_comms.json": comms,
    "bench_aggregator.json": aggregator,
    "bench_island.json": island,
    "bench_ensemble.json": ensemble,
    "bench_ensemble_hybrid.json": hybrid,
    "bench_quality_s1500.json": quality_longer,
    "bench_quality_s1500_h250.json": quality_longer,
    "bench_quality_medium.json": quality_medium,
}

# the command behind a JSON file where it is not ``scripts/<name>.py``
COMMANDS = {"bench_ensemble_hybrid.json": "bench_ensemble.py --hybrid",
            "bench_quality_medium.json": "bench_quality.py --preset medium"}  # fmt: skip

ANCHORS = """## What the projects we compare with report

- DiLoCo: 8 workers match synchronous training with 500x less communication (H = 500).
- INTELLECT-1: 400x less bandwidth than data parallel with int8 pseudo-gradients, H = 100,
  83-96% compute utilization across continents; OpenDiLoCo: 90-95%.
- Decentralized Diffusion Models: FID 6.08 vs 8.49 for the monolith, FLOP for FLOP; router
  about 4% of training FLOPs.
- hivemind's fp16 codec: about 0.4 GB/s on one core here (measured beside ours above)."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="docs/benchmarks", help="where the bench_*.json files are")
    p.add_argument("--out", default="BENCHMARKS.md")
    args = p.parse_args(argv)
    parts = [
        "# Benchmarks",
        "Generated by `scripts/gen_benchmarks.py` from the JSON in "
        f"`{args.dir}/`; every figure was measured by the command under its heading. Where a "
        "target is missed the table says so. Faults, attacks, load and fuzzing (soak, fuzz "
        "counts, attacker table, recovery figures) are in "
        "[`docs/reliability.md`](docs/reliability.md). Sparse 2-bit pushes (`sparse2`) with "
        "and without outer momentum, with error feedback that decays (SparseLoCo's, the "
        "default for sparse codecs), a 1-bit dense codec (`sign1`), and what they cost up "
        "and down: "
        "[`docs/benchmarks/thin.md`](docs/benchmarks/thin.md), which also has `bench_quality "
        "--thin` (every link at 4x a round's compute for one dense fp32 pseudo-gradient). "
        "Outer-step and round-length "
        "variants tried to cut the steps to DDP's loss at H = 50, and a sweep of the inner "
        "learning rate: every quality run here trains each method at AdamW 2e-3, below DDP's "
        "best for its budget, so their ratios to DDP are against DDP at 2e-3; against DDP at "
        "its best rate, with every method at its own, Archipelago and sync DiLoCo at H = 50 "
        "both need about 2x DDP's steps, and Archipelago with rounds of 5 steps and plain "
        "averaging 1.5x to 1.6x. Archipelago's steps are the islands' mean of the inner steps "
        "in the evaluated model (rank 0, which evaluates, falls behind the others; JSON "
        "written before 2026-12-05 counted its steps alone) "
        "([`docs/benchmarks/steps.md`](docs/benchmarks/steps.md)). Islands at mixed compute "
        "speeds (1, 1, 1/2, 1/4), on loopback and over per-worker shaped links of 100, 10, "
        "10 and 2 Mbit/s (`bench_quality --hetero`), and Nesterov against Delayed Nesterov "
        "outer steps on that mix (`--arch-outer`): "
        "[`docs/benchmarks/hetero.md`](docs/benchmarks/hetero.md). Expert groups against "
        "isolated experts, one global model and the monolith (`bench_ensemble.py --hybrid`): "
        "below.",
        "Model sizes: every `bench_quality` table here and in `docs/benchmarks/` runs the "
        "bytelm model reduced to 120,576 parameters (d_model 64, 2 layers, context 64), "
        "except the section on the workload's default model (`--preset medium`, 842,496 "
        "parameters: d_model 128, 4 layers, context 128), which says so in its heading; its "
        "reading, and the command for a GPU, are in "
        "[`docs/benchmarks/medium.md`](docs/benchmarks/medium.md).",
    ]
    found = 0
    for name, render in SECTIONS.items():
        path = Path(args.dir) / name
        if path.exists():
            parts.append(render(json.loads(path.read_text())))
            found += 1
        else:
            command = COMMANDS.get(name, f"{name[:-5]}.py")
            parts.append(f"## {name}\n\nNot measured yet: run `python scripts/{command} "
                         f"--json {path}`.")  # fmt: skip
    parts.append(ANCHORS)
    Path(args.out).write_text("\n\n".join(parts) + "\n")
    print(f"wrote {args.out} from {found} benchmark files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
