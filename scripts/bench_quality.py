"""Quality per byte and time to a target loss: Archipelago against DDP, synchronous DiLoCo and
hivemind, side by side in one run (bytelm, ``--world`` workers, same model, seed, data and
inner optimizer; see ``scripts/quality_methods.py`` for the workers).

1. **DDP** (gloo, gradients all-reduced every step) trains ``S`` steps; its final held-out
   loss is the **target**. Its bytes are counted as a ring all-reduce sends them: per step
   and worker ``2 (N-1)/N * P`` bytes sent and as many received (``P`` = fp32 gradient bytes).
2. **Sync DiLoCo**: ``H`` inner steps, blocking outer sync through a real ``aggregator
   serve`` root (``buffer_k = N``, Nesterov 0.7 / 0.9), fp32 pseudo-gradients (codec none).
3. **hivemind**: ``hivemind.Optimizer(use_local_updates=True)`` at the same ``H``.
4. **Archipelago**: overlapped, staleness-weighted sync, int8 and int4 deltas with error
   feedback (published ``u_v`` in the same codec), ``H`` in ``--H``; each island adopts a
   version at the first inner step after it arrives (``--adopt arrival``, the default) or
   at its next round boundary (``boundary``). With ``--fragments F`` (> 1) an Archipelago
   setting also runs **with streamed fragments** (Streaming DiLoCo, ``[sync] fragments = F``
   of the island daemon): each worker trains through the island's ``StreamingLocalUpdate``
   with one sync engine per fragment line ``<model_id>.f<p>`` (``island.fragmented``), and
   the root serves one model line per fragment (``fragment = [p, F]`` of the same init);
   fragment p pushes ``H (p + 1) / F`` steps in, then every ``H``. Rank 0 evaluates the union
   of the fragments' anchors every ``H`` steps (the last fragment's boundaries, as often as
   without fragments); the steps it holds are the fewest any fragment's anchor holds.

Every method but DDP runs until it has done ``S`` steps *and* reached the target, or
``--max-factor * S`` steps. Rank 0 evaluates the held-out loss every round. Reported per
method: the loss at step ``S`` (the honest gap at equal steps), bytes sent + received per
worker until the target is first reached, steps to it, DDP's bytes over the method's.

**Time to target, modelled**: the loss curves above come from runs on loopback on one
(shared) machine, where wall-clock time says little about a slow link. The model: one
worker's compute per inner step ``c`` is measured once, alone, before the runs; per link
(rate ``r``, one-way delay ``d``; ``100`` = 100 Mbit/s no delay, ``10`` = 10 Mbit/s + 50 ms)

- DDP:   per step ``max(c, 2 (N-1) (P / N / r + d))`` (all-reduce fully overlapped with
  the step: generous to DDP);
- sync DiLoCo, k rounds: ``k (H c + o + 3 d) + B / r``, ``B`` the measured bytes so far, ``o``
  the measured per-round encode/apply time;
- Archipelago (overlapped), k rounds: ``max(k (H c + o), B / r + 3 k d)`` (pushes and
  versions overlap the compute);
- hivemind, k epochs: ``max(k H c, (B / 2) / r + 4 k d)`` (averaging taken to overlap the
  compute, which hivemind's local-update mode does not do, and matchmaking waits not charged:
  generous to hivemind).

**Time to target, measured** (``--shaped 10 100``, the default unless ``--quick`` or
``--no-netns``; needs root): the methods run again with every worker in its own network
namespace behind a real shaped link (``comms.netns``: tbf for the rate, netem or the TUN
forwarder for the delay) and the root aggregator in the hub namespace. DDP runs
``--shaped-ddp-steps`` steps and its measured seconds per step are multiplied by its steps to
the target; sync DiLoCo, hivemind and the Archipelago setting with the shortest modelled time
run until they reach the target. Times are from the start barrier to rank 0's first
evaluation at or below the target, less rank 0's evaluation time. All workers share this
machine's cores, so compute is slower than ``c`` for every method alike.

**Mixed hardware** (``--hetero``): 4 workers at compute speeds 1, 1, 1/2, 1/4 (``--slowdowns
1,1,2,4``) behind their own links of 100, 10, 10 and 2 Mbit/s (0, 50, 50, 50 ms one way); every
method and every Archipelago setting (``--H`` 50 and ``--every-s`` 2.5 by default) is timed over
them. **Thin links** (``--thin``): every worker's link is set so that one dense fp32
pseudo-gradient takes 4x one round of 50 inner steps (one worker's step measured alone here), 50
ms one way; DDP, sync DiLoCo (fp32, H = 50), Archipelago int4 at H = 50 and sparse2 at H = 10
(outer sgd, int8 versions) are timed over them, and int4 at H = 50 again with streamed fragments
(``quality_args.THIN_FRAGMENTS``, F = 2 and 4; ``--fragments`` sets the counts). Both report,
per method, measured seconds to the target, rank 0's bytes to it, each worker's bytes up and
down and utilization (seconds in inner steps over wall seconds), the peak bytes per push (the
largest mean bytes sent per push of any model line, on the wire; with fragments about 1/F of the
whole model's push), and the compute-only bound (DDP's steps at one worker's pace alone, no
communication).

**The workload's default model** (``--preset medium``): the bytelm model at its own default size
(842,496 parameters; the committed headline tables run a 120,576-parameter reduction), S = 2000,
H = 50, int8 and int4 against DDP and sync DiLoCo, on loopback with modelled times
(``quality_args.PRESETS``). On a GPU machine the same preset runs with ``--device cuda`` (every
worker's model and batches on the GPU; DDP's all-reduce stays on gloo), e.g. at 8 workers and
about 25 M parameters: ``--preset medium --device cuda --world 8 --d-model 512 --n-layer 8
--n-head 8``.

    python scripts/bench_quality.py [--quick] [--no-netns] [--hetero | --thin] [--fragments F ...]
        [--preset medium] [--device DEVICE] --json PATH

Writes ``{"target_loss", "ddp": {...}, "sync_diloco": {...}, "hivemind": {...},
"archipelago": {"int8_H100": {...}, ...}, "config", "notes", "plots", "meta"}``; each method
holds ``final_loss, steps, bytes_per_island, bytes_to_target, seconds_to_target{"100","10"}``
(null where the target was never reached) plus ``loss_at_S``, ``steps_to_target``,
``ddp_bytes_ratio``, ``utilization``, ``curve``, for DiLoCo/Archipelago ``fragments``,
``bytes_up``/``bytes_down`` per worker, ``push_bytes_peak`` (measured) and
``push_bytes_planned`` (``island.sync.auto.push_nbytes`` of the largest fragment), and the
run's diagnostics; ``"shaped":
{LINK: {"backend", "ddp": {"seconds_per_step", "seconds_to_target", ...}, "sync_diloco":
{"seconds_to_target", "steps_to_target", ...}, ...}}`` holds the measured times.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path[:0] = [p for p in (str(SCRIPTS), str(REPO)) if p not in sys.path]

from benchlib import write_json  # noqa: E402
from quality_args import (  # noqa: E402
    HIVEMIND_STANDARD,
    LINKS,
    OPTIM,
    OUTER,
    THIN_DELAY_S,
    THIN_H,
    THIN_RATIO,
    THIN_SLOTS,
    split_outer,
)
from quality_args import parse_args as parse_command_line  # noqa: E402
from quality_procs import MODEL_ID, Federation, ShapedNet, free_port, run_workers  # noqa: E402
from quality_report import link_label, notes, plot, print_table  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``quality_args.parse_args``) with this script's description."""
    return parse_command_line(argv, __doc__.split("\n\n")[0])


# ============================================================================ pure figures


def transfer_s(nbytes: float, rate_bps: float, delay_s: float, trips: float = 1) -> float:
    """Seconds to move ``nbytes`` over a link of ``rate_bps`` with ``trips`` one-way delays."""
    return nbytes * 8 / rate_bps + trips * delay_s


def ddp_bytes_per_step(param_bytes: int, world: int) -> float:
    """Ring all-reduce, per worker and step: ``2 (N-1)/N * P`` sent plus as many received."""
    return 2 * (2 * (world - 1) / world * param_bytes)


def ddp_seconds(steps: int, compute_s: float, param_bytes: int, world: int, link) -> float:
    rate, delay = link
    comm = 2 * (world - 1) * transfer_s(param_bytes / world, rate, delay)
    return steps * max(compute_s, comm)


def rounds_seconds(kind: str, rounds: int, h: int, compute_s: float, overhead_s: float,
                   nbytes: float, link) -> float:  # fmt: skip
    """Modelled wall time of ``rounds`` rounds that moved ``nbytes`` (sent + received) so far;
    ``kind``: ``sync`` (blocking), ``overlapped`` or ``hivemind`` (see the module docstring)."""
    rate, delay = link
    work = rounds * (h * compute_s + overhead_s)
    if kind == "sync":
        return work + transfer_s(nbytes, rate, delay, 3 * rounds)
    if kind == "overlapped":
        return max(work, transfer_s(nbytes, rate, delay, 3 * rounds))
    if kind == "hivemind":
        return max(rounds * h * compute_s, transfer_s(nbytes / 2, rate, delay, 4 * rounds))
    raise ValueError(f"unknown kind {kind!r}")


def thin_rate_bps(param_bytes: int, compute_s: float) -> float:
    """--thin's link rate: one dense fp32 pseudo-gradient (``param_bytes``) takes THIN_RATIO
    times one round of THIN_H inner steps of ``compute_s`` each."""
    return param_bytes * 8 / (THIN_RATIO * THIN_H * compute_s)


def first_crossing(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation at or below ``target`` (curve in step order), or None."""
    return next((point for point in curve if point["loss"] <= target), None)


def held_steps(
    merged: dict[int, list[tuple[str, int]]], round_steps: dict[str, dict[str, int]]
) -> tuple[dict[int, dict[str, int]], int]:
    """One model line's versions (``merged``: version -> the (peer id, push sequence) of the
    island updates it merged) against each island's rounds (``round_steps``: peer id -> push
    sequence -> the inner steps of that round): version -> peer id -> the inner steps of that
    island's rounds merged in versions 1..v (version 0 holds none); and how many merged
    updates matched no round (counted as none)."""
    held = dict.fromkeys(round_steps, 0)
    out, missing = {0: dict(held)}, 0
    for version in sorted(merged):
        for peer, seq in merged[version]:
            steps = round_steps.get(peer, {}).get(str(seq))
            if steps is None:
                missing += 1
                continue
            held[peer] += steps
        out[version] = dict(held)
    return out, missing


def federation_steps(
    evals: list[dict[str, Any]], lines: list[dict[int, dict[str, int]]], peers: list[str]
) -> list[tuple[float, int]]:
    """For each of rank 0's evaluations (its ``version``, or with fragments its ``versions``,
    one per line), the inner steps the evaluated model holds: the mean over the islands
    (``peers``, rank 0 first) and rank 0's own. With fragments an island's steps in the
    model are the fewest of any fragment's (``lines`` as from :func:`held_steps`)."""

    def at(line: dict[int, dict[str, int]], version: int) -> dict[str, int]:
        return line[max(v for v in line if v <= version)]

    out = []
    for e in evals:
        versions = e.get("versions") or [e.get("version", 0)] * len(lines)
        per_peer = [min(at(line, int(v))[p] for line, v in zip(lines, versions, strict=True))
                    for p in peers]  # fmt: skip
        out.append((statistics.mean(per_peer), per_peer[0]))
    return out


def loss_at(curve: list[dict[str, Any]], step: int) -> float | None:
    """The loss of the last evaluation at or before ``step``."""
    before = [p for p in curve if p["step"] <= step]
    return before[-1]["loss"] if before else None


# ============================================================================ runs


def calibrate_compute_s(workload_cfg: dict, steps: int = 25) -> tuple[float, int]:
    """Median seconds of one inner step of one worker running alone (one thread), and the
    model's fp32 parameter bytes."""
    import torch
    from quality_methods import make_adamw

    from island.workloads import get_workload

    torch.set_num_threads(1)
    workload = get_workload("bytelm", **workload_cfg)
    model = workload.build_model(0)
    opt = make_adamw(model.parameters(), OPTIM)
    batches = workload.train_batches(0)
    sync = torch.cuda.synchronize if workload.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(steps + 5):
        t0 = time.perf_counter()
        workload.loss(model, next(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return statistics.median(times[5:]), param_bytes


def base_spec(args, method: str, run_dir: Path, steps: int) -> dict[str, Any]:
    return {
        "method": method, "world": args.world, "run_dir": str(run_dir), "steps": steps,
        "min_steps": args.steps, "target": None, "workload": args.workload, "seed": args.seed,
        "data_seed": args.seed, "eval_every": args.eval_every, "eval_batches": args.eval_batches,
        "warmup_steps": args.warmup, "timeout_s": args.timeout, **OPTIM, "lr": args.lr,
        "drain_s": args.deadline + 10.0,  # Archipelago's wait for its last rounds' versions
        "slowdowns": args.slowdowns, "compute_s": args.compute_s,
        "step_floor_s": args.step_floor,
    }  # fmt: skip


def run_method(
    args, tmp: Path, name: str, method: str, net: ShapedNet | None = None, **extra: Any
) -> dict[str, Any]:
    """One method's workers (and, for DiLoCo, its root aggregator); their results. With
    ``net`` every worker runs in its island namespace behind its shaped link and the root in
    the hub namespace."""
    run_dir = tmp / name
    run_dir.mkdir()
    default_steps = args.steps if method == "ddp" else int(args.max_factor * args.steps)
    steps = extra.pop("steps", default_steps)
    spec = {**base_spec(args, method, run_dir, steps), "target": extra.pop("target", None)}
    spec.update(extra)
    federation = None
    t0 = time.perf_counter()
    print(f"--- {name}: up to {steps} steps", flush=True)
    try:
        per_rank: list[dict[str, Any]] = [{} for _ in range(args.world)]
        if method == "ddp":
            spec["port"] = free_port()
            if net is not None:
                spec["master_addr"] = net.island_address(0)
        elif method == "diloco":
            federation = Federation(run_dir, args.workload, args.seed, args.world,
                                    spec["publish_codec"], args.deadline, spec["outer"],
                                    net, buffer_k=spec.get("buffer_k"),
                                    fragments=spec.get("fragments", 1),
                                    ef_decay=spec.get("publish_ef_decay"))  # fmt: skip
            spec.update(roster=federation.roster, model_id=MODEL_ID)
            for r, extra_r in enumerate(per_rank):
                extra_r.update(address=federation.addresses[r], key=federation.keys[r])
        elif method == "hivemind":
            spec["run_id"] = f"bench_quality_{os.getpid()}_{name}"
            if net is not None:
                for r, extra_r in enumerate(per_rank):
                    extra_r["listen_host"] = net.island_address(r)
        specs = [{**spec, "rank": r, "key": "", **per_rank[r]} for r in range(args.world)]
        results = run_workers(specs, run_dir, args.timeout, net)
    finally:
        if federation is not None:
            federation.close()
    print(f"    {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    out = {"results": results, "spec": spec, "run_s": time.perf_counter() - t0}
    if federation is not None:
        out["root"] = federation.versions_staleness()
        out["contributors"] = federation.version_contributors()
    return out


def run_held_steps(run: dict) -> tuple[list[tuple[float, int, float]] | None, int | None]:
    """A DiLoCo/Archipelago run's steps for each of rank 0's evaluations, as (the islands'
    mean, rank 0's own, from :func:`federation_steps`; the mean over rank 0's own: the factor
    its bytes sent and rounds are scaled by), and the merged updates that matched no island's
    round; (None, None) for other runs."""
    results = run["results"]
    if run.get("contributors") is None or not all("round_steps" in r for r in results):
        return None, None
    lines, unmatched = [], 0
    for p, merged in enumerate(run["contributors"]):
        line, missing = held_steps(merged, {r["peer_id"]: r["round_steps"][p] for r in results})
        lines.append(line)
        unmatched += missing
    steps = federation_steps(results[0]["evals"], lines, [r["peer_id"] for r in results])
    return [(mean, own, mean / own if own else 1.0) for mean, own in steps], unmatched


def summarize(kind: str, run: dict, target: float, args, cal: dict) -> dict[str, Any]:
    """The JSON figures of one method from its workers' results."""
    results, spec = run["results"], run["spec"]
    rank0 = results[0]
    world, c, pbytes = args.world, cal["compute_s"], cal["param_bytes"]
    h = spec.get("H", 1)
    held, unmatched = run_held_steps(run)
    curve = []
    for i, e in enumerate(rank0["evals"]):
        # DiLoCo/Archipelago: the inner steps the evaluated global version holds (overlapped:
        # the rounds still in flight are not in it), the mean over the islands: rank 0 also
        # evaluates, so the others run ahead of it, by up to 2x at H = 5 on this machine
        point = {"step": e.get("holds_steps", e["step"]), "loss": e["loss"], "t": e.get("t")}
        scale = 1.0  # the islands' mean over rank 0's own: its bytes sent and rounds scaled
        if held is not None:
            mean, own, scale = held[i]
            point["step"], point["step_rank0"] = round(mean), own
        if kind == "ddp":
            point["bytes"] = e["step"] * ddp_bytes_per_step(pbytes, world)
            point["seconds"] = {n: ddp_seconds(e["step"], c, pbytes, world, link)
                                for n, link in LINKS.items()}  # fmt: skip
        else:
            if kind == "hivemind":
                point["bytes"] = 4 * e["allreduce_out"] + e["state_out"]
                overhead = 0.0
            else:
                # the islands' mean: rank 0's bytes sent scaled as its steps; every island
                # receives the same versions
                point["bytes"] = round(e["bytes_sent"] * scale) + e["bytes_received"]
                boundary = max(0.0, rank0["boundary_s"] - rank0["blocked_s"])
                overhead = boundary / max(1, rank0["rounds"])
            # a worker's own count, when it gave one (scaled as its steps)
            rounds = e.get("rounds", e["step"] // h) * scale
            point["seconds"] = {
                n: rounds_seconds(kind, rounds, h, c, overhead, point["bytes"], link)
                for n, link in LINKS.items()
            }
        curve.append(point)
    if kind == "ddp":
        per_island = [r["steps"] * ddp_bytes_per_step(pbytes, world) for r in results]
    elif kind == "hivemind":
        per_island = [4 * r["allreduce_out"] + r["state_out"] for r in results]
    else:
        per_island = [r["bytes_sent"] + r["bytes_received"] for r in results]
    hit = first_crossing(curve, target)
    last = curve[-1] if curve else {"step": 0, "seconds": dict.fromkeys(LINKS, 0.0)}
    out: dict[str, Any] = {
        "final_loss": curve[-1]["loss"] if curve else None,
        "steps": rank0["steps"],
        "bytes_per_island": statistics.mean(per_island),
        "bytes_to_target": hit["bytes"] if hit else None,
        "seconds_to_target": {n: hit["seconds"][n] if hit else None for n in LINKS},
        "steps_to_target": hit["step"] if hit else None,
        "loss_at_S": loss_at(curve, args.steps),
        "utilization": {
            n: (last["step"] * c / last["seconds"][n]) if last["seconds"][n] else None
            for n in LINKS
        },  # modelled: compute time over modelled wall time
        "curve": curve,
        "measured": {
            "run_s": run["run_s"],
            # wall seconds from the start barrier to rank 0's first evaluation at or below the
            # target, on loopback (all workers on this machine's cores; --slowdowns applied)
            "loopback_seconds_to_target": hit.get("t") if hit else None,
            "step_s_median": [r["step_s_median"] for r in results],
            "loopback_compute_fraction": [
                r["lu"]["compute_fraction"] for r in results if "lu" in r
            ],
        },
    }
    if kind in ("sync", "overlapped"):
        out.update(line_figures(results, spec, cal))
        out["measured"]["staleness_last"] = [e.get("staleness") for e in rank0["evals"]][-1:]
        out["measured"]["pushes_stale"] = [r["lu"]["sync"]["pushes_stale"] for r in results]
        out["measured"]["root"] = run.get("root")  # versions and their updates' staleness
        out["measured"]["steps_per_island"] = [r["steps"] for r in results]
        if unmatched is not None:  # merged updates with no round in their island's record
            out["measured"]["updates_unmatched"] = unmatched
    if kind == "hivemind":
        out["measured"]["epochs"] = [r["epoch"] for r in results]
    return out


def param_sizes(workload_cfg: dict) -> dict[str, int]:
    """The model's parameter tensors: name -> number of elements."""
    from island.workloads import get_workload

    model = get_workload("bytelm", **{**workload_cfg, "device": "cpu"}).build_model(0)
    return {n: p.numel() for n, p in model.named_parameters()}


def planned_push_bytes(sizes: dict[str, int], codec: str, fragments: int) -> int:
    """Bytes of the largest push of a model of ``sizes`` cut into ``fragments`` fragments
    (``comms.fragments.split_fragments``, as the island and the root cut it) under ``codec``
    (``island.sync.auto.push_nbytes``: the codec's payload plus the envelope's overhead)."""
    from comms.fragments import split_fragments
    from island.sync.auto import push_nbytes

    return max(push_nbytes(codec, [sizes[n] for n in names])
               for names in split_fragments(sizes, fragments))  # fmt: skip


def line_figures(results: list[dict[str, Any]], spec: dict[str, Any], cal: dict) -> dict:
    """A DiLoCo/Archipelago run's bytes per worker, up and down, and its bytes per push:
    ``push_bytes_peak``, the largest mean bytes sent per answered push of any model line of
    any worker (the engines' counters on the wire, gRPC framing included), and
    ``push_bytes_planned``, the largest fragment's push as the island sizes it."""
    sizes = [line["push_bytes"] for r in results for line in r.get("lines", [])
             if line["push_bytes"]]  # fmt: skip
    fragments = spec.get("fragments", 1)
    return {
        "fragments": fragments,
        "bytes_up": [r["bytes_sent"] for r in results],
        "bytes_down": [r["bytes_received"] for r in results],
        "push_bytes_peak": max(sizes, default=None),
        "push_bytes_planned": planned_push_bytes(cal["sizes"], spec["codec"], fragments)
        if "sizes" in cal
        else None,
        "lines": [r.get("lines") for r in results],
    }


def ef_label(decay: float | None) -> str:
    """A slot suffix for an error-feedback decay (None: the island's default for the codec)."""
    return "ef_default" if decay is None else f"ef{decay:g}"


def lr_label(lr: float | None) -> str:
    """A slot suffix for an islands' inner rate (None: ``--lr``, every method's)."""
    return "lr_default" if lr is None else f"lr{lr:g}"


def ratios(doc: dict[str, Any]) -> None:
    """``ddp_bytes_ratio``: DDP's bytes to the target over each method's."""
    ddp_bytes = doc["ddp"].get("bytes_to_target")
    for entry in method_entries(doc):
        mine = entry.get("bytes_to_target")
        entry["ddp_bytes_ratio"] = ddp_bytes / mine if ddp_bytes and mine else None


def method_entries(doc: dict[str, Any]) -> list[dict[str, Any]]:
    flat = [doc[k] for k in ("ddp", "sync_diloco", "hivemind")]
    return flat + list(doc["archipelago"].values())


# ============================================================================ measuring


def empty_entry(error: str) -> dict[str, Any]:
    return {
        "final_loss": None, "steps": None, "bytes_per_island": None, "bytes_to_target": None,
        "seconds_to_target": dict.fromkeys(LINKS), "steps_to_target": None, "loss_at_S": None,
        "utilization": dict.fromkeys(LINKS), "curve": [], "error": error,
    }  # fmt: skip


def measure(args, tmp: Path, doc: dict, slot: str, kind: str, method: str, cal, **extra):
    """Run one method and put its figures in ``doc`` (or an error entry, and go on)."""
    holder, key = (doc["archipelago"], slot) if kind == "overlapped" else (doc, slot)
    name = f"archipelago_{slot}" if kind == "overlapped" else slot
    try:
        run = run_method(args, tmp, name, method, **extra)
        holder[key] = summarize(kind, run, doc["target_loss"], args, cal)
        holder[key]["settings"] = {k: v for k, v in extra.items() if k != "target"}
    except Exception as err:  # one broken method must not hide the others' figures
        print(f"    {name}: FAILED: {err}", flush=True)
        holder[key] = empty_entry(f"{type(err).__name__}: {err}")


def shaped_entry(run: dict[str, Any], target: float, cal: dict) -> dict[str, Any]:
    """Measured figures of one run over shaped links: seconds from the start barrier to rank
    0's first evaluation at or below ``target``, less rank 0's own evaluation time; for
    DiLoCo/Archipelago, to the arrival of the global version that evaluation found at or below
    it (and the steps that version holds). Also rank 0's bytes (sent + received) at that
    evaluation, each worker's bytes up and down at the run's end (it stops at the target) and
    each worker's utilization (:func:`utilization`); for DiLoCo/Archipelago also the bytes per
    push (:func:`line_figures`)."""
    rank0 = run["results"][0]
    hit = first_crossing(rank0["evals"], target)
    last = rank0["evals"][-1] if rank0["evals"] else None
    seconds = steps = None
    if hit and hit.get("version_t") is not None:  # since the evaluated version arrived
        seconds, steps = hit["version_t"] - hit["eval_s_before"], hit["holds_steps"]
    elif hit:
        seconds, steps = hit["t"] - hit["eval_s"], hit["step"]
    # DiLoCo/Archipelago: the islands' mean steps in that version, and rank 0's bytes sent
    # scaled alike (as in :func:`summarize`)
    held, _ = run_held_steps(run)
    scale = 1.0
    if hit and held is not None:
        mean, _, scale = held[rank0["evals"].index(hit)]
        steps = round(mean)
    entry = {
        "seconds_to_target": seconds,
        "steps_to_target": steps,
        "steps": rank0["steps"],
        "final_loss": last["loss"] if last else None,
        "run_s": run["run_s"],
        "utilization": utilization(run["results"]),
        "utilization_how": "each worker's seconds in inner steps (with the --slowdowns hold) "
        "over its wall seconds from the start barrier, rank 0's evaluations left out",
    }
    results = run["results"]
    if "bytes_sent" in rank0:  # DiLoCo / Archipelago: the sync engine's counts on the wire
        entry["bytes_to_target"] = (
            round(hit["bytes_sent"] * scale) + hit["bytes_received"] if hit else None
        )
        entry["bytes_up"] = [r["bytes_sent"] for r in results]
        entry["bytes_down"] = [r["bytes_received"] for r in results]
        entry["engine_compute_fraction"] = [r["lu"]["compute_fraction"] for r in results]
        entry.update({k: v for k, v in line_figures(results, run["spec"], cal).items()
                      if k not in ("bytes_up", "bytes_down")})  # fmt: skip
    elif "allreduce_out" in rank0:  # hivemind, counted as in the loopback runs
        entry["bytes_to_target"] = 4 * hit["allreduce_out"] + hit["state_out"] if hit else None
        entry["bytes_up"] = [2 * r["allreduce_out"] + r["state_out"] for r in results]
        entry["bytes_down"] = [2 * r["allreduce_out"] for r in results]
    return entry


def utilization(results: list[dict[str, Any]]) -> list[float]:
    """Per worker: seconds in inner steps (with the ``--slowdowns`` and ``--step-floor``
    holds) over its wall seconds since the start barrier, rank 0's evaluations left out."""
    return [r["busy_s"] / max(1e-9, r["wall_s"] - r["eval_s"]) for r in results]


def shaped_links(args, link: str) -> list[tuple[float, float]]:
    """Each worker's (rate, delay) for a ``--shaped`` link name or a profile (hetero, thin)."""
    return args.profiles[link] if link in args.profiles else [LINKS[link]] * args.world


def shaped_ddp(args, tmp: Path, doc: dict, link: str, net: ShapedNet, cal: dict) -> dict:
    """DDP over the shaped links for ``--shaped-ddp-steps`` steps: its measured seconds per
    step times its steps to the target (from the loopback run)."""
    run = run_method(args, tmp, f"shaped{link}_ddp", "ddp", net=net, steps=args.shaped_ddp_steps)
    rank0 = run["results"][0]
    per_step = (rank0["wall_s"] - rank0["eval_s"]) / max(1, rank0["steps"])
    steps = doc["ddp"]["steps_to_target"]
    slow = args.slowdowns or [1.0] * args.world
    per_worker = ddp_bytes_per_step(cal["param_bytes"], args.world) * (steps or 0)
    return {
        "seconds_per_step": per_step, "steps": rank0["steps"],
        "seconds_to_target": per_step * steps if steps else None, "steps_to_target": steps,
        "how": f"measured seconds per step over {rank0['steps']} steps, times its {steps} "
               "steps to the target",
        "bytes_to_target": per_worker if steps else None,
        "bytes_up": [per_worker / 2] * args.world, "bytes_down": [per_worker / 2] * args.world,
        # the all-reduce runs inside backward, so a step's compute is not measured apart:
        # worker k's compute is taken as one step alone times its slowdown
        "utilization": [slow[k] * cal["compute_s"] / per_step for k in range(args.world)],
        "utilization_how": "one step's compute measured alone, times the worker's slowdown, "
        "over the measured seconds per step",
    }  # fmt: skip


def measure_shaped(args, tmp: Path, doc: dict, link: str, hivemind: dict, cal: dict):
    """Time to the target over real shaped links (:class:`ShapedNet`): DDP for
    ``--shaped-ddp-steps`` steps (its measured seconds per step times its steps to the target),
    then sync DiLoCo, hivemind and the Archipelago setting with the shortest modelled time at
    this link (for the hetero and thin profiles: every Archipelago setting), each until it
    reaches the target (or its step limit)."""
    target = doc["target_loss"]
    links = shaped_links(args, link)
    out: dict[str, Any] = {"links": [{"rate_bps": r, "delay_s": d} for r, d in links]}
    net = ShapedNet(args.world, link, links)
    try:
        out["backend"] = net.config.backend
        try:
            out["ddp"] = shaped_ddp(args, tmp, doc, link, net, cal)
        except Exception as err:
            out["ddp"] = {"error": f"{type(err).__name__}: {err}"}
        runs = []
        baseline_lr = {} if args.baseline_lr is None else {"lr": args.baseline_lr}
        if "sync_diloco" not in args.skip:
            runs.append(("sync_diloco", "diloco", {"H": args.baseline_H, "codec": "none",
                         "publish_codec": "none", "mode": "sync", "outer": ("nesterov", OUTER),
                         **baseline_lr}))  # fmt: skip
        if "hivemind" not in args.skip:
            runs.append(("hivemind", "hivemind", {"H": args.baseline_H, **hivemind,
                                                  **baseline_lr}))  # fmt: skip
        if link in args.profiles:
            slots = [slot for slot, e in doc["archipelago"].items() if "settings" in e]
        else:
            reached = [(e["seconds_to_target"][link], slot)
                       for slot, e in doc["archipelago"].items()
                       if e.get("seconds_to_target", {}).get(link) is not None]  # fmt: skip
            slots = [min(reached)[1]] if reached else []
        for slot in slots:
            runs.append(
                (f"archipelago {slot}", "diloco", dict(doc["archipelago"][slot]["settings"]))
            )
        for name, method, extra in runs:
            try:
                run = run_method(args, tmp, f"shaped{link}_{name.replace(' ', '_')}", method,
                                 net=net, target=target, min_steps=0, **extra)  # fmt: skip
                out[name] = shaped_entry(run, target, cal)
            except Exception as err:
                print(f"    shaped {name}: FAILED: {err}", flush=True)
                out[name] = {"error": f"{type(err).__name__}: {err}"}
    finally:
        net.close()
    # the limit line: DDP's steps at one worker's pace alone, no communication at all
    out["compute_only_bound_s"] = args.steps * cal["compute_s"]
    return out


def fragment_suffix(fragments: int) -> str:
    """A slot suffix: ``_F<n>`` for a run in ``n`` streamed fragments, none for the whole model."""
    return f"_F{fragments}" if fragments > 1 else ""


def fragment_setting(fragments: int) -> dict[str, int]:
    """The run's ``fragments`` setting; none for the whole model (its settings as before)."""
    return {"fragments": fragments} if fragments > 1 else {}


def outer_label(
    outer: tuple[str, dict[str, float]], others: Sequence[tuple[str, dict[str, float]]] = ()
) -> str:
    """A slot suffix: the name, the delay and the root's buffer_k when given
    (``delayed_nesterov_d4_k1``); every parameter (``nesterov_lr0.5_momentum0.9``) when another
    entry of ``others`` would get the same short suffix, so side-by-side runs keep their own
    slots."""

    def short(o: tuple[str, dict[str, float]]) -> str:
        name, params = o
        return name + "".join(f"_{tag}{params[key]:g}" for key, tag in (("delay", "d"),
                                                                         ("buffer_k", "k"))
                              if key in params)  # fmt: skip

    if not any(o != outer and short(o) == short(outer) for o in others):
        return short(outer)
    name, params = outer
    return name + "".join(f"_{key}{value:g}" for key, value in sorted(params.items()))


def check_fragment_counts(sizes: dict[str, int], args: argparse.Namespace) -> None:
    """SystemExit (2) naming the count when the model cannot be cut into that many fragments
    (each needs one of its parameter tensors; ``comms.fragments.split_fragments``)."""
    from comms.errors import ConfigError
    from comms.fragments import split_fragments

    for count in sorted({*args.fragments, *(f for v in args.thin_fragments.values() for f in v)}):
        try:
            split_fragments(sizes, count)
        except ConfigError as err:
            print(f"bench_quality.py: error: --fragments {count}: {err}", file=sys.stderr)
            raise SystemExit(2) from err


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    compute_s, param_bytes = calibrate_compute_s(args.workload)
    args.compute_s = compute_s  # --slowdowns hold each step this much times (slowdown - 1)
    cal = {"compute_s": compute_s, "param_bytes": param_bytes,
           "sizes": param_sizes(args.workload)}  # fmt: skip
    check_fragment_counts(cal["sizes"], args)
    print(f"model {args.workload}: {param_bytes // 4:,} params; one worker's step alone: "
          f"{compute_s * 1e3:.1f} ms", flush=True)  # fmt: skip
    if args.thin:
        rate = thin_rate_bps(param_bytes, compute_s)
        args.profiles["thin"] = [(rate, THIN_DELAY_S)] * args.world
        cal["thin"] = {"rate_bps": rate, "bits_per_s_per_param": rate / (param_bytes // 4),
                       "round_s": THIN_H * compute_s, "dense_push_s": param_bytes * 8 / rate}  # fmt: skip
        print(f"thin link: {rate / 1e6:.3f} Mbit/s, {rate / (param_bytes // 4):.2f} bit/s per "
              f"parameter: a dense fp32 pseudo-gradient ({param_bytes:,} bytes) takes "
              f"{param_bytes * 8 / rate:.2f} s, {THIN_RATIO:g}x one round of {THIN_H} steps "
              f"({THIN_H * compute_s:.2f} s); {THIN_DELAY_S * 1e3:g} ms one way", flush=True)  # fmt: skip
    hivemind_settings = dict(HIVEMIND_STANDARD)
    if args.quick:  # epochs would be shorter than matchmaking: slow the steps, match fast
        hivemind_settings.update(matchmaking_time=0.5, averaging_timeout=10.0)
    doc: dict[str, Any] = {"target_loss": None, "archipelago": {}}
    with contextlib.ExitStack() as stack:
        if args.workdir:  # kept afterwards, for the workers' logs
            tmp = Path(args.workdir)
            tmp.mkdir(parents=True, exist_ok=False)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_quality_")))
        ddp = run_method(args, tmp, "ddp", "ddp")
        doc["ddp"] = summarize("ddp", ddp, float("-inf"), args, cal)
        doc["target_loss"] = target = doc["ddp"]["final_loss"]
        doc["ddp"] = summarize("ddp", ddp, target, args, cal)
        print(f"    target loss: {target:.4f}", flush=True)
        h = args.baseline_H
        baseline_lr = {} if args.baseline_lr is None else {"lr": args.baseline_lr}
        if "sync_diloco" in args.skip:
            doc["sync_diloco"] = empty_entry("skipped (--skip)")
        else:
            measure(args, tmp, doc, "sync_diloco", "sync", "diloco", cal, target=target, H=h,
                    codec="none", publish_codec="none", mode="sync",
                    outer=("nesterov", OUTER), **baseline_lr)  # fmt: skip
        if "hivemind" in args.skip:
            doc["hivemind"] = empty_entry("skipped (--skip)")
        else:
            measure(args, tmp, doc, "hivemind", "hivemind", "hivemind", cal, target=target,
                    H=h, **hivemind_settings, **baseline_lr)  # fmt: skip
        for codec in args.codecs:
            for every, frags in itertools.product(args.H, args.fragments):
                for rebase, adopt, outer, decay, root_decay, lr in itertools.product(
                        args.rebase, args.adopt, args.arch_outer, args.ef_decay,
                        args.publish_ef_decay, args.arch_lr):  # fmt: skip
                    warm = f"_warm{args.h_warmup[0]}x{args.h_warmup[1]}" if args.h_warmup else ""
                    slot = f"{codec}_H{every}{warm}{fragment_suffix(frags)}" + "".join(
                        f"_{v}" for v, opts in ((rebase, args.rebase), (adopt, args.adopt),
                                                (outer_label(outer, args.arch_outer), args.arch_outer),
                                                (ef_label(decay), args.ef_decay),
                                                ("root" + ef_label(root_decay),
                                                 args.publish_ef_decay),
                                                (lr_label(lr), args.arch_lr))
                        if len(opts) > 1)  # fmt: skip
                    opt, buffer_k = split_outer(outer)
                    measure(args, tmp, doc, slot, "overlapped", "diloco", cal, target=target,
                            H=every, H_warmup=args.h_warmup,
                            codec=codec, publish_codec=args.publish_codec or codec,
                            mode="overlapped", outer=opt, buffer_k=buffer_k,
                            rebase=rebase, adopt=adopt, ef_decay=decay,
                            publish_ef_decay=root_decay, **({} if lr is None else {"lr": lr}),
                            **fragment_setting(frags))  # fmt: skip
            for every_s, outer in itertools.product(args.every_s, args.arch_outer):
                # rounds sized to each island's speed
                label = (
                    f"_{outer_label(outer, args.arch_outer)}" if len(args.arch_outer) > 1 else ""
                )
                opt, buffer_k = split_outer(outer)
                measure(args, tmp, doc, f"{codec}_T{every_s:g}{label}", "overlapped", "diloco",
                        cal, target=target, H=args.H[0], every_s=every_s, codec=codec,
                        publish_codec=args.publish_codec or codec, mode="overlapped",
                        outer=opt, buffer_k=buffer_k)  # fmt: skip
        for slot, settings in THIN_SLOTS.items() if args.thin else ():
            for frags in args.thin_fragments[slot]:  # the whole model, then its fragment rows
                measure(args, tmp, doc, slot + fragment_suffix(frags), "overlapped", "diloco",
                        cal, target=target, mode="overlapped", **settings,
                        **fragment_setting(frags))  # fmt: skip
        ratios(doc)
        doc["shaped"] = {}
        why_not = ShapedNet.available() if args.shaped else None
        for link in args.shaped if why_not is None else []:
            print(f"=== shaped links: {link_label(shaped_links(args, link))}, real namespaces",
                  flush=True)  # fmt: skip
            doc["shaped"][link] = measure_shaped(args, tmp, doc, link, hivemind_settings, cal)
        if why_not:
            doc["shaped"]["error"] = why_not
    doc["config"] = {
        "S": args.steps, "max_steps": int(args.max_factor * args.steps), "world": args.world,
        "workload": args.workload, "params": param_bytes // 4,
        "inner_optim": {**OPTIM, "lr": args.lr}, "arch_lr": args.arch_lr,
        "baseline_lr": args.baseline_lr,
        "warmup_steps": args.warmup, "outer": {"sync_diloco": ["nesterov", OUTER],
                                               "archipelago": [list(o) for o in args.arch_outer]},
        "baseline_H": h, "H": args.H, "rebase": args.rebase, "adopt": args.adopt,
        "codecs": args.codecs, "publish_codec": args.publish_codec, "h_warmup": args.h_warmup,
        "ef_decay": args.ef_decay, "publish_ef_decay": args.publish_ef_decay,
        "fragments": args.fragments, "thin_fragments": args.thin_fragments,
        "slowdowns": args.slowdowns, "every_s": args.every_s,
        "eval_batches": args.eval_batches, "eval_every": args.eval_every,
        "compute_s_per_step": compute_s, "links": {k: {"rate_bps": r, "delay_s": d}
                                                   for k, (r, d) in LINKS.items()},
        "hivemind": hivemind_settings, "quick": args.quick, "hetero": args.hetero,
        "preset": args.preset, "device": args.workload["device"], "skip": args.skip,
        "thin": cal.get("thin"), "profiles": {k: [{"rate_bps": r, "delay_s": d} for r, d in v]
                                              for k, v in args.profiles.items()},
    }  # fmt: skip
    doc["notes"] = notes(args, hivemind_settings)
    json_path = Path(args.json) if args.json else None
    out_dir = Path(args.plots) if args.plots else (json_path.parent if json_path else Path("."))
    doc["plots"] = plot(doc, out_dir, json_path.stem if json_path else "bench_quality")
    print_table(doc)
    write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
