"""``scripts/bench_quality.py``'s settings: the models, links, presets and outer steps it runs,
and its command line (``parse_args``: the flags, the presets ``--hetero``, ``--thin`` and
``--preset``, and every check on them, each refusal an exit 2 naming the flag). Pure: nothing
here starts a process or imports torch; ``check_device`` imports the workloads' device check.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

FULL_MODEL = {"d_model": 128, "n_layer": 4, "n_head": 4, "context": 128, "batch_size": 16}
QUICK_MODEL = {"d_model": 32, "n_layer": 1, "n_head": 2, "context": 32, "batch_size": 4}
# --preset NAME: settings a flag given by hand overrides. "medium": the bytelm workload's own
# default size (FULL_MODEL, 0.84 M parameters; the headline tables run a 0.12 M reduction of
# it), S = 2000, the default push codec and int4 at H = 50 against DDP and sync DiLoCo at the
# same H, on loopback (times modelled). Up to 2 S steps a method: 83 min measured on this 2-core
# machine (4 workers at about 0.17 s a step alone). hivemind is left out for time (--skip
# with no names brings it back); --device cuda runs the same preset on a GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "medium": {"steps": 2000, "max_factor": 2.0, "H": [50],
               "codecs": ["int8", "int4"], "baseline_H": 50, "skip": ["hivemind"],
               "no_netns": True},
}  # fmt: skip
OPTIM = {"lr": 2e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0}
OUTER = {"lr": 0.7, "momentum": 0.9}
# hivemind.Optimizer's timing. matchmaking_time is short because with use_local_updates a local
# step waits for the averaging round in flight, and the progress tracker leaves that wait out of
# its throughput: when matchmaking plus the all-reduce outlasts the next epoch's estimated time,
# every step starts another round (over the --hetero links with 5 s, each step took about 9 s).
# next_chunk_timeout defaults to matchmaking_time; 1 s bans a 2 Mbit/s sender mid-all-reduce
# and the parameters went NaN after such a partial round, so it is set on its own
# (docs/benchmarks/hetero.md, "hivemind over the shaped links").
HIVEMIND_STANDARD = {"matchmaking_time": 1.0, "averaging_timeout": 60.0, "next_chunk_timeout": 30.0}
LINKS = {"100": (100e6, 0.0), "10": (10e6, 0.050)}  # name: (bits per second, one-way delay s)
# --hetero: worker k's speed is 1 / HETERO_SLOWDOWNS[k] and its link HETERO_LINKS[k]
HETERO_SLOWDOWNS = [1.0, 1.0, 2.0, 4.0]
HETERO_LINKS = [(100e6, 0.0), (10e6, 0.050), (10e6, 0.050), (2e6, 0.050)]
# --thin: every link's rate is set so that one dense fp32 pseudo-gradient takes THIN_RATIO times
# one round of THIN_H inner steps (one worker's step measured alone), THIN_DELAY_S one way
THIN_RATIO, THIN_H, THIN_DELAY_S = 4.0, 50, 0.050
# --thin's Archipelago runs: int4 at H = 50 (Nesterov), and sparse2 at H = 10 with the outer
# sgd step and int8 versions, the sparse setting that reached the target in thin.md
THIN_SLOTS = {
    "int4_H50": {"H": 50, "codec": "int4", "publish_codec": "int4", "outer": ("nesterov", OUTER)},
    "sparse2_H10_sgd": {"H": 10, "codec": "sparse2", "publish_codec": "int8",
                        "outer": ("sgd", {"lr": 1.0})},
}  # fmt: skip
# --thin's fragment counts per setting (streamed fragments, besides the whole model; override:
# --fragments). int4 at H = 50 in 2 and 4 fragments: the thin model's 28 tensors cut into
# fragments of 55/45% and 28/27/28/17% of the parameters (comms.fragments), so a push falls to
# about 38 KB and 20 KB from 69 KB, each sent within the 25 or 12.5 steps before the next
# fragment's push (at thin.md's 20-ms step: 0.32 and 0.17 s at the thin rate against 0.50 and
# 0.25 s of compute). 8 fragments would push 10 KB every 6.25 steps: 0.09 s on the wire, less
# than the 50-ms link's round trip, so latency, not bandwidth, would set their pace.
# sparse2 at H = 10 stays whole: its versions' downlink volume (int8, every 10 steps) kept it
# from the target, and fragments split that volume over F lines without shrinking it.
THIN_FRAGMENTS = {"int4_H50": [2, 4]}


def split_outer(outer: tuple[str, dict[str, float]]) -> tuple[tuple[str, dict], int | None]:
    """``(name, params)`` -> the optimizer's ``(name, params)`` and the root's buffer_k (None:
    the default, one version per ``--world`` island updates)."""
    name, params = outer
    rest = {k: v for k, v in params.items() if k != "buffer_k"}
    return (name, rest), (int(params["buffer_k"]) if "buffer_k" in params else None)


def parse_outer(text: str) -> tuple[str, dict[str, float]]:
    """``"nesterov:lr=0.7,momentum=0.5"`` -> ``("nesterov", {"lr": 0.7, "momentum": 0.5})``.
    A ``buffer_k=K`` among them is the root's merge.buffer_k for that run (not the optimizer's;
    see :func:`split_outer`)."""
    from aggregator.outer import make_outer_optimizer
    from comms.errors import ConfigError

    name, _, rest = text.partition(":")
    try:
        params = {k: float(v) for k, v in (kv.split("=") for kv in rest.split(",") if kv)}
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME:key=number,...") from err
    outer, buffer_k = split_outer((name, params))
    if buffer_k is not None and not (buffer_k == int(buffer_k) and buffer_k >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: buffer_k must be a whole number >= 1")
    try:
        make_outer_optimizer(outer[0], **outer[1])
    except ConfigError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from err
    return name, params


def parse_slowdowns(text: str) -> list[float]:
    """``"1,1,2,4"`` -> [1.0, 1.0, 2.0, 4.0], each at least 1."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: use numbers >= 1, e.g. 1,1,2,4") from err
    if not all(math.isfinite(v) and v >= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every slowdown must be at least 1")
    return values


def parse_h_warmup(text: str) -> tuple[int, int]:
    """``"H0:STEPS"`` -> (H0, STEPS), both positive integers."""
    try:
        h0, steps = (int(x) for x in text.split(":"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: use H0:STEPS, e.g. 10:200") from err
    if h0 < 1 or steps < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: H0 and STEPS must be at least 1")
    return h0, steps


def parse_lr(text: str) -> float:
    """A learning rate: a positive finite number."""
    try:
        lr = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive number, e.g. 4e-3") from err
    if not (math.isfinite(lr) and lr > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: a learning rate must be positive")
    return lr


def parse_ef_decay(text: str) -> float:
    """An error-feedback decay: a number in (0, 1]."""
    try:
        beta = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: a number in (0, 1], e.g. 0.95") from err
    if not 0 < beta <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be in (0, 1] (1: no decay)")
    return beta


def check_fragments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--fragments``: each count at least 1, at most every H it is run with (fragment p
    pushes ``H (p + 1) / F`` steps in); not with ``--h-warmup`` (the fragments' rounds keep
    one length). Sets ``args.fragments`` (the counts for the settings of H steps) and
    ``args.thin_fragments`` (--thin: setting -> its counts)."""
    counts = args.fragments
    if counts is not None and any(f < 1 for f in counts):
        p.error(f"--fragments: counts of at least 1 (1: the whole model), got {counts}")
    thin = {slot: counts or [1, *THIN_FRAGMENTS.get(slot, [])] if slot in THIN_FRAGMENTS
            else [1] for slot in THIN_SLOTS} if args.thin else {}  # fmt: skip
    args.fragments = [1] if args.thin else list(dict.fromkeys(counts or [1]))
    args.thin_fragments = {slot: list(dict.fromkeys(v)) for slot, v in thin.items()}
    most = max([*args.fragments, *(f for v in thin.values() for f in v)])
    if most == 1:
        return
    if args.h_warmup:
        p.error("--fragments: not with --h-warmup (streamed fragments keep one round length)")
    shortest = min(args.H) if not args.thin else min(
        THIN_SLOTS[slot]["H"] for slot, v in thin.items() if max(v) > 1)  # fmt: skip
    if most > shortest:
        p.error(f"--fragments: {most} fragments need rounds of at least {most} steps (fragment "
                f"p pushes H (p + 1) / F steps in); the shortest H is {shortest}")  # fmt: skip


def parse_args(argv: list[str] | None, description: str = "") -> argparse.Namespace:
    """``bench_quality.py``'s command line, its presets applied and its settings checked."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny model, a few dozen steps (CI)")
    p.add_argument(
        "--preset", choices=list(PRESETS),
        help="a named set of settings (flags given by hand override them); medium: the "
        "bytelm workload's default size (0.84 M parameters), S = 2000, H = 50, int8 and int4, "
        "DDP and sync DiLoCo, loopback; 83 min measured on 2 cores",
    )  # fmt: skip
    p.add_argument(
        "--device", default="cpu",
        help="torch device of every worker's model and batches (cpu, cuda, cuda:N, auto); "
        "with cuda all workers share the visible GPU(s) and DDP's all-reduce stays on gloo",
    )  # fmt: skip
    p.add_argument("--no-netns", action="store_true", help="no network namespaces (see notes)")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--plots", help="folder for the PNGs (default: beside --json, or ./)")
    p.add_argument("--steps", type=int, help="S: DDP's steps (default 3000; quick 40)")
    p.add_argument("--max-factor", type=float, help="others run up to this times S (3; 1.5)")
    p.add_argument("--H", type=int, nargs="+", help="Archipelago's H (50 100 250 500; 10)")
    p.add_argument("--codecs", nargs="+", help="Archipelago's push codecs (int8 int4)")
    p.add_argument(
        "--slowdowns",
        type=parse_slowdowns,
        metavar="S0,S1,...",
        help="each worker's step takes this many times its compute (every method alike; "
        "e.g. 1,1,2,4: compute speeds 1, 1, 1/2, 1/4); default all 1",
    )
    p.add_argument(
        "--every-s",
        type=float,
        nargs="*",
        default=[],
        metavar="T",
        help="also run Archipelago with rounds of T seconds of compute (sync.every_s) per codec",
    )
    p.add_argument(
        "--h-warmup",
        type=parse_h_warmup,
        metavar="H0:STEPS",
        help="Archipelago: rounds of H0 inner steps until step STEPS, then of --H (e.g. 10:200)",
    )
    p.add_argument(
        "--publish-codec",
        help="the codec of the root's published u_v for every Archipelago run (default: each "
        "run's --codecs entry, as for the pushes)",
    )
    p.add_argument(
        "--lr",
        type=parse_lr,
        default=OPTIM["lr"],
        help=f"inner AdamW learning rate of every method (default {OPTIM['lr']:g})",
    )
    p.add_argument(
        "--arch-lr",
        type=parse_lr,
        nargs="+",
        default=[None],
        metavar="LR",
        help="Archipelago islands' inner learning rate (default: --lr); more than one runs "
        "each side by side (a local-update island's best rate need not be data-parallel's)",
    )
    p.add_argument(
        "--baseline-lr",
        type=parse_lr,
        metavar="LR",
        help="sync DiLoCo's and hivemind's inner learning rate (default: --lr), so that each "
        "method can train at its own best rate against one DDP target",
    )
    p.add_argument(
        "--ef-decay",
        type=parse_ef_decay,
        nargs="+",
        default=[None],
        metavar="BETA",
        help="Archipelago islands' error-feedback decay (sync.ef_decay, in (0, 1]; 1: none; "
        "default: the island's, 0.95 with a sparse codec, else 1); more than one runs each "
        "side by side",
    )
    p.add_argument(
        "--publish-ef-decay",
        type=parse_ef_decay,
        nargs="+",
        default=[None],
        metavar="BETA",
        help="the root's error-feedback decay on published versions ([[models]] ef_decay; "
        "default: the root's, 1); more than one runs each side by side",
    )
    p.add_argument("--baseline-H", type=int, help="H of sync DiLoCo and hivemind (100; 10)")
    p.add_argument(
        "--arch-outer",
        type=parse_outer,
        nargs="+",
        default=[("nesterov", OUTER)],
        help="Archipelago's outer step at the root, NAME:k=v,... (default "
        "nesterov:lr=0.7,momentum=0.9; e.g. co2:lr=0.7,momentum=0.5 or "
        "delayed_nesterov:lr=0.7,momentum=0.9,delay=4,buffer_k=1, buffer_k being the root's "
        "merge.buffer_k for that run, default --world); more than one runs each side by side "
        "(slot names get a suffix)",
    )
    p.add_argument(
        "--rebase",
        nargs="+",
        default=["eager"],
        choices=["eager", "lookahead", "reset"],
        help="Archipelago's round start (island.sync.SyncConfig.rebase); more than one runs "
        "each (slot names get a suffix)",
    )
    p.add_argument(
        "--adopt",
        nargs="+",
        default=["arrival"],
        choices=["arrival", "boundary"],
        help="when Archipelago adopts a version (island.sync.SyncConfig.adopt); more than one "
        "runs each",
    )
    p.add_argument(
        "--fragments", type=int, nargs="+", metavar="F",
        help="Archipelago: the fragment counts each setting of H inner steps runs at "
        "(streamed fragments, the island's [sync] fragments; 1: the whole model, > 1: a row "
        "with slot suffix _F<n>); default 1; --thin: the counts of "
        + ", ".join(f"{k} (default 1 {' '.join(map(str, v))})" for k, v in THIN_FRAGMENTS.items())
        + ", the other settings whole",
    )  # fmt: skip
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--d-model", type=int)
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--context", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--warmup", type=int, help="inner lr warm-up steps (100; 5)")
    p.add_argument("--eval-batches", type=int, help="held-out batches per evaluation (16; 2)")
    p.add_argument("--eval-every", type=int, help="DDP's evaluation interval (min H)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, default=60.0, help="aggregator merge deadline_s")
    p.add_argument("--timeout", type=float, default=3600.0, help="longest run of one method, s")
    p.add_argument("--workdir", help="a new folder for run files, kept (default: a temp dir)")
    p.add_argument(
        "--skip", nargs="*", choices=["sync_diloco", "hivemind"],
        help="methods left out (default none; --preset medium: hivemind); --skip alone: none",
    )  # fmt: skip
    p.add_argument(
        "--shaped", nargs="*", choices=list(LINKS),
        help="links to also time for real in network namespaces (default: 10 100; quick or "
        "--no-netns: none)",
    )  # fmt: skip
    p.add_argument(
        "--step-floor", type=float,
        help="shortest inner step of every method, s (quick: 0.05, else 0): the quick model's "
        "6-ms steps end a round of H = 10 before a push reaches the root, so overlapped rounds "
        "would merge deltas several versions stale, unlike any real run",
    )  # fmt: skip
    p.add_argument("--shaped-ddp-steps", type=int, default=20, help="DDP steps timed per link")
    p.add_argument(
        "--hetero", action="store_true",
        help="mixed hardware: 4 workers at speeds 1, 1, 1/2, 1/4 (--slowdowns 1,1,2,4) behind "
        "their own real shaped links of 100, 10, 10, 2 Mbit/s (0, 50, 50, 50 ms); every method "
        "and Archipelago setting timed over them (default --H 50 --codecs int8 --every-s 2.5)",
    )  # fmt: skip
    p.add_argument(
        "--thin", action="store_true",
        help=f"thin links: every worker's link set so that one dense fp32 pseudo-gradient "
        f"takes {THIN_RATIO:g}x one round of H = {THIN_H} steps (measured here), "
        f"{THIN_DELAY_S * 1e3:g} ms; DDP, sync DiLoCo (fp32, H = {THIN_H}), Archipelago "
        f"{' and '.join(THIN_SLOTS)} (and with fragments, see --fragments), each timed over "
        "them",
    )  # fmt: skip
    args = p.parse_args(argv)
    apply_preset(p, args)
    if args.hetero and args.thin:
        p.error("--hetero and --thin are separate benchmarks: give one")
    args.profiles = {}  # link name -> each worker's (rate, delay); --thin's is set once measured
    if args.hetero:
        if args.world != len(HETERO_LINKS):
            p.error(
                f"--hetero: the mix is for {len(HETERO_LINKS)} workers, not --world {args.world}"
            )
        args.profiles["hetero"] = HETERO_LINKS
        args.slowdowns = args.slowdowns or HETERO_SLOWDOWNS
        args.H, args.codecs = args.H or [50], args.codecs or ["int8"]
        args.every_s = args.every_s or [2.5]
    if args.thin:
        if args.H or args.codecs or args.every_s:
            p.error(f"--thin runs its own Archipelago settings ({', '.join(THIN_SLOTS)}); "
                    "leave out --H, --codecs and --every-s")  # fmt: skip
        args.H, args.codecs = [THIN_H], []
        args.baseline_H = args.baseline_H or THIN_H
    if args.codecs is None:
        args.codecs = ["int8", "int4"]
    if args.slowdowns is not None and len(args.slowdowns) != args.world:
        p.error(f"--slowdowns: give one per worker ({args.world}), got {len(args.slowdowns)}")
    quick = args.quick
    model = dict(QUICK_MODEL if quick else FULL_MODEL)
    for key in ("d_model", "n_layer", "n_head", "context", "batch_size"):
        if getattr(args, key) is not None:
            model[key] = getattr(args, key)
    args.workload = {**model, "device": check_device(p, args.device)}
    defaults = {"steps": (40, 3000), "max_factor": (1.5, 3.0), "H": ([10], [50, 100, 250, 500]),
                "baseline_H": (10, 100), "warmup": (5, 100), "eval_batches": (2, 16)}  # fmt: skip
    for key, (q, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    if args.step_floor is None:
        args.step_floor = 0.05 if quick else 0.0
    if args.eval_every is None:
        args.eval_every = min([*args.H, args.baseline_H])
    check_fragments(p, args)
    if args.shaped is None:
        args.shaped = [] if (quick or args.no_netns) else ["10", "100"]
    if args.hetero or args.thin:  # timed over their own links only
        if args.no_netns:
            p.error("--hetero and --thin time every method over real shaped links: drop --no-netns")
        args.shaped = ["hetero" if args.hetero else "thin"]
    if quick:
        args.timeout = min(args.timeout, 120.0)
    return args


def apply_preset(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the settings ``--preset`` names where no flag set them; ``--skip`` given alone
    keeps every method. A preset's model is FULL_MODEL (a preset refuses ``--quick``)."""
    preset = PRESETS.get(args.preset, {}) if args.preset else {}
    if preset and (args.quick or args.hetero or args.thin):
        p.error(f"--preset {args.preset}: not with --quick, --hetero or --thin")
    for key, value in preset.items():
        if key == "no_netns":
            args.no_netns = args.no_netns or (value and args.shaped is None)
        elif getattr(args, key) is None:
            setattr(args, key, value)
    if args.skip is None:
        args.skip = []


def check_device(p: argparse.ArgumentParser, name: str) -> str:
    """``--device``: a torch device this machine has (``island.workloads.resolve_device``)."""
    from comms.errors import ConfigError
    from island.workloads import resolve_device

    try:
        return str(resolve_device(name))
    except ConfigError as err:
        p.error(f"--device: {err}")
        raise  # p.error exits; for the type checker
