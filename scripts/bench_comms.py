"""Benchmark the tensor codecs side by side, against hivemind's fp16 codec.

Every codec encodes and decodes the same Gaussian float32 tensor (64 MiB, or 4 MiB with
``--quick``) on one thread; the figure is the best of a few repeats of one full round trip,
reported as GB/s of float32 input. Also reported: relative L2 error ``||x - y|| / ||x||`` and
payload bytes per parameter.

    python scripts/bench_comms.py [--quick] [--repeats N] --json PATH

The JSON holds ``{"codecs": {name: {"gbps", "rel_error", "bytes_per_param"}},
"hivemind_fp16": {"gbps", "rel_error"}, "grpc_push_mbps": ..., ...}``.
"""

from __future__ import annotations

import os

# One thread everywhere: set before numpy or torch load their thread pools.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from comms.codecs import REQUIRED_CODECS, get_codec  # noqa: E402

FULL_BYTES = 64 << 20
QUICK_BYTES = 4 << 20


def best_seconds(round_trip: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls (after one warm-up call)."""
    round_trip()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        round_trip()
        best = min(best, time.perf_counter() - start)
    return best


def relative_error(x: np.ndarray, y: np.ndarray) -> float:
    x64 = x.astype(np.float64).ravel()
    return float(
        np.linalg.norm(x64 - np.asarray(y, dtype=np.float64).ravel()) / np.linalg.norm(x64)
    )


def bench_codec(name: str, x: np.ndarray, repeats: int) -> dict[str, float]:
    codec = get_codec(name)
    seconds = best_seconds(lambda: codec.decode(codec.encode(x), x.shape), repeats)
    payload = codec.encode(x)
    return {
        "gbps": x.nbytes / seconds / 1e9,
        "rel_error": relative_error(x, codec.decode(payload, x.shape)),
        "bytes_per_param": len(payload) / x.size,
    }


def bench_hivemind_fp16(x: np.ndarray, repeats: int) -> dict[str, float]:
    import torch
    from hivemind.compression import CompressionInfo, Float16Compression

    torch.set_num_threads(1)
    tensor = torch.from_numpy(x)
    codec = Float16Compression()
    info = CompressionInfo.from_tensor(tensor)
    seconds = best_seconds(lambda: codec.extract(codec.compress(tensor, info)), repeats)
    serialized = codec.compress(tensor, info)
    return {
        "gbps": x.nbytes / seconds / 1e9,
        "rel_error": relative_error(x, codec.extract(serialized).numpy()),
        "bytes_per_param": len(serialized.buffer) / x.size,
    }


def bench_grpc_push(nbytes: int) -> float | None:
    """Throughput in MB/s of one push of ``nbytes`` over the gRPC transport on loopback.

    Returns None for now: it is filled in when the transport (comms/transport.py) lands.
    """
    del nbytes
    return None


def format_table(results: dict) -> str:
    lines = [f"{'codec':<16}{'GB/s':>8}{'rel_error':>12}{'bytes/param':>13}"]
    rows = [*results["codecs"].items(), ("hivemind fp16", results["hivemind_fp16"])]
    for name, row in rows:
        lines.append(
            f"{name:<16}{row['gbps']:>8.2f}{row['rel_error']:>12.2e}{row['bytes_per_param']:>13.4f}"
        )
    lines.append(f"int8 vs hivemind fp16 speed: {results['int8_vs_hivemind_fp16']:.2f}x")
    grpc = results["grpc_push_mbps"]
    lines.append(
        f"gRPC push: {'n/a (transport not wired yet)' if grpc is None else f'{grpc:.1f} MB/s'}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 MiB tensor instead of 64 MiB")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many round trips")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    nbytes = QUICK_BYTES if args.quick else FULL_BYTES
    x = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
    codecs = {name: bench_codec(name, x, args.repeats) for name in REQUIRED_CODECS}
    hivemind_fp16 = bench_hivemind_fp16(x, args.repeats)
    results = {
        "tensor_bytes": nbytes,
        "repeats": args.repeats,
        "threads": 1,
        "machine": platform.processor() or platform.machine(),
        "codecs": codecs,
        "hivemind_fp16": hivemind_fp16,
        "int8_vs_hivemind_fp16": codecs["int8"]["gbps"] / hivemind_fp16["gbps"],
        "grpc_push_mbps": bench_grpc_push(nbytes),
    }
    print(f"tensor: {nbytes >> 20} MiB float32 Gaussian, 1 thread, best of {args.repeats}")
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
