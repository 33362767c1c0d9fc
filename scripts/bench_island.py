"""Benchmark one island's compute utilization: overlapped versus synchronous DiLoCo, one run.

One island (``island.daemon.Island``, in this process, the ``bytelm`` workload on one torch
thread) trains against a real root aggregator (``python -m aggregator serve``, a fresh
process and state directory per mode, ``buffer_k = 1`` so each push becomes a version).
The island's uplink is shaped in-process to 10 Mbit/s with 100 ms one-way latency (token
bucket, ``[link]`` of the island's config). Both modes run one after the other with the same
model, data, codec, ``H`` and number of rounds:

- **overlapped** (CO2, Sun et al. 2024): a round boundary encodes and queues the delta, adopts
  whatever versions arrived, and trains on while the push and the merge are in flight;
- **sync** (DiLoCo, Douillard et al. 2023, Algorithm 1): a boundary waits, after pushing, for
  the version that merges this round's delta (push over the shaped uplink, the root's outer
  step, the download of ``u_v`` over the unshaped loopback downlink).

**Utilization** is ``Island.utilization()`` read at the last round boundary: time in
forward/backward/optimizer (the island's timer also holds drawing the batch) over wall time
since training started (evaluation is off). Its
denominator holds every round boundary: forming, encoding and signing the delta on the
training thread, the sync-mode wait for the version, decoding and adopting versions. It stops
at the last boundary, so the overlapped island's last push, still draining when training
ends (it would overlap the next round in a longer run), is not counted against it.

    python scripts/bench_island.py [--quick] [--every H] [--rounds N] --json PATH

``--quick``: a tiny model, H = 5, 2 rounds (for the smoke test). The JSON holds
``{"utilization": {"overlapped", "sync"}, "link_mbit", "latency_ms", "H", "rounds",
"push_bytes", "round_seconds": {"overlapped", "sync"}, "shaped", "load_avg", "detail",
"meta"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import format_table, write_json

from aggregator.config import AggregatorConfig, MergeConfig, ModelConfig
from comms.config import save_config
from comms.identity import Identity, Roster
from island.config import IslandConfig, LinkConfig
from island.daemon import Island, export_initial_parameters
from island.sync import SyncConfig

MODES = ("overlapped", "sync")
TINY_MODEL = {"d_model": 32, "n_layer": 1, "n_head": 2, "context": 32, "batch_size": 4}
SHAPED = (
    "island uplink (pushes) shaped in-process: token bucket at the stated rate plus one-way "
    "latency per chunk; the downlink (versions, the initial snapshot) is unshaped loopback"
)
TARGET_OVERLAPPED = 0.95


@dataclass
class Setup:
    """What both modes share."""

    every: int = 50
    rounds: int = 6
    rate_mbit: float = 10.0
    latency_ms: float = 100.0
    codec: str = "int8"
    threads: int = 1
    workload_config: dict[str, Any] = field(default_factory=dict)
    start_timeout_s: float = 60.0
    sync_timeout_s: float = 120.0


# ---------------------------------------------------------------------- the federation


@dataclass
class Federation:
    """Keys, roster and theta_0 written once, shared by both modes' roots and islands."""

    dir: Path
    island_key: Path
    root_key: Path
    roster: Path
    init: Path


def write_federation(workdir: Path, setup: Setup) -> Federation:
    island_id, root_id = Identity.generate(), Identity.generate()
    fed = Federation(
        dir=workdir, island_key=workdir / "island.pem", root_key=workdir / "root.pem",
        roster=workdir / "roster.json", init=workdir / "init.safetensors",
    )  # fmt: skip
    island_id.save(fed.island_key)
    root_id.save(fed.root_key)
    roster = Roster()
    roster.add(island_id.public_key, "island", "island")
    roster.add(root_id.public_key, "aggregator", "root")
    roster.save(fed.roster)
    export_initial_parameters(island_config(fed, setup, "overlapped", ""), str(fed.init))
    return fed


def island_config(fed: Federation, setup: Setup, mode: str, address: str) -> IslandConfig:
    return IslandConfig(
        name=f"bench-{mode}",
        key=str(fed.island_key),
        roster=str(fed.roster),
        aggregator=address or "unset:0",
        workload="bytelm",
        workload_config=dict(setup.workload_config),
        steps=setup.every * setup.rounds,
        threads=setup.threads,
        eval_every=0,  # no evaluation: nothing to exclude from the wall time
        http="",
        sync=SyncConfig(
            model_id="global",
            every=setup.every,
            codec=setup.codec,
            mode=mode,
            sync_timeout_s=setup.sync_timeout_s,
        ),
        link=LinkConfig(rate_mbit=setup.rate_mbit, latency_ms=setup.latency_ms),
    )


def root_config_path(fed: Federation, mode: str) -> Path:
    config = AggregatorConfig(
        name=f"root-{mode}", role="root", key=str(fed.root_key), roster=str(fed.roster),
        state_dir=str(fed.dir / f"root-{mode}"), http="",
        merge=MergeConfig(buffer_k=1, deadline_s=5.0),
        models=[ModelConfig("global", init=str(fed.init), codec="int8")],
    )  # fmt: skip
    path = fed.dir / f"root-{mode}.toml"
    save_config(config, path)
    return path


# ---------------------------------------------------------------------- the root process


def start_root(config: Path, log: Path, timeout: float) -> tuple[subprocess.Popen, str]:
    """Start ``aggregator serve`` and return it with its gRPC address once it serves."""
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aggregator", "serve", str(config), "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=logf, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().decode() if ready else ""
        if "serving on " not in line:
            raise RuntimeError(
                f"root aggregator did not start within {timeout:g} s (said {line!r}); "
                f"its log:\n{tail(log)}"
            )
    except BaseException:
        stop_process(proc)
        raise
    return proc, line.split("serving on ")[1].split()[0]


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------- one mode


def run_mode(fed: Federation, setup: Setup, mode: str) -> dict[str, Any]:
    """Train ``setup.rounds`` rounds in ``mode`` against a fresh root; return the figures."""
    log = fed.dir / f"root-{mode}.log"
    root, address = start_root(root_config_path(fed, mode), log, setup.start_timeout_s)
    try:
        island = Island(island_config(fed, setup, mode, address))
        summary = island.run()
        if root.poll() is not None:
            raise RuntimeError(f"root aggregator exited during the {mode} run:\n{tail(log)}")
        lu_stats = island.lu.stats
    finally:
        stop_process(root)
    return mode_figures(island.round_records, summary, lu_stats, island.compute_s, setup)


def mode_figures(
    records: list[dict[str, Any]],
    summary: dict[str, Any],
    lu_stats: dict[str, Any],
    compute_s: float,
    setup: Setup,
) -> dict[str, Any]:
    """Figures of one mode from the island's round records (one per boundary) and summary."""
    if len(records) != setup.rounds:
        raise RuntimeError(f"expected {setup.rounds} round records, got {len(records)}")
    last = records[-1]
    times = [0.0] + [r["t"] for r in records]
    each = [round(b - a, 3) for a, b in itertools.pairwise(times)]
    sync = summary["sync"]
    accepted = max(1, sync["pushes_accepted"] + sync["pushes_replayed"])
    return {
        "utilization": last["utilization"],
        "wall_s": last["t"],
        "round_seconds": last["t"] / setup.rounds,
        "round_seconds_each": each,
        "compute_s_per_round": compute_s / setup.rounds,
        "step_seconds": compute_s / max(1, summary["step"]),
        "boundary_s_per_round": lu_stats["boundary_s"] / setup.rounds,
        "blocked_s_total": lu_stats["blocked_s"],  # the initial snapshot download included
        "push_bytes": sync["bytes_sent"] / accepted,
        "bytes_received": sync["bytes_received"],  # the initial snapshot and the versions
        "versions_received": sync["versions_received"],
        "pushes_accepted": sync["pushes_accepted"],
        "pushes_lost": sync["pushes_stale"] + sync["pushes_rejected"] + sync["pushes_dropped"],
        "final_version": summary["version"],
        "last_staleness": sync["last_staleness"],
        "steps": summary["step"],
    }


# ---------------------------------------------------------------------- the run


def run(setup: Setup) -> dict[str, Any]:
    load_before = os.getloadavg()
    detail: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-island-") as tmp:
        fed = write_federation(Path(tmp), setup)
        for mode in MODES:
            print(f"running {mode}: H={setup.every}, {setup.rounds} rounds ...", flush=True)
            detail[mode] = run_mode(fed, setup, mode)
    util = {m: detail[m]["utilization"] for m in MODES}
    return {
        "utilization": util,
        "link_mbit": setup.rate_mbit,
        "latency_ms": setup.latency_ms,
        "H": setup.every,
        "rounds": setup.rounds,
        "codec": setup.codec,
        "push_bytes": detail["overlapped"]["push_bytes"],
        "round_seconds": {m: detail[m]["round_seconds"] for m in MODES},
        "target": {
            "overlapped_at_least": TARGET_OVERLAPPED,
            "met": util["overlapped"] >= TARGET_OVERLAPPED and util["sync"] < util["overlapped"],
        },
        "workload": {"name": "bytelm", "config": setup.workload_config or "default"},
        "torch_threads": setup.threads,
        "shaped": SHAPED,
        "load_avg": {"before": list(load_before), "after": list(os.getloadavg())},
        "detail": detail,
    }


def print_table(result: dict[str, Any]) -> None:
    headers = ["mode", "H", "rounds", "util %", "round s", "compute s/rnd", "boundary s/rnd",
               "push KB", "versions in", "pushes lost"]  # fmt: skip
    rows = []
    for mode in MODES:
        d = result["detail"][mode]
        rows.append([
            mode, result["H"], result["rounds"], 100 * d["utilization"], d["round_seconds"],
            d["compute_s_per_round"], d["boundary_s_per_round"], d["push_bytes"] / 1e3,
            d["versions_received"], d["pushes_lost"],
        ])  # fmt: skip
    print(format_table(headers, rows))
    step = result["detail"]["overlapped"]["step_seconds"]
    print(
        f"link: {result['link_mbit']:g} Mbit/s, {result['latency_ms']:g} ms one way; "
        f"{result['shaped']}.\n"
        f"bytelm {result['workload']['config']}, {result['torch_threads']} torch thread(s), "
        f"{step * 1e3:.0f} ms/step, codec {result['codec']}; root buffer_k=1 (a version per "
        f"push). target: overlapped >= {100 * TARGET_OVERLAPPED:.0f}% and sync lower: "
        f"{'met' if result['target']['met'] else 'NOT met'}. load avg before/after: "
        f"{' '.join(f'{x:.2f}' for x in result['load_avg']['before'])} / "
        f"{' '.join(f'{x:.2f}' for x in result['load_avg']['after'])}"
    )


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, H=5, 2 rounds")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--every", type=int, default=0, help="H: inner steps per round (default 50)")
    p.add_argument("--rounds", type=int, default=0, help="rounds per mode (default 6)")
    p.add_argument("--rate-mbit", type=float, default=10.0, help="uplink rate")
    p.add_argument("--latency-ms", type=float, default=100.0, help="uplink one-way latency")
    p.add_argument("--codec", default="int8", help="codec of pushed deltas")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the island")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    setup = Setup(
        every=args.every or (5 if args.quick else 50),
        rounds=args.rounds or (2 if args.quick else 6),
        rate_mbit=args.rate_mbit, latency_ms=args.latency_ms, codec=args.codec,
        threads=args.threads, workload_config=dict(TINY_MODEL) if args.quick else {},
    )  # fmt: skip
    if setup.every < 1 or setup.rounds < 1 or setup.rate_mbit <= 0:
        print("bench_island: --every, --rounds and --rate-mbit must be positive", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # unwind: stop the root, remove the temp dir
    with contextlib.suppress(KeyboardInterrupt):
        result = run(setup)
        print_table(result)
        write_json(args.json, result)
        return 0
    return 130


if __name__ == "__main__":
    sys.exit(main())
