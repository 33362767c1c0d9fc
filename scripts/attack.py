"""The attacker table: one malicious island among four, against a root with a given clip setting.

    python scripts/attack.py [--quick] [--scenarios honest,scale,signflip,noise,nan,stale]
                             [--clip adaptive|off] [--clip-action clip|reject] [--leaf]
                             [--clip-factor C] [--direction reject|off] [--min-cos C]
                             [--repeat N] [--steps N] [--every H] [--dump-deltas]
                             [--out DIR] [--json PATH] [--reference EARLIER.json]

Every participant is a separate OS process started through its command line, as in
``scripts/federation.py``: ``aggregator serve`` (a root; with ``--leaf`` the islands push to a
leaf in front of it) and four ``island run`` islands training the reduced bytelm with int8
pushes, H inner steps per round, in sync mode (``--mode overlapped`` for full overlap).
Honest islands run through ``scripts/attack_island.py --attack none`` (the unmodified daemon;
it logs each push's norm);
in an attack scenario island 3 runs ``attack_island.py --attack NAME``, the same daemon with its
pseudo-gradient transformed just before encoding.

Scenarios: ``honest`` (all four honest: the reference), ``scale`` (x1e6), ``signflip``
(x-1), ``noise`` (Gaussian of the update's norm), ``nan`` (one NaN, codec none), ``stale``
(base version 64 behind). Each run starts from the same seeded theta_0, data shards and batch
order; the runs differ only in island 3 (timing on a shared machine still varies, so
``--repeat N`` runs the honest reference N times to show the noise floor).

``--direction`` / ``--min-cos`` set the direction check (``merge.direction``,
``direction_min_cos``; unset: the aggregators' defaults). ``--dump-deltas`` saves every push
as decoded (``deltas/islandI/SEQ-BASE.npz``) and reports each island's cosines with ``-u_v``
of the version it was based on (``cosines``), the measurement behind ``direction_min_cos``.
``--clip`` unset leaves the aggregators' default (the table reports the mode the root ran);
``--reference`` takes the honest runs of an earlier ``--json`` for the ratios (for a run of
attack scenarios only). The results: ``docs/reliability.md``, "Attacker table".

Reported per run: the global model's validation loss at the end (the root's final theta,
``--eval-batches`` held-out batches), its ratio to the honest run's, the honest islands'
own last evaluation (their anchor: the global model as they hold it), the root's clip and
rejection counts (``/status`` and ``/metrics``), versions, and seconds. The norms every push
carried (``norms/*.jsonl``) give the spread of honest update norms (``max/median`` over every
window of 32 in arrival order) and ``||delta|| / ||theta||`` of the first updates, the
measurements behind ``clip_factor`` and ``clip_warmup_ratio``.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path[:0] = [p for p in (str(SCRIPTS), str(REPO)) if p not in sys.path]

from federation_procs import FederationError, Supervisor  # noqa: E402

from aggregator.config import AggregatorConfig, MergeConfig, ModelConfig  # noqa: E402
from comms.config import save_config  # noqa: E402
from comms.http import url_of  # noqa: E402
from comms.identity import Identity, Roster  # noqa: E402
from island.config import IslandConfig, OptimConfig, SnapshotConfig  # noqa: E402
from island.sync import SyncConfig  # noqa: E402

MODEL_ID = "global"
N_ISLANDS = 4
ATTACKER = N_ISLANDS - 1
SCENARIOS = ("honest", "scale", "signflip", "noise", "nan", "stale")
QUICK_PACKAGES = ("asyncio", "email", "xml", "http", "urllib", "json", "logging", "concurrent")
# the reduced bytelm of scripts/federation.py (full: 0.12 M parameters; quick: 22 k)
MODEL = {"d_model": 64, "n_layer": 2, "n_head": 4, "context": 64, "batch_size": 16}
QUICK_MODEL = {"d_model": 32, "n_layer": 1, "n_head": 2, "context": 32, "batch_size": 8}
WINDOW = 32  # the default clip_window: spreads are measured over windows of this many norms


def corpus() -> list[str]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [str(stdlib / p) for p in QUICK_PACKAGES if (stdlib / p).is_dir()]


class Run:
    """One federation: a root (and optionally a leaf), four islands, one of them maybe hostile."""

    def __init__(self, out: Path, scenario: str, args: argparse.Namespace):
        self.out, self.scenario, self.args = out, scenario, args
        self.model = dict(QUICK_MODEL if args.quick else MODEL, data=corpus())
        for sub in ("keys", "configs", "metrics", "norms", "state", "logs"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        self.sup = Supervisor(out, REPO)
        self.sup.env["PYTHONPATH"] = f"{SCRIPTS}:{self.sup.env['PYTHONPATH']}"
        self.reader = Identity.load_or_create(out / "keys" / "reader.pem")  # signed reads

    def path(self, *parts: str) -> str:
        return str(self.out.joinpath(*parts))

    def prepare(self) -> None:
        roster = Roster()
        for i in range(N_ISLANDS):
            ident = Identity.load_or_create(self.path("keys", f"island{i}.pem"))
            roster.add(ident.public_key, "island", f"island{i}")
        for name in ("root", "leaf"):
            ident = Identity.load_or_create(self.path("keys", f"{name}.pem"))
            roster.add(ident.public_key, "aggregator", name)
        roster.add(self.reader.public_key, "island", "reader")
        roster.save(self.path("roster.json"))

    def island_config(self, i: int, aggregator: str) -> IslandConfig:
        a = self.args
        return IslandConfig(
            name=f"island{i}", key=self.path("keys", f"island{i}.pem"),
            roster=self.path("roster.json"), aggregator=aggregator, workload="bytelm",
            workload_config=self.model, seed=a.seed, shard=i, num_shards=N_ISLANDS,
            steps=a.steps, threads=1, eval_batches=a.eval_batches, http="",
            metrics_file=self.path("metrics", f"island{i}.jsonl"),
            optim=OptimConfig(lr=a.lr, warmup_steps=a.warmup),
            sync=SyncConfig(model_id=MODEL_ID, every=a.every, codec="int8", mode=a.mode),
            snapshot=SnapshotConfig(),
        )  # fmt: skip

    def aggregator_config(self, name: str, role: str, **kw: Any) -> str:
        a = self.args
        clip: dict[str, Any] = {"clip_action": a.clip_action}
        if a.clip:  # unset: the aggregator's default
            clip["clip"] = a.clip
        if a.clip != "off":
            clip.update({k: v for k, v in (("clip_factor", a.clip_factor),
                        ("clip_warmup_ratio", a.clip_warmup_ratio)) if v is not None})  # fmt: skip
        if a.direction:
            clip["direction"] = a.direction
        if a.min_cos is not None:
            clip["direction_min_cos"] = a.min_cos
        merge = MergeConfig(buffer_k=N_ISLANDS, deadline_s=a.deadline, **clip)
        cfg = AggregatorConfig(
            name=name, role=role, listen="127.0.0.1:0", http="127.0.0.1:0",
            key=self.path("keys", f"{name}.pem"), roster=self.path("roster.json"),
            state_dir=self.path("state", name), merge=merge, **kw,
        )  # fmt: skip
        save_config(cfg, self.path("configs", f"{name}.toml"))
        return self.path("configs", f"{name}.toml")

    def start_aggregators(self) -> tuple[str, str]:
        """The root (and the leaf); returns (address islands push to, the root's http)."""
        init = self.path("init.safetensors")
        save_config(self.island_config(0, "127.0.0.1:1"), self.path("configs", "init.toml"))
        self.sup.run("init", "island", "init", self.path("configs", "init.toml"), "--out", init,
                     timeout=300)  # fmt: skip
        root_cfg = self.aggregator_config("root", "root", models=[ModelConfig(MODEL_ID, init=init)])
        line = self.sup.start("root", "aggregator", "serve", root_cfg).wait_line("serving on", 120)
        self.root = line.split("serving on ")[1].split()[0]
        self.root_http = line.split(" http ")[1].split()[0]
        if not self.args.leaf:
            return self.root, self.root_http
        leaf_cfg = self.aggregator_config(
            "leaf", "leaf", parent=self.root, models=[ModelConfig(MODEL_ID)]
        )
        line = self.sup.start("leaf", "aggregator", "serve", leaf_cfg).wait_line("serving on", 120)
        self.leaf_http = line.split(" http ")[1].split()[0]
        return line.split("serving on ")[1].split()[0], self.root_http

    def start_islands(self, address: str) -> list:
        children = []
        for i in range(N_ISLANDS):
            cfg = self.island_config(i, address)
            cfg_path = self.path("configs", f"island{i}.toml")
            save_config(cfg, cfg_path)
            attack = self.scenario if i == ATTACKER and self.scenario != "honest" else "none"
            argv = ["--attack", attack, "--seed", str(self.args.seed + i),
                    "--norm-log", self.path("norms", f"island{i}.jsonl"), cfg_path]  # fmt: skip
            if self.args.dump_deltas:
                argv[-1:-1] = ["--delta-dir", self.path("deltas", f"island{i}")]
            children.append(
                self.sup.start(f"island{i}", "attack_island", *argv, death_signal=signal.SIGKILL)
            )
        for child in children:
            child.wait_line("training", 300)
        return children

    def wait_quiet(self, timeout: float) -> dict:
        """Until no aggregator buffers anything and the root's version stops moving."""
        https = [self.root_http] + ([self.leaf_http] if self.args.leaf else [])
        deadline, last = time.monotonic() + timeout, None
        while True:
            states = [http_json(h, "/status") for h in https]
            busy = any(s["outbox"] or s["models"][MODEL_ID]["buffered"] for s in states)
            version = states[0]["models"][MODEL_ID]["version"]
            if (not busy and version == last) or time.monotonic() > deadline:
                return states[-1] if self.args.leaf else states[0]
            last = version
            time.sleep(1.0)

    def execute(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.prepare()
        try:
            address, _ = self.start_aggregators()
            islands = self.start_islands(address)
            failed = []
            for child in islands:  # an island whose model turned NaN exits with an error
                try:
                    child.finish(self.args.island_timeout)
                except FederationError:
                    failed.append(child.name)
            status = self.wait_quiet(4 * self.args.deadline + 30)
            metrics = http_text(self.leaf_http if self.args.leaf else self.root_http, "/metrics")
            version, loss = self.evaluate_global()
        finally:
            self.sup.stop_all(grace=10)
        summaries = [json_summary(c.stdout) for c in islands]
        honest = [i for i in range(N_ISLANDS) if i != ATTACKER or self.scenario == "honest"]
        return {
            "scenario": self.scenario,
            "clip": status["models"][MODEL_ID].get("clip", {}).get("mode", self.args.clip),
            "clip_action": self.args.clip_action,
            "global_val_loss": loss,
            "version": version,
            "honest_val_loss": statistics.mean(
                last_val_loss(self.path("metrics", f"island{i}.jsonl")) for i in honest
            ),
            "clip_status": status["models"][MODEL_ID].get("clip", {}),
            "direction": status["models"][MODEL_ID].get("direction", {}),
            "rejected": rejected_by_reason(metrics),
            "islands_failed": failed,
            "attacker": summaries[ATTACKER].get("pushes") or summaries[ATTACKER],
            "seconds": round(time.perf_counter() - t0, 1),
        }

    def evaluate_global(self) -> tuple[int, float]:
        """The root's current theta (a signed Fetch), evaluated on held-out batches."""
        import asyncio

        from comms.envelope import Envelope
        from comms.transport import TransportClient
        from comms.update import decode_update
        from island.pseudo import load_numpy_into
        from island.workloads import get_workload

        async def fetch() -> bytes:
            async with TransportClient(self.root, identity=self.reader) as c:
                return await c.fetch(MODEL_ID, -1)

        env = Envelope.from_bytes(asyncio.run(fetch()), max_bytes=1 << 32)
        theta = decode_update(env)
        workload = get_workload("bytelm", **self.model)
        model = workload.build_model(self.args.seed)
        load_numpy_into(model, theta)
        loss = workload.validation_loss(model, max_batches=self.args.eval_batches)
        if not all(math.isfinite(float(v.sum())) for v in theta.values()):
            loss = math.inf
        return env.header.base_version, float(loss)


def http_json(address: str, path: str) -> dict:
    with urllib.request.urlopen(url_of(address) + path, timeout=10) as r:
        return json.loads(r.read())


def http_text(address: str, path: str) -> str:
    with urllib.request.urlopen(url_of(address) + path, timeout=10) as r:
        return r.read().decode()


def rejected_by_reason(metrics: str) -> dict[str, float]:
    out = {}
    for line in metrics.splitlines():
        if line.startswith("archipelago_updates_rejected_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


def json_summary(lines: list[str]) -> dict:
    for line in reversed(lines):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def last_val_loss(path: str) -> float:
    if not Path(path).exists():
        return math.nan
    records = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    return vals[-1] if vals else math.nan


# --------------------------------------------------------------------------- norm spreads


def honest_norms(run_dir: Path, scenario: str) -> list[dict]:
    """Every honest push's logged norm, in the order they were encoded (time)."""
    out = []
    for i in range(N_ISLANDS):
        if i == ATTACKER and scenario != "honest":
            continue
        path = run_dir / "norms" / f"island{i}.jsonl"
        out += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return sorted(out, key=lambda r: r["t"])


def norm_spread(norms: list[float], window: int = WINDOW) -> dict[str, float]:
    """max / median over every full window of ``window`` norms (and over the warm-up: each
    prefix of 8 to ``window``), as the adaptive bound sees them."""
    ratios = []
    for end in range(8, len(norms) + 1):
        w = norms[max(0, end - window) : end]
        ratios.append(max(w) / statistics.median(w))
    # also the next update against the window before it (what the bound checks)
    nxt = [
        norms[e] / statistics.median(norms[max(0, e - window) : e]) for e in range(8, len(norms))
    ]
    return {
        "updates": len(norms),
        "max_over_median": round(max(ratios), 3) if ratios else math.nan,
        "p99_next_over_median": round(sorted(nxt)[int(0.99 * (len(nxt) - 1))], 3)
        if nxt
        else math.nan,
        "max_next_over_median": round(max(nxt), 3) if nxt else math.nan,
    }


def theta_ratios(run: Run, records: list[dict]) -> dict:
    """``||delta|| / ||theta_base||`` of the honest pushes, theta rebuilt from theta_0 and the
    versions in the (stopped) root's model store: the first 8 (the warm-up) and all."""
    import numpy as np
    from safetensors.numpy import load_file

    from aggregator.store import ModelStore
    from comms.envelope import Envelope
    from comms.update import apply_update, decode_update

    theta = load_file(run.path("init.safetensors"))
    store = ModelStore(Path(run.path("state", "root", "store")), MODEL_ID)

    def norm(t) -> float:
        return math.sqrt(sum(float(np.dot(v.reshape(-1).astype(np.float64), v.reshape(-1)))
                             for v in t.values()))  # fmt: skip

    norms = {0: norm(theta)}
    for v in range(1, max(r["base_version"] for r in records) + 1):
        apply_update(
            theta, decode_update(Envelope.from_bytes(store.get_version(v), max_bytes=1 << 32))
        )
        norms[v] = norm(theta)
    ratios = [r["norm"] / norms[r["base_version"]] for r in records]
    return {
        "theta0_norm": round(norms[0], 3),
        "first8_delta_over_theta_max": round(max(ratios[:8]), 4),
        "delta_over_theta_max": round(max(ratios), 4),
        "delta_over_theta_median": round(statistics.median(ratios), 4),
    }


# --------------------------------------------------------------------------- the table


def direction_tag(args: argparse.Namespace) -> str:
    tag = f"-dir-{args.direction}" if args.direction else ""
    return tag + (f"-cos{args.min_cos:g}" if args.min_cos is not None else "")


def direction_cosines(run: Run) -> dict:
    """Each island's pushes' cosines with ``-u_b`` (b: the version it was based on, from the
    stopped root's store), from ``deltas/`` (``--dump-deltas``): min, median, max per island."""
    import numpy as np

    from aggregator.store import ModelStore
    from comms.envelope import Envelope
    from comms.update import decode_update

    def flat(arrays) -> np.ndarray:
        return np.concatenate([arrays[k].reshape(-1).astype(np.float64) for k in sorted(arrays)])

    store = ModelStore(Path(run.path("state", "root", "store")), MODEL_ID)
    versions: dict[int, np.ndarray] = {}
    out = {}
    for i in range(N_ISLANDS):
        cos = []
        for f in sorted(Path(run.path("deltas", f"island{i}")).glob("*.npz")):
            base = int(f.stem.split("-")[1])
            if base < 1:
                continue
            if base not in versions:
                env = Envelope.from_bytes(store.get_version(base), max_bytes=1 << 32)
                versions[base] = flat(decode_update(env))
            with np.load(f) as z:
                d = flat({k: z[k] for k in z.files})
            u = versions[base]
            cos.append(float(-(d @ u) / (np.linalg.norm(d) * np.linalg.norm(u))))
        if cos:
            out[f"island{i}"] = {"min": round(min(cos), 3), "median": round(statistics.median(cos), 3),
                                 "max": round(max(cos), 3), "n": len(cos)}  # fmt: skip
    return out


def print_table(results: list[dict], reference: list[dict] | None = None) -> None:
    """The table; ratios are to the mean of the honest runs (``reference``: those of an earlier
    ``--json``, else the honest runs among ``results``)."""
    ref = [r for r in (reference or results) if r["scenario"] == "honest"]
    ref_global = statistics.mean(r["global_val_loss"] for r in ref) if ref else math.nan
    ref_honest = statistics.mean(r["honest_val_loss"] for r in ref) if ref else math.nan
    print(f"\n{'scenario':<10} {'clip':<9} {'direction':<13} {'global loss':>11} {'ratio':>7} {'honest isl.':>11} "
          f"{'ratio':>7} {'clipped':>7} {'rejected':<16} {'ver':>4} {'s':>6}")  # fmt: skip
    for r in results:
        rej = ",".join(f"{k}:{int(v)}" for k, v in sorted(r["rejected"].items())) or "-"
        d = r.get("direction") or {}
        direction = f"{d.get('mode', '-')} {d.get('min_cos', '')}".strip()
        print(f"{r['scenario']:<10} {r['clip']:<9} {direction:<13} {r['global_val_loss']:>11.4f} "
              f"{r['global_val_loss'] / ref_global:>7.4f} {r['honest_val_loss']:>11.4f} "
              f"{r['honest_val_loss'] / ref_honest:>7.4f} {r['clip_status'].get('clipped', 0):>7} "
              f"{rej:<16} {r['version']:>4} {r['seconds']:>6.0f}", flush=True)  # fmt: skip


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities as None (null: a model that diverged)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="One malicious island among four: the table.")
    p.add_argument("--quick", action="store_true", help="22 k parameters, 150 steps, H = 25")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--clip", choices=("adaptive", "off"), help="default: the aggregator's")
    p.add_argument("--clip-action", choices=("clip", "reject"), default="clip")
    p.add_argument("--clip-factor", type=float, help="default: the aggregator's default")
    p.add_argument("--clip-warmup-ratio", type=float, help="default: the aggregator's default")
    p.add_argument("--direction", choices=("reject", "off"), help="default: the aggregator's")
    p.add_argument("--min-cos", type=float, help="direction_min_cos; default: the aggregator's")
    p.add_argument("--leaf", action="store_true", help="islands push to a leaf before the root")
    p.add_argument(
        "--dump-deltas", action="store_true", help="save every push (deltas/) for direction figures"
    )
    p.add_argument("--repeat", type=int, default=1, help="runs of the honest reference")
    p.add_argument("--steps", type=int)
    p.add_argument("--every", type=int)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mode",
        choices=("sync", "overlapped"),
        default="sync",
        help="the islands' sync mode (sync: each version merges one round of all four)",
    )
    p.add_argument("--deadline", type=float, default=10.0, help="the aggregators' merge deadline")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--island-timeout", type=float, default=1800)
    p.add_argument("--out", default="attack-out")
    p.add_argument("--json", default="", help="write the results here too")
    p.add_argument("--reference", default="", help="ratios to the honest runs of this --json")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.steps = args.steps or (150 if args.quick else 800)
    args.every = args.every or (25 if args.quick else 50)
    if args.quick:
        args.warmup = min(args.warmup, 20)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        print(f"attack: unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
        return 2
    results, spreads = [], []
    for scenario in scenarios:
        for rep in range(args.repeat if scenario == "honest" else 1):
            clip = (
                f"c{args.clip_factor:g}"
                if args.clip_factor and args.clip != "off"
                else args.clip or "default"
            )
            tag = f"{scenario}-{clip}" + direction_tag(args) + (f"-{rep}" if rep else "")
            print(f"run {tag}: {args.steps} steps, H = {args.every}", flush=True)
            run = Run(out / tag, scenario, args)
            result = run.execute()
            records = honest_norms(run.out, scenario)
            spread = {"run": tag, **norm_spread([r["norm"] for r in records])}
            if scenario == "honest":
                spread.update(theta_ratios(run, records))
            if args.dump_deltas:
                result["cosines"] = direction_cosines(run)
            result["honest_norms"] = spread
            results.append(result)
            spreads.append(spread)
            print(f"  {json.dumps({k: v for k, v in result.items() if k != 'attacker'})}",
                  flush=True)  # fmt: skip
    reference = json.loads(Path(args.reference).read_text())["results"] if args.reference else None
    if reference:  # null: NaN
        reference = [{k: math.nan if v is None else v for k, v in r.items()} for r in reference]
    print_table(results, reference)
    print("\nhonest norm spreads (max / median over windows of 32):")
    for s in spreads:
        print("  " + json.dumps(s))
    if args.json:
        doc = strict_json({"args": vars(args), "results": results})
        Path(args.json).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
