"""Fuzz every decoder that reads bytes from a peer or from a file a user hands over.

For each target of ``fuzz_targets`` (the update envelope, the gateway's admission, WAL records
and segment files, codecs, chunk streams, DHT records, signed read requests (``ReadGuard``),
configs, the roster, key files, checkpoint manifests, the router server's request bodies) it runs ``--inputs`` inputs: a mix
of random bytes (15%), the target's own random documents (10%), byte-level havoc of valid
seeds (25%) and structured mutations of seeds re-signed or re-digested so the deeper checks
run (50%). Every input is classified (``fuzz_targets.classify``): accepted, rejected with one
of the target's typed errors (counted by type), or a crash (any other exception, an empty
error message, a broken invariant, or a run past ``--timeout-s``: ``Hang``), whose input is
saved under ``--crashes`` with its traceback.

Reported per target: how its valid seeds fare (run once first, untimed, as a warm-up),
inputs, accepted, rejections by type, crashes by type, the longest time one input took, the
peak of Python allocations during one input (``tracemalloc``, on every ``--trace-every``-th
input) and the worker's peak RSS. Each worker process runs one target
under an address-space cap (current size + 3 GiB), so an unbounded allocation is a
``MemoryError`` crash and not an outage. The documented run::

    python scripts/fuzz.py --inputs 100000 --jobs 2 --json docs/benchmarks/fuzz.json

Reproduce a saved crash: ``python scripts/fuzz.py --replay build/fuzz/crashes/<target>/<file>.bin``.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import random
import resource
import signal
import sys
import time
import traceback
import tracemalloc
from collections import Counter
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path[:0] = [p for p in (str(SCRIPTS), str(REPO)) if p not in sys.path]

from benchlib import format_table, write_json  # noqa: E402
from fuzz_targets import Hang, Result, classify, make_input, memory_cap, targets  # noqa: E402

MAX_SAVED_PER_SIGNATURE = 5


def _on_alarm(signum, frame):
    raise Hang


def _signature(result: Result) -> str:
    """Error type plus the innermost frame in the repository: one line per distinct defect."""
    frames = [ln for ln in result.trace.splitlines() if ln.strip().startswith('File "')]
    ours = [f for f in frames if str(REPO) in f and "/scripts/" not in f and ".venv" not in f]
    where = (ours or frames or ["?"])[-1].strip()
    where = where.replace(f'File "{REPO}/', "").replace('File "', "")
    return f"{result.error} at {where}"


def _save(crash_dir: Path, name: str, data: bytes, result: Result) -> str:
    d = crash_dir / name
    d.mkdir(parents=True, exist_ok=True)
    stem = f"{result.error.split('(')[0]}-{hashlib.sha1(data).hexdigest()[:12]}"
    (d / f"{stem}.bin").write_bytes(data)
    (d / f"{stem}.txt").write_text(f"{result.error}: {result.message}\n\n{result.trace}")
    return str(d / f"{stem}.bin")


def fuzz_part(name: str, part: int, count: int, seed: int, timeout_s: float, crash_dir: str,
              trace_every: int) -> dict:  # fmt: skip
    """Run ``count`` inputs of one target (in a worker process of its own)."""
    target = targets()[name]
    signal.signal(signal.SIGALRM, _on_alarm)
    rng = random.Random(f"{seed}/{name}/{part}")
    stats = {"inputs": 0, "sources": Counter(), "accepted": 0, "rejected": Counter(),
             "crashes": Counter(), "signatures": {}, "max_s": 0.0, "total_s": 0.0,
             "peak_traced": 0}  # fmt: skip
    with memory_cap(3 << 30):
        # Warm-up, untimed: the seeds once (first calls pay for lazy imports and torch's
        # one-time set-up, seconds on a busy machine, which is no property of the decoder).
        stats["seeds"] = Counter(classify(target, s).status for s in target.seeds())
        for i in range(count):
            source, data = make_input(target, rng)
            traced = i % trace_every == 0
            if traced:
                tracemalloc.start()
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                result = classify(target, data)
            except Hang:
                result = Result("crash", "Hang", f"over {timeout_s} s", timeout_s,
                                traceback.format_exc())  # fmt: skip
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if traced:
                stats["peak_traced"] = max(stats["peak_traced"], tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
            stats["inputs"] += 1
            stats["sources"][source] += 1
            stats["max_s"] = max(stats["max_s"], result.seconds)
            stats["total_s"] += result.seconds
            if result.status == "accepted":
                stats["accepted"] += 1
            elif result.status == "rejected":
                stats["rejected"][result.error] += 1
            else:
                stats["crashes"][result.error] += 1
                sig = stats["signatures"].setdefault(
                    _signature(result), {"count": 0, "message": result.message[:300], "saved": []}
                )
                sig["count"] += 1
                if len(sig["saved"]) < MAX_SAVED_PER_SIGNATURE:
                    sig["saved"].append(_save(Path(crash_dir), name, data, result))
    stats["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return stats


def _merge(parts: list[dict]) -> dict:
    out = {"inputs": 0, "sources": Counter(), "accepted": 0, "rejected": Counter(),
           "crashes": Counter(), "signatures": {}, "max_s": 0.0, "total_s": 0.0,
           "peak_traced": 0, "peak_rss": 0, "seeds": parts[0]["seeds"]}  # fmt: skip
    for p in parts:
        for key in ("inputs", "accepted", "total_s"):
            out[key] += p[key]
        for key in ("sources", "rejected", "crashes"):
            out[key].update(p[key])
        for key in ("max_s", "peak_traced", "peak_rss"):
            out[key] = max(out[key], p[key])
        for sig, info in p["signatures"].items():
            have = out["signatures"].setdefault(sig, {"count": 0, "message": info["message"],
                                                      "saved": []})  # fmt: skip
            have["count"] += info["count"]
            have["saved"] = (have["saved"] + info["saved"])[:MAX_SAVED_PER_SIGNATURE]
    return out


def report(name: str, merged: dict) -> dict:
    target = targets()[name]
    return {
        "decoder": target.decoder,
        "inputs": merged["inputs"],
        "seeds": dict(merged["seeds"]),
        "inputs_by_source": dict(sorted(merged["sources"].items())),
        "accepted": merged["accepted"],
        "rejected": sum(merged["rejected"].values()),
        "rejected_by_type": dict(merged["rejected"].most_common()),
        "crashes": sum(merged["crashes"].values()),
        "crashes_by_type": dict(merged["crashes"].most_common()),
        "crash_signatures": merged["signatures"],
        "max_ms_per_input": round(merged["max_s"] * 1e3, 2),
        "mean_ms_per_input": round(merged["total_s"] * 1e3 / max(merged["inputs"], 1), 3),
        "peak_traced_mib_per_input": round(merged["peak_traced"] / 2**20, 2),
        "peak_rss_mib": round(merged["peak_rss"] / 2**20, 1),
    }


def replay(path: str, name: str | None) -> int:
    name = name or Path(path).parent.name
    result = classify(targets()[name], Path(path).read_bytes())
    print(f"{name}: {result.status} {result.error} {result.message[:500]}")
    if result.trace:
        print(result.trace)
    return 1 if result.status == "crash" else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=100_000, help="inputs per target")
    p.add_argument("--targets", default="", help="comma-separated names (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=10.0, help="per input; longer is a Hang")
    p.add_argument("--trace-every", type=int, default=25, help="tracemalloc every Nth input")
    p.add_argument("--crashes", default=str(REPO / "build" / "fuzz" / "crashes"))
    p.add_argument("--json", default=str(REPO / "docs" / "benchmarks" / "fuzz.json"))
    p.add_argument("--replay", metavar="FILE", help="run one saved input and show the outcome")
    p.add_argument("--target", help="with --replay: the target (default: the file's folder)")
    p.add_argument("--list", action="store_true", help="list the targets and exit")
    args = p.parse_args(argv)
    if args.replay:
        return replay(args.replay, args.target)
    names = [n for n in args.targets.split(",") if n] or list(targets())
    if args.list:
        for n in names:
            print(f"{n:22s} {targets()[n].decoder}")
        return 0
    unknown = sorted(set(names) - set(targets()))
    if unknown:
        p.error(f"unknown targets {unknown}; --list shows them")
    per_part = -(-args.inputs // args.jobs)
    tasks = [(n, j, min(per_part, args.inputs - j * per_part), args.seed, args.timeout_s,
              args.crashes, args.trace_every)
             for n in names for j in range(args.jobs) if args.inputs - j * per_part > 0]  # fmt: skip
    started = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
        parts = pool.starmap(fuzz_part, tasks, chunksize=1)
    wall = time.perf_counter() - started
    results = {n: report(n, _merge([r for t, r in zip(tasks, parts, strict=True) if t[0] == n]))
               for n in names}  # fmt: skip
    rows = [[n, r["inputs"], r["accepted"], r["rejected"], r["crashes"], r["max_ms_per_input"],
             r["peak_traced_mib_per_input"], r["peak_rss_mib"],
             ", ".join(f"{k} {v}" for k, v in list(r["rejected_by_type"].items())[:3])]
            for n, r in results.items()]  # fmt: skip
    print(format_table(["target", "inputs", "accepted", "rejected", "crashes", "max ms",
                        "traced MiB", "RSS MiB", "top rejections"], rows))  # fmt: skip
    for n, r in results.items():
        for sig, info in r["crash_signatures"].items():
            print(f"CRASH {n}: {sig} x{info['count']}: {info['message'][:160]}")
            print(f"      reproducer: {info['saved'][0] if info['saved'] else '-'}")
    doc = {
        "inputs_per_target": args.inputs,
        "seed": args.seed,
        "jobs": args.jobs,
        "timeout_s": args.timeout_s,
        "wall_s": round(wall, 1),
        "targets": results,
    }
    write_json(args.json, doc)
    print(f"{len(names)} targets, {wall:.0f} s")
    return 1 if any(r["crashes"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
