"""Benchmark the tensor codecs side by side, against hivemind's fp16 codec, and the gRPC push.

Every codec encodes and decodes the same Gaussian float32 tensor (64 MiB, or 4 MiB with
``--quick``) on one thread; the figure is the best of a few repeats of one full round trip,
reported as GB/s of float32 input. Also reported: relative L2 error ``||x - y|| / ||x||`` and
payload bytes per parameter.

The transport figure pushes a blob of the same size through a real ``TransportServer`` and
``TransportClient`` (comms/transport.py) on 127.0.0.1: best of at least 3 pushes after a
warm-up, in MB/s (1e6 bytes of payload per second).

    python scripts/bench_comms.py [--quick] [--repeats N] --json PATH

The JSON holds ``{"codecs": {name: {"gbps", "rel_error", "bytes_per_param"}},
"hivemind_fp16": {"gbps", "rel_error", "bytes_per_param"}, "grpc_push_mbps": ...,
"grpc_push_bytes": ..., ..., "meta": {date, machine, command}}``.
"""

from __future__ import annotations

import os

# One thread everywhere: set before numpy or torch load their thread pools.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import asyncio  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from benchlib import format_table, write_json  # noqa: E402

from comms.codecs import REQUIRED_CODECS, get_codec  # noqa: E402
from comms.errors import MalformedError, NotFoundError  # noqa: E402

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


class _SizeCheckingSink:
    """A push-only transport handler: checks each blob's size and keeps nothing."""

    def __init__(self, expected_bytes: int):
        self.expected_bytes = expected_bytes
        self.deliveries = 0

    async def on_push(self, upload_id: str, data: bytes, metadata: dict[str, str]) -> dict:
        if len(data) != self.expected_bytes:
            raise MalformedError(
                f"push {upload_id}: {len(data)} bytes, expected {self.expected_bytes}"
            )
        self.deliveries += 1
        return {"size": len(data)}

    async def subscribe(self, model_id: str, from_version: int):
        raise NotFoundError(f"this benchmark server publishes no model ({model_id!r})")
        yield  # an async generator that yields nothing

    async def fetch(self, model_id: str, version: int) -> bytes:
        raise NotFoundError(f"this benchmark server holds no snapshot of {model_id!r}")


async def _best_push_seconds(blob: bytes, repeats: int) -> float:
    from comms.transport import TransportClient, TransportServer

    sink = _SizeCheckingSink(len(blob))
    server = TransportServer(sink, "127.0.0.1", 0)
    port = await server.start()
    client = TransportClient(f"127.0.0.1:{port}", deadline_s=60.0)
    try:
        await client.push(blob)  # warm-up: channel, connection, allocator
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            ack = await client.push(blob)
            best = min(best, time.perf_counter() - start)
            if int(ack["size"]) != len(blob):
                raise RuntimeError(f"server acknowledged {ack['size']} of {len(blob)} bytes")
    finally:
        await client.close()
        await server.stop(0)
    if sink.deliveries != repeats + 1:
        raise RuntimeError(f"{sink.deliveries} deliveries for {repeats + 1} pushes")
    return best


def bench_grpc_push(nbytes: int, repeats: int = 3) -> float:
    """Best throughput in MB/s (1e6 bytes of payload per second) of pushing an ``nbytes``
    blob through a real ``TransportServer`` and ``TransportClient`` on loopback.

    Each push is the full client path: whole-blob digest, 4 MiB digested chunks, the
    server's reassembly and digest checks, and the handler's acknowledgement.
    """
    blob = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    seconds = asyncio.run(_best_push_seconds(blob, repeats))
    return nbytes / seconds / 1e6


def report(results: dict) -> str:
    rows = [
        [name, row["gbps"], f"{row['rel_error']:.2e}", row["bytes_per_param"]]
        for name, row in [*results["codecs"].items(), ("hivemind fp16", results["hivemind_fp16"])]
    ]
    codecs = format_table(["codec", "GB/s (fp32 in)", "rel_error", "bytes/param"], rows)
    transport = format_table(
        ["transport (loopback)", "payload MiB", "MB/s"],
        [["gRPC push", results["grpc_push_bytes"] >> 20, results["grpc_push_mbps"]]],
    )
    speedup = f"int8 vs hivemind fp16 speed: {results['int8_vs_hivemind_fp16']:.2f}x"
    return "\n\n".join([codecs, speedup, transport])


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
        "codecs": codecs,
        "hivemind_fp16": hivemind_fp16,
        "int8_vs_hivemind_fp16": codecs["int8"]["gbps"] / hivemind_fp16["gbps"],
        "grpc_push_bytes": nbytes,
        "grpc_push_mbps": bench_grpc_push(nbytes, repeats=max(3, args.repeats)),
    }
    print(f"tensor: {nbytes >> 20} MiB float32 Gaussian, 1 thread, best of {args.repeats}")
    print(report(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
