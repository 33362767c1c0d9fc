"""Output of ``scripts/bench_quality.py``: the plots, the printed tables and the notes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchlib import format_table


def named_entries(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    named = [(k, doc[k]) for k in ("ddp", "sync_diloco", "hivemind")]
    return named + [(f"archipelago {k}", v) for k, v in doc["archipelago"].items()]


def plot(doc: dict[str, Any], out_dir: Path, stem: str) -> dict[str, str]:
    """Loss vs bytes and loss vs modelled wall-clock (both links) as PNGs; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    target = doc["target_loss"]
    curves = [(n, e["curve"]) for n, e in named_entries(doc) if e.get("curve")]
    paths = {}
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=plt.cm.tab20.colors)  # > 10 methods
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves:
        pts = [(p["bytes"], p["loss"]) for p in curve if p["bytes"] > 0]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=name)
    ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    ax.set(xscale="log", xlabel="bytes sent + received per worker", ylabel="held-out loss",
           title="loss vs bytes (bytelm)")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths["loss_vs_bytes"] = str(out_dir / f"{stem}_loss_vs_bytes.png")
    fig.savefig(paths["loss_vs_bytes"], dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(doc["config"]["links"]), figsize=(12, 4.5), sharey=True)
    for ax, (link, label) in zip(axes, (("100", "100 Mbit/s"), ("10", "10 Mbit/s + 50 ms")),
                                 strict=True):  # fmt: skip
        for name, curve in curves:
            ax.plot([p["seconds"][link] for p in curve], [p["loss"] for p in curve],
                    marker=".", label=name)  # fmt: skip
        ax.axhline(target, color="k", linestyle="--", linewidth=1)
        measured = (doc.get("shaped") or {}).get(link) or {}
        for i, (name, e) in enumerate(
            (n, e)
            for n, e in measured.items()
            if isinstance(e, dict) and e.get("seconds_to_target")
        ):
            ax.plot([e["seconds_to_target"]], [target], marker="xv^<>s*"[i % 7], color="k",
                    linestyle="none", label=f"{name}: measured, shaped link")  # fmt: skip
        ax.legend(fontsize=6)
        ax.set(xscale="log", xlabel="wall-clock seconds", title=label)
    axes[0].set_ylabel("held-out loss")
    fig.suptitle("loss vs modelled wall-clock (compute measured, links modelled); black markers: "
                 "time to the target measured over real shaped links")  # fmt: skip
    fig.tight_layout()
    paths["loss_vs_wallclock"] = str(out_dir / f"{stem}_loss_vs_wallclock.png")
    fig.savefig(paths["loss_vs_wallclock"], dpi=110)
    plt.close(fig)
    return paths


def print_table(doc: dict[str, Any]) -> None:
    rows = []
    for name, e in named_entries(doc):
        if "error" in e:
            status = "skipped" if e["error"].startswith("skipped") else "FAILED"
            rows.append([name, status, *[None] * 10])
            continue
        secs = e["seconds_to_target"]
        rows.append([
            name, e["loss_at_S"], e["final_loss"], e["steps"], e["steps_to_target"],
            e["bytes_to_target"], e["ddp_bytes_ratio"], secs["100"], secs["10"],
            e["utilization"]["10"], e["bytes_per_island"], e.get("push_bytes_peak"),
        ])  # fmt: skip
    headers = ["method", "loss@S", "final", "steps", "steps->tgt", "bytes->tgt", "DDP/x bytes",
               "s->tgt 100M*", "s->tgt 10M*", "util 10M*", "bytes total", "peak B/push"]  # fmt: skip
    print(f"\ntarget loss (DDP after {doc['config']['S']} steps): {doc['target_loss']:.4f}")
    print(format_table(headers, rows))
    print("* modelled: measured compute per step + link model (see notes)")
    for link, entries in doc.get("shaped", {}).items():
        if link == "error":
            print(f"shaped links: not run ({entries})")
            continue
        print_shaped(link, entries)


def link_label(links: list) -> str:
    """``100 Mbit/s`` for one link shared by all; per worker ``100/10/10/2 Mbit/s, 0/50/50/50
    ms``. ``links``: each worker's (rate, delay) or {"rate_bps", "delay_s"}."""
    pairs = [(x["rate_bps"], x["delay_s"]) if isinstance(x, dict) else tuple(x) for x in links]
    shown = pairs if len(set(pairs)) > 1 else pairs[:1]
    rates = "/".join(f"{r / 1e6:.3g}" for r, _ in shown)
    delays = "/".join(f"{d * 1e3:g}" for _, d in shown)
    return f"{rates} Mbit/s" + (f", {delays} ms" if any(d for _, d in pairs) else "")


def print_shaped(link: str, entries: dict[str, Any]) -> None:
    """The measured table of one shaped-link set: seconds to the target, its ratio to DDP's
    and to sync DiLoCo's, bytes, each worker's utilization."""
    ddp_s = (entries.get("ddp") or {}).get("seconds_to_target")
    sync_s = (entries.get("sync_diloco") or {}).get("seconds_to_target")
    rows = []
    for name, e in entries.items():
        if not isinstance(e, dict):
            continue
        secs = e.get("seconds_to_target")
        util = e.get("utilization")
        up, down = e.get("bytes_up"), e.get("bytes_down")
        rows.append([
            name, secs, ddp_s / secs if ddp_s and secs else None,
            sync_s / secs if sync_s and secs else None, e.get("steps_to_target"), e.get("steps"),
            e.get("bytes_to_target"), mean_mb(up), mean_mb(down), e.get("push_bytes_peak"),
            " ".join(f"{u:.2f}" for u in util) if util else (e.get("error") or "").split("\n")[0][:60],
        ])  # fmt: skip
    label = f"{link} Mbit/s" if link in ("100", "10") else f"{link}, {link_label(entries['links'])}"
    print(f"\nMEASURED over real shaped links, {label} ({entries.get('backend')}):")
    headers = ["method", "s->tgt", "DDP/x", "syncDiLoCo/x", "steps->tgt", "steps", "bytes->tgt",
               "up MB", "down MB", "peak B/push", "util per worker"]  # fmt: skip
    print(format_table(headers, rows))
    if "compute_only_bound_s" in entries:
        print(f"compute-only bound (DDP's steps at one worker's pace alone, no communication): "
              f"{entries['compute_only_bound_s']:.1f} s")  # fmt: skip


def mean_mb(values: list[float] | None) -> float | None:
    """The workers' mean of ``values`` (bytes), in MB; None without any."""
    return sum(values) / len(values) / 1e6 if values else None


def notes(args, hivemind_settings: dict) -> list[str]:
    return [
        "seconds_to_target and utilization are MODELLED: one worker's compute per step measured "
        "alone before the runs, plus the link model in scripts/bench_quality.py's docstring"
        + (
            f"; 'shaped' holds MEASURED times over real shaped links ({', '.join(args.shaped)} "
            "Mbit/s) in network namespaces, where the 4 workers share this machine's cores "
            "(compute per step slower than alone) and rank 0's evaluation time is excluded"
            if args.shaped
            else "; no run used shaped links" + (" (--no-netns given)" if args.no_netns else "")
        ),
        "bytes: DDP counted as a ring all-reduce (2(N-1)/N*P sent + as many received per step); "
        "DiLoCo/Archipelago measured on the wire by the sync engine (envelopes and gRPC "
        "framing; every worker builds theta_0 from the shared seed, as DDP's do, so no initial "
        "download); hivemind: 4x the serialized reduce-scatter "
        "parts each peer sent, plus state it served (DHT and libp2p framing not counted)",
        "peak B/push (push_bytes_peak): the largest mean bytes sent per answered push of any "
        "model line of any worker, on the wire (with fragments: of any fragment line); "
        "up/down MB: each worker's bytes sent/received to its run's end, the workers' mean",
        "evaluation: rank 0's model every round (DiLoCo: the global anchor just adopted; "
        "hivemind: its local parameters after its latest averaging round) on fixed held-out windows; "
        "DiLoCo/Archipelago add a last point, the global model once it holds every round "
        "pushed (drained: true)",
        "steps (DiLoCo/Archipelago): the islands' mean of the inner steps the evaluated version "
        "holds, from the root's versions (the island updates each merged) and each island's "
        "rounds; rank 0 evaluates, so the others run ahead of it (its own count: step_rank0; "
        "measured.steps_per_island); bytes to the target: rank 0's bytes sent, scaled alike, "
        "plus what it received",
        f"hivemind: use_local_updates=True, target_batch_size = world*batch*H, "
        f"{hivemind_settings}; delay_state_averaging off (hivemind's default: the step that ends an "
        f"epoch waits for its all-reduce)",
        *(
            [
                "fragments (slot suffix _F<n>): the island's streamed fragments (sync.fragments, "
                "island.streaming) against a root serving one model line per fragment; rank 0 "
                "evaluates the union of the fragments' anchors at the last fragment's boundaries "
                "(every H steps); an island's steps in it are those of its fragment holding the "
                "fewest"
            ]
            if max([*args.fragments, *(f for v in args.thin_fragments.values() for f in v)]) > 1
            else []
        ),
        *(
            [f"every method's inner steps last at least {args.step_floor:g} s (--step-floor)"]
            if args.step_floor
            else []
        ),
        "all workers of a method share one machine's cores; the loopback runs' wall times "
        "are in measured.run_s (no link at all, so not a measure of time on a slow link)",
    ]
