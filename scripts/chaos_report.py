"""The chaos harness's results: a stopped run's checks applied to its daemons' records
(``run_result``), its figures (goodput, restart-to-progress, recovery after a freeze or a cut,
kills by role) and the table: one row per scenario, and the problems under it."""

from __future__ import annotations

import contextlib
import signal
import statistics
from pathlib import Path
from typing import Any

import chaos_checks as checks
from chaos_procs import LEAVES, MODEL_ID, N_ISLANDS, lingering_processes


def print_table(results: list[dict]) -> str:
    head = ("| scenario | passed | kills (island/leaf/root) | aimed faults fired | versions | "
            "loss | vs baseline | goodput | restart to first accepted push (median/max s) | "
            "restart to first ack, accepted or replayed (median/max s) | restart to first version (median/max s) | recovery after freeze/cut (s) | s |")  # fmt: skip
    lines = [head, "|---|---|---|---|--:|--:|--:|--:|---|---|---|--:|--:|"]
    for r in results:
        if "not_run" in r or "kills" not in r:
            why = r.get("not_run") or "; ".join(
                p for ps in r.get("problems", {}).values() for p in ps
            )
            lines.append(f"| {r['scenario']} | {'not run' if 'not_run' in r else 'NO'}: {why} |")
            continue
        k = r["kills"]
        vs = f"{r['loss_vs_baseline']:+.2%}" if r["loss_vs_baseline"] is not None else "-"
        p, v = r["restart_to_first_push"], r["restart_to_first_version"]
        a = r.get("restart_to_first_ack", {"n": 0})
        rec = "-" if r.get("recovery_s") is None else r["recovery_s"]
        lines.append(
            f"| {r['scenario']} | {'yes' if r['passed'] else 'NO'} | "
            f"{k.get('island', 0)}/{k.get('leaf', 0)}/{k.get('root', 0)} | "
            f"{len(r['faults_fired'])} | {r['versions']} | {r['loss']:.4f} | {vs} | "
            f"{r['goodput']} | {_fmt(p)} | {_fmt(a)} | {_fmt(v)} | {rec} | "
            f"{r['seconds']:.0f} |"
        )
    table = "\n".join(lines)
    print(table, flush=True)
    for r in results:
        for what, ps in r.get("problems", {}).items():
            for p in ps:
                print(f"  {r['scenario']}: {what}: {p}", flush=True)
    return table


def _fmt(s: dict) -> str:
    return f"{s['median_s']} / {s['max_s']} (n={s['n']})" if s.get("n") else "-"


def recovery(run, acks: list[dict]) -> float | None:
    """Seconds from the end of a freeze (SIGCONT) or a link cut (mended) to the first
    accepted push of an island behind it."""
    for e in run.events:
        if "sigcont" in e:
            leaf = e["sigcont"]
            names = [f"island{i}" for i in range(N_ISLANDS) if LEAVES[i % len(LEAVES)] == leaf]
        elif "mend" in e:
            names = [e["mend"]]
        else:
            continue
        senders = {run.peer_ids[n] for n in names}
        after = [a["t"] for a in acks if a["sender"] in senders and a.get("status") == "accepted"
                 and a["t"] > e["wall"]]  # fmt: skip
        return round(min(after) - e["wall"], 1) if after else None
    return None


def kill_counts(run) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in run.daemons.values():
        n = sum(1 for r in d.runs if r.killed or (r.rc == -signal.SIGKILL))
        if n:
            counts[d.role] = counts.get(d.role, 0) + n
    return counts


def figures(run, contributors: dict, acks: list[dict]) -> dict[str, Any]:
    """Goodput and restart-to-progress times."""
    steps = {}
    for a in acks:
        steps.setdefault((a["sender"], int(a["sequence"])), int(a.get("steps") or 0))
    in_versions = sum(steps.get((str(s), int(q)), 0) for cs in contributors.values()
                      for s, q in cs)  # fmt: skip
    computed = 0
    for d in run.daemons.values():
        if d.role != "island":
            continue
        for k, r in enumerate(d.runs):
            end = run.args.steps if (k == len(d.runs) - 1 and d.done) else r.last_step
            computed += max(0, end - r.resumed_step)
    island_restart = [r.first_progress - r.start for d in run.daemons.values()
                      if d.role == "island" for r in d.runs[1:] if r.first_progress]  # fmt: skip
    island_ack = [r.first_ack - r.start for d in run.daemons.values()
                  if d.role == "island" for r in d.runs[1:] if r.first_ack]  # fmt: skip
    root_restart = [r.first_progress - r.start for r in run.daemons["root"].runs[1:]
                    if r.first_progress]  # fmt: skip
    ready = [r.ready - r.start for d in run.daemons.values() for r in d.runs[1:] if r.ready]

    def summary(xs: list[float]) -> dict[str, Any]:
        if not xs:
            return {"n": 0}
        return {"n": len(xs), "median_s": round(statistics.median(xs), 1),
                "max_s": round(max(xs), 1)}  # fmt: skip

    return {
        "goodput": round(in_versions / computed, 3) if computed else None,
        "steps_in_versions": in_versions,
        "steps_computed": computed,
        "restart_to_first_push": summary(island_restart),
        "restart_to_first_ack": summary(island_ack),
        "restart_to_first_version": summary(root_restart),
        "restart_to_ready": summary(ready),
    }


def run_result(run, replicas: list, reference: dict[str, Any] | None) -> dict[str, Any]:
    """A stopped run's checks (read from its daemons' records), figures and facts."""
    from safetensors.numpy import load_file

    headers, contributors, updates, root_version, root_theta = checks.read_store(
        Path(run.path("state", "root", "store")), MODEL_ID
    )
    thetas = checks.rebuild_thetas(load_file(run.path("init.safetensors")), updates)
    acks, summaries, anchors, island_version_problems = [], [], [], []
    for i in range(N_ISLANDS):
        name = f"island{i}"
        acks += checks.read_jsonl(run.path("state", name, "acks.jsonl"))
        anchors += checks.read_island_anchors(run.path("state", name), name)
        child = run.daemons[name].child
        s = child.json_summary() if child else {}
        if "anchor_digest" in s:
            anchors.append((f"{name} final", int(s["version"]), s["anchor_digest"]))
        summaries.append(s)
        island_version_problems += checks.check_island_versions(
            checks.read_jsonl(run.path("state", name, "metrics.jsonl")), name
        )
    published = checks.read_published(run.path("logs", "root.log"), MODEL_ID)
    leftover_procs = lingering_processes(run.run_id)
    sockets = {p for p in run.sockets_seen | run.sockets_of_killed if p.exists()}
    loss = run.evaluate(root_theta)
    ref_loss = reference["loss"] if reference else None
    problems = {
        "acks_exactly_once": checks.check_acks_exactly_once(acks, contributors),
        "root_theta": checks.check_root_theta(thetas, root_version, checks.digest(root_theta)),
        "replicas": checks.check_replicas(thetas, replicas + anchors),
        "versions_increase": checks.check_versions_increase(headers, published)
        + island_version_problems,
        "loss": checks.check_loss(loss, ref_loss, run.args.loss_tolerance),
        "leftovers": checks.check_leftovers(
            leftover_procs, sorted(str(s) for s in sockets - run.sockets_of_killed)
        ),
    }
    for s in sockets:  # clean up what killed p2pd daemons left (reported above)
        with contextlib.suppress(OSError):
            s.unlink()
    return {
        "scenario": run.scenario,
        "seed": run.args.seed,
        "passed": not any(problems.values()),
        "problems": problems,
        "versions": root_version,
        "loss": loss,
        "loss_vs_baseline": loss / ref_loss - 1 if ref_loss else None,
        "acked_updates": len(
            {(a["sender"], a["sequence"]) for a in acks if a.get("status") in checks.DELIVERED}
        ),
        "replicas_checked": len(replicas) + len(anchors),
        "kills": kill_counts(run),
        "faults_fired": [e for e in run.events if "fault" in e],
        "unexpected_exits": [e for e in run.events if "exit" in e],
        "sockets_left_by_kill_9": len(sockets & run.sockets_of_killed),
        **figures(run, contributors, acks),
        "recovery_s": recovery(run, acks),
        "train_seconds": round(run.train_seconds, 1),
        "events": run.events,
    }
