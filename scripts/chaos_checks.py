"""The chaos harness's invariant checks, read from the daemons' own records.

Each ``check_*`` function is pure: it takes records already read and returns a list of
problems (strings; empty: the invariant holds), so a unit test can hand it a broken record set
and see it go red. The ``read_*`` functions read the records from stopped daemons' state
directories: an island's ``acks.jsonl`` (every push its aggregator answered, written by the
island daemon), its snapshots (anchor at a version) and its metrics file; the root's model
store (every published ``u_v`` envelope, with its contributors) and saved state (theta); the
root's log (the versions it published, in order, across restarts).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

UpdateId = tuple[str, int]  # (island peer id, sequence)
DELIVERED = ("accepted", "replayed")  # "replayed": the aggregator had it already


# --------------------------------------------------------------------------- pure checks


def check_acks_exactly_once(
    acks: Iterable[Mapping[str, Any]], contributors: Mapping[int, Iterable[Iterable[Any]]]
) -> list[str]:
    """Every update an island saw acknowledged is in exactly one version's contributors, and
    no update is in two versions."""
    where: dict[UpdateId, list[int]] = {}
    for version, listed in sorted(contributors.items()):
        for sender, seq in listed:
            where.setdefault((str(sender), int(seq)), []).append(int(version))
    problems = [
        f"update {s[:12]}#{q} is in {len(vs)} versions {vs} (counted more than once)"
        for (s, q), vs in sorted(where.items())
        if len(vs) > 1
    ]
    missing = sorted(
        {(str(a["sender"]), int(a["sequence"])) for a in acks if a.get("status") in DELIVERED}
        - set(where)
    )
    problems += [f"acknowledged update {s[:12]}#{q} is in no version (lost)" for s, q in missing]
    return problems


def check_versions_increase(
    headers: Iterable[tuple[int, int, int]], published: Iterable[int]
) -> list[str]:
    """The store holds versions 1..V, each ``u_v`` with sequence ``v`` on base ``v - 1``; the
    root published each version number once, in increasing order (across restarts)."""
    problems = []
    headers = sorted(headers)
    expected = list(range(1, len(headers) + 1))
    if [v for v, _, _ in headers] != expected:
        problems.append(f"stored versions are not 1..{len(headers)}: {[v for v, _, _ in headers]}")
    for v, seq, base in headers:
        if seq != v or base != v - 1:
            problems.append(f"u_{v} carries sequence {seq} on base {base}")
    last = 0
    for v in published:
        if v <= last:
            problems.append(f"version {v} published after version {last}")
        last = max(last, v)
    return problems


def check_island_versions(records: Iterable[Mapping[str, Any]], name: str) -> list[str]:
    """Within one run of an island (its metrics records until ``t`` restarts) its version
    never goes back."""
    problems, last_t, last_v = [], -math.inf, -1
    for r in records:
        t, v = float(r.get("t", 0.0)), int(r.get("version", -1))
        if t < last_t:  # a new incarnation: it resumed from a snapshot, maybe at an older one
            last_v = -1
        elif v < last_v:
            problems.append(
                f"{name}: version went back from {last_v} to {v} at step {r.get('step')}"
            )
        last_t, last_v = t, max(last_v, v)
    return problems


def digest(params: Mapping[str, np.ndarray]) -> str:
    """blake2b of the tensors' bytes in sorted-name order (``island.daemon.params_digest``)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(params):
        a = np.ascontiguousarray(params[name], dtype=np.float32)
        h.update(name.encode())
        h.update(a.tobytes())
    return h.hexdigest()


def rebuild_thetas(
    theta0: Mapping[str, np.ndarray], updates: Iterable[Mapping[str, np.ndarray]]
) -> list[str]:
    """Digests of theta_0, theta_1, ...: theta_0 plus the decoded u_v, by the replica rule."""
    from comms.update import apply_update

    theta = {k: np.array(v, dtype=np.float32, order="C") for k, v in theta0.items()}
    out = [digest(theta)]
    for u in updates:
        apply_update(theta, u)
        out.append(digest(theta))
    return out


def check_root_theta(thetas: list[str], root_version: int, root_theta_digest: str) -> list[str]:
    """The root's saved theta equals theta_0 plus every published u_v, bit for bit."""
    if root_version != len(thetas) - 1:
        return [f"root state at version {root_version}, store holds {len(thetas) - 1} versions"]
    if thetas[root_version] != root_theta_digest:
        return [f"root theta at version {root_version} differs from theta_0 + sum of u_v"]
    return []


def check_replicas(thetas: list[str], replicas: Iterable[tuple[str, int, str]]) -> list[str]:
    """Every replica (leaf, island anchor) at version v holds exactly theta_v's bits."""
    problems = []
    for name, version, dig in replicas:
        if not 0 <= version < len(thetas):
            problems.append(f"{name}: version {version} was never published")
        elif thetas[version] != dig:
            problems.append(f"{name}: at version {version} its bits differ from the root's")
    return problems


def check_loss(loss: float, reference: float | None, tolerance: float = 0.03) -> list[str]:
    if not math.isfinite(loss):
        return [f"final loss is {loss}"]
    if reference is None:
        return []
    if loss > reference * (1 + tolerance):
        return [f"final loss {loss:.4f} is {loss / reference - 1:+.1%} of the fault-free "
                f"{reference:.4f} (allowed {tolerance:.0%})"]  # fmt: skip
    return []


def check_leftovers(processes: Iterable[str], sockets: Iterable[str]) -> list[str]:
    problems = [f"process left behind: {p}" for p in processes]
    return problems + [f"socket file left behind: {s}" for s in sockets]


# --------------------------------------------------------------------------- readers


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line (the writer was killed mid-line)
            continue
    return out


def read_store(store_dir: str | os.PathLike, model_id: str):
    """(headers [(v, sequence, base)], contributors {v: [[sender, seq]]}, decoded u_v list,
    root version, root theta) from a root's model store."""
    from aggregator.store import ModelStore
    from comms.envelope import Envelope
    from comms.update import decode_update

    store = ModelStore(store_dir, model_id)
    headers, contributors, updates = [], {}, []
    for v in store.stored_versions():
        env = Envelope.from_bytes(store.get_version(v), max_bytes=1 << 32)
        headers.append((v, env.header.sequence, env.header.base_version))
        contributors[v] = env.header.meta.get("contributors", [])
        updates.append(decode_update(env))
    state = store.load_state()
    theta, version = {}, 0
    if state is not None:
        arrays, meta = state
        theta = {k[6:]: v for k, v in arrays.items() if k.startswith("theta/")}
        version = int(meta["version"])
    return headers, contributors, updates, version, theta


_PUBLISHED = re.compile(r": version (\d+) of (\S+) from ")


def read_published_text(text: str, model_id: str) -> list[int]:
    return [int(m.group(1)) for m in _PUBLISHED.finditer(text) if m.group(2) == model_id]


def read_published(log_path: str | os.PathLike, model_id: str) -> list[int]:
    """The version numbers a root logged as published, in order, across its restarts."""
    p = Path(log_path)
    return read_published_text(p.read_text(errors="replace"), model_id) if p.exists() else []


def read_island_anchors(snapshot_dir: str | os.PathLike, name: str) -> list[tuple[str, int, str]]:
    """(name, version, anchor digest) of each complete snapshot an island kept."""
    from island.snapshot import read_snapshot
    from island.snapshot.format import snapshot_dirs

    out = []
    for step, path in snapshot_dirs(Path(snapshot_dir)):
        try:
            state = read_snapshot(path)
        except Exception:  # incomplete (killed mid-write) or damaged: not a complete snapshot
            continue
        if "base_version" in state.meta and state.anchor:
            anchor = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v)
                      for k, v in state.anchor.items()}  # fmt: skip
            out.append((f"{name} snapshot@{step}", int(state.meta["base_version"]), digest(anchor)))
    return out


def read_live_replicas(addresses, model_id: str, reader) -> list[tuple[str, int, str]]:
    """(name, version, digest) of each aggregator's current theta, by a Fetch signed by
    ``reader`` (an Identity in the roster); ``addresses``: (name, host:port) pairs."""
    import asyncio

    from comms.envelope import Envelope
    from comms.transport import TransportClient
    from comms.update import decode_update

    async def fetch(address: str) -> tuple[int, str]:
        async with TransportClient(address, identity=reader) as c:
            env = Envelope.from_bytes(await c.fetch(model_id, -1), max_bytes=1 << 32)
        return env.header.base_version, digest(decode_update(env))

    return [(f"{name} (live)", *asyncio.run(fetch(address))) for name, address in addresses]
