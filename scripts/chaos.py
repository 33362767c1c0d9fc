"""Chaos harness: a small real federation under kill -9, freezes and cut links, then checked.

    python scripts/chaos.py [--scenarios baseline,kills,aimed,freeze,cut,lossy] [--seed 0]
                            [--steps 300] [--every 20] [--slowdown 1] [--kills 16]
                            [--small] [--out DIR] [--json PATH]

A root (with a hivemind DHT, so p2pd runs too), two leaves and four islands training the
reduced bytelm of ``scripts/federation.py`` (0.12 M parameters; ``--small``: 22 k), int8
pushes, synchronous DiLoCo rounds by default (``--mode``), run as real processes through
their CLIs (``aggregator serve``, ``island run``) on fixed ports, under a supervisor that
restarts a daemon that died the way systemd or a pod restart would: the rest of its process
group is killed (p2pd included), and after ``--restart-delay`` seconds the same command starts
again with the same config and state directory. Each scenario runs in a fresh process of this
script; faults are timed from the moment all four islands train, from a seeded RNG:

- ``baseline``: no faults; the reference for loss and goodput.
- ``kills``: ``--kills`` kill -9 of a random island (p = 1/2), leaf or the root (1/4 each).
- ``aimed``: kills at the moments that matter, by fault points (``comms.faults``) in the
  daemons' first incarnations: an island right after its push was acknowledged and before it
  recorded it, an island mid-snapshot, a leaf between its WAL append and the ack, a leaf
  mid-flush to the root (after its intent; after the root's ack, before its mark), the root
  between its state and its mark and after its mark before publishing; plus random kills.
- ``freeze``: leaf0 stopped (SIGSTOP of its process group) for ``--freeze-s`` s, then SIGCONT.
- ``cut``: island0's link cut for ``--freeze-s`` s (``comms.netns.cut``), then mended.
- ``lossy``: every island's link with 1% loss and 20 +- 10 ms delay.

``cut`` and ``lossy`` place each island in its own network namespace behind a shaped link
(``comms.netns``; the aggregators and this script in the hub namespace): they need root, and
report "not run" with the reason otherwise.

After each scenario every daemon is stopped and the checks read their records
(``chaos_checks``): acknowledged updates (the islands' ``acks.jsonl``) each in exactly one
version's contributors (the root's model store); the root's theta equal to theta_0 plus every
decoded u_v; the aggregators' live replicas (signed Fetch before the stop) and the islands'
anchors (snapshots and final summaries) equal to theta_v at their version; versions only
increasing (store, root log, island records); the final validation loss within 3% of the
baseline's; no process, p2pd or socket file left behind. Figures (``chaos_report``): goodput
(island steps in a published version over island steps computed), the time from a restart to
an island's first accepted push and to the root's first published version, and from the end
of a freeze or cut to the first accepted push behind it. A full disk is not a scenario here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path[:0] = [p for p in (str(SCRIPTS), str(REPO)) if p not in sys.path]

import chaos_checks as checks  # noqa: E402
from chaos_procs import (  # noqa: E402
    LEAVES,
    MODEL_ID,
    N_ISLANDS,
    RUN_ENV,
    Daemon,
    Incarnation,
    file_size,
    free_ports,
    http_json,
    note_island_progress,
    note_root_progress,
    one_process,
    resumed_step,
    run_sockets,
    setns,
)
from chaos_report import print_table, run_result  # noqa: E402
from federation_procs import Child, FederationError  # noqa: E402

QUICK_PACKAGES = ("asyncio", "email", "xml", "http", "urllib", "json", "logging", "concurrent")
# the reduced bytelm of scripts/federation.py (0.12 M parameters; --small: its quick 22 k)
MODEL = {"d_model": 64, "n_layer": 2, "n_head": 4, "context": 64, "batch_size": 16}
SMALL_MODEL = {"d_model": 32, "n_layer": 1, "n_head": 2, "context": 32, "batch_size": 8}
SCENARIOS = ("baseline", "kills", "aimed", "freeze", "cut", "lossy")
NETNS_SCENARIOS = {  # scenario -> the islands' links (comms.netns; islands in namespaces)
    "cut": {"rate": "100mbit", "delay": "5ms"},
    "lossy": {"rate": "20mbit", "delay": "20ms", "jitter": "10ms", "loss": "1%"},
}
NETNS_PREFIX = "chaos"
# fault point -> the daemon whose first incarnations carry it (name@n: at the n-th visit)
AIMED = {
    "island0": ["island.after_ack@3"],
    "island1": ["island.mid_snapshot@3"],
    "leaf0": ["leaf.after_wal_append@4", "leaf.before_mark@2"],
    "leaf1": ["leaf.after_intent@2"],
    "root": ["root.before_mark@3", "root.before_publish@2"],
}
AIMED_FAST = {  # the test suite's subset
    "island0": ["island.after_ack@2"],
    "leaf0": ["leaf.after_wal_append@3"],
    "root": ["root.before_mark@2"],
}


def corpus() -> list[str]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [str(stdlib / p) for p in QUICK_PACKAGES if (stdlib / p).is_dir()]


class Run:
    """One scenario: a federation started, supervised through a schedule, stopped, checked."""

    def __init__(self, out: Path, scenario: str, args: argparse.Namespace):
        self.out, self.scenario, self.args = out, scenario, args
        self.rng = random.Random(f"{args.seed}-{scenario}")
        self.netns = scenario in NETNS_SCENARIOS
        self.run_id = uuid.uuid4().hex
        for sub in ("keys", "configs", "state", "logs"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                    RUN_ENV: self.run_id,
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        self.env.pop("ARCHIPELAGO_FAULT", None)
        self.daemons: dict[str, Daemon] = {}
        self.events: list[dict[str, Any]] = []  # what the harness did, for the report
        self.sockets_seen: set[Path] = set()  # socket files this run's processes held
        self.sockets_of_killed: set[Path] = set()  # ... those of a root killed since
        self.last_scan = 0.0

    def path(self, *parts: str) -> str:
        return str(self.out.joinpath(*parts))

    # ------------------------------------------------------------------ configuration

    def prepare(self) -> None:
        from aggregator.config import AggregatorConfig, MergeConfig, ModelConfig
        from comms.config import save_config
        from comms.identity import Identity, Roster
        from island.config import IslandConfig, OptimConfig, SnapshotConfig
        from island.sync import SyncConfig

        a = self.args
        roster = Roster()
        self.peer_ids = {}
        for name in [f"island{i}" for i in range(N_ISLANDS)] + ["reader"]:
            ident = Identity.load_or_create(self.path("keys", f"{name}.pem"))
            roster.add(ident.public_key, "island", name)
            self.peer_ids[name] = ident.peer_id
        for name in ("root", *LEAVES):
            roster.add(Identity.load_or_create(self.path("keys", f"{name}.pem")).public_key,
                       "aggregator", name)  # fmt: skip
        roster.save(self.path("roster.json"))
        self.reader = Identity.load(self.path("keys", "reader.pem"))
        ports = free_ports(2 + 2 * len(LEAVES) + N_ISLANDS)
        self.root_addr, root_http = f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"
        # in namespaces: aggregators in the hub (this thread's namespace), each island behind
        # its link, dialling the hub's end of it
        listen = "0.0.0.0" if self.netns else "127.0.0.1"

        def leaf_for(i: int, port: int) -> str:
            from comms import netns

            return f"{netns.hub_address(i) if self.netns else '127.0.0.1'}:{port}"

        def island_http(i: int) -> str:
            from comms import netns

            host = netns.island_address(i) if self.netns else "127.0.0.1"
            return f"{'0.0.0.0' if self.netns else host}:{ports[2 + 2 * len(LEAVES) + i]}", host

        model = self.model()

        def island_cfg(i: int, leaf: str) -> IslandConfig:
            return IslandConfig(
                name=f"island{i}", key=self.path("keys", f"island{i}.pem"),
                roster=self.path("roster.json"), aggregator=leaf, workload="bytelm",
                workload_config=model, seed=a.seed, shard=i, num_shards=N_ISLANDS, steps=a.steps,
                threads=1, eval_batches=2, slowdown=a.slowdown, http=island_http(i)[0],
                metrics_file=self.path("state", f"island{i}", "metrics.jsonl"),
                optim=OptimConfig(lr=3e-3, warmup_steps=20),
                sync=SyncConfig(model_id=MODEL_ID, every=a.every, codec="int8", mode=a.mode),
                snapshot=SnapshotConfig(dir=self.path("state", f"island{i}")),
            )  # fmt: skip

        init = self.path("init.safetensors")
        save_config(island_cfg(0, "127.0.0.1:1"), self.path("configs", "init.toml"))
        child = self._spawn("init", [sys.executable, "-m", "island", "init",
                                     self.path("configs", "init.toml"), "--out", init], "")  # fmt: skip
        child.finish(300)

        def agg(name: str, role: str, listen: str, http: str, k: int, **kw: Any) -> str:
            cfg = AggregatorConfig(
                name=name, role=role, listen=listen, http=http,
                key=self.path("keys", f"{name}.pem"), roster=self.path("roster.json"),
                state_dir=self.path("state", name), push_deadline_s=10.0,
                merge=MergeConfig(buffer_k=k, deadline_s=a.deadline), **kw,
            )  # fmt: skip
            save_config(cfg, self.path("configs", f"{name}.toml"))
            return self.path("configs", f"{name}.toml")

        serve = [sys.executable, "-m", "aggregator", "serve"]
        root_listen = f"{listen}:{ports[0]}"
        root_cfg = agg("root", "root", root_listen, root_http, N_ISLANDS, dht=a.dht,
                       models=[ModelConfig(MODEL_ID, init=init)])  # fmt: skip
        self._add(Daemon("root", "root", [*serve, root_cfg], "serving on", http=root_http))
        self.leaf_addr = {}
        for j, leaf in enumerate(LEAVES):
            addr, http = f"127.0.0.1:{ports[2 + 2 * j]}", f"127.0.0.1:{ports[3 + 2 * j]}"
            self.leaf_addr[leaf] = addr
            cfg = agg(leaf, "leaf", f"{listen}:{ports[2 + 2 * j]}", http, N_ISLANDS // len(LEAVES),
                      parent=self.root_addr,
                      models=[ModelConfig(MODEL_ID)])  # fmt: skip
            self._add(Daemon(leaf, "leaf", [*serve, cfg], "serving on", http=http))
        for i in range(N_ISLANDS):
            leaf_port = int(self.leaf_addr[LEAVES[i % len(LEAVES)]].rpartition(":")[2])
            cfg = island_cfg(i, leaf_for(i, leaf_port))
            save_config(cfg, self.path("configs", f"island{i}.toml"))
            argv = [sys.executable, "-m", "island", "run", self.path("configs", f"island{i}.toml")]
            if self.netns:
                from comms import netns

                argv = netns.exec_argv(f"isl{i}", argv, prefix=NETNS_PREFIX)
            http = f"{island_http(i)[1]}:{cfg.http.rpartition(':')[2]}"
            self._add(Daemon(f"island{i}", "island", argv, "training", http=http))
        if self.scenario == "aimed":
            for name, faults in (AIMED_FAST if self.args.aimed_set == "fast" else AIMED).items():
                self.daemons[name].faults = list(faults)

    def model(self) -> dict[str, Any]:
        return dict(SMALL_MODEL if self.args.small else MODEL, data=corpus())

    def _add(self, d: Daemon) -> None:
        self.daemons[d.name] = d

    def _spawn(self, name: str, argv: list[str], fault: str) -> Child:
        env = dict(self.env)
        if fault:
            env["ARCHIPELAGO_FAULT"] = fault
        death = signal.SIGKILL if name.startswith("island") else signal.SIGTERM
        return Child(name, argv, Path(self.path("logs", f"{name}.log")), env, REPO, death)

    # ------------------------------------------------------------------ supervision

    def start(self, d: Daemon) -> None:
        fault = d.faults.pop(0) if d.faults else ""
        if d.role == "root":
            d.log_offset = file_size(self.path("logs", "root.log"))
        d.child = self._spawn(d.name, d.argv, fault)
        d.runs.append(Incarnation(time.monotonic(), time.time(), fault))
        d.restart_at = None

    def kill(self, d: Daemon, how: str = "kill") -> bool:
        if not d.running:
            return False
        d.runs[-1].killed = how
        if d.role == "root":
            self.sockets_of_killed |= run_sockets(self.run_id)
        self._note_step(d)
        with contextlib.suppress(ProcessLookupError):
            os.kill(d.child.proc.pid, signal.SIGKILL)
        self.events.append({"t": round(self.now(), 2), "kill": d.name})
        return True

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _note_step(self, d: Daemon) -> None:
        if d.role == "island" and d.running:
            with contextlib.suppress(Exception):
                d.runs[-1].last_step = max(d.runs[-1].last_step,
                                           int(http_json(d.http, "/status", 0.5).get("step", 0)))  # fmt: skip

    def supervise_once(self) -> None:
        """Reap dead daemons (and their process groups), restart them, note readiness."""
        now = time.monotonic()
        self.scan_sockets()
        for d in self.daemons.values():
            if d.child is None or d.done:
                continue
            run = d.runs[-1]
            rc = d.child.proc.poll()
            if rc is not None and run.end is None:
                run.end, run.rc = now, rc
                # systemd (KillMode=control-group) or a pod restart: nothing of it survives
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(d.child.proc.pid, signal.SIGKILL)
                if d.role == "root" and rc == -signal.SIGKILL:  # what the dead root held
                    self.sockets_of_killed |= self.sockets_seen
                if d.role == "island" and rc == 0:
                    d.done = True
                    continue
                if not run.killed and rc != -signal.SIGKILL:
                    self.events.append({"t": round(self.now(), 2), "exit": d.name, "rc": rc,
                                        "log": str(d.child.log_path)})  # fmt: skip
                if run.fault and rc == -signal.SIGKILL:
                    self.events.append({"t": round(self.now(), 2), "fault": run.fault,
                                        "daemon": d.name})  # fmt: skip
                d.restart_at = now + self.args.restart_delay
            if d.restart_at is not None and now >= d.restart_at:
                self.start(d)
                continue
            if run.ready is None and any(d.ready_line in x for x in list(d.child.stdout)):
                run.ready = now
                if d.role == "island":
                    run.resumed_step = resumed_step(d.child.log_path)
            if (run.first_progress is None or run.first_ack is None) and len(d.runs) > 1:
                self._progress(d, run)
            if d.role == "island" and run.ready is not None and d.running and now % 2 < 0.1:
                self._note_step(d)

    def scan_sockets(self) -> None:
        if time.monotonic() - self.last_scan > 2.0:
            self.last_scan = time.monotonic()
            self.sockets_seen |= run_sockets(self.run_id)

    def _progress(self, d: Daemon, run: Incarnation) -> None:
        if d.role == "island":
            acks = checks.read_jsonl(Path(self.path("state", d.name, "acks.jsonl")))
            note_island_progress(run, acks, time.monotonic())
        elif d.role == "root":
            with open(self.path("logs", "root.log"), "rb") as f:
                f.seek(d.log_offset)
                published = checks.read_published_text(f.read().decode(errors="replace"), MODEL_ID)
            note_root_progress(run, published, time.monotonic())

    def schedule(self) -> list[tuple[float, str, str]]:
        """(time, action, daemon) of this scenario's faults, from its seed."""
        a, out = self.args, []
        if self.scenario in ("kills", "aimed"):
            roles = ["island"] * 2 + ["leaf", "root"]
            n = a.kills if self.scenario == "kills" else a.aimed_random_kills
            span = a.kill_span
            times = sorted(self.rng.uniform(a.kill_start, a.kill_start + span) for _ in range(n))
            for t in times:
                role = self.rng.choice(roles)
                names = [d.name for d in self.daemons.values() if d.role == role]
                out.append((t, "kill", self.rng.choice(names)))
        if self.scenario == "freeze":
            out.append((a.kill_start, "stop", "leaf0"))
            out.append((a.kill_start + a.freeze_s, "cont", "leaf0"))
        if self.scenario == "cut":
            out.append((a.kill_start, "cut", "island0"))
            out.append((a.kill_start + a.freeze_s, "mend", "island0"))
        return out

    def play(self) -> None:
        self.t0 = time.monotonic()
        for names in (["root"], LEAVES):  # a leaf starts from its parent's current version
            for name in names:
                self.start(self.daemons[name])
            for name in names:
                self.daemons[name].child.wait_line("serving on", 120)
                self.daemons[name].runs[-1].ready = time.monotonic()
        islands = [d for d in self.daemons.values() if d.role == "island"]
        for d in islands:
            self.start(d)
        ready_by = time.monotonic() + 300
        while not all(d.runs[-1].ready for d in islands):  # faults are timed from here
            if time.monotonic() > ready_by:
                raise FederationError(f"{self.scenario}: islands not training after 300 s")
            self.supervise_once()
            time.sleep(0.1)
        self.t0 = time.monotonic()
        plan = self.schedule()
        deadline = self.t0 + self.args.timeout
        while not all(d.done for d in self.daemons.values() if d.role == "island"):
            if time.monotonic() > deadline:
                raise FederationError(
                    f"{self.scenario}: islands not done after {self.args.timeout} s"
                )
            self.supervise_once()
            while plan and self.now() >= plan[0][0]:
                t, action, name = plan[0]
                d = self.daemons[name]
                if action == "kill":
                    if d.done:  # a finished island: kill another daemon of the federation
                        alive = [x for x in self.daemons.values() if x.running and x.runs[-1].ready]
                        if not alive:
                            break
                        d = self.rng.choice(alive)
                    if not (d.running and d.runs[-1].ready):
                        plan[0] = (t + 1.0, action, name)  # restarting: try again shortly
                        plan.sort()
                        break
                    self.kill(d)
                elif action == "stop":
                    os.killpg(d.child.proc.pid, signal.SIGSTOP)
                    self.events.append({"t": round(self.now(), 2), "sigstop": d.name})
                elif action == "cont":
                    os.killpg(d.child.proc.pid, signal.SIGCONT)
                    self.events.append(
                        {"t": round(self.now(), 2), "sigcont": d.name, "wall": time.time()}
                    )
                elif action in ("cut", "mend"):
                    from comms import netns

                    netns.cut(int(name[6:]), NETNS_PREFIX, restore=action == "mend")
                    self.events.append(
                        {"t": round(self.now(), 2), action: name, "wall": time.time()}
                    )
                plan.pop(0)
            time.sleep(0.1)
        self.train_seconds = self.now()

    def wait_quiet(self, timeout: float = 90.0) -> None:
        """Until no aggregator buffers or sends anything and the root's version stops moving,
        restarting any daemon that is still down."""
        deadline, last, calm = time.monotonic() + timeout, None, 0
        while time.monotonic() < deadline:
            self.supervise_once()
            try:
                states = [http_json(self.daemons[n].http, "/status") for n in ("root", *LEAVES)]
            except Exception:
                time.sleep(0.5)
                continue
            busy = any(s["outbox"] or s["models"][MODEL_ID]["buffered"] for s in states)
            version = states[0]["models"][MODEL_ID]["version"]
            lagging = any(s["models"][MODEL_ID]["version"] != version for s in states[1:])
            calm = calm + 1 if (not busy and not lagging and version == last) else 0
            if calm >= 3:
                return
            last = version
            time.sleep(1.0)
        raise FederationError(f"{self.scenario}: the tree did not settle in {timeout:.0f} s")

    def live_replicas(self) -> list[tuple[str, int, str]]:
        """Each aggregator's current theta through a signed Fetch: (name, version, digest)."""
        addresses = [("root", self.root_addr), *self.leaf_addr.items()]
        return checks.read_live_replicas(addresses, MODEL_ID, self.reader)

    def stop_all(self) -> None:
        for name in ("island0", "island1", "island2", "island3", *LEAVES, "root"):
            d = self.daemons.get(name)
            if d is not None and d.child is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(d.child.proc.pid, signal.SIGCONT)
                d.child.stop(20.0)

    # ------------------------------------------------------------------ the scenario

    def execute(self, reference: dict[str, Any] | None) -> dict[str, Any]:
        t_start = time.perf_counter()
        self.prepare()
        try:
            self.play()
            self.wait_quiet()
            replicas = self.live_replicas()
        finally:
            self.stop_all()
        time.sleep(1.0)
        result = run_result(self, replicas, reference)
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        return result

    def evaluate(self, theta: dict) -> float:
        from island.pseudo import load_numpy_into
        from island.workloads import get_workload

        workload = get_workload("bytelm", **self.model())
        model = workload.build_model(self.args.seed)
        load_numpy_into(model, theta)
        return float(workload.validation_loss(model, max_batches=self.args.eval_batches))


# --------------------------------------------------------------------------- helpers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Kill, freeze and check a small federation.")
    p.add_argument("--scenarios", default="baseline,kills,aimed,freeze")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300, help="inner steps per island")
    p.add_argument("--every", type=int, default=20, help="H: inner steps per round")
    p.add_argument("--mode", choices=("sync", "overlapped"), default="sync",
                   help="islands' sync mode (sync: a version merges one round of all four, so "
                   "runs with the same seed are comparable)")  # fmt: skip
    p.add_argument("--slowdown", type=float, default=1.0, help="islands compute this much slower")
    p.add_argument("--small", action="store_true", help="the 22 k-parameter bytelm")
    p.add_argument("--deadline", type=float, default=2.0, help="aggregators' merge deadline")
    p.add_argument("--kills", type=int, default=16, help="random kills in 'kills'")
    p.add_argument("--aimed-random-kills", type=int, default=4)
    p.add_argument("--aimed-set", choices=("all", "fast"), default="all",
                   help="fast: three fault points (island, leaf, root) for the test suite")  # fmt: skip
    p.add_argument("--kill-start", type=float, default=5.0, help="first fault, s after start")
    p.add_argument("--kill-span", type=float, default=90.0, help="faults spread over this")
    p.add_argument("--freeze-s", type=float, default=30.0)
    p.add_argument("--restart-delay", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--loss-tolerance", type=float, default=0.03)
    p.add_argument("--no-dht", dest="dht", action="store_false", help="root without a DHT")
    p.add_argument("--out", default="runs/chaos")
    p.add_argument("--json", default="", help="write the results here too")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # one scenario, result here
    p.add_argument("--reference-loss", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def run_scenario(scenario: str, args: argparse.Namespace, reference: dict | None) -> dict:
    """One scenario in this process; a network-namespace scenario first builds the islands'
    links and moves this thread (and so the aggregators it starts) into the hub namespace."""
    run_dir = Path(args.out).resolve() / f"{scenario}-s{args.seed}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    if scenario not in NETNS_SCENARIOS:
        return Run(run_dir, scenario, args).execute(reference)
    from comms import netns
    from comms.errors import CommsError, ConfigError

    try:
        if os.geteuid() != 0:
            raise ConfigError("network namespaces need root")
        netns.require_tools()
        cfg = netns.up(N_ISLANDS, prefix=NETNS_PREFIX, **NETNS_SCENARIOS[scenario])
    except (ConfigError, CommsError, OSError) as e:
        return {"scenario": scenario, "seed": args.seed, "not_run": str(e)}
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        setns(f"/run/netns/{cfg.hub}")
        result = Run(run_dir, scenario, args).execute(reference)
        result["links"] = {**NETNS_SCENARIOS[scenario], "backend": cfg.backend}
        return result
    finally:
        setns(own)
        os.close(own)
        netns.down(NETNS_PREFIX)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        print(f"chaos: unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
        return 2
    if args.one:  # one scenario in a fresh process (its own gRPC threads and namespace)
        reference = {"loss": args.reference_loss} if args.reference_loss else None
        result = run_scenario(scenarios[0], args, reference)
        Path(args.one).write_text(json.dumps(result))
        return 0
    results, reference = [], None
    for scenario in scenarios:
        print(f"chaos {scenario}-s{args.seed}: {N_ISLANDS} islands x {args.steps} steps, "
              f"H = {args.every}", flush=True)  # fmt: skip
        result = one_process(
            __file__, scenario, argv if argv is not None else sys.argv[1:], reference
        )
        if scenario == "baseline" and "loss" in result:
            reference = result
        results.append(result)
        print("  " + json.dumps({k: v for k, v in result.items() if k != "events"}), flush=True)
    table = print_table(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "table": table,
                                               "results": results}, indent=1))  # fmt: skip
    return 0 if all(r.get("passed", True) for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
