"""The merge worker process and its kernels: ``S += w_i * delta_i`` into one shared buffer.

What a worker computes is :func:`aggregator.merge.accumulate` (FedBuff, Nguyen et al. 2022):
``S += w_i * delta_i`` in float32, where ``delta_i`` is decoded with the codec its envelope
names (the ``none`` codec is read in place from shared memory, no decoded copy; a decoder can
be injected). Only a reference to the envelope's bytes travels to the worker: a
:class:`MergeEvent` names a shared blob (:class:`~aggregator.pool.shm.BlobRef`) or a range of
a file (:class:`FileRef`, e.g. a WAL record).

Concurrency: one process per worker. It blocks on its pipe to the pool's dispatcher thread,
merges one event at a time into the one shared buffer it is bound to, and reports each event
``merged``, ``failed``, ``tainted`` (it failed after changing the buffer's contents) or
``skipped`` (it was queued for contents the worker had already tainted).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from aggregator.merge import UpdateId, scale_tensor, scaled_add_, scaled_copy
from aggregator.pool.shm import BlobRef, SharedBlob, SharedParams
from comms.codecs.base import SparseTensor

DecodeFn = Callable[[dict, memoryview, tuple[int, ...]], np.ndarray | SparseTensor]
"""``decode(codec_spec, payload, shape) -> float32 array``; must be picklable (module level)."""

_BLOCK = 1 << 16  # elements per block of the fused add: 256 KiB of float32, fits in L2


@dataclass(frozen=True)
class FileRef:
    """An update's envelope bytes in a file, e.g. a write-ahead-log record's body."""

    path: str
    offset: int
    length: int


@dataclass(frozen=True)
class MergeEvent:
    """One accepted update to merge: where its envelope lies, and how much it weighs."""

    source: BlobRef | FileRef
    weight: float
    update_id: UpdateId  # (sender, sequence); must match the envelope's header
    staleness: int = 0
    scale: float = 1.0  # the gateway's clip of the update's data (weight unchanged): S += w*(s*x)
    work: float = 1.0  # the update's share of a full round (aggregator.gateway.update_work)


def decode_with_codec(
    codec_spec: dict, payload: memoryview, shape: tuple[int, ...]
) -> np.ndarray | SparseTensor:
    """The default decoder: the codec the envelope names (``comms.codecs``, imported lazily);
    a sparse codec's tensor comes as its nonzero entries, added without a dense copy."""
    from comms.codecs import codec_from_spec

    codec = codec_from_spec(codec_spec)
    sparse = codec.decode_sparse(payload, shape)
    return codec.decode(payload, shape) if sparse is None else sparse


def _merge_weight(weight: float) -> np.float32:
    w = np.float32(weight)
    if not (math.isfinite(weight) and np.isfinite(w) and w > 0):
        raise ValueError(f"merge weight must be a finite positive number, got {weight!r}")
    return w


def _clip_scale(scale: float) -> np.float32:
    s = np.float32(scale)
    if not (math.isfinite(scale) and 0 <= s <= 1):
        raise ValueError(f"clip scale must be in [0, 1], got {scale!r}")
    return s


# ---------------------------------------------------------------- the worker process


@dataclass
class _WorkerState:
    gen: int  # generation of the buffer's contents this worker is adding to
    clean: bool  # the buffer holds nothing of this generation yet: overwrite, don't add
    dead_gen: int | None = None  # a generation this worker corrupted: skip its events


def _read_file_ref(ref: FileRef) -> bytes:
    chunks, offset, left = [], ref.offset, ref.length
    fd = os.open(ref.path, os.O_RDONLY)
    try:
        while left > 0:
            chunk = os.pread(fd, left, offset)
            if not chunk:
                raise ValueError(
                    f"{ref.path}: file ends before byte {ref.offset + ref.length} of the event"
                )
            chunks.append(chunk)
            offset += len(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _add_raw_float32(dst: np.ndarray, payload: memoryview, weight: np.float32, fresh: bool) -> None:
    """The ``none`` codec without a decoded copy: ``dst (+)= weight * x`` read straight from the
    shared payload, block by block, refusing NaN/Inf as ``NoneCodec.decode`` does. Same float32
    operations as :func:`~aggregator.merge.scaled_add_`, so the result is bit-identical."""
    from comms.errors import MalformedError, NonFiniteError

    flat = dst.reshape(-1)
    if payload.nbytes != 4 * flat.size:
        raise MalformedError(f"none: payload is {payload.nbytes} bytes for {flat.size} elements")
    src = np.frombuffer(payload, dtype="<f4")
    scratch = np.empty(min(flat.size, _BLOCK), dtype=np.float32)
    for start in range(0, flat.size, _BLOCK):
        stop = min(start + _BLOCK, flat.size)
        buf = scratch[: stop - start]
        np.multiply(src[start:stop], weight, out=buf)
        if not (np.isfinite(buf.max()) and np.isfinite(buf.min())):
            raise NonFiniteError("none: payload holds non-finite values (NaN or Inf)")
        if fresh:
            flat[start:stop] = buf
        else:
            np.add(flat[start:stop], buf, out=flat[start:stop])


def _add_envelope(acc, data, event, fresh, decode, verify_digest, max_bytes) -> tuple[str, str]:
    """Add ``weight * decode(envelope)`` into ``acc``: ``("merged"|"failed"|"tainted", why)``.

    ``tainted`` means ``acc`` was partly changed before the failure (not on a fresh buffer,
    which the next event overwrites whole anyway).
    """
    from comms.envelope import Envelope, parse_header
    from comms.errors import MalformedError

    try:
        if verify_digest:
            envelope = Envelope.from_bytes(data, max_bytes=max_bytes)
            header, payload = envelope.header, envelope.payload
        else:  # the gateway verified digest and signature before it accepted the update
            header = parse_header(data)
            if header.payload_size > len(data):
                raise MalformedError(f"envelope truncated: payload needs {header.payload_size} B")
            payload = data[len(data) - header.payload_size :]
        if (header.sender, header.sequence) != tuple(event.update_id):
            raise ValueError(
                f"envelope is update ({header.sender}, {header.sequence}), the event says "
                f"{event.update_id}"
            )
        shapes = acc.layout.shapes()
        got = {t.name: t.shape for t in header.tensors}
        if got != shapes:
            raise ValueError(
                f"envelope tensors {sorted(got)[:8]} or their shapes differ from the model's "
                f"layout ({len(shapes)} tensors)"
            )
    except Exception as e:  # hostile bytes raise an open set of types; all mean "reject"
        return "failed", f"{type(e).__name__}: {e}"
    weight = _merge_weight(event.weight)
    scale = _clip_scale(event.scale)
    touched = False
    try:
        for spec in header.tensors:
            encoded = payload[spec.offset : spec.offset + spec.nbytes]
            dst = acc.arrays[spec.name]
            zero_copy = decode is decode_with_codec and spec.codec == {"name": "none"}
            if zero_copy and dst.size and scale == 1:
                touched = True
                _add_raw_float32(dst, encoded, weight, fresh)  # zero copy from shared memory
                continue
            x = decode(spec.codec, encoded, spec.shape)
            if x.shape != spec.shape:
                raise ValueError(f"decoder gave shape {x.shape} for {spec.name!r} {spec.shape}")
            if scale != 1:  # the gateway's gateway.scale_update, to the bit
                x = scale_tensor(x, scale)
            touched = True
            if fresh:
                scaled_copy(x, weight, dst)
            else:
                scaled_add_(dst, x, weight)
    except Exception as e:
        return ("tainted" if touched and not fresh else "failed"), f"{type(e).__name__}: {e}"
    return "merged", ""


def _merge_one(state, acc, event, gen, decode, verify_digest, max_bytes) -> tuple[str, str]:
    if gen == state.dead_gen:
        return "skipped", ""
    if gen != state.gen:
        state.gen, state.clean = gen, True
    try:
        if isinstance(event.source, BlobRef):
            blob = SharedBlob.attach(event.source)
            try:
                outcome = _add_envelope(
                    acc, blob.view, event, state.clean, decode, verify_digest, max_bytes
                )
            finally:
                blob.close()
        else:
            data = memoryview(_read_file_ref(event.source))
            outcome = _add_envelope(acc, data, event, state.clean, decode, verify_digest, max_bytes)
    except (OSError, ValueError) as e:  # the blob or file is gone or short
        return "failed", f"cannot read the event's bytes: {type(e).__name__}: {e}"
    if outcome[0] == "merged":
        state.clean = False
    elif outcome[0] == "tainted":
        state.dead_gen = gen
    return outcome


def _worker_main(conn, buffer_name, layout, gen, clean, decode, verify_digest, max_bytes) -> None:
    """A merge worker: merge each event the gateway sends into one shared buffer, report it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway decides when workers stop
    import comms.envelope  # before "ready", not on the first event

    if decode is None:
        import comms.codecs  # noqa: F401

        decode = decode_with_codec
    acc = SharedParams.attach(layout, buffer_name)
    state = _WorkerState(gen=gen, clean=clean)
    try:
        conn.send(("ready", os.getpid()))
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the gateway is gone
            if message[0] == "stop":
                return
            _, ordinal, msg_gen, event = message
            start = time.perf_counter()
            outcome, why = _merge_one(state, acc, event, msg_gen, decode, verify_digest, max_bytes)
            conn.send((outcome, ordinal, msg_gen, time.perf_counter() - start, why))
    finally:
        acc.close()
