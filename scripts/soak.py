"""Load soak of the aggregator tree: many islands push for minutes; nothing may fail or leak.

    python scripts/soak.py [--duration 600] [--islands 64] [--rate 0.1]
                           [--json docs/benchmarks/soak.json] [--plot docs/benchmarks/soak.png]

A root and three leaves run as real ``aggregator serve CONFIG`` processes (TOML configs in a
temporary directory, loopback, port 0; each daemon prints the addresses it bound). Simulated
islands (asyncio tasks in ``--island-procs`` worker processes: this script with ``--worker``),
each with its own Ed25519 key in the roster (role ``island``), are spread over the leaves.
Every island subscribes to its leaf's version stream and, ``--rate`` times per second (jittered
+-10%, never two pushes of its own at once), pushes a signed int8 update of a 4M-parameter
model (five tensors, 4,196,864 float32 parameters; theta_0 written as safetensors for the
root) with the newest version it has seen as ``base_version`` and a sequence number one
above its last. A pseudo-gradient is a gaussian with std 1e-3: each worker draws a bank of
``BANK`` of them once and every push scales a random one by U(0.5, 1.5) before the int8
codec encodes it, so the workers' CPU goes to encoding and pushing, not to random numbers.
The default rate, 0.1 (6.4 pushes/s offered), is about 60% of what the tree accepted when
saturated on a shared two-core machine (11/s at 0.4 offered, acks taking 5 s); at 0.1 no
island fell behind its schedule and p99 ack latency stayed under a second.

Measured: accepted updates per second, ack latency (push call to ack) p50/p99, root versions
per minute, each process's RSS (``VmRSS`` in ``/proc/PID/status``) and CPU every
``--sample-s`` seconds. A leaf keeps the last ``VERSION_CACHE`` (256) published u_v in memory
by design, the root its last 8, so a leaf's RSS rises by one u_v (4 MB here) per version
until its cache is full; the soak subtracts that (versions so far, capped, times the u_v
size) and judges what is left: its growth from the first sample after the warm-up
(``--warmup``, default a third of the run up to 120 s, while allocator arenas and gRPC
buffers fill) to the last, and its least-squares slope in MB per hour; the raw figures are
reported too. After the last push the tree drains (every buffer and outbox empty) and the
counts must agree: acks the islands received = deltas the leaves accepted; partials the
leaves sent = partials the root accepted; then every island must reach the root's version.

Errors, by kind, and every one fails the run (exit 1): a push that raised or was not
accepted, a transport retry, a subscription failure, a rejection or a dropped partial in any
aggregator's ``/metrics``, an ERROR line or traceback in a daemon's log, a daemon or worker
that exited, counts that disagree after the drain, an island behind the root at the end, an
unreachable status page, a daemon that did not stop cleanly on SIGTERM, and a process left
alive. So does net RSS growth beyond ``--max-rss-growth-mb`` and, once the window after the
warm-up lasts ``SLOPE_MIN_WINDOW_S`` or more, a net slope beyond ``--max-rss-slope-mb-per-h``
(over a short window the slope is mostly noise, so short runs are judged by growth alone).

Processes: every child runs in its own process group and dies with this script, even after
``kill -9`` (``federation_procs``: ``PR_SET_PDEATHSIG``); at the end, on an error, Ctrl+C or
SIGTERM, workers are stopped first, then the leaves, then the root (SIGTERM, then SIGKILL of
the group), and no process of those groups may be left. The daemons start no DHT, so there is
no p2pd and no socket file; the temporary directory is removed (its logs are kept when the
run failed or was interrupted; only ``kill -9`` of this script leaves it whole). Concurrency: the main thread starts the children and samples; one reader thread per
child (``federation_procs.Child``); each worker runs one asyncio loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import format_table, write_json
from federation_procs import Child, FederationError, tail

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
MODEL_ID = "global"
SHAPES = {  # 4,196,864 float32 parameters (16 MiB), one transformer-block-like model
    "embed.weight": (4096, 512),
    "mlp.fc1.weight": (2048, 512),
    "mlp.fc1.bias": (2048,),
    "mlp.fc2.weight": (512, 2048),
    "norm.weight": (512,),
}
DELTA_STD = 1e-3  # a pseudo-gradient's scale (DiLoCo-like deltas after H AdamW steps)
BANK = 4  # pseudo-gradients drawn per worker
LEAVES = 3
START_TIMEOUT_S = 120.0
STATUS_TIMEOUT_S = 10.0
SLOPE_MIN_WINDOW_S = 300.0  # judge the slope only over a window after warm-up this long
REPORT_EVERY_S = 2.0  # a worker prints its records this often
METRIC = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")


# ============================================================================ island workers


class Island:
    def __init__(self, index: int, identity, leaf: str):
        self.index, self.identity, self.leaf = index, identity, leaf
        self.version = 0  # newest version seen on the leaf's stream
        self.sequence = 0
        self.client = None  # its TransportClient to the leaf (pushes and the version stream)


def make_bank(seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {n: rng.standard_normal(s, dtype=np.float32) * np.float32(DELTA_STD) for n, s in SHAPES.items()}
        for _ in range(BANK)
    ]  # fmt: skip


def build_push(isl: Island, delta: dict[str, np.ndarray], scale: float) -> tuple[bytes, int]:
    """One signed int8 delta envelope from ``isl`` on the newest version it has seen."""
    from comms.update import encode_update

    base = isl.version
    env = encode_update(
        {n: x * np.float32(scale) for n, x in delta.items()}, codec="int8", model_id=MODEL_ID,
        kind="delta", sender=isl.identity.peer_id, sequence=isl.sequence, base_version=base,
        meta={"steps": 100}, identity=isl.identity,
    )  # fmt: skip
    return env.to_bytes(), base


async def follow_versions(isl: Island, client, errors: Counter, examples: dict) -> None:
    """Keep ``isl.version`` at the newest version its leaf streams."""
    while True:
        try:
            async for version, _ in client.subscribe(MODEL_ID, isl.version + 1):
                isl.version = version
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # recorded by kind; the stream is opened again
            kind = f"subscribe:{type(e).__name__}"
            errors[kind] += 1
            examples.setdefault(kind, str(e)[:300])
            await asyncio.sleep(1.0)


async def run_island(isl: Island, spec: dict, bank, go: dict, records: list) -> None:
    rng = np.random.default_rng(1000 + isl.index)
    interval = 1.0 / spec["rate"]
    next_at = go["start"] + rng.uniform(0, interval)
    while next_at < go["end"]:
        await asyncio.sleep(max(0.0, next_at - time.time()))
        isl.sequence += 1
        delta = bank[int(rng.integers(len(bank)))]
        data, base = await asyncio.to_thread(build_push, isl, delta, float(rng.uniform(0.5, 1.5)))
        t0 = time.time()
        try:
            ack = await isl.client.push(data)
            status = "ok" if ack.get("status") == "accepted" else f"ack:{ack.get('status')}"
            staleness, note = int(ack.get("staleness", -1)), ""
        except Exception as e:  # every failure is recorded by kind and fails the soak
            status, staleness, note = f"push:{type(e).__name__}", -1, str(e)[:300]
        records.append(
            [isl.index, isl.sequence, t0, time.time() - t0, status, staleness, base, note]
        )
        now = time.time()
        next_at += interval * rng.uniform(0.9, 1.1)
        if next_at < now:  # the previous push outlasted the interval: no catch-up burst
            records.append([isl.index, 0, now, 0.0, "late", -1, -1, ""])
            next_at = now


async def wait_for_file(path: Path) -> dict:
    while not path.exists():
        await asyncio.sleep(0.1)
    return json.loads(path.read_text())


async def cancel_all(tasks: list[asyncio.Task]) -> int:
    """Cancel ``tasks`` and wait for them; returns how many needed a second cancel().

    On Python 3.11, ``asyncio.wait_for`` swallows a cancellation that lands as the awaited
    read completes; ``TransportClient._read_blob`` reads a multi-chunk blob through it, so a
    subscription cancelled mid-version can run on (see docs/reliability.md, "Soak")."""
    again = 0
    for task in tasks:
        task.cancel()
    for _ in range(20):
        _, pending = await asyncio.wait(tasks, timeout=1.0)
        if not pending:
            break
        for task in pending:
            again += 1
            task.cancel()
    return again


async def worker_main(spec: dict) -> None:
    """Islands of one worker: subscribe; on the go file push until its end; report records
    every REPORT_EVERY_S; on the stop file wait for its version, then close."""
    from comms.identity import Identity
    from comms.transport import TransportClient

    islands = [Island(i, Identity.load(key), leaf) for i, key, leaf in spec["islands"]]
    bank = make_bank(spec["seed"])
    errors: Counter = Counter()
    examples: dict[str, str] = {}
    records: list[list] = []
    followers = []
    for isl in islands:
        isl.client = TransportClient(isl.leaf, identity=isl.identity)
        followers.append(asyncio.create_task(follow_versions(isl, isl.client, errors, examples)))
    print(json.dumps({"ready": len(islands)}), flush=True)
    go = await wait_for_file(Path(spec["go"]))

    def report(**extra: Any) -> None:
        out = {"records": records[:], "errors": dict(errors), "examples": examples,
               "retries": sum(isl.client.stats.retries for isl in islands),
               "versions": [isl.version for isl in islands], **extra}  # fmt: skip
        records.clear()
        print(json.dumps(out), flush=True)

    pushers = asyncio.gather(*(run_island(isl, spec, bank, go, records) for isl in islands))
    while not pushers.done():
        await asyncio.wait([pushers], timeout=REPORT_EVERY_S)
        report()
    await pushers
    report(pushed=True)
    stop = await wait_for_file(Path(spec["stop"]))  # the tree has drained: the final version
    deadline = time.time() + 30.0
    while time.time() < deadline and min(isl.version for isl in islands) < stop["version"]:
        await asyncio.sleep(0.1)
    behind = [isl.index for isl in islands if isl.version < stop["version"]]
    if behind:
        errors["island_behind_root"] += len(behind)
        examples.setdefault("island_behind_root", f"islands {behind} < v{stop['version']}")
    recancelled = await cancel_all(followers)
    report(done=True, recancelled=recancelled)
    for isl in islands:
        await isl.client.close()


# ============================================================================ the tree


def proc_rss_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def proc_cpu_s(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def http_get(address: str, path: str) -> bytes:
    from comms.http import url_of

    with urllib.request.urlopen(url_of(address) + path, timeout=STATUS_TIMEOUT_S) as r:
        return r.read()


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """Prometheus text as {(name, labels): value}, e.g. ("..._rejected_total", 'reason="x"')."""
    out = {}
    for line in text.splitlines():
        m = METRIC.match(line)
        if m and not line.startswith("#"):
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def processes_in_groups(pgids: set[int]) -> list[int]:
    """Live processes (zombies excluded) whose process group is one of ``pgids``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            fields = text[text.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[2]) in pgids:
                found.append(int(stat.parent.name))
    return found


class Daemon:
    """An ``aggregator serve`` child and the addresses it printed."""

    def __init__(self, child: Child, name: str, role: str):
        self.child, self.name, self.role = child, name, role
        line = child.wait_line("serving on", START_TIMEOUT_S)
        self.address = line.split("serving on ", 1)[1].split()[0]
        self.http = line.split(" http ", 1)[1].split()[0]

    def status(self) -> dict:
        return json.loads(http_get(self.http, "/status"))["models"][MODEL_ID]

    def metrics(self) -> dict:
        return parse_metrics(http_get(self.http, "/metrics").decode())


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.children: list[Child] = []
        self.daemons: dict[str, Daemon] = {}
        self.workers: dict[str, Child] = {}
        self.errors: Counter = Counter()
        self.examples: dict[str, str] = {}
        self.records: list[list] = []
        self.samples: dict[str, list[list[float]]] = {}  # name -> [[t, rss MB, cpu s], ...]
        self.versions: list[list[float]] = []  # [[t, root version], ...]
        self.worker_final: dict[str, dict] = {}  # each worker's last report
        self.pushed: set[str] = set()  # workers whose islands have made their last push
        self.root_version: int | None = None
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip

    def error(self, kind: str, example: str = "", n: int = 1) -> None:
        self.errors[kind] += n
        if example:
            self.examples.setdefault(kind, example[:300])

    def spawn(self, name: str, argv: list[str]) -> Child:
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        child = Child(name, argv, self.work / "logs" / f"{name}.log", self.env, REPO)
        self.children.append(child)
        return child

    # ------------------------------------------------------------------ setup

    def write_federation(self) -> None:
        from safetensors.numpy import save_file

        from comms.identity import Identity, Roster

        roster = Roster()
        self.island_keys = []
        for i in range(self.args.islands):
            ident = Identity.generate()
            ident.save(self.work / "keys" / f"island{i}.pem")
            roster.add(ident.public_key, "island", f"island{i}")
            self.island_keys.append(str(self.work / "keys" / f"island{i}.pem"))
        for name in ["root", *(f"leaf{j}" for j in range(LEAVES))]:
            ident = Identity.generate()
            ident.save(self.work / "keys" / f"{name}.pem")
            roster.add(ident.public_key, "aggregator", name)
        roster.save(self.work / "roster.json")
        rng = np.random.default_rng(0)
        theta0 = {n: (0.02 * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}
        save_file(theta0, str(self.work / "theta0.safetensors"))

    def config(self, name: str, role: str, parent: str = "") -> Path:
        from aggregator.config import AggregatorConfig, MergeConfig, ModelConfig
        from comms.config import save_config

        k = self.args.root_k if role == "root" else self.args.leaf_k
        cfg = AggregatorConfig(
            name=name, role=role, listen="127.0.0.1:0", http="127.0.0.1:0",
            key=str(self.work / "keys" / f"{name}.pem"), roster=str(self.work / "roster.json"),
            state_dir=str(self.work / "state" / name), parent=parent,
            # random deltas point nowhere in particular: the direction check would refuse half
            merge=MergeConfig(buffer_k=k, deadline_s=self.args.deadline_s, direction="off"),
            models=[ModelConfig(model_id=MODEL_ID, codec="int8",
                                init=str(self.work / "theta0.safetensors") if role == "root" else "")],
        )  # fmt: skip
        path = self.work / f"{name}.toml"
        save_config(cfg, path)
        return path

    def start_daemon(self, name: str, role: str, parent: str = "") -> Daemon:
        argv = [sys.executable, "-m", "aggregator", "serve", str(self.config(name, role, parent))]
        daemon = Daemon(self.spawn(name, argv), name, role)
        self.daemons[name] = daemon
        return daemon

    def start(self) -> None:
        self.write_federation()
        root = self.start_daemon("root", "root")
        leaves = [self.start_daemon(f"leaf{j}", "leaf", root.address) for j in range(LEAVES)]
        n_procs = max(1, min(self.args.island_procs, self.args.islands))
        for w in range(n_procs):
            members = [[i, self.island_keys[i], leaves[i % LEAVES].address]
                       for i in range(w, self.args.islands, n_procs)]  # fmt: skip
            spec = {"islands": members, "rate": self.args.rate, "seed": 7 + w,
                    "go": str(self.work / "go.json"), "stop": str(self.work / "stop.json")}  # fmt: skip
            spec_path = self.work / f"worker{w}.json"
            spec_path.write_text(json.dumps(spec))
            name = f"islands{w}"
            self.workers[name] = self.spawn(
                name, [sys.executable, str(SCRIPT), "--worker", str(spec_path)]
            )
        for child in self.workers.values():
            child.wait_line('"ready"', START_TIMEOUT_S)
        print(f"soak: root {root.address}, leaves {[d.address for d in leaves]}, "
              f"{self.args.islands} islands in {n_procs} worker(s)", flush=True)  # fmt: skip

    # ------------------------------------------------------------------ running

    def watched(self) -> dict[str, int]:
        pids = {name: d.child.proc.pid for name, d in self.daemons.items()}
        return pids | {name: c.proc.pid for name, c in self.workers.items()}

    def sample(self) -> None:
        t = time.time() - self.t0
        for name, pid in self.watched().items():
            rss, cpu = proc_rss_mb(pid), proc_cpu_s(pid)
            if rss is not None and cpu is not None:
                self.samples.setdefault(name, []).append([round(t, 2), round(rss, 2), cpu])
        try:
            self.versions.append([round(t, 2), self.daemons["root"].status()["version"]])
        except OSError as e:
            self.error("status_unreachable@root", str(e))

    def read_workers(self) -> None:
        for name, child in self.workers.items():
            while True:
                try:
                    line = child.lines.get_nowait()
                except queue.Empty:
                    break
                if line is None or not line.startswith("{"):
                    continue
                msg = json.loads(line)
                self.records.extend(msg.get("records", []))
                if msg.get("pushed"):
                    self.pushed.add(name)
                if msg.get("done"):  # the worker's own counters are cumulative
                    self.worker_final[name] = msg

    def daemon_exits(self) -> bool:
        dead = False
        for name, d in self.daemons.items():
            if d.child.proc.poll() is not None:
                self.error(
                    f"daemon_exit:{name}",
                    f"exit {d.child.proc.returncode}: {tail(d.child.log_path, 5)}",
                )
                dead = True
        return dead

    def write_file(self, name: str, doc: dict) -> None:
        path = self.work / name
        path.with_suffix(".tmp").write_text(json.dumps(doc))
        os.replace(path.with_suffix(".tmp"), path)

    def run(self) -> None:
        """Push for the duration while sampling; drain the tree; let the islands catch up."""
        start = time.time() + 1.0
        self.t0, self.t_end = start, start + self.args.duration
        self.write_file("go.json", {"start": start, "end": self.t_end})
        self.cpu0 = machine_busy()
        next_sample, last_print = start, start
        while len(self.pushed) < len(self.workers):
            now = time.time()
            if now >= next_sample:
                self.sample()
                next_sample += self.args.sample_s
            self.read_workers()
            if self.daemon_exits():
                raise FederationError("an aggregator exited during the soak")
            for name, child in self.workers.items():
                if child.proc.poll() is not None and name not in self.pushed:
                    raise FederationError(f"{name} exited ({child.proc.returncode}): "
                                          f"{tail(child.log_path, 5)}")  # fmt: skip
            if now - last_print >= 30:
                last_print = now
                ok = sum(1 for r in self.records if r[4] == "ok")
                v = self.versions[-1][1] if self.versions else 0
                print(f"  t={now - start:5.0f}s accepted {ok} root v{v}", flush=True)
            if now > self.t_end + START_TIMEOUT_S:
                raise FederationError("island workers did not finish after the soak ended")
            time.sleep(0.2)
        self.sample()
        self.cpu1 = machine_busy()
        self.drain()
        self.write_file("stop.json", {"version": self.root_version or 0})
        deadline = time.time() + 90.0
        while time.time() < deadline and any(c.proc.poll() is None for c in self.workers.values()):
            self.read_workers()
            time.sleep(0.2)
        self.read_workers()
        for name, child in self.workers.items():
            if child.proc.poll() != 0 or name not in self.worker_final:
                self.error(f"worker_exit:{name}", tail(child.log_path, 5))

    def drain(self) -> None:
        """Wait until every accepted update is in a root version; then check the counts."""
        deadline = time.time() + 4 * self.args.deadline_s + 60
        leaves = [d for d in self.daemons.values() if d.role == "leaf"]
        while True:
            try:
                st = {name: d.status() for name, d in self.daemons.items()}
                sent = sum(st[d.name]["partials_sent"] for d in leaves)
                metrics = {name: d.metrics() for name, d in self.daemons.items()}
            except OSError as e:
                self.error("status_unreachable", str(e))
                return
            got = metrics["root"].get(
                ("archipelago_updates_accepted_total", f'kind="partial",model_id="{MODEL_ID}"'), 0
            )
            idle = all(s["buffered"] == 0 for s in st.values()) and got == sent
            if idle or time.time() > deadline:
                break
            time.sleep(0.5)
        self.metrics_final = metrics
        self.root_version = st["root"]["version"]
        if not idle:
            self.error("undrained", f"buffered {[s['buffered'] for s in st.values()]}, "
                       f"partials sent {sent}, root accepted {got:.0f}")  # fmt: skip
        deltas = sum(metrics[d.name].get(
            ("archipelago_updates_accepted_total", f'kind="delta",model_id="{MODEL_ID}"'), 0)
            for d in leaves)  # fmt: skip
        acked = sum(1 for r in self.records if r[4] == "ok")
        if deltas != acked:
            self.error("count_mismatch", f"islands saw {acked} acks, leaves accepted {deltas:.0f}")
        for name, m in metrics.items():
            for (metric, labels), value in m.items():
                if value and metric in ("archipelago_updates_rejected_total",
                                        "archipelago_partials_dropped_total"):  # fmt: skip
                    self.error(f"{metric.split('_')[-2]}@{name}:{labels}", n=int(value))

    # ------------------------------------------------------------------ stopping

    def stop(self) -> None:
        """Workers, then leaves, then the root; then check that nothing is left."""
        order = {"islands": 0, "leaf": 1, "root": 2}
        for child in sorted(self.children, key=lambda c: order[c.name.rstrip("0123456789")]):
            child.stop(grace=20.0)
        for name, d in self.daemons.items():
            if d.child.proc.returncode != 0:  # SIGTERM is a clean stop: exit status 0
                self.error(f"daemon_stop:{name}", f"exit status {d.child.proc.returncode}")
        left, deadline = [], time.time() + 5.0
        while time.time() < deadline:
            left = processes_in_groups({c.proc.pid for c in self.children})
            if not left:
                break
            time.sleep(0.2)
        if left:
            self.error("leftover_process", f"pids {left}", n=len(left))

    def check_logs(self) -> None:
        """Every ERROR line or traceback a daemon logged, until it stopped, is an error."""
        for name, d in self.daemons.items():
            text = d.child.log_path.read_text(errors="replace")
            bad = [ln for ln in text.splitlines() if error_line(ln)]
            if bad:
                self.error(f"log_error@{name}", bad[0], n=len(bad))


def error_line(line: str) -> bool:
    """An ERROR or CRITICAL line, or one with a traceback, in either log format (comms.logs);
    a bare traceback a crashing process printed."""
    from comms.logs import parse_line

    doc = parse_line(line)
    if doc is None:
        return line.startswith("Traceback")
    return doc["level"] in ("ERROR", "CRITICAL") or "exc" in doc


# ============================================================================ the report


def version_cache_sizes() -> dict[str, int]:
    """How many recent u_v each role keeps in memory by design (``aggregator.service``)."""
    try:
        from aggregator import service

        return {"leaf": int(service.VERSION_CACHE), "root": int(service.ROOT_VERSION_CACHE)}
    except (ImportError, AttributeError):
        print("soak: aggregator.service has no version cache sizes; assuming 256 and 8")
        return {"leaf": 256, "root": 8}


def fit_rss(samples: list[list[float]], warmup: float, cached_mb: list[float]) -> dict[str, Any]:
    """RSS after ``warmup`` seconds: growth (last sample minus the first, MB) and the
    least-squares slope (MB per hour), raw and net of ``cached_mb`` (per sample: the u_v the
    aggregator's version cache holds by design at that moment)."""
    warm = [i for i, s in enumerate(samples) if s[0] >= warmup]
    out = {"start_mb": samples[0][1], "warm_mb": None, "end_mb": samples[-1][1],
           "peak_mb": max(s[1] for s in samples), "window_s": 0.0, "cache_mb": None,
           "raw_growth_mb": None, "raw_slope_mb_per_h": None, "growth_mb": None,
           "slope_mb_per_h": None}  # fmt: skip
    if len(warm) < 3:
        return out
    t = np.array([samples[i][0] for i in warm]) / 3600.0
    raw = np.array([samples[i][1] for i in warm])
    net = raw - np.array([cached_mb[i] for i in warm])
    out["warm_mb"], out["window_s"] = raw[0], samples[warm[-1]][0] - samples[warm[0]][0]
    out["cache_mb"] = cached_mb[warm[-1]] - cached_mb[warm[0]]
    out["raw_growth_mb"], out["raw_slope_mb_per_h"] = raw[-1] - raw[0], np.polyfit(t, raw, 1)[0]
    out["growth_mb"], out["slope_mb_per_h"] = net[-1] - net[0], np.polyfit(t, net, 1)[0]
    return {k: float(v) if isinstance(v, np.floating) else v for k, v in out.items()}


def rss_failures(processes: dict[str, dict], args: argparse.Namespace) -> list[str]:
    failures = []
    for name, p in processes.items():
        if p["role"] == "islands" or p["growth_mb"] is None:
            continue
        if p["growth_mb"] > args.max_rss_growth_mb:
            failures.append(f"{name}: RSS grew {p['growth_mb']:.1f} MB after the warm-up, net of "
                            f"its version cache (bound {args.max_rss_growth_mb} MB)")  # fmt: skip
        slope = p["slope_mb_per_h"]
        if p["window_s"] >= SLOPE_MIN_WINDOW_S and slope > args.max_rss_slope_mb_per_h:
            failures.append(f"{name}: RSS slope {slope:.1f} MB/h net of its version cache "
                            f"(bound {args.max_rss_slope_mb_per_h} MB/h)")  # fmt: skip
    return failures


def summarize(soak: Soak, args: argparse.Namespace) -> dict[str, Any]:
    from comms.codecs import get_codec

    int8 = get_codec("int8")
    payload_bytes = sum(int8.encoded_nbytes(math.prod(s)) for s in SHAPES.values())
    pushes = [r for r in soak.records if r[1] > 0]
    ok = [r for r in pushes if r[4] == "ok"]
    for r in pushes:
        if r[4] != "ok":
            soak.error(r[4], r[7])
    for name, final in soak.worker_final.items():
        for kind, n in final["errors"].items():
            soak.error(kind, final["examples"].get(kind, ""), n=n)
        if final["retries"]:
            soak.error(
                "transport_retry", f"{name}: {final['retries']} retried call(s)", n=final["retries"]
            )
    lat = np.array([r[3] for r in ok]) * 1e3
    stale = [r[5] for r in ok]
    v = soak.versions
    window = [x for x in v if x[0] <= args.duration + 1e-6]
    v_span = window[-1][1] - window[0][1] if len(window) > 1 else 0
    t_span = window[-1][0] - window[0][0] if len(window) > 1 else 0
    busy = soak.cpu1[0] - soak.cpu0[0], soak.cpu1[1] - soak.cpu0[1]
    duration = args.duration
    processes = {}
    uv_mb = payload_bytes / 2**20  # one published u_v (int8, like the islands' deltas)
    caches = version_cache_sizes()
    version_at = dict(map(tuple, soak.versions))
    for name, samples in soak.samples.items():
        cpu = [s for s in samples if s[0] <= duration + args.sample_s]
        cached = [0.0] * len(samples)
        if name in soak.daemons:
            cap = caches[soak.daemons[name].role]
            cached = [round(min(version_at.get(s[0], 0), cap) * uv_mb, 2) for s in samples]
            entry = fit_rss(samples, args.warmup, cached)
        else:
            entry = {"end_mb": samples[-1][1]}
        entry["pid"] = soak.watched()[name]
        entry["role"] = soak.daemons[name].role if name in soak.daemons else "islands"
        entry["cpu_percent"] = 100 * (cpu[-1][2] - cpu[0][2]) / max(1e-9, cpu[-1][0] - cpu[0][0])
        entry["samples"] = [[s[0], s[1], c] for s, c in zip(samples, cached, strict=True)]
        processes[name] = entry
    failures = rss_failures(processes, args)
    if soak.errors:
        failures.append(f"{sum(soak.errors.values())} error(s): {dict(soak.errors)}")
    return {
        "ok": not failures,
        "failures": failures,
        "islands": args.islands,
        "leaves": LEAVES,
        "params": int(sum(math.prod(s) for s in SHAPES.values())),
        "payload_bytes": int(payload_bytes),
        "version_cache": caches,
        "rate_per_island": args.rate,
        "offered_per_s": args.islands * args.rate,
        "duration_s": duration,
        "warmup_s": args.warmup,
        "pushes": len(pushes),
        "accepted": len(ok),
        "accepted_per_s": len(ok) / duration,
        "late_pushes": sum(1 for r in soak.records if r[4] == "late"),
        "subscriptions_cancelled_twice": sum(
            f.get("recancelled", 0) for f in soak.worker_final.values()
        ),
        "ack_latency_ms": {
            "p50": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99": float(np.percentile(lat, 99)) if len(lat) else None,
            "max": float(lat.max()) if len(lat) else None,
        },
        "staleness": {
            "mean": float(np.mean(stale)) if stale else None,
            "max": int(max(stale)) if stale else None,
        },
        "root_versions": soak.root_version,
        "versions_per_min": 60 * v_span / t_span if t_span else 0.0,
        "machine_busy_percent": 100 * busy[0] / max(1, busy[1]),
        "processes": processes,
        "errors": dict(soak.errors),
        "error_examples": soak.examples,
        "bounds": {
            "max_rss_growth_mb": args.max_rss_growth_mb,
            "max_rss_slope_mb_per_h": args.max_rss_slope_mb_per_h,
            "slope_min_window_s": SLOPE_MIN_WINDOW_S,
        },
        "config": {
            "leaf_k": args.leaf_k,
            "root_k": args.root_k,
            "deadline_s": args.deadline_s,
            "codec": "int8",
            "delta_std": DELTA_STD,
            "sample_s": args.sample_s,
            "island_procs": args.island_procs,
        },
        "versions": soak.versions,
    }


def print_table(r: dict[str, Any]) -> None:
    lat = r["ack_latency_ms"]
    print(format_table(["figure", "value"], [
        ["islands x rate (pushes/s offered)", f"{r['islands']} x {r['rate_per_island']:g} = {r['offered_per_s']:.2f}"],
        ["duration, warm-up (s)", f"{r['duration_s']:g}, {r['warmup_s']:g}"],
        ["accepted updates", r["accepted"]],
        ["accepted updates / s", r["accepted_per_s"]],
        ["ack latency p50 / p99 / max (ms)", f"{lat['p50'] or 0:.0f} / {lat['p99'] or 0:.0f} / {lat['max'] or 0:.0f}"],
        ["late pushes (island behind schedule)", r["late_pushes"]],
        ["staleness mean / max", f"{r['staleness']['mean'] or 0:.2f} / {r['staleness']['max']}"],
        ["root versions (per minute)", f"{r['root_versions']} ({r['versions_per_min']:.1f})"],
        ["machine CPU busy (all users)", f"{r['machine_busy_percent']:.0f}%"],
    ]))  # fmt: skip
    print()
    rows = []
    for name, p in r["processes"].items():
        rows.append([name, p["role"], p.get("start_mb"), p.get("warm_mb"), p["end_mb"],
                     p.get("raw_growth_mb"), p.get("cache_mb"), p.get("growth_mb"),
                     p.get("slope_mb_per_h"), p["cpu_percent"]])  # fmt: skip
    print(format_table(["process", "role", "RSS start MB", "after warm-up", "end", "growth",
                        "of it u_v cache", "net growth", "net slope MB/h", "CPU %"], rows))  # fmt: skip
    print()
    errors = [[k, v] for k, v in r["errors"].items()] or [["(none)", 0]]
    print(format_table(["error kind", "count"], errors))
    for f in r["failures"]:
        print(f"FAIL: {f}")


def plot(r: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[2, 1])
    for name, p in r["processes"].items():
        if p["role"] == "islands":
            continue
        t = np.array([s[0] for s in p["samples"]]) / 60
        rss = np.array([s[1] for s in p["samples"]])
        net = rss - np.array([s[2] for s in p["samples"]])
        line = ax.plot(t, rss, label=f"{name} RSS")[0]
        ax.plot(t, net, ":", color=line.get_color(), lw=1.2)
        if p["slope_mb_per_h"] is not None:
            warm = t >= r["warmup_s"] / 60
            fit = np.polyfit(t[warm] / 60, net[warm], 1)
            ax.plot(t[warm], np.polyval(fit, t[warm] / 60), "--", color=line.get_color(), lw=1,
                    label=f"{name} net fit {p['slope_mb_per_h']:+.0f} MB/h")  # fmt: skip
    ax.axvline(r["warmup_s"] / 60, color="grey", ls=":", label="end of warm-up")
    ax.set_ylabel("RSS (MB); dotted: net of the u_v cache")
    ax.set_title(f"Aggregator RSS, {r['islands']} islands x {r['rate_per_island']:g} pushes/s, "
                 f"4M-param int8 updates")  # fmt: skip
    ax.legend(fontsize=7, ncol=2)
    v = np.array(r["versions"], dtype=float)
    if len(v):
        bx.plot(v[:, 0] / 60, v[:, 1], color="black")
    bx.set_ylabel("root version")
    bx.set_xlabel("minutes")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ============================================================================ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Load soak of a root and three leaf aggregators.")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of pushing")
    p.add_argument("--islands", type=int, default=64)
    p.add_argument("--rate", type=float, default=0.1, help="pushes per second per island")
    p.add_argument("--island-procs", type=int, default=2, help="worker processes for islands")
    p.add_argument("--leaf-k", type=int, default=8, help="leaf buffer_k")
    p.add_argument("--root-k", type=int, default=24, help="root buffer_k (island updates)")
    p.add_argument(
        "--deadline-s", type=float, default=5.0, help="merge deadline of every aggregator"
    )
    p.add_argument("--warmup", type=float, help="seconds excluded from the RSS fit (default: a third "
                   "of the run, at most 120)")  # fmt: skip
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling interval")
    p.add_argument("--max-rss-growth-mb", type=float, default=250.0)
    p.add_argument("--max-rss-slope-mb-per-h", type=float, default=1000.0)
    p.add_argument("--json", default=str(REPO / "docs" / "benchmarks" / "soak.json"))
    p.add_argument("--plot", default=str(REPO / "docs" / "benchmarks" / "soak.png"))
    p.add_argument("--keep", help="keep the run's directory (configs, logs, state) here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        asyncio.run(worker_main(json.loads(Path(args.worker).read_text())))
        return 0
    if args.warmup is None:
        args.warmup = min(120.0, args.duration / 3)
    if args.islands < 1 or args.rate <= 0 or args.duration <= 0:
        print("soak: --islands, --rate and --duration must be positive", file=sys.stderr)
        return 2

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, work)
    result, interrupted = None, False
    try:
        soak.start()
        soak.run()
    except KeyboardInterrupt:
        interrupted = True
        print("\nsoak: interrupted; stopping every process", file=sys.stderr, flush=True)
    except FederationError as e:
        soak.error("aborted", str(e))
        print(f"\nsoak: {e}", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            soak.stop()
    if not interrupted and "aborted" not in soak.errors:
        soak.check_logs()
        result = summarize(soak, args)
        print_table(result)
        write_json(args.json, result)
        if args.plot:
            plot(result, args.plot)
    ok = result is not None and result["ok"] and not soak.errors
    if not args.keep:
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "state", ignore_errors=True)
            print(f"soak: logs kept in {work / 'logs'}", file=sys.stderr)
    return 130 if interrupted else 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
