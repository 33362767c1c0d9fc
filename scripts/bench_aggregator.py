"""Benchmark the aggregator side by side with plain numpy and with hivemind's all-reduce.

Three figures, measured in one run:

(a) **Merge throughput**: ``aggregator.merge.accumulate`` (the weighted, block-by-block add of a
    decoded float32 delta into a partial aggregate) against a plain numpy ``a += b`` over the
    same bytes (64 MiB float32 deltas), in GB/s of delta bytes (1e9 bytes per second), best of
    a few. The headline pair comes from ``scripts/bench_merge.py``'s functions when present
    (four deltas into a fresh partial, as a flush does); ``detail.merge.in_place_gbps`` adds
    one delta into a partial that already holds one.
(b) **One full round**: N islands each encode (fp16, signed) and push a 16 MiB float32 update
    (4M params); the round ends when version ``v`` has reached all N islands, each of which
    holds a Subscribe stream to its aggregator and decodes the fp16 ``u_v`` it receives.
    Topologies: **flat** (one root, ``buffer_k = N``) and **tree** (a root and two leaves,
    islands split evenly, leaf ``buffer_k = N/2``, root ``buffer_k = N``). Aggregators run as
    real ``python -m aggregator serve`` processes (WAL fsyncs included); islands are asyncio
    tasks of this process, whose CPU time per round is recorded to show whether it was the
    bottleneck. Against **hivemind**: ``DecentralizedAverager`` averaging the same 4M-float
    tensor among N peers on loopback (each peer its own ``DHT`` and averager,
    ``Float16Compression``: equal compression), timed from the ``step`` calls to all N
    returning; the peers run in a child process of their own. Best of a few rounds.
(c) **Idle CPU** of one aggregator process (the flat root after its rounds, clients gone)
    over a window, from ``utime + stime`` in ``/proc/PID/stat``, in percent of one core.

    python scripts/bench_aggregator.py [--quick] [--repeats N] --json PATH

``--quick`` uses 256K params, N = 4 only, a 3 s idle window (for the smoke test).
The JSON holds ``{"merge_gbps", "numpy_add_gbps", "round_seconds": {"flat"|"tree"|"hivemind":
{"4": s, "16": s}}, "idle_cpu_percent", "notes": [...], "meta"}``, with ``null`` and a note
for what did not run, and diagnostics (all rounds, CPU seconds per process) under ``"detail"``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from benchlib import format_table, write_json
from safetensors.numpy import save_file

from aggregator.config import AggregatorConfig, MergeConfig, ModelConfig
from aggregator.merge import PartialAggregate, accumulate
from comms.config import save_config
from comms.envelope import Envelope
from comms.identity import Identity, Roster
from comms.update import decode_update, encode_update

# comms.transport (grpc) is imported where it is used: the hivemind worker process never
# loads it, so nothing of grpc's is around when hivemind forks its DHT processes.

FULL_PARAMS = 4 << 20  # 4M float32 = 16 MiB per update
QUICK_PARAMS = 256 << 10
FULL_MERGE_BYTES = 64 << 20
QUICK_MERGE_BYTES = 4 << 20
FULL_ISLANDS = (4, 16)
QUICK_ISLANDS = (4,)
MODEL_ID = "global"
WIRE_CODEC = "fp16"  # islands' deltas and the published u_v; hivemind: Float16Compression
START_TIMEOUT_S = 60.0
SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent


# ============================================================================ (a) merge


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_merge(nbytes: int, repeats: int = 5) -> tuple[float, float]:
    """(aggregator merge GB/s, numpy ``a += b`` GB/s) over ``nbytes`` of float32 delta."""
    rng = np.random.default_rng(0)
    delta = rng.random(nbytes // 4, dtype=np.float32)
    partial = accumulate(PartialAggregate(), {"w": delta}, 1.0)  # later deltas add in place
    merge_s = best_seconds(lambda: accumulate(partial, {"w": delta}, 0.5), repeats)
    acc = rng.random(delta.size, dtype=np.float32)
    numpy_s = best_seconds(lambda: np.add(acc, delta, out=acc), repeats)
    return delta.nbytes / merge_s / 1e9, delta.nbytes / numpy_s / 1e9


def merge_figures(nbytes: int, events: int = 4) -> tuple[float, float, str]:
    """The merge figures from ``scripts/bench_merge.py``'s measuring functions when they are
    there (``events`` deltas of ``nbytes`` each), else from :func:`measure_merge`."""
    environ = dict(os.environ)
    try:
        import bench_merge as bm  # sets thread counts in os.environ: restored below
    except ImportError:
        bm = None
    finally:
        os.environ.clear()
        os.environ.update(environ)
    wanted = ("model_shapes", "bench_accumulate", "bench_numpy")
    if bm is not None and all(callable(getattr(bm, f, None)) for f in wanted):
        try:
            shapes = bm.model_shapes(nbytes >> 20)
            total = events * 4 * sum(math.prod(s) for s in shapes.values())
            merge_s = bm.bench_accumulate(shapes, events, 3)
            numpy_s = bm.bench_numpy(shapes, events, 3)
            return total / merge_s / 1e9, total / numpy_s / 1e9, "scripts/bench_merge.py"
        except (TypeError, ValueError, AttributeError):
            pass  # its functions changed shape: measure here
    merge, add = measure_merge(nbytes)
    return merge, add, "measure_merge"


# ============================================================================ processes


def cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of process ``pid`` and every live descendant (hivemind's averagers and
    p2pd daemons are children of the process that made them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, ValueError):
            total += cpu_seconds(p)
        todo.extend(children.get(p, []))
    return total


def idle_cpu_percent(pid: int, seconds: float) -> float:
    """CPU use of process ``pid`` over ``seconds`` of wall time, in percent of one core."""
    c0, t0 = cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    c1, t1 = cpu_seconds(pid), time.perf_counter()
    return 100.0 * (c1 - c0) / (t1 - t0)


class AggregatorProcess:
    """``python -m aggregator serve CONFIG`` as a child; ``address`` once it serves."""

    def __init__(self, name: str, config_path: Path, log_path: Path):
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "ab")  # closed in stop()
        cmd = [sys.executable, "-m", "aggregator", "serve", str(config_path)]
        self.proc = subprocess.Popen(
            [*cmd, "--log-level=warning"],
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.address = ""

    async def wait_serving(self, timeout: float = START_TIMEOUT_S) -> str:
        try:
            line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        except TimeoutError:
            line = b""
        text = line.decode(errors="replace")
        if "serving on" not in text:
            self.stop()
            raise RuntimeError(
                f"aggregator {self.name} did not start within {timeout:.0f}s "
                f"(got {text.strip()!r}); log: {self.log_tail()}"
            )
        self.address = text.split("serving on ", 1)[1].split()[0]
        return self.address

    def log_tail(self, nbytes: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-nbytes:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


# ============================================================================ federation


@dataclass
class Federation:
    """Keys, roster, theta_0 and configs of one benchmark federation in ``root``."""

    root: Path
    islands: list  # comms.identity.Identity, one per island
    roster_path: Path
    init_path: Path

    def config_path(self, name: str, role: str, buffer_k: int, parent: str = "") -> Path:
        config = AggregatorConfig(
            name=name,
            role=role,
            listen="127.0.0.1:0",
            http="",
            key=str(self.root / "keys" / f"{name}.pem"),
            roster=str(self.roster_path),
            state_dir=str(self.root / "state" / name),
            parent=parent,
            merge=MergeConfig(buffer_k=buffer_k, deadline_s=600.0),
            models=[
                ModelConfig(
                    model_id=MODEL_ID,
                    init=str(self.init_path) if role == "root" else "",
                    codec=WIRE_CODEC,
                )
            ],
        )
        path = self.root / f"{name}.toml"
        save_config(config, path)
        return path


def make_federation(root: Path, n_islands: int, aggregators: list[str], numel: int) -> Federation:
    islands = [Identity.generate() for _ in range(n_islands)]
    roster = Roster()
    for i, ident in enumerate(islands):
        roster.add(ident.public_key, "island", f"island{i}")
    for name in aggregators:
        ident = Identity.generate()
        ident.save(root / "keys" / f"{name}.pem")
        roster.add(ident.public_key, "aggregator", name)
    roster_path, init_path = root / "roster.json", root / "init.safetensors"
    roster.save(roster_path)
    theta0 = np.random.default_rng(0).standard_normal(numel, dtype=np.float32)
    save_file({"w": theta0}, str(init_path))
    return Federation(root, islands, roster_path, init_path)


# ============================================================================ (b) rounds


@dataclass
class Island:
    """One island: a client of its aggregator and the versions its Subscribe stream delivered."""

    identity: Identity
    address: str
    delta: np.ndarray
    client: object = None
    arrivals: asyncio.Queue = field(default_factory=asyncio.Queue)
    follower: asyncio.Task | None = None


def encode_delta(island: Island, sequence: int, base_version: int) -> bytes:
    env = encode_update(
        {"w": island.delta},
        codec=WIRE_CODEC,
        model_id=MODEL_ID,
        kind="delta",
        sender=island.identity.peer_id,
        sequence=sequence,
        base_version=base_version,
        identity=island.identity,
    )
    return env.to_bytes()


def decode_version(data: bytes) -> dict[str, np.ndarray]:
    return decode_update(Envelope.from_bytes(data, max_bytes=1 << 34))


async def follow_versions(island: Island) -> None:
    """Keep the island's Subscribe stream open; queue (version, arrival time) once decoded."""
    async for version, data in island.client.subscribe(MODEL_ID, 1):
        await asyncio.to_thread(decode_version, data)
        island.arrivals.put_nowait((version, time.perf_counter()))


async def wait_for_version(island: Island, version: int) -> float:
    while True:
        got, at = await island.arrivals.get()
        if got >= version:
            return at


async def island_push(island: Island, version: int) -> dict:
    data = await asyncio.to_thread(encode_delta, island, version, version - 1)
    return await island.client.push(data)


def process_cpu(procs: dict[str, int]) -> dict[str, float]:
    return {"bench": cpu_seconds("self"), **{name: cpu_seconds(pid) for name, pid in procs.items()}}


async def run_rounds(
    islands: list[Island], procs: dict[str, int], repeats: int, timeout: float
) -> tuple[list[float], list[dict[str, float]]]:
    """Run ``repeats`` rounds (round r publishes version r); wall seconds and CPU per round."""
    from comms.transport import TransportClient

    for island in islands:
        island.client = TransportClient(
            island.address, deadline_s=timeout, identity=island.identity
        )
        island.follower = asyncio.create_task(follow_versions(island))
    try:
        await asyncio.sleep(0.3)  # let every Subscribe stream reach its aggregator
        seconds, cpu = [], []
        for version in range(1, repeats + 1):
            before = process_cpu(procs)
            start = time.perf_counter()
            pushes = asyncio.gather(*(island_push(i, version) for i in islands))
            arrivals = asyncio.gather(*(wait_for_version(i, version) for i in islands))
            _, done = await asyncio.wait_for(asyncio.gather(pushes, arrivals), timeout)
            seconds.append(max(done) - start)
            after = process_cpu(procs)
            cpu.append({k: round(after[k] - before[k], 3) for k in after})
        return seconds, cpu
    finally:
        for island in islands:
            if island.follower is not None:
                island.follower.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await island.follower
            await island.client.close()


async def bench_topology(
    topology: str, n: int, numel: int, repeats: int, idle_s: float | None, timeout: float
) -> dict:
    """Rounds of ``n`` islands against a flat root or a root with two leaves (processes)."""
    names = ["root"] if topology == "flat" else ["root", "leaf0", "leaf1"]
    procs: list[AggregatorProcess] = []
    with tempfile.TemporaryDirectory(prefix=f"bench_agg_{topology}{n}_") as tmp:
        root_dir = Path(tmp)
        try:
            fed = make_federation(root_dir, n, names, numel)
            root = AggregatorProcess(
                "root", fed.config_path("root", "root", n), root_dir / "root.log"
            )
            procs.append(root)
            await root.wait_serving()
            if topology == "flat":
                addresses = [root.address] * n
            else:
                if n % 2:
                    raise ValueError(f"a tree of two leaves needs an even N, got {n}")
                for leaf in names[1:]:
                    cfg = fed.config_path(leaf, "leaf", n // 2, parent=root.address)
                    procs.append(AggregatorProcess(leaf, cfg, root_dir / f"{leaf}.log"))
                await asyncio.gather(*(p.wait_serving() for p in procs[1:]))
                addresses = [procs[1 + i * 2 // n].address for i in range(n)]
            rng = np.random.default_rng(1)
            islands = [
                Island(ident, addr, (rng.random(numel, dtype=np.float32) - 0.5) * 0.01)
                for ident, addr in zip(fed.islands, addresses, strict=True)
            ]
            pids = {p.name: p.proc.pid for p in procs}
            try:
                seconds, cpu = await run_rounds(islands, pids, repeats, timeout)
            except Exception as e:
                logs = " | ".join(f"{p.name}: {p.log_tail(600)}" for p in procs)
                raise RuntimeError(f"{type(e).__name__}: {e}; logs: {logs}") from e
            out = {"seconds": seconds, "cpu_seconds": cpu}
            if idle_s:
                await asyncio.sleep(0.5)  # let the closed streams wind down
                out["idle_cpu_percent"] = await asyncio.to_thread(
                    idle_cpu_percent, root.proc.pid, idle_s
                )
            return out
        finally:
            for p in reversed(procs):
                p.stop()


# ============================================================================ hivemind


def hivemind_worker(n: int, numel: int, repeats: int, timeout: float) -> dict:
    """Run in a child process: N hivemind peers on loopback, ``repeats`` averaging rounds."""
    import torch
    from hivemind import DHT
    from hivemind.averaging import DecentralizedAverager
    from hivemind.compression import Float16Compression

    dhts, averagers = [], []
    try:
        setup = time.perf_counter()
        listen = ["/ip4/127.0.0.1/tcp/0"]
        dhts.append(DHT(start=True, host_maddrs=listen))
        bootstrap = dhts[0].get_visible_maddrs()
        for _ in range(n - 1):
            dhts.append(DHT(start=True, initial_peers=bootstrap, host_maddrs=listen))
        gen = torch.Generator().manual_seed(0)
        for dht in dhts:
            averagers.append(
                DecentralizedAverager(
                    [torch.randn(numel, generator=gen)],
                    dht,
                    start=True,
                    prefix="bench_aggregator",
                    target_group_size=n,
                    min_group_size=n,
                    compression=Float16Compression(),
                )
            )
        setup_s = time.perf_counter() - setup
        seconds, cpu, failures = [], [], 0
        for _ in range(repeats):
            results: list = [None] * n

            def step(i: int, results=results) -> None:
                results[i] = averagers[i].step(timeout=timeout)

            threads = [threading.Thread(target=step, args=(i,)) for i in range(n)]
            cpu0 = tree_cpu_seconds(os.getpid())
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
            if all(r is not None and len(r) == n for r in results):
                seconds.append(elapsed)
                cpu.append(tree_cpu_seconds(os.getpid()) - cpu0)
            else:
                failures += 1
        return {"seconds": seconds, "cpu_seconds": cpu, "failures": failures, "setup_s": setup_s}
    finally:
        for averager in averagers:
            with contextlib.suppress(Exception):
                averager.shutdown()
        for dht in dhts:
            with contextlib.suppress(Exception):
                dht.shutdown()


def bench_hivemind(n: int, numel: int, repeats: int, timeout: float, log_dir: Path) -> dict:
    """Run :func:`hivemind_worker` in its own process group; kill the group when done."""
    cmd = [sys.executable, str(SCRIPT), "--hivemind-worker", str(n), "--params", str(numel)]
    cmd += ["--repeats", str(repeats), "--round-timeout", str(timeout)]
    log_path = log_dir / f"hivemind{n}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, cwd=REPO, start_new_session=True
        )
        try:
            out, _ = proc.communicate(timeout=120 + repeats * (timeout + 30))
        except subprocess.TimeoutExpired:
            out = b""
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the peers' DHT processes and p2pd daemons
            proc.wait()
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode not in (0, -signal.SIGKILL) or not lines:
        tail = log_path.read_bytes()[-600:].decode(errors="replace")
        return {"error": f"hivemind with {n} peers did not finish (rc {proc.returncode}): {tail}"}
    return json.loads(lines[-1])


# ============================================================================ main


def best(values: list[float] | None) -> float | None:
    return min(values) if values else None


def run(args: argparse.Namespace) -> dict:
    numel = args.params or (QUICK_PARAMS if args.quick else FULL_PARAMS)
    sizes = QUICK_ISLANDS if args.quick else FULL_ISLANDS
    all_sizes = FULL_ISLANDS
    repeats = args.repeats or (2 if args.quick else 3)
    idle_s = args.idle_seconds or (3.0 if args.quick else 10.0)
    notes: list[str] = []
    detail: dict = {"params": numel, "repeats": repeats}

    merge_bytes = QUICK_MERGE_BYTES if args.quick else FULL_MERGE_BYTES
    merge_gbps, numpy_gbps, source = merge_figures(merge_bytes)
    in_place, _ = measure_merge(merge_bytes)  # into a partial that already holds a delta
    detail["merge"] = {"bytes": merge_bytes, "measured_by": source, "in_place_gbps": in_place}
    print(f"merge: {merge_gbps:.2f} GB/s, numpy a += b: {numpy_gbps:.2f} GB/s", flush=True)

    rounds: dict[str, dict[str, float | None]] = {
        t: {str(n): None for n in all_sizes} for t in ("flat", "tree", "hivemind")
    }
    round_cpu = {t: {str(n): None for n in all_sizes} for t in ("flat", "tree", "hivemind")}
    idle, shares = None, []
    skipped = [n for n in all_sizes if n not in sizes]
    if skipped:
        notes.append(f"N={skipped} not run: --quick measures N={list(sizes)} only")
    for topology in ("flat", "tree"):
        for n in sizes:
            want_idle = idle_s if (topology == "flat" and n == sizes[0]) else None
            try:
                got = asyncio.run(
                    bench_topology(topology, n, numel, repeats, want_idle, args.round_timeout)
                )
            except Exception as e:
                notes.append(f"{topology} N={n} failed: {e}")
                print(f"{topology} N={n}: FAILED {e}", flush=True)
                continue
            rounds[topology][str(n)] = best(got["seconds"])
            detail[f"{topology}{n}"] = got
            idle = got.get("idle_cpu_percent", idle)
            print(f"{topology} N={n}: rounds {[round(s, 3) for s in got['seconds']]}", flush=True)
            i = int(np.argmin(got["seconds"]))
            cpu, wall = got["cpu_seconds"][i], got["seconds"][i]
            got["best_round"] = {
                "islands_process_cores": cpu["bench"] / wall,  # this process: the islands
                "all_processes_cores": sum(cpu.values()) / wall,  # of the machine's cores
            }
            shares.append((cpu["bench"] / wall, f"{topology} N={n}"))
            round_cpu[topology][str(n)] = min(sum(c.values()) for c in got["cpu_seconds"])
    if shares:
        share, where = max(shares)
        notes.append(
            f"islands ran as asyncio tasks of this process; at most {share:.2f} of a core "
            f"during a best round ({where}); see detail.*.best_round for the machine's load"
        )

    with tempfile.TemporaryDirectory(prefix="bench_agg_hivemind_") as tmp:
        for n in sizes:
            got = bench_hivemind(n, numel, repeats, args.round_timeout, Path(tmp))
            detail[f"hivemind{n}"] = got
            if got.get("failures"):
                notes.append(f"hivemind N={n}: {got['failures']} of {repeats} rounds failed")
            if got.get("seconds"):
                rounds["hivemind"][str(n)] = best(got["seconds"])
                round_cpu["hivemind"][str(n)] = best(got.get("cpu_seconds"))
                print(f"hivemind N={n}: rounds {[round(s, 3) for s in got['seconds']]}", flush=True)
            else:
                reason = got.get("error") or f"all {got.get('failures')} rounds failed"
                notes.append(f"hivemind N={n}: no successful round: {reason}")
                print(f"hivemind N={n}: FAILED {reason}", flush=True)
    notes.append(
        "hivemind: target_group_size=min_group_size=N, matchmaking times at their defaults "
        "(a full group starts at once; 1 s made N=16 matchmaking fail or take 30-40 s); "
        "setup (DHTs, averagers) excluded"
    )
    notes.append(
        "round = islands encode+sign (fp16) and push, aggregators verify, WAL-fsync, merge, "
        "outer step, publish fp16 u_v; ends when every island decoded it"
    )
    notes.append(
        "round_cpu_seconds: CPU seconds one round cost all processes together, least of the "
        "rounds (ours: the islands' process and every aggregator; hivemind: its peers' process "
        "and all its descendants, averagers and p2pd daemons); on one machine with 2 cores a "
        "round cannot be shorter than half of it"
    )
    return {
        "merge_gbps": merge_gbps,
        "numpy_add_gbps": numpy_gbps,
        "round_seconds": rounds,
        "round_cpu_seconds": round_cpu,
        "idle_cpu_percent": idle,
        "notes": notes,
        "detail": detail,
    }


def print_table(result: dict) -> None:
    print()
    rows = [
        ["merge (accumulate)", result["merge_gbps"], "GB/s"],
        ["merge, into a partial in place", result["detail"]["merge"]["in_place_gbps"], "GB/s"],
        ["numpy a += b", result["numpy_add_gbps"], "GB/s"],
        ["merge / numpy", result["merge_gbps"] / result["numpy_add_gbps"], "ratio"],
        ["idle CPU, one aggregator", result["idle_cpu_percent"], "% of a core"],
    ]
    print(format_table(["figure", "value", "unit"], rows))
    print()
    rs = result["round_seconds"]
    rows = []
    for n in rs["flat"]:
        flat, tree, hm = rs["flat"][n], rs["tree"][n], rs["hivemind"][n]
        ratio = hm / tree if hm and tree else None
        rows.append([n, flat, tree, hm, ratio])
    print(format_table(["N", "flat s", "tree s", "hivemind s", "hivemind/tree"], rows))
    rc = result.get("round_cpu_seconds") or {}
    if rc:
        rows = [[n, rc["flat"][n], rc["tree"][n], rc["hivemind"][n]] for n in rc["flat"]]
        print(format_table(["N", "flat CPU s", "tree CPU s", "hivemind CPU s"], rows))
    for note in result["notes"]:
        print(f"note: {note}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny tensors, N=4, 3 s idle window")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--repeats", type=int, default=0, help="rounds per setting (best is kept)")
    p.add_argument("--params", type=int, default=0, help="float32 params per update")
    p.add_argument("--idle-seconds", type=float, default=0.0, help="idle CPU window")
    p.add_argument("--round-timeout", type=float, default=120.0, help="seconds per round")
    p.add_argument("--hivemind-worker", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hivemind_worker:
        got = hivemind_worker(
            args.hivemind_worker, args.params, args.repeats or 1, args.round_timeout
        )
        print(json.dumps(got), flush=True)
        return 0
    result = run(args)
    print_table(result)
    write_json(args.json, result)
    sizes = QUICK_ISLANDS if args.quick else FULL_ISLANDS
    ours = [result["round_seconds"][t][str(n)] for t in ("flat", "tree") for n in sizes]
    return 0 if None not in [*ours, result["idle_cpu_percent"]] else 1


if __name__ == "__main__":
    sys.exit(main())
