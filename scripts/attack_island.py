"""A malicious (or merely measured) island: the normal ``island run`` daemon with its
pseudo-gradient transformed just before it is encoded and signed.

    python scripts/attack_island.py --attack scale [--factor 1e6] [--norm-log FILE] CONFIG.toml

Nothing here is part of the product: the wrapper replaces ``encode_update`` inside the island's
push queue (``island.sync.pushes``) with one that transforms the delta, then runs the island's
own command line (``island.cli.main(["run", CONFIG])``). Everything else (training, error
feedback, signatures, the push queue, snapshots) is the unmodified daemon.

Attacks (``--attack``):

- ``none``: honest (with ``--norm-log``: measures the norms of its updates);
- ``scale``: ``delta * factor`` (default 1e6);
- ``signflip``: ``-factor * delta`` (default factor 1: the honest step reversed);
- ``noise``: Gaussian noise with the delta's own L2 norm, times ``factor`` (default 1);
- ``nan``: the delta with one NaN, sent with the ``none`` codec (int8's encoder refuses NaN);
- ``stale``: the honest delta claiming a base version ``lag`` (default 64) versions behind.

``--delta-dir DIR`` saves each push as the aggregator decodes it (``SEQUENCE-BASE.npz``), for
offline measurements of directions. ``--norm-log FILE`` appends one JSON line per push: ``sequence``, ``base_version`` (as sent),
``norm`` (L2 of what the aggregator decodes), ``raw_norm`` (L2 of the honest delta), ``t``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ATTACKS = ("none", "scale", "signflip", "noise", "nan", "stale")
DEFAULT_FACTOR = {"scale": 1e6}


def l2(arrays) -> float:
    return math.sqrt(sum(float(np.dot(v.reshape(-1).astype(np.float64), v.reshape(-1).astype(np.float64)))
                         for v in arrays.values()))  # fmt: skip


def transform(delta: dict, attack: str, factor: float, rng: np.random.Generator) -> dict:
    """The malicious island's delta in place of the honest ``delta`` (new float32 arrays)."""
    if attack == "scale":
        return {k: np.multiply(v, np.float32(factor), dtype=np.float32) for k, v in delta.items()}
    if attack == "signflip":
        return {k: np.multiply(v, np.float32(-factor), dtype=np.float32) for k, v in delta.items()}
    if attack == "noise":
        noise = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in delta.items()}
        s = np.float32(factor * l2(delta) / max(l2(noise), 1e-30))
        return {k: np.multiply(v, s, dtype=np.float32) for k, v in noise.items()}
    if attack == "nan":
        out = {k: np.array(v, dtype=np.float32) for k, v in delta.items()}
        first = sorted(out)[0]
        out[first].reshape(-1)[0] = np.nan
        return out
    return {k: np.asarray(v, dtype=np.float32) for k, v in delta.items()}


def install(
    attack: str, factor: float, lag: int, seed: int, norm_log: str, delta_dir: str = ""
) -> None:
    """Replace the push queue's ``encode_update`` with the attacker's."""
    import island.sync.pushes as pushes
    from comms.envelope import Envelope
    from comms.update import decode_update

    honest_encode = pushes.encode_update
    rng = np.random.default_rng(seed)

    def encode_update(delta, **kw):
        raw_norm = l2(delta)
        bad = transform(delta, attack, factor, rng)
        if attack == "stale":
            kw["base_version"] = max(0, kw["base_version"] - lag)
        if attack == "nan":  # the codecs refuse NaN: lay the envelope out by hand
            env = Envelope.build(
                model_id=kw["model_id"], kind=kw["kind"], sender=kw["sender"],
                sequence=kw["sequence"], base_version=kw["base_version"], meta=kw.get("meta"),
                tensors=[(k, v.shape, "float32", {"name": "none"}, v) for k, v in bad.items()],
            ).sign(kw["identity"])  # fmt: skip
            norm = math.nan
        else:
            env = honest_encode(bad, **kw)
            decoded = decode_update(env) if norm_log or delta_dir else None
            norm = l2(decoded) if decoded is not None else math.nan
            if delta_dir:  # what the aggregator decodes, for offline direction measurements
                Path(delta_dir).mkdir(parents=True, exist_ok=True)
                np.savez(Path(delta_dir) / f"{kw['sequence']:06d}-{kw['base_version']}.npz",
                         **decoded)  # fmt: skip
        if norm_log:
            with open(norm_log, "a") as f:
                f.write(json.dumps({"t": time.time(), "sequence": kw["sequence"],
                                    "base_version": kw["base_version"], "norm": norm,
                                    "raw_norm": raw_norm, "attack": attack}) + "\n")  # fmt: skip
        return env

    pushes.encode_update = encode_update


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attack", choices=ATTACKS, default="none")
    p.add_argument("--factor", type=float, help="scale: 1e6; signflip and noise: 1")
    p.add_argument("--lag", type=int, default=64, help="stale: versions behind")
    p.add_argument("--seed", type=int, default=0, help="noise: the generator's seed")
    p.add_argument("--norm-log", default="", help="append one JSON line per push here")
    p.add_argument("--delta-dir", default="", help="save each decoded push here (.npz)")
    p.add_argument("--log-level", default="info")
    p.add_argument("config")
    args = p.parse_args(argv)
    factor = args.factor if args.factor is not None else DEFAULT_FACTOR.get(args.attack, 1.0)
    install(args.attack, factor, args.lag, args.seed, args.norm_log, args.delta_dir)
    from island.cli import main as island_main

    return island_main(["run", args.config, "--log-level", args.log_level])


if __name__ == "__main__":
    raise SystemExit(main())
