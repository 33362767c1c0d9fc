"""The main job: one command runs a whole local federation and ends with a report.

    python scripts/federation.py [--quick] [--islands N] [--workload bytelm|flow]
                                 [--experts-workload flow|bytelm] [--data PATH] [--out DIR]
                                 [--netns] [--tls]

Every participant is a separate OS process started through its own command line with a
generated TOML config and Ed25519 key, exactly as on separate machines:

- ``aggregator serve``: a root that also hosts the DHT bootstrap (``dht = true``), and two
  leaves that join that DHT and find the root there;
- ``island run``: N islands, each pushing to its leaf over a shaped link (the in-process token
  bucket, default 10 Mbit/s and 50 ms; with ``--netns`` each island runs in its own network
  namespace behind a ``tc``-shaped link instead, ``comms.netns``);
- ``router partition / train / serve / eval`` for the expert phase and the ensemble.

With ``--tls`` every gRPC link of the run (island to leaf, leaf to root, the launcher's own
reads of the root) is mutual TLS: ``aggregator tls init`` writes a CA and a certificate per
aggregator and island into OUT/run/tls, and each daemon's config gets its ``[tls]`` section.

Phases: (1) local-update: N islands train one model (``--workload``, default bytelm) with
overlapped, staleness-aware sync (DiLoCo, Douillard et al. 2023; CO2, Sun et al. 2024), one
island ``slowdown`` times slower so staleness is real; (2) experts (``--experts-workload``,
default flow, the digits: Decentralized Diffusion Models' setting, McAllister et al. 2025,
where the experts beat the monolith; bytelm's lose to it at this size): the data is
clustered into N partitions (c-BTM, Gururangan et al. 2023), N islands each train an expert
alone, the router is trained, and a monolith is trained on all data with the same total FLOPs
(one more expert-mode island on a one-cluster partition; flow: the monolith's batch split
across the experts by cluster size, as in DDM). Experts of phase 1's workload and their
monolith branch from its global model (``expert.init``; Branch-Train-Merge's seed phase);
others start from their workload's theta_0; (3) ensemble: the ensemble is served and queried
through ``router.Client`` and evaluated against the monolith: flow samples every method from
the same noise and scores it by Frechet distance (``federation_experts``); bytelm completes
prompts cut from the run's held-out text; then ``router distill`` trains one dense student of
the experts' size on the top-2 ensemble's outputs (the DDM paper's way to serve one model),
scored the same way with its compute. The report (``federation_report``) is written to
OUT/report.{md,html,json}.

Processes: each child runs in its own process group with ``PR_SET_PDEATHSIG`` = SIGTERM, so
children die with the launcher even after ``kill -9``; at the end, on Ctrl+C or SIGTERM, they
are stopped islands first, then leaves, then the root (SIGTERM, then SIGKILL after a grace
period). ``OUT/processes.json`` lists every child's pid as it starts.

Concurrency: the main thread starts every child (PDEATHSIG follows the thread that forked)
and drives the phases; one reader thread per child copies its stdout into its log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from federation_plan import ExpertsPlan, make_plan
from federation_procs import Child, FederationError, Supervisor, tail
from federation_report import Progress, phase_summary, write_report

from aggregator.config import PARTIAL_STEPS, AggregatorConfig, MergeConfig, ModelConfig
from comms.config import save_config
from comms.identity import Identity, Roster
from comms.tls import CA_CERT_FILE, TLSConfig, material_paths
from island.config import ExpertConfig, IslandConfig, LinkConfig, OptimConfig, SnapshotConfig
from island.sync import SyncConfig
from router.cli import (
    DistillSection,
    EvalSection,
    PartitionSection,
    RouterConfig,
    RouterSection,
    WorkloadSection,
)
from router.server import LimitsConfig, ServeConfig

REPO = Path(__file__).resolve().parents[1]
MARKER = ".federation"
NETNS_PREFIX = "fed"
GLOBAL_CURVE_POINTS = 16  # versions of the global model evaluated for the report
MODEL_ID = "global"


# --------------------------------------------------------------------------- the federation


class Federation:
    def __init__(self, args: argparse.Namespace):
        self.args, self.n = args, args.islands
        self.out = Path(args.out).resolve()
        self.run_dir = self.out / "run"
        data = [str(Path(args.data).resolve())] if args.data else []
        self.plan = make_plan(args.workload, args.quick, data, args.experts_workload)
        self.sup = Supervisor(self.out, REPO, NETNS_PREFIX)
        self.facts: dict[str, Any] = {
            "islands": self.n,
            "workload": args.workload,
            "experts_workload": args.experts_workload,
            "quick": args.quick,
            "tls": args.tls,
        }
        self.agg_http: dict[str, str] = {}

    def path(self, *parts: str) -> str:
        return str(self.run_dir.joinpath(*parts))

    # ------------------------------------------------------------------ setup

    def prepare(self) -> None:
        prepare_out_dir(self.out)
        for sub in ("keys", "configs", "metrics", "state", "experts"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        roster = Roster()
        names = [f"island{i}" for i in range(self.n)] + ["monolith"]
        for name in names:
            roster.add(
                Identity.load_or_create(self.path("keys", f"{name}.pem")).public_key, "island", name
            )
        for name in ("root", "leaf0", "leaf1"):
            roster.add(
                Identity.load_or_create(self.path("keys", f"{name}.pem")).public_key,
                "aggregator",
                name,
            )
        roster.add(
            Identity.load_or_create(self.path("keys", "router.pem")).public_key, "admin", "router"
        )
        roster.save(self.path("roster.json"))
        if self.args.tls:
            self.make_tls()
        if self.args.netns:
            from comms import netns

            cfg = netns.up(
                self.n, self.plan.rate_mbit * 1e6, self.plan.latency_ms / 1e3, prefix=NETNS_PREFIX
            )
            print(f"netns: {self.n} links up ({cfg.backend}), {self.plan.rate_mbit:g} Mbit/s, "
                  f"{self.plan.latency_ms:g} ms", flush=True)  # fmt: skip

    def make_tls(self) -> None:
        """A CA and a pair per aggregator and island, through ``aggregator tls init``."""
        hosts = ["127.0.0.1", "localhost"]
        if self.args.netns:  # islands dial the hub's address on their link; leaves 0.0.0.0
            from comms import netns

            hosts += ["0.0.0.0", *(netns.hub_address(i) for i in range(self.n))]
        names = ("root", "leaf0", "leaf1", "router")  # router: router serve's HTTPS
        daemons = [f"--daemon={name}={','.join(hosts)}" for name in names]
        islands = [f"--island=island{i}" for i in range(self.n)] + ["--island=client"]
        self.sup.run("tls-init", "aggregator", "tls", "init", self.path("tls"),
                     "--ca-name", "federation.py CA", *daemons, *islands, timeout=60)  # fmt: skip

    def tls(self, name: str) -> TLSConfig:
        """Daemon ``name``'s [tls] section: mutual TLS with the run's CA (empty without --tls)."""
        if not self.args.tls:
            return TLSConfig()
        cert, key = material_paths(self.path("tls"), name)
        ca = self.path("tls", CA_CERT_FILE)
        return TLSConfig(cert=str(cert), key=str(key), ca=ca, mutual=True)

    def client_tls(self) -> dict[str, str]:
        """``router.Client``'s TLS arguments for the launcher's queries to router serve: the
        run's CA and the client certificate ``client`` (none without --tls)."""
        tls = self.tls("client")
        return {"ca": tls.ca, "cert": tls.cert, "key": tls.key} if tls.enabled else {}

    def island_config(self, i: int, **overrides: Any) -> IslandConfig:
        p = self.plan
        slow = i == self.n - 1 and self.n > 1
        cfg = IslandConfig(
            name=f"island{i}", key=self.path("keys", f"island{i}.pem"), roster=self.path("roster.json"),
            workload=p.workload, workload_config=p.model, seed=0, shard=i, num_shards=self.n,
            steps=round(p.steps / p.slowdown) if slow else p.steps, threads=1,
            slowdown=p.slowdown if slow else 1.0, eval_batches=p.eval_batches,
            http="" if self.args.netns else "127.0.0.1:0",
            metrics_file=self.path("metrics", f"island{i}.jsonl"),
            optim=OptimConfig(lr=p.lr, warmup_steps=p.warmup),
            sync=SyncConfig(model_id=MODEL_ID, every=p.every, codec=p.codec),
            link=LinkConfig() if self.args.netns else LinkConfig(p.rate_mbit, p.latency_ms),
            snapshot=SnapshotConfig(dir=self.path("state", f"island{i}")),
            tls=self.tls(f"island{i}"),
        )  # fmt: skip
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg

    def start_aggregators(self) -> None:
        """The root (with the DHT bootstrap), then two leaves that find it through the DHT."""
        t0 = time.perf_counter()
        init = self.path("init.safetensors")
        # theta_0 depends only on the workload and the seed; the address is never dialled
        save_config(
            self.island_config(0, aggregator="127.0.0.1:1"), self.path("configs", "init.toml")
        )
        self.sup.run(
            "init", "island", "init", self.path("configs", "init.toml"), "--out", init, timeout=120
        )
        listen = "0.0.0.0:0" if self.args.netns else "127.0.0.1:0"
        ns = "hub" if self.args.netns else ""
        per_leaf = math.ceil(self.n / 2)

        def config(name: str, role: str, **kw: Any) -> str:
            cfg = AggregatorConfig(
                name=name, role=role, listen=listen, key=self.path("keys", f"{name}.pem"),
                roster=self.path("roster.json"), state_dir=self.path("state", name),
                merge=MergeConfig(buffer_k=self.n if role == "root" else per_leaf, deadline_s=self.plan.deadline_s,
                                  partial_step=self.args.partial_step),
                tls=self.tls(name), **kw,
            )  # fmt: skip
            save_config(cfg, self.path("configs", f"{name}.toml"))
            return self.path("configs", f"{name}.toml")

        root_cfg = config(
            "root",
            "root",
            dht=True,
            models=[
                ModelConfig(
                    MODEL_ID, init=init, outer=self.plan.outer, outer_params=self.plan.outer_params
                )
            ],
        )
        root = self.sup.start("root", "aggregator", "serve", root_cfg, namespace=ns)
        line = root.wait_line("serving on", 120)
        self.root_address = line.split("serving on ")[1].split()[0]
        self.agg_http["root"] = line.split(" http ")[1].split()[0]
        bootstrap = line.split(" dht ")[1].split(",")
        leaves = []
        for name in ("leaf0", "leaf1"):
            cfg = config(
                name,
                "leaf",
                dht=True,
                dht_peers=bootstrap,
                fan_in=per_leaf,
                models=[ModelConfig(MODEL_ID)],
            )
            leaves.append(self.sup.start(name, "aggregator", "serve", cfg, namespace=ns))
        self.leaf_ports = []
        for leaf in leaves:
            line = leaf.wait_line("serving on", 120)
            self.leaf_ports.append(int(line.split("serving on ")[1].split()[0].rpartition(":")[2]))
            self.agg_http[leaf.name] = line.split(" http ")[1].split()[0]
        print(f"aggregators: root {self.root_address} (DHT bootstrap {bootstrap[0]}), leaves on "
              f"ports {self.leaf_ports} found the root through the DHT"
              f"{', all over mutual TLS' if self.args.tls else ''} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip
        print(dashboard_line(self.agg_http["root"], self.args.netns), flush=True)

    # ------------------------------------------------------------------ phase 1

    def local_update(self) -> None:
        t0 = time.perf_counter()
        from comms import netns

        configs = []
        for i in range(self.n):
            host = netns.hub_address(i) if self.args.netns else "127.0.0.1"
            cfg = self.island_config(i, aggregator=f"{host}:{self.leaf_ports[i % 2]}")
            save_config(cfg, self.path("configs", f"island{i}.toml"))
            configs.append(cfg)
        link = "netns tc" if self.args.netns else "in-process shaper"
        print(f"\n[1/3] local-update: {self.n} islands train one {self.plan.workload} model "
              f"(H={self.plan.every}, int8 pushes, {self.plan.rate_mbit:g} Mbit/s {self.plan.latency_ms:g} ms "
              f"links via {link}; island{self.n - 1} {self.plan.slowdown:g}x slower)", flush=True)  # fmt: skip
        islands = [
            self.sup.start(c.name, "island", "run", self.path("configs", f"{c.name}.toml"),
                           namespace=f"isl{i}" if self.args.netns else "", death_signal=signal.SIGKILL)
            for i, c in enumerate(configs)
        ]  # fmt: skip
        t0_mono, wall_start = time.monotonic(), time.time()
        for child in islands:
            child.wait_line("training", 300)
        watch(
            islands,
            [c.metrics_file for c in configs],
            sum(c.steps for c in configs),
            "local-update",
        )
        for child in islands:
            child.finish(600)
        self.facts["local_update"] = {
            "island_configs": [{"name": c.name, "steps": c.steps, "slowdown": c.slowdown} for c in configs],
            "summaries": [c.json_summary() for c in islands],
            "records": {c.name: read_jsonl(c.metrics_file) for c in configs},
            # every push each island saw answered (island.sync.pushes): its contribution
            "acks": {c.name: read_jsonl(str(Path(c.snapshot.dir) / "acks.jsonl")) for c in configs},
            "logs": {c.name: str(c.log_path) for c in islands},
            "started_at": {c.name: c.ready_at - t0_mono for c in islands},
            "wall_start": wall_start,
            "root_log": str(self.out / "logs" / "root.log"),
            "outer": {"outer": self.plan.outer, **self.plan.outer_params},
            "link": {"rate_mbit": self.plan.rate_mbit, "latency_ms": self.plan.latency_ms, "shaper": link},
            "every": self.plan.every,
            "seconds": time.perf_counter() - t0,
        }  # fmt: skip

    def finish_local_update(self) -> None:
        """Evaluate theta_0 and the root's final model; print the phase's summary line."""
        t0 = time.perf_counter()
        self.facts["local_update"]["global"] = self.evaluate_global()
        self.facts["local_update"]["seconds"] += time.perf_counter() - t0
        print(phase_summary(self.facts, "local_update"), flush=True)

    def evaluate_global(self) -> dict[str, Any]:
        """theta_0's and the root's final validation loss (in the hub namespace with --netns)."""
        args = [json.dumps(self.agg_http), self.root_address, self.path("configs", "island0.toml"),
                self.path("init.safetensors"), self.path("global.json")]  # fmt: skip
        if self.args.netns:
            from comms import netns

            argv = netns.exec_argv(
                "hub", [sys.executable, __file__, "--eval-global", *args], NETNS_PREFIX
            )
            subprocess.run(argv, check=True, timeout=300, env=self.sup.env, cwd=REPO)
        else:
            eval_global(*args, timeout=60 + 4 * self.plan.deadline_s)
        return json.loads(Path(self.path("global.json")).read_text())

    # ------------------------------------------------------------------ phase 2

    def router_config(self, k: int, name: str) -> str:
        ex = self.plan.experts
        experts = [self.path("experts", f"expert{i}") for i in range(self.n)]
        cfg = RouterConfig(
            workload=WorkloadSection(ex.workload, ex.model),
            partition=PartitionSection(dir=self.path(name), k=k, **ex.partition),
            router=RouterSection(dir=self.path("router"), config=ex.router_model,
                                 expert_ids=[f"expert{i}" for i in range(k)], steps=ex.router_steps,
                                 batch_size=ex.router_batch, lr=ex.router_lr, eval_samples=512,
                                 key=self.path("keys", "router.pem")),
            eval=EvalSection(experts=experts, monolith=self.path("experts", "monolith"),
                             max_batches=ex.eval_batches, output=self.path("eval.json")),
            distill=DistillSection(rule=ex.distill_rule, steps=max(1, ex.distill_steps),
                                   batch_size=max(1, ex.distill_batch), lr=ex.distill_lr,
                                   output=self.path("experts", "student"),
                                   key=self.path("keys", "router.pem")),
        )  # fmt: skip
        path = self.path("configs", f"{name}.toml")
        save_config(cfg, path)
        return path

    def start_partitions(self) -> None:
        """Cluster the corpus (K = islands, and K = 1 for the monolith) in the background: it
        needs nothing from the federation, so it overlaps the aggregators' start."""
        configs = [self.router_config(self.n, "partition"), self.router_config(1, "partition_all")]
        runs = [
            self.sup.start(f"partition{k}", "router", "partition", c) for k, c in enumerate(configs)
        ]
        self.partitions = (configs, runs)

    def expert_batches(self) -> list[int]:
        """Each expert's batch: its cluster's share of the monolith's (flow), else the model's."""
        from safetensors.numpy import load_file

        ex = self.plan.experts
        if not ex.batch:
            return [ex.model["batch_size"]] * (self.n + 1)
        from ensemble_training import split_batch

        labels = load_file(str(Path(self.path("partition")) / "partition.safetensors"))["labels"]
        return [*split_batch(ex.batch, np.bincount(labels, minlength=self.n)), ex.batch]

    def experts(self) -> None:
        t0 = time.perf_counter()
        ex = self.plan.experts
        partitions, runs = self.partitions
        for child in runs:
            child.finish(600)
        router = self.sup.start("router-train", "router", "train", partitions[0])
        self.finish_local_update()  # writes the global model, which the experts may branch from
        # experts of phase 1's workload branch from its global model (Branch-Train-Merge's
        # seed phase); others start from their workload's theta_0 (seed 0)
        branch = ex.workload == self.plan.workload
        seed = self.path("global.safetensors") if branch else ""
        batches = self.expert_batches()
        mono_steps = ex.steps if ex.batch else ex.steps * self.n
        configs = []
        for i in range(self.n + 1):
            mono = i == self.n
            name = "monolith" if mono else f"expert{i}"
            cfg = self.island_config(
                0, name=name, mode="expert", key=self.path("keys", f"{'monolith' if mono else f'island{i}'}.pem"),
                workload=ex.workload, workload_config={**ex.model, "batch_size": batches[i]},
                optim=ex.optim, eval_batches=ex.eval_batches,
                steps=mono_steps if mono else ex.steps, slowdown=1.0, shard=0, num_shards=1,
                metrics_file=self.path("metrics", f"{name}.jsonl"), snapshot=SnapshotConfig(),
                expert=ExpertConfig(partition=self.path("partition_all" if mono else "partition"),
                                    cluster=0 if mono else i, output=self.path("experts", name), expert_id=name,
                                    init=seed), tls=TLSConfig(),  # trains alone: no gRPC link
            )  # fmt: skip
            cfg.snapshot.every_steps = max(10, cfg.steps // 8)
            save_config(cfg, self.path("configs", f"{name}.toml"))
            configs.append(cfg)
        children = [
            self.sup.start(
                c.name,
                "island",
                "run",
                self.path("configs", f"{c.name}.toml"),
                death_signal=signal.SIGKILL,
            )
            for c in configs
        ]
        origin = (
            "all branched from the global model" if branch else f"all from {ex.workload}'s theta_0"
        )
        print(f"\n[2/3] experts ({ex.workload}): {self.n} clusters, {self.n} experts of {ex.steps} "
              f"steps in isolation at batches {batches[:-1]}, a router, and a monolith of "
              f"{mono_steps} steps at batch {batches[-1]} on all data (the same FLOPs), {origin}",
              flush=True)  # fmt: skip
        for line in runs[0].stdout:
            if line.startswith("cluster "):
                print(f"  {line}", flush=True)
        watch(children, [c.metrics_file for c in configs], sum(c.steps for c in configs), "experts")
        for child in [*children, router]:
            child.finish(900)
        from safetensors.numpy import load_file

        labels = load_file(str(Path(self.path("partition")) / "partition.safetensors"))["labels"]
        manifest = json.loads((Path(self.path("router")) / "manifest.json").read_text())
        self.facts["experts"] = {
            "workload": ex.workload,
            "model": {k: v for k, v in ex.model.items() if k != "data"},
            "branched": branch,
            "batches": {c.name: b for c, b in zip(configs, batches, strict=True)},
            "cluster_sizes": [int(x) for x in np.bincount(labels, minlength=self.n)],
            "partition_report": [ln for ln in runs[0].stdout if ln.startswith("cluster ")],
            "router": manifest.get("extra", {}),
            "steps": {c.name: c.steps for c in configs},
            "records": {c.name: read_jsonl(c.metrics_file) for c in configs},
            "summaries": {c.name: ch.json_summary() for c, ch in zip(configs, children, strict=True)},
            "seconds": time.perf_counter() - t0,
        }  # fmt: skip
        self.router_config_path = partitions[0]
        print(phase_summary(self.facts, "experts"), flush=True)

    # ------------------------------------------------------------------ phase 3

    def ensemble(self) -> None:
        from router import Client

        t0 = time.perf_counter()
        ex = self.plan.experts
        print(f"\n[3/3] ensemble: serve {self.n} experts with the router, query it, evaluate against "
              "the monolith", flush=True)  # fmt: skip
        serve = ServeConfig(
            listen="127.0.0.1:0", experts=[self.path("experts", f"expert{i}") for i in range(self.n)],
            router=self.path("router"), rule="top1", roster=self.path("roster.json"),
            tls=self.tls("router"),
            limits=LimitsConfig(request_timeout=300.0, max_samples=max(64, ex.samples),
                                max_steps=max(200, ex.sample_steps)),
        )  # fmt: skip
        save_config(serve, self.path("configs", "serve.toml"))
        server = self.sup.start(
            "router-serve", "router", "serve", self.path("configs", "serve.toml")
        )
        evaluation = self.sup.start("router-eval", "router", "eval", self.router_config_path)
        url = server.wait_line("router serving", 300).rsplit(" ", 1)[1]
        facts: dict[str, Any] = {"url": url}
        if ex.workload == "flow":
            facts.update(self.flow_samples(url))
        else:
            facts["samples"] = query_prompts(Client(url, timeout=300, **self.client_tls()), ex)
            facts["distill"] = self.distill()
        evaluation.finish(900)
        server.stop(20)
        facts["eval"] = json.loads(Path(self.path("eval.json")).read_text())
        facts["seconds"] = time.perf_counter() - t0
        self.facts["ensemble"] = facts
        print(phase_summary(self.facts, "ensemble"), flush=True)

    def distill(self) -> dict[str, Any] | None:
        """``router distill``: one dense student of the experts' size trained on the ensemble's
        outputs under ``distill_rule``, signed with the router's key (it is in the roster); its
        summary, with the command's wall time. Runs alone, after the ensemble's samples."""
        ex = self.plan.experts
        if not ex.distill_steps:
            return None
        t0 = time.perf_counter()
        self.sup.start("router-distill", "router", "distill", self.router_config_path).finish(900)

        def manifest(name: str) -> dict[str, Any]:
            return json.loads(Path(self.path("experts", name, "manifest.json")).read_text())

        summary = {**manifest("student")["extra"]["distilled"],
                   "wall_seconds": time.perf_counter() - t0,
                   "experts_train_flops": sum(manifest(f"expert{i}")["train_flops"]
                                              for i in range(self.n)),
                   "monolith_train_flops": manifest("monolith")["train_flops"]}  # fmt: skip
        print(f"  distilled one student from the ensemble ({summary['rule']}): {summary['steps']} "
              f"steps at batch {summary['batch_size']}, {summary['flops']:.3g} FLOPs, "
              f"{summary['wall_seconds']:.0f} s", flush=True)  # fmt: skip
        return summary

    def flow_samples(self, url: str) -> dict[str, Any]:
        """Every method's samples from the same noise (the ensemble's through ``router.Client``),
        their Frechet distances, and the router's accuracy by noise level."""
        from federation_experts import flow_quality, sample_all, sample_alone, save_grid

        from router import Client

        ex = self.plan.experts
        roster = Roster.load(self.path("roster.json"))
        experts = [self.path("experts", f"expert{i}") for i in range(self.n)]
        sets = sample_all(Client(url, timeout=300, **self.client_tls()), experts, self.path("experts", "monolith"),
                          ex.samples, ex.sample_steps, seed=0, roster=roster)  # fmt: skip
        distilled = self.distill()
        if distilled:  # its row goes next to the ensemble's, before the experts alone
            student = sample_alone(self.path("experts", "student"), ex.samples, ex.sample_steps,
                                   seed=0, roster=roster)  # fmt: skip
            alone = {k: sets.pop(k) for k in list(sets) if k.startswith("expert")}
            sets = {**sets, "student": student, **alone}
        rows = save_grid(sets, self.out / "samples.npz")
        quality = flow_quality(sets, ex.model, self.path("router"), self.path("partition"),
                               ex.classifier_steps, samples_per_band=max(128, ex.samples // 2),
                               seed=0, roster=roster)  # fmt: skip
        fd = quality["frechet"]
        print(f"  {quality['samples']} samples per method ({ex.sample_steps} Euler steps, the same "
              f"noise); Frechet distance to the held-out digits: "
              + ", ".join(f"{k} {v:.1f}" for k, v in fd.items()), flush=True)  # fmt: skip
        return {"flow": quality, "distill": distilled,
                "samples": [{"grid": "samples.npz", "rows": rows, "steps": ex.sample_steps,
                             "seed": 0}]}  # fmt: skip

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.prepare()
        self.start_partitions()
        self.start_aggregators()
        self.local_update()
        self.experts()
        self.ensemble()
        self.facts["wall_seconds"] = time.perf_counter() - t0
        self.facts["plan"] = self.plan.__dict__
        return self.facts

    def close(self) -> None:
        self.sup.stop_all()
        if self.args.netns:
            from comms import netns

            netns.down(NETNS_PREFIX)


def prepare_out_dir(out: Path) -> None:
    """OUT is ours if empty or made by an earlier run (it has the marker); then it is cleared."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise FederationError(
                f"--out {out} exists and was not made by this script; choose another directory"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by scripts/federation.py; cleared by the next run\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def watch(children: list[Child], metrics: list[str], total: int, label: str) -> None:
    """A progress bar of the steps the children's metrics files report, until all exit."""
    bar = Progress(total, label)
    while True:
        done = sum(max((r.get("step", 0) for r in read_jsonl(m)), default=0) for m in metrics)
        bar.update(done)
        failed = [c for c in children if c.proc.poll() not in (None, 0)]
        if failed:
            bar.close()
            c = failed[0]
            raise FederationError(
                f"{c.name} exited with {c.proc.returncode}; see {c.log_path}:\n{tail(c.log_path)}"
            )
        if all(c.proc.poll() is not None for c in children):
            break
        time.sleep(0.5)
    bar.update(total)
    bar.close()


def query_prompts(client, ex: ExpertsPlan) -> list[dict[str, Any]]:
    """bytelm: prompts cut from the run's held-out text, completed through ``client`` (a
    ``router.Client``) and printed as they come."""
    from federation_experts import held_out_prompts

    samples = []
    for prompt in held_out_prompts(ex.model):
        print(f"  prompt {prompt!r}:", flush=True)
        with client.generate_stream(prompt, max_bytes=ex.max_bytes, temperature=0.8, seed=0) as s:
            text = "".join(piece.text for piece in s)
            result = s.result
        print("  " + (prompt + text).replace("\n", "\n  "), flush=True)
        samples.append({"prompt": prompt, "completion": text,
                        "expert_counts": result.expert_counts if result else {}})  # fmt: skip
    return samples


def dashboard_line(http: str, netns: bool) -> str:
    """Where the root's live dashboard is (``aggregator.dashboard``); never the token."""
    url = http if "://" in http else f"http://{http}"
    where = " (inside the hub network namespace)" if netns else ""
    token = (" (open it once as /dashboard?token=$ARCHIPELAGO_HTTP_TOKEN)"
             if os.environ.get("ARCHIPELAGO_HTTP_TOKEN") else "")  # fmt: skip
    return f"dashboard: {url}/dashboard{where}{token}"


def eval_global(agg_http: str, root: str, island_config: str, init: str, out: str,
                timeout: float = 120.0) -> None:  # fmt: skip
    """Wait until every aggregator's buffer is empty and the root's version stops moving, then
    write the validation loss of the global model theta_v at up to ``GLOBAL_CURVE_POINTS``
    versions from theta_0 to the root's final one (rebuilt from the published u_v, exactly
    as an island holds them) to ``out``."""
    import asyncio
    import urllib.request

    from safetensors.numpy import load_file, save_file

    from aggregator.outer import apply_update
    from comms.config import load_config
    from comms.envelope import Envelope
    from comms.http import url_of
    from comms.tls import client_ssl_context, read_pem
    from comms.transport import TransportClient
    from comms.update import decode_update
    from island.pseudo import load_numpy_into
    from island.workloads import get_workload

    cfg = load_config(IslandConfig, island_config)
    # with --tls the aggregators serve HTTPS with certificates of the run's CA
    context = client_ssl_context(read_pem(cfg.tls.ca)) if cfg.tls.ca else None

    def status(address: str) -> dict:
        with urllib.request.urlopen(url_of(address) + "/status", timeout=10, context=context) as r:
            return json.loads(r.read())

    addresses, last, deadline = json.loads(agg_http), None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [status(a) for a in addresses.values()]
        busy = any(s["outbox"] or any(m["buffered"] for m in s["models"].values()) for s in states)
        version = status(addresses["root"])["models"][MODEL_ID]["version"]
        if not busy and version == last:
            break
        last = version
        time.sleep(1.0)

    version = status(addresses["root"])["models"][MODEL_ID]["version"]
    theta = load_file(init)
    versions = [*range(0, version, max(1, math.ceil(version / GLOBAL_CURVE_POINTS))), version]
    reader = Identity.load(cfg.key)  # an island's key: reads are signed by roster keys

    async def replay() -> dict[int, dict]:
        """theta_v at the chosen versions, rebuilt from theta_0 and the published u_v."""
        chosen = {0: {k: v.copy() for k, v in theta.items()}}
        if version == 0:
            return chosen
        async with TransportClient(root, cfg.tls.client_tls(), identity=reader) as c:
            async for v, data in c.subscribe(MODEL_ID, 1):
                apply_update(theta, decode_update(Envelope.from_bytes(data, max_bytes=1 << 30)))
                if v in versions:
                    chosen[v] = {k: x.copy() for k, x in theta.items()}
                if v >= version:
                    return chosen
        return chosen

    thetas = asyncio.run(replay())
    workload = get_workload(cfg.workload, **cfg.workload_config)
    model = workload.build_model(cfg.seed)
    curve = []
    for v in sorted(thetas):
        load_numpy_into(model, thetas[v])
        curve.append([v, workload.validation_loss(model, max_batches=cfg.eval_batches)])
    params = sum(x.size for x in theta.values())
    final = str(Path(out).with_suffix(".safetensors"))  # the seed the experts branch from
    save_file({k: np.ascontiguousarray(x) for k, x in thetas[max(thetas)].items()}, final)
    Path(out).write_text(json.dumps({"version": curve[-1][0], "val_loss_start": curve[0][1],
                                     "val_loss_end": curve[-1][1], "curve": curve,
                                     "params": int(params)}))  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run a whole local federation and write a report.")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps (about a minute)")
    p.add_argument("--islands", type=int, default=4, help="islands (and experts); default 4")
    p.add_argument("--workload", choices=["bytelm", "flow"], default="bytelm")
    p.add_argument("--experts-workload", choices=["flow", "bytelm"], default="flow",
                   help="phase 2's experts, router and monolith: flow (the digits, where the "
                        "experts beat the monolith; the default) or bytelm")  # fmt: skip
    p.add_argument("--data", help="bytelm: a text file or folder (default: the Python stdlib)")
    p.add_argument("--out", default="runs/federation", help="output directory (cleared first)")
    p.add_argument("--netns", action="store_true",
                   help="root only: islands in network namespaces behind tc-shaped links")  # fmt: skip
    p.add_argument("--tls", action="store_true",
                   help="mutual TLS on every gRPC link (material from `aggregator tls init`)")  # fmt: skip
    p.add_argument("--partial-step", choices=PARTIAL_STEPS, default=PARTIAL_STEPS[0],
                   help="the root's merge.partial_step: a version of fewer than buffer_k updates "
                        "takes that share of a plain step, its momentum deferred (deferred, the "
                        "default), that share of a momentum step (scaled) or a whole one (full)")  # fmt: skip
    p.add_argument("--eval-global", nargs=5, metavar="ARG", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.eval_global:
        eval_global(*args.eval_global)
        return 0
    if args.islands < 2:
        print("federation: --islands must be at least 2", file=sys.stderr)
        return 2
    if args.data and "bytelm" not in (args.workload, args.experts_workload):
        print("federation: --data is for bytelm (flow uses the bundled digits)", file=sys.stderr)
        return 2
    if args.netns:
        from comms import netns
        from comms.errors import ConfigError

        try:
            netns.require_tools()
        except ConfigError as e:
            print(f"federation: --netns: {e}", file=sys.stderr)
            return 2

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    fed = Federation(args)
    try:
        facts = fed.run()
    except KeyboardInterrupt:
        print("\nfederation: interrupted; stopping every process", file=sys.stderr, flush=True)
        return 130
    except (FederationError, subprocess.CalledProcessError) as e:
        print(f"\nfederation: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            fed.close()
    report = write_report(fed.out, facts)
    print(report["headline"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
