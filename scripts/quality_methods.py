"""Worker processes of ``scripts/bench_quality.py``: one training method, one rank each.

``python scripts/quality_methods.py SPEC.json`` trains one worker of one method and writes
``result-RANK.json`` into the spec's ``run_dir``. The methods share everything but the way
workers combine their progress: the workload (bytelm), the initial weights (``seed``), the
data stream of each rank (``train_batches(data_seed, shard=rank, num_shards=world)``), the
inner optimizer (AdamW, linear warm-up then a constant rate, grad-norm clip) and the batch
per step. Rank 0 evaluates the model it holds on the held-out windows at every round
(``eval_every`` steps) and records ``(step, loss, bytes)``.

- ``ddp``: ``torch.distributed`` (gloo) with ``DistributedDataParallel``: gradients are
  all-reduced every step. Bytes are not measured but counted as a ring all-reduce sends them.
- ``diloco``: ``island.LocalUpdate`` + ``SyncEngine`` against a real ``aggregator serve``
  root (DiLoCo, Douillard et al. 2023, Algorithm 1). ``mode = "sync"`` is synchronous
  DiLoCo; ``"overlapped"`` is Archipelago's overlapped, staleness-weighted sync (CO2, Sun et
  al. 2024). Bytes are the engine's on-the-wire counters (envelopes and gRPC framing).
  With ``fragments`` > 1 the worker streams its model in fragments as the island daemon does
  with ``[sync] fragments`` (``island.fragmented``, ``island.streaming``): one engine per
  fragment line ``<model_id>.f<p>`` on one network loop and a ``StreamingLocalUpdate`` around
  them; the bytes are the engines' counters summed, and each line's own are in ``lines``.
- ``hivemind``: ``hivemind.Optimizer(use_local_updates=True)``, one epoch = ``world * batch
  * H`` samples, parameters averaged by hivemind's butterfly all-reduce at each epoch's end;
  the step that ends an epoch waits for that round (``delay_state_averaging`` off, hivemind's
  default; on, the next local step waits for it instead: local updates average by the delta
  rule). Timing: ``quality_args.HIVEMIND_STANDARD``.
  Bytes: the serialized tensor parts each peer sends in the reduce-scatter phase, counted
  by a pass-through compression (``CountingNoCompression``); the all-gather phase returns
  parts of equal size and the peer receives as much as it sends, so sent + received is four
  times that figure. DHT and libp2p framing are not counted.

Final point (DiLoCo): a worker that ran all its steps waits, for at most ``drain_s``, until
the global model holds every round it pushed (overlapped rounds are still in flight at the
last boundary), and rank 0 evaluates that final model too (``drained: true``).

Early stop: once rank 0 has run at least ``min_steps`` and reached ``target`` it creates
``run_dir/stop``; every worker checks for that file before each step and stops.

Concurrency: each worker is single-threaded in its training loop; the sync engine and
hivemind run their networking on their own threads or processes. This module must not
import grpc (``comms.transport``) in a hivemind worker before hivemind forks its processes,
so the imports sit inside each worker function.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from island.workloads import get_workload  # noqa: E402


def inner_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` to ``lr``, then constant (the island default)."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr


def make_adamw(params, spec: dict[str, Any]) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params, lr=spec["lr"], betas=tuple(spec["betas"]), weight_decay=spec["weight_decay"]
    )


class Recorder:
    """Rank 0's evaluation records and every rank's step timings."""

    def __init__(self, spec: dict[str, Any], workload, model: torch.nn.Module):
        self.spec, self.workload, self.model = spec, workload, model
        self.rank = spec["rank"]
        self.run_dir = Path(spec["run_dir"])
        self.stop_path = self.run_dir / "stop"
        self.evals: list[dict[str, Any]] = []
        self.step_s: list[float] = []
        self.busy_s = 0.0  # inner steps, with the --slowdowns and --step-floor holds
        # each step's optimizer.step() seconds; where the optimizer can wait for peers inside
        # it (hivemind), the busy seconds count each at most the median (``optimizer_wait_s``)
        self.optimizer_s: list[float] = []
        self.optimizer_waits = False
        self.eval_s = 0.0
        self.started = time.perf_counter()

    def stopped(self) -> bool:
        return self.stop_path.exists()

    def barrier(self) -> None:
        """Wait until every rank is ready to train (start-up times differ by seconds)."""
        (self.run_dir / f"ready-{self.rank}").touch()
        ready = [self.run_dir / f"ready-{r}" for r in range(self.spec["world"])]
        deadline = time.monotonic() + self.spec["timeout_s"]
        while not all(p.exists() for p in ready):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every worker became ready in {self.run_dir}")
            time.sleep(0.02)
        self.started = time.perf_counter()

    def evaluate(self, step: int, model: torch.nn.Module | None = None, **extra: Any) -> float:
        """Held-out loss of ``model`` (default: the worker's own)."""
        t0 = time.perf_counter()
        eval_s_before = self.eval_s
        model = self.model if model is None else model
        loss = float(self.workload.validation_loss(model, self.spec["eval_batches"]))
        self.eval_s += time.perf_counter() - t0
        # t: seconds since the barrier; eval_s: rank 0's own evaluation time within them
        record = {"step": step, "loss": loss, "t": time.perf_counter() - self.started,
                  "eval_s": self.eval_s, "eval_s_before": eval_s_before, **extra}  # fmt: skip
        self.evals.append(record)
        target = self.spec.get("target")
        if target is not None and step >= self.spec["min_steps"] and loss <= target:
            self.stop_path.touch()
        print(json.dumps({"rank": self.rank, **record}), file=sys.stderr, flush=True)
        return loss

    def optimizer_wait_s(self) -> float:
        """Seconds the optimizer's step spent beyond its median, where it can wait for peers
        (``optimizer_waits``): a hivemind step that ends an epoch, or the local step after
        it, holds the all-reduce. 0 otherwise."""
        if not self.optimizer_waits or not self.optimizer_s:
            return 0.0
        typical = statistics.median(self.optimizer_s)
        return sum(max(0.0, s - typical) for s in self.optimizer_s)

    def write(self, steps: int, **extra: Any) -> None:
        timed = self.step_s[5:] or self.step_s  # the first steps warm caches up
        waited = self.optimizer_wait_s()
        result = {
            "rank": self.rank,
            "steps": steps,
            "evals": self.evals,
            "step_s_median": statistics.median(timed) if timed else None,
            "wall_s": time.perf_counter() - self.started,
            "eval_s": self.eval_s,
            "compute_s": sum(self.step_s),
            "busy_s": self.busy_s - waited,
            "optimizer_wait_s": waited,
            **extra,
        }
        tmp = self.run_dir / f"result-{self.rank}.json.tmp"
        tmp.write_text(json.dumps(result))
        tmp.rename(self.run_dir / f"result-{self.rank}.json")


def timed_step(rec: Recorder, step: int, model, optimizer, batch, lr_groups, spec) -> float:
    """One inner step (forward, backward, clip, optimizer); returns the training loss."""
    t0 = time.perf_counter()
    for group in lr_groups:
        group["lr"] = inner_lr(step, spec["lr"], spec["warmup_steps"])
    loss = rec.workload.loss(model, batch)
    loss.backward()
    if spec["grad_clip"]:
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"])
    t_opt = time.perf_counter()
    optimizer.step()
    rec.optimizer_s.append(time.perf_counter() - t_opt)
    optimizer.zero_grad(set_to_none=True)
    value = float(loss.detach())  # waits for a GPU's queued work, so the step's time is whole
    spent = time.perf_counter() - t0
    rec.step_s.append(spent)
    slowdown = (spec.get("slowdowns") or [1.0] * spec["world"])[spec["rank"]]
    if slowdown > 1:  # --slowdowns: a slower machine. The extra time is (slowdown - 1) times
        # one step's compute measured alone before the runs, not times this step's time: a
        # DDP step holds the all-reduce's wait for slower ranks, and scaling that would
        # compound from step to step
        extra = (slowdown - 1) * spec["compute_s"]
        time.sleep(extra)
        spent += extra
    if spec.get("step_floor_s", 0) > spent:  # --quick: rounds outlast a push, as in real runs
        time.sleep(spec["step_floor_s"] - spent)
        spent = spec["step_floor_s"]
    rec.busy_s += spent
    return value


# ============================================================================ DDP


def ddp_worker(spec: dict[str, Any]) -> None:
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, world = spec["rank"], spec["world"]
    master = spec.get("master_addr", "127.0.0.1")  # rank 0's address (its namespace's, if any)
    dist.init_process_group(
        "gloo", init_method=f"tcp://{master}:{spec['port']}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=spec["timeout_s"]),
    )  # fmt: skip
    try:
        workload = get_workload("bytelm", **spec["workload"])
        model = workload.build_model(spec["seed"])
        ddp = DistributedDataParallel(model)
        optimizer = make_adamw(ddp.parameters(), spec)
        batches = workload.train_batches(spec["data_seed"], shard=rank, num_shards=world)
        rec = Recorder(spec, workload, model)
        steps = spec["steps"]
        for step in range(steps):
            timed_step(rec, step, ddp, optimizer, next(batches), optimizer.param_groups, spec)
            if rank == 0 and ((step + 1) % spec["eval_every"] == 0 or step + 1 == steps):
                rec.evaluate(step + 1)
        rec.write(steps)
    finally:
        dist.destroy_process_group()


# ============================================================================ DiLoCo


def diloco_worker(spec: dict[str, Any]) -> None:
    from comms.aio import LoopThread
    from comms.identity import Identity, Roster
    from island.fragmented import FragmentEngines, fragment_configs
    from island.local_update import LocalUpdate
    from island.pseudo import load_numpy_into, params_to_numpy
    from island.streaming import StreamingLocalUpdate
    from island.sync import SyncConfig, SyncEngine

    rank = spec["rank"]
    fragments = spec.get("fragments", 1)
    workload = get_workload("bytelm", **spec["workload"])
    model = workload.build_model(spec["seed"])
    optimizer = make_adamw(model.parameters(), spec)
    batches = workload.train_batches(spec["data_seed"], shard=rank, num_shards=spec["world"])
    outer_name, outer = spec["outer"]
    lookahead = {"outer_lr": outer["lr"], "outer_momentum": outer["momentum"]} if (
        outer_name == "nesterov") else {}  # fmt: skip
    every_s = spec.get("every_s")  # rounds sized by seconds of compute instead of steps
    config = SyncConfig(
        model_id=spec["model_id"], every=None if every_s else spec["H"], every_s=every_s,
        codec=spec["codec"], mode=spec["mode"], fragments=fragments,
        ef_decay=spec.get("ef_decay"), codec_params=dict(spec.get("codec_params") or {}),
        sync_timeout_s=spec["timeout_s"], retry_interval_s=0.2, max_retry_interval_s=2.0,
        rebase=spec.get("rebase", "eager"), adopt=spec.get("adopt", "arrival"), **lookahead,
    )  # fmt: skip
    identity = Identity.load(spec["key"])
    roster = Roster.load(spec["roster"])
    rec = Recorder(spec, workload, model)
    # Every worker builds theta_0 from the shared seed (the root's init file holds the same
    # bits), as DDP's workers do: version 0 is known without a download.
    theta0 = params_to_numpy(model)
    loop = None
    if fragments > 1:
        # streamed fragments as the island daemon runs them (island.fragmented): one engine
        # per fragment line <model_id>.f<p> on one network loop, one StreamingLocalUpdate
        # around them (fragment p pushes H (p + 1) / F steps in, then every H)
        loop = LoopThread(f"bench-rank{rank}").start()
        engines = [SyncEngine(c, identity, spec["address"], roster=roster, loop=loop)
                   for c in fragment_configs(config)]  # fmt: skip
        engine: Any = FragmentEngines(engines)
        lu: Any = StreamingLocalUpdate(model, optimizer, engines=engines, flush_on_exit=False,
                                       anchor=theta0, anchor_versions=[0] * fragments)  # fmt: skip
        parts = lu.updates
    else:
        engine = SyncEngine(config, identity, spec["address"], roster=roster)
        engines = [engine]
        lu = LocalUpdate(model, optimizer, engine=engine, flush_on_exit=False,
                         anchor=theta0, anchor_version=0)  # fmt: skip
        parts = [lu]
    global_model = workload.build_model(spec["seed"])  # rank 0 evaluates the global version
    step = 0
    # H warm-up: rounds of h0 steps until step `until`, then of H (set at round boundaries)
    h0, until = spec.get("H_warmup") or (spec["H"], 0)
    if not every_s and fragments == 1:
        lu.every = h0 if until > 0 else spec["H"]
    # per fragment (one without fragments): sequence of a pushed round -> its steps, and the
    # step of its last boundary
    round_steps: list[dict[int, int]] = [{} for _ in parts]
    boundary = [0] * len(parts)
    try:
        lu.start()
        rec.barrier()
        tokens = spec["workload"]["batch_size"] * spec["workload"]["context"]
        while step < spec["steps"] and not rec.stopped():
            timed_step(rec, step, model, optimizer, next(batches), optimizer.param_groups, spec)
            step += 1
            ended = lu.step(tokens=tokens)
            if not ended:
                continue
            for p, part in enumerate(parts):
                if part.steps_in_round == 0 and boundary[p] < step:  # its round ended here
                    round_steps[p][part.last_push.sequence] = step - boundary[p]
                    boundary[p] = step
            if fragments == 1 and step >= until and not every_s:
                lu.every = spec["H"]
            # rank 0 evaluates once a round of H steps: with fragments at the last fragment's
            # boundaries (every H steps), as often as without
            if rank == 0 and boundary[-1] == step:
                sync = engine.stats
                # the anchor is the global model (with fragments the union of the fragments'
                # anchors, each the root's theta of its line bit for bit); the worker's own
                # params start the next round from it plus its in-flight deltas. A fragment's
                # anchor holds its steps to its last boundary but the rounds still in flight
                # (overlapped: at least the one just pushed); with fragments the model holds
                # at least the fewest of any fragment, and existed here since the last of the
                # fragments' versions arrived.
                load_numpy_into(global_model, lu.anchor)
                holds = min(
                    boundary[p]
                    - sum(round_steps[p][int(s)] for s in part.state_dict()["in_flight"])
                    for p, part in enumerate(parts)
                )
                pairs = zip(engines, parts, strict=True)
                arrivals = [e.arrival_time(part.version) for e, part in pairs]
                arrived = None if None in arrivals else max(arrivals)
                rec.evaluate(
                    step, global_model, version=lu.version, holds_steps=holds,
                    version_t=None if arrived is None else arrived - rec.started,
                    bytes_sent=sync["bytes_sent"], bytes_received=sync["bytes_received"],
                    staleness=sync["last_staleness"], rounds=parts[-1].round,
                    **({"versions": lu.versions} if fragments > 1 else {}),
                )  # fmt: skip
        stats = local_update_stats(parts, engine)  # the training's figures, before the drain
        if not rec.stopped() and drain_all(parts, spec["drain_s"]) and rank == 0:
            # every round is in the global model: the federation's final model, holding all
            # the steps to each fragment's last boundary (without this the last point is
            # whichever version was newest at the last boundary, rounds behind when the root
            # lags: 4.6 against 3.2 in one run). A fragment's unfinished round is not pushed,
            # as a whole model's is not: the other islands may have stopped at the target
            # and would not push theirs, so no version would hold it before the deadline.
            load_numpy_into(global_model, lu.anchor)
            sync = engine.stats
            rec.evaluate(
                step, global_model, version=lu.version, holds_steps=min(boundary), drained=True,
                rounds=parts[-1].round,
                bytes_sent=sync["bytes_sent"], bytes_received=sync["bytes_received"],
                staleness=sync["last_staleness"],
            )  # fmt: skip
        # the pushes still queued go out (or are abandoned) before the lines' bytes are read
        engine.close(timeout=5)
        rec.write(step, lu=stats, boundary_s=stats["boundary_s"], blocked_s=stats["blocked_s"],
                  rounds=stats["rounds"], bytes_sent=stats["sync"]["bytes_sent"],
                  bytes_received=stats["sync"]["bytes_received"],
                  lines=line_stats(engines), peer_id=identity.peer_id,
                  # per model line: push sequence -> the inner steps of that round (JSON keys:
                  # strings), so the bench can count the steps every island has in each version
                  round_steps=round_steps)  # fmt: skip
    finally:
        engine.close(timeout=5)  # idempotent
        if loop is not None:
            loop.stop()


def local_update_stats(parts: list, engine) -> dict[str, Any]:
    """``LocalUpdate.stats`` of the worker's one ``LocalUpdate``, or with fragments of its
    fragments together: the engines' counters summed (``FragmentEngines.stats``), rounds of H
    steps (the last fragment's, whose rounds are all whole), boundary and blocked seconds
    summed over the fragments (one training thread spent them all)."""
    if len(parts) == 1:
        return parts[0].stats
    per = [part.stats for part in parts]
    sync = engine.stats
    elapsed = max(s["elapsed_s"] for s in per)
    blocked = sync["blocked_s"]
    return {
        "rounds": per[-1]["rounds"],
        "fragment_rounds": [s["rounds"] for s in per],
        "steps": per[-1]["steps"],
        "versions": [s["version"] for s in per],
        "boundary_s": sum(s["boundary_s"] for s in per),
        "blocked_s": blocked,
        "elapsed_s": elapsed,
        "compute_fraction": max(0.0, 1.0 - blocked / elapsed) if elapsed > 0 else 1.0,
        "sync": sync,
    }


def line_stats(engines: list) -> list[dict[str, Any]]:
    """Per model line (one, or one per fragment), read after the engines closed: the engine's
    bytes on the wire, its pushes the aggregator answered, those left undelivered, and
    ``push_bytes``, bytes sent per answered push (the push client's uploads and gRPC framing,
    plus the version stream's small requests); None when a push was left undelivered, whose
    bytes may be partly counted."""
    out = []
    for engine in engines:
        s = engine.stats
        answered = sum(s[k] for k in ("pushes_accepted", "pushes_replayed", "pushes_stale",
                                      "pushes_rejected"))  # fmt: skip
        out.append({
            "model_id": engine.model_id, "bytes_sent": s["bytes_sent"],
            "bytes_received": s["bytes_received"], "pushes": answered,
            "pushes_undelivered": s["pushes_pending"],
            "versions_received": s["versions_received"],
            "push_bytes": s["bytes_sent"] / answered if answered and not s["pushes_pending"]
            else None,
        })  # fmt: skip
    return out


def drain_all(parts: list, timeout_s: float) -> bool:
    """:func:`drain` of each ``LocalUpdate`` (the one, or each fragment's), ``timeout_s`` in
    all; True when none has anything left in flight."""
    deadline = time.monotonic() + timeout_s
    return all([drain(part, part.engine, deadline - time.monotonic()) for part in parts])


def drain(lu, engine, timeout_s: float) -> bool:
    """After the last round: adopt versions until every delta this island pushed is in the
    global model (or refused), for at most ``timeout_s``. True when nothing is left in
    flight. Every rank drains, so each keeps its engine up until its pushes are delivered."""
    from island.sync import SyncTimeoutError

    deadline = time.monotonic() + timeout_s
    while lu.state_dict()["in_flight"]:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            engine.wait_for_version(lu.version, left)
        except SyncTimeoutError:
            return False
        lu.catch_up()
    return True


# ============================================================================ hivemind


def counting_compression(counter):
    """A ``NoCompression`` that adds the size of every tensor part it serializes to
    ``counter`` (a ``multiprocessing.Value`` shared with hivemind's averager process)."""
    from hivemind.compression import NoCompression

    class CountingNoCompression(NoCompression):
        def compress(self, tensor, info, allow_inplace=False):
            message = super().compress(tensor, info, allow_inplace)
            with counter.get_lock():
                counter.value += message.ByteSize()
            return message

    return CountingNoCompression()


def _dht_peers(spec: dict[str, Any], dht) -> list[str]:
    """Rank 0 publishes its multiaddrs in ``run_dir/dht.json``; the others wait for them.
    The file appears whole (written aside, then renamed): a reader that found it created but
    not yet written read an empty file and failed (seen on a loaded machine)."""
    path = Path(spec["run_dir"]) / "dht.json"
    if spec["rank"] == 0:
        aside = path.with_suffix(".json.tmp")
        aside.write_text(json.dumps([str(a) for a in dht.get_visible_maddrs()]))
        os.replace(aside, path)
        return []
    deadline = time.monotonic() + spec["timeout_s"]
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not publish its DHT address in {path}")
        time.sleep(0.05)
    return json.loads(path.read_text())


def hivemind_worker(spec: dict[str, Any]) -> None:
    import multiprocessing as mp

    import hivemind

    rank, world, h = spec["rank"], spec["world"], spec["H"]
    listen = [f"/ip4/{spec.get('listen_host', '127.0.0.1')}/tcp/0"]
    if rank == 0:
        dht = hivemind.DHT(start=True, host_maddrs=listen)
        _dht_peers(spec, dht)
    else:
        dht = hivemind.DHT(start=True, host_maddrs=listen, initial_peers=_dht_peers(spec, None))
    workload = get_workload("bytelm", **spec["workload"])
    model = workload.build_model(spec["seed"])
    batch_size = spec["workload"]["batch_size"]
    allreduce_out = mp.Value("q", 0)
    state_out = mp.Value("q", 0)
    opt = hivemind.Optimizer(
        dht=dht, run_id=spec["run_id"], target_batch_size=world * batch_size * h,
        batch_size_per_step=batch_size, params=model.parameters(),
        optimizer=lambda params: make_adamw(params, spec), use_local_updates=True,
        matchmaking_time=spec["matchmaking_time"], averaging_timeout=spec["averaging_timeout"],
        next_chunk_timeout=spec.get("next_chunk_timeout"),
        state_averaging_compression=counting_compression(allreduce_out),
        load_state_compression=counting_compression(state_out), verbose=False,
    )  # fmt: skip
    lr_groups = opt.state_averager.optimizer.param_groups  # the live groups (not copies)
    batches = workload.train_batches(spec["data_seed"], shard=rank, num_shards=world)
    rec = Recorder(spec, workload, model)
    rec.optimizer_waits = True
    rec.barrier()
    step = 0
    while step < spec["steps"] and not rec.stopped():
        timed_step(rec, step, model, opt, next(batches), lr_groups, spec)
        step += 1
        if rank == 0 and step % h == 0:
            rec.evaluate(step, epoch=opt.local_epoch, allreduce_out=allreduce_out.value,
                         state_out=state_out.value)  # fmt: skip
    rec.write(step, epoch=opt.local_epoch, allreduce_out=allreduce_out.value,
              state_out=state_out.value)  # fmt: skip
    # the result is written: the launcher may kill this process group from here on
    opt.shutdown()
    dht.shutdown()


WORKERS = {"ddp": ddp_worker, "diloco": diloco_worker, "hivemind": hivemind_worker}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(spec.get("threads", 1))
    WORKERS[spec["method"]](spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
