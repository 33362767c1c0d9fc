"""Helpers for aggregator tests: a federation's keys and roster, configs, synthetic deltas,
versions computed by hand."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from aggregator.config import AggregatorConfig, MergeConfig, ModelConfig
from comms.identity import Identity, Roster
from comms.update import encode_update


@dataclass
class Federation:
    root: Path
    islands: list[Identity]
    aggregators: dict[str, Identity]
    roster: Roster
    theta0: dict[str, np.ndarray]
    roster_path: Path = field(init=False)
    init_path: Path = field(init=False)

    def __post_init__(self):
        self.roster_path = self.root / "roster.json"
        self.roster.save(self.roster_path)
        self.init_path = self.root / "init.safetensors"
        save_file(self.theta0, str(self.init_path))
        for name, ident in self.aggregators.items():
            ident.save(self.root / "keys" / f"{name}.pem")

    def config(self, name: str, role: str, parent: str = "", **merge) -> AggregatorConfig:
        """A config for aggregator ``name``; ``merge`` overrides MergeConfig fields (and
        ``codec``, the root's codec of published versions). The direction check is off unless
        asked for (``direction="reject"``): random deltas are not aligned with the last step."""
        models = [ModelConfig(model_id="global", init=str(self.init_path) if role == "root" else "",
                              codec=merge.pop("codec", "none"))]  # fmt: skip
        return AggregatorConfig(
            name=name,
            role=role,
            key=str(self.root / "keys" / f"{name}.pem"),
            roster=str(self.roster_path),
            state_dir=str(self.root / "state" / name),
            parent=parent,
            http="",
            merge=MergeConfig(**{"buffer_k": 4, "deadline_s": 60.0, "direction": "off", **merge}),
            models=models,
        )


def make_federation(tmp_path: Path, n_islands: int, aggregators=("root", "leaf0", "leaf1"),
                    shapes=None, seed=0) -> Federation:  # fmt: skip
    rng = np.random.default_rng(seed)
    shapes = shapes or {"w": (32, 16), "b": (16,)}
    theta0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    islands = [Identity.generate() for _ in range(n_islands)]
    aggs = {name: Identity.generate() for name in aggregators}
    roster = Roster()
    for i, ident in enumerate(islands):
        roster.add(ident.public_key, "island", f"island{i}")
    for name, ident in aggs.items():
        roster.add(ident.public_key, "aggregator", name)
    return Federation(tmp_path, islands, aggs, roster, theta0)


def random_delta(theta0: dict, seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in theta0.items()}


def delta_bytes(ident: Identity, delta, sequence: int, base_version: int = 0, codec="none",
                model_id="global") -> bytes:  # fmt: skip
    env = encode_update(delta, codec=codec, model_id=model_id, kind="delta", sender=ident.peer_id,
                        sequence=sequence, base_version=base_version, identity=ident)  # fmt: skip
    return env.to_bytes()


def hand_versions(theta0, rounds, lr=0.7, momentum=0.9, buffer_k=None, defer=False):
    """theta_v after each round, in float64 by hand: ``rounds`` lists (delta, staleness) pairs;
    g = sum w d / sum w with FedBuff's w = 1/sqrt(1+s), then Nesterov: m = mu m + g,
    u = -lr (g + mu m), theta += u. With ``buffer_k``, a round of n < buffer_k updates takes
    the share f = n / buffer_k of a step (the root's partial_step "scaled"): m = mu^f m + f g,
    u = -lr f (g + mu m). With ``defer`` too ("deferred"): while the bank F + f stays below 1,
    u = -lr f g and D += f g, F += f; the step reaching 1 takes m = mu m + (D + f g) / (F + f),
    u = -lr (f g + mu m) and empties the bank."""
    theta = {k: v.astype(np.float64) for k, v in theta0.items()}
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    bank, banked = {k: np.zeros_like(v) for k, v in theta.items()}, 0.0
    out = []
    for updates in rounds:
        w = [1.0 / np.sqrt(1.0 + s) for _, s in updates]
        f = 1.0 if buffer_k is None else min(1.0, len(updates) / buffer_k)
        short = defer and banked + f < 1.0 - 1e-6
        for k in theta:
            g = sum(wi * d[k].astype(np.float64) for wi, (d, _) in zip(w, updates, strict=True))
            g /= sum(w)
            if short:
                bank[k] = bank[k] + f * g
                theta[k] = theta[k] - lr * f * g
            elif defer:
                m[k] = momentum * m[k] + (bank[k] + f * g) / (banked + f)
                theta[k] = theta[k] - lr * (f * g + momentum * m[k])
                bank[k] = np.zeros_like(bank[k])
            else:
                m[k] = momentum**f * m[k] + f * g
                theta[k] = theta[k] - lr * f * (g + momentum * m[k])
        banked = banked + f if short else 0.0
        out.append({k: v.copy() for k, v in theta.items()})
    return out


def rejected_by_reason(service) -> dict[str, float]:
    """An aggregator's ``archipelago_updates_rejected_total`` by reason."""
    return {
        s.labels["reason"]: s.value
        for m in service.metrics.rejected.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }
