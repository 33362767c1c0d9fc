"""Benchmark merge throughput: the worker pool against in-process accumulate and plain numpy.

Every row merges the same float32 deltas (``--mib`` MiB each, ``--events`` of them) and
reports GB/s of float32 delta merged (``events * model bytes / seconds``):

- ``numpy a += b``: the memory-bandwidth ceiling of one add over the same bytes.
- ``accumulate (decoded)``: :func:`aggregator.merge.accumulate` of already decoded arrays
  into a partial that reuses the previous flush's buffers (the service's steady state);
  ``accumulate, fresh buffers``: the same into newly allocated ones (a first flush).
- ``decode+accumulate <codec>``: in process, from envelope bytes (what one worker does);
  ``sparse2`` is added at its kept entries only, and ``sparse2, densified`` decodes the same
  updates to dense arrays first (how sparse updates were merged before).
- ``pool <codec>, worker busy``: one pool worker, its own merge time (attach the shared
  blob, parse the header, decode, add into its shared buffer).
- ``pool <codec>, submit+flush``: wall time to submit every event (its bytes already in a
  shared blob, as when the gateway receives straight into one) and ``flush`` (wait, then sum
  the buffers into a new partial aggregate).
- ``pool <codec>, with copy to shm``: the same plus the gateway copying each envelope from
  private memory into a new shared blob first (``submit_bytes``).

Also reported: the peak bytes allocated to decode and add one update into existing buffers
(tracemalloc), per codec; and worker start time (``Process.start()`` to ready) with the forkserver (cold,
then warm) and with spawn.

    python scripts/bench_merge.py [--quick] [--mib N] [--events N] [--json PATH]
"""

from __future__ import annotations

import os

# One thread everywhere: set before numpy loads its thread pools.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import format_table, write_json  # noqa: E402

from aggregator.merge import PartialAggregate, accumulate  # noqa: E402
from aggregator.shm import ParamLayout, SharedBlob  # noqa: E402
from aggregator.workers import MergePool, decode_with_codec  # noqa: E402
from comms.codecs import SparseTensor, get_codec  # noqa: E402
from comms.envelope import Envelope, parse_header  # noqa: E402

SENDER = "bench-island"


def model_shapes(mib: int) -> dict[str, tuple[int, ...]]:
    """Four tensors of equal size, ``mib`` MiB of float32 in all."""
    numel = (mib << 20) // 4 // 4
    return {f"layer{i}.weight": (numel // 1024, 1024) for i in range(4)}


def make_envelopes(shapes, events: int, codec_name: str, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    codec = get_codec(codec_name)
    out = []
    for seq in range(events):
        tensors = [
            (
                name,
                shape,
                "float32",
                codec.spec(),
                codec.encode(rng.standard_normal(shape, np.float32)),
            )
            for name, shape in shapes.items()
        ]
        env = Envelope.build(
            model_id="bench", kind="delta", sender=SENDER, sequence=seq, tensors=tensors
        )
        out.append(env.to_bytes())
    return out


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_numpy(shapes, events: int, repeats: int) -> float:
    rng = np.random.default_rng(1)
    acc = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    deltas = {n: rng.standard_normal(s, np.float32) for n, s in shapes.items()}

    def run():
        for _ in range(events):
            for n, a in acc.items():
                a += deltas[n]

    return best_of(run, repeats)


def bench_accumulate(shapes, events: int, repeats: int, recycle: bool = True) -> float:
    """Best seconds to merge ``events`` deltas into a new partial. ``recycle``: the partial
    reuses the previous run's buffers, as the service hands a flushed partial's buffers to the
    next one (every flush after the first); else it faults in fresh pages (the first flush)."""
    rng = np.random.default_rng(1)
    deltas = {n: rng.standard_normal(s, np.float32) for n, s in shapes.items()}
    last = PartialAggregate()

    def run():
        nonlocal last
        partial = PartialAggregate(spare=last.weighted_sum if recycle else {})
        for _ in range(events):
            accumulate(partial, deltas, 0.7)
        last = partial

    return best_of(run, repeats)


def decode_envelope(data: bytes, densify: bool = False) -> dict:
    """The envelope's tensors as the merge takes them (a sparse codec's as its entries), or
    all as dense arrays with ``densify`` (how sparse updates were merged before)."""
    header = parse_header(data)
    payload = memoryview(data)[len(data) - header.payload_size :]
    delta = {}
    for t in header.tensors:
        x = decode_with_codec(t.codec, payload[t.offset : t.offset + t.nbytes], t.shape)
        delta[t.name] = x.dense() if densify and isinstance(x, SparseTensor) else x
    return delta


def bench_decode_accumulate(envelopes: list[bytes], repeats: int, densify: bool = False) -> float:
    last = PartialAggregate()

    def run():
        nonlocal last
        partial = PartialAggregate(spare=last.weighted_sum)  # the service's steady state
        for data in envelopes:
            accumulate(partial, decode_envelope(data, densify), 0.7)
        last = partial

    return best_of(run, repeats)


def peak_merge_bytes(envelopes: list[bytes], densify: bool = False) -> int:
    """Peak bytes allocated (tracemalloc) to decode and add one more update into a partial
    whose buffers already exist: the merge's own temporaries."""
    partial = PartialAggregate()
    accumulate(partial, decode_envelope(envelopes[0], densify), 0.7)
    tracemalloc.start()
    try:
        accumulate(partial, decode_envelope(envelopes[1], densify), 0.7)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def bench_pool(layout, envelopes: list[bytes], repeats: int) -> dict[str, float]:
    """Best seconds of one warm worker: ``copy`` (the gateway copies every envelope into a
    new shared blob), ``merge`` (submit the blobs, flush: wall) and ``busy`` (the worker's own
    merge time)."""
    best = {"copy": float("inf"), "merge": float("inf"), "busy": float("inf")}
    with MergePool(layout, max_workers=1, warm_workers=1, idle_timeout_s=600) as pool:
        pool.wait_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            blobs = [SharedBlob.from_bytes(data) for data in envelopes]
            copied = time.perf_counter()
            before = pool.stats().merge_seconds
            for seq, blob in enumerate(blobs):
                pool.submit_blob(blob, 0.7, (SENDER, seq))
            result = pool.flush(timeout=600)
            done = time.perf_counter()
            assert result.count == len(envelopes), f"merged {result.count} of {len(envelopes)}"
            del result, blobs
            best["copy"] = min(best["copy"], copied - start)
            best["merge"] = min(best["merge"], done - copied)
            best["busy"] = min(best["busy"], pool.stats().merge_seconds - before)
    return best


def worker_start_seconds(layout, method: str) -> float:
    with MergePool(layout, max_workers=1, warm_workers=1, start_method=method) as pool:
        pool.wait_ready()
        return pool.stats().last_worker_start_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="model size in MiB of float32")
    parser.add_argument("--events", type=int, default=6, help="updates merged per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="16 MiB, 4 events, 2 repeats")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.mib, args.events, args.repeats = 16, 4, 2

    shapes = model_shapes(args.mib)
    layout = ParamLayout.from_shapes(shapes)
    merged_bytes = args.events * layout.nbytes
    gbps: dict[str, float] = {}

    def record(name: str, seconds: float) -> None:
        gbps[name] = merged_bytes / seconds / 1e9

    # Before any other pool: the first forkserver start is the cold one.
    start_s = {
        "forkserver (cold)": worker_start_seconds(layout, "forkserver"),
        "forkserver (warm)": worker_start_seconds(layout, "forkserver"),
        "spawn": worker_start_seconds(layout, "spawn"),
    }

    record("numpy a += b", bench_numpy(shapes, args.events, args.repeats))
    record("accumulate (decoded)", bench_accumulate(shapes, args.events, args.repeats))
    record(
        "accumulate, fresh buffers",
        bench_accumulate(shapes, args.events, args.repeats, recycle=False),
    )
    peak_mb: dict[str, float] = {}
    for codec in ("none", "int8", "sparse2"):
        envelopes = make_envelopes(shapes, args.events, codec)
        record(f"decode+accumulate {codec}", bench_decode_accumulate(envelopes, args.repeats))
        peak_mb[codec] = peak_merge_bytes(envelopes) / 1e6
        if codec == "sparse2":  # against the same updates decoded to dense arrays first
            dense = bench_decode_accumulate(envelopes, args.repeats, densify=True)
            record(f"decode+accumulate {codec}, densified", dense)
            peak_mb[f"{codec}, densified"] = peak_merge_bytes(envelopes, densify=True) / 1e6
        pool = bench_pool(layout, envelopes, args.repeats)
        record(f"pool {codec}, worker busy", pool["busy"])
        record(f"pool {codec}, submit+flush", pool["merge"])
        record(f"pool {codec}, with copy to shm", pool["copy"] + pool["merge"])
        del envelopes

    ceiling = gbps["numpy a += b"]
    rows = [[name, value, value / ceiling] for name, value in gbps.items()]
    print(f"{args.events} deltas of {args.mib} MiB float32, best of {args.repeats}")
    print(format_table(["merge", "GB/s", "vs numpy"], rows))
    print()
    print(format_table(["worker start", "ms"], [[k, 1e3 * v] for k, v in start_s.items()]))
    print()
    print(format_table(["decode+add one update", "peak MB allocated"], list(peak_mb.items())))
    write_json(
        args.json,
        {
            "mib": args.mib,
            "events": args.events,
            "repeats": args.repeats,
            "gbps": gbps,
            "worker_start_s": start_s,
            "peak_merge_mb": peak_mb,
        },
    )


if __name__ == "__main__":
    main()
