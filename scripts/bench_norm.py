"""What the norm bound costs the gateway: one island update admitted with and without its norm.

    python scripts/bench_norm.py [--params 1e6,4e6,16e6] [--codec int8] [--repeat 5]

Per update size, the median over ``--repeat`` admissions of one signed delta (the parts of
``aggregator.gateway.admit`` that differ):

- ``validate``: ``Codec.validate`` only: the pool engine's gateway with ``clip = "off"``;
- ``norm_streamed``: decode one tensor at a time for the norm, keep nothing: the pool engine's
  gateway with the bound on (the workers decode again to merge);
- ``decode``: ``decode_update``: the inline engine's gateway, which decodes anyway;
- ``decode_norm``: ``decode_update`` then ``update_norm``: the inline engine with the bound.

The shapes are a transformer's (square matrices of 512 x 512 and vectors), the values Gaussian.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aggregator.gateway import encoded_norm, validate_update  # noqa: E402
from aggregator.robust import update_norm  # noqa: E402
from comms.envelope import Envelope  # noqa: E402
from comms.identity import Identity  # noqa: E402
from comms.update import Manifest, decode_update, encode_update  # noqa: E402


def make_update(params: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out, n, i = {}, 0, 0
    while n < params:
        shape = (512, 512) if i % 4 else (512,)
        out[f"t{i:04d}"] = (0.01 * rng.standard_normal(shape)).astype(np.float32)
        n += out[f"t{i:04d}"].size
        i += 1
    return out


def timed(fn, env, manifest, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(env, manifest)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="1e6,4e6,16e6")
    p.add_argument("--codec", default="int8")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    ident = Identity.generate()
    print(f"codec {args.codec}, median of {args.repeat}; milliseconds per update")
    print(f"{'params':>10} {'validate':>9} {'norm_streamed':>14} {'decode':>8} {'decode_norm':>12}")
    for params in (int(float(x)) for x in args.params.split(",")):
        update = make_update(params)
        manifest = Manifest.from_arrays(update)
        data = encode_update(update, codec=args.codec, model_id="m", kind="delta",
                             sender=ident.peer_id, sequence=1, identity=ident).to_bytes()  # fmt: skip
        env = Envelope.from_bytes(data, max_bytes=1 << 34)
        fns = {
            "validate": lambda e, m: validate_update(e, m),
            "norm_streamed": encoded_norm,
            "decode": decode_update,
            "decode_norm": lambda e, m: update_norm(decode_update(e, m)),
        }
        t = {k: timed(fn, env, manifest, args.repeat) for k, fn in fns.items()}
        n = sum(v.size for v in update.values())
        print(f"{n:>10} {1e3 * t['validate']:>9.1f} {1e3 * t['norm_streamed']:>14.1f} "
              f"{1e3 * t['decode']:>8.1f} {1e3 * t['decode_norm']:>12.1f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
