"""Fuzz targets for what peers send: update envelopes, the gateway's admission, WAL records
and segment files, codec payloads, chunk streams, DHT records and signed read requests.

Registered in ``fuzz_targets.TARGETS`` on import (``fuzz_targets.targets()`` does it).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import struct
from types import SimpleNamespace
from typing import Any

import msgpack
import numpy as np
from fuzz_mutations import havoc, interesting_value, mutate_tree
from fuzz_targets import (
    AGGREGATOR,
    ISLAND,
    KEYS,
    MAX_ENVELOPE_BYTES,
    SHAPES,
    STRANGER,
    InvariantError,
    Target,
    check_arrays,
    fresh_dir,
    manifest,
    register,
    roster,
)

from comms.errors import (
    CommsError,
    ProtocolVersionError,
    ReadDeniedError,
    RejectedError,
    TooManyReadsError,
)

# --- the update envelope ----------------------------------------------------------------------


def _delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (0.01 * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}


CODEC_SPECS = ("none", "fp16", "bf16", {"name": "int8", "block": 8}, {"name": "int4", "block": 4},
               {"name": "topk", "fraction": 0.25},
               {"name": "sparse2", "density": 0.25, "chunk": 8})  # fmt: skip
PARTIAL_META = {"weight_sum": 2.5, "count": 3, "max_staleness": 1,
                "contributors": [["island-a", 1], ["island-b", 7]]}  # fmt: skip


def envelope_seeds() -> list[bytes]:
    from comms.update import encode_update

    out = []
    for i, codec in enumerate(CODEC_SPECS):
        env = encode_update(_delta(i), codec=codec, model_id="global", kind="delta",
                            sender=ISLAND.peer_id, sequence=i + 1, base_version=3,
                            meta={"steps": 10, "tokens": 1280}, identity=ISLAND)  # fmt: skip
        out.append(env.to_bytes())
    partial = encode_update(_delta(9), codec="none", model_id="global", kind="partial",
                            sender=AGGREGATOR.peer_id, sequence=4, base_version=5,
                            meta=dict(PARTIAL_META), identity=AGGREGATOR)  # fmt: skip
    unsigned = encode_update(_delta(10), codec="int8", model_id="global", kind="delta",
                             sender=ISLAND.peer_id, sequence=9)  # fmt: skip
    return [_at_fixed_time(e) for e in (*out, partial.to_bytes())] + [
        _at_fixed_time(unsigned.to_bytes(), sign=False)
    ]


SEED_TIME = 1_900_000_000.0  # seeds carry fixed times: a run's inputs depend on its seed alone


def _at_fixed_time(data: bytes, sign: bool = True) -> bytes:
    header, _, payload = split_envelope(data)
    header["created_at"] = SEED_TIME
    framed = join_envelope(random.Random(0), header, payload)
    if sign:
        return framed
    n = struct.unpack_from(">I", framed, 6)[0]
    return framed[: 10 + n] + b"\x00" + framed[10 + n + 1 + 64 :]


def split_envelope(data: bytes) -> tuple[Any, bytes, bytes]:
    """(decoded header, signature, payload) of a well-framed envelope (a seed)."""
    from comms.envelope import PREAMBLE_BYTES

    n = struct.unpack_from(">I", data, 6)[0]
    header = msgpack.unpackb(data[PREAMBLE_BYTES : PREAMBLE_BYTES + n], raw=False)
    sig_len = data[PREAMBLE_BYTES + n]
    start = PREAMBLE_BYTES + n + 1
    return header, data[start : start + sig_len], data[start + sig_len :]


def join_envelope(rng: random.Random, header: Any, payload: bytes, fix: bool = True) -> bytes:
    """Frame ``header`` and ``payload``; with ``fix``, recompute the payload's size and digest
    and sign the header with the key of its sender (the island's key for an unknown one)."""
    from comms import PROTOCOL_VERSION
    from comms.envelope import MAGIC, SIGNING_CONTEXT

    if fix and isinstance(header, dict):
        header["payload_size"] = len(payload)
        header["payload_digest"] = hashlib.sha256(payload).digest()
    try:
        header_bytes = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):  # a value msgpack cannot carry: send raw
        header_bytes = rng.randbytes(16)
    sender = header.get("sender") if isinstance(header, dict) else None
    signer = KEYS.get(sender, ISLAND) if isinstance(sender, str) else ISLAND
    sig = signer.sign(SIGNING_CONTEXT + header_bytes) if fix or rng.random() < 0.5 else b""
    preamble = struct.pack(">4sHI", MAGIC, PROTOCOL_VERSION, len(header_bytes))
    return preamble + header_bytes + bytes([len(sig)]) + sig + payload


def _tensor_edit(rng: random.Random, spec: dict) -> None:
    key = rng.choice(("shape", "shape", "codec", "codec", "nbytes", "offset", "dtype", "name"))
    if key == "shape":
        shape = spec.get("shape")
        if isinstance(shape, list) and shape and rng.random() < 0.7:
            shape[rng.randrange(len(shape))] = rng.choice((0, 1, 2**31, 2**32, 10**12, 2**62))
        else:
            spec["shape"] = rng.choice(([], [0], [10**12], [2**32, 2**32], [1] * 65))
    elif key == "codec" and isinstance(spec.get("codec"), dict):
        codec = spec["codec"]
        param = rng.choice(("name", "block", "fraction", "density", "chunk", "extra"))
        codec[param] = interesting_value(rng, "msgpack")
        if rng.random() < 0.5:  # a plausible one, to reach the codec's own checks
            codec[param] = rng.choice(
                ("int8", "int4", "topk", "sparse2", 1, 2, 3, 2**16, 2**20, 1e-12, 1.0)
            )
    else:
        spec[key] = interesting_value(rng, "msgpack")


def _scribble_floats(rng: random.Random, payload: bytearray) -> None:
    """NaN, Inf, huge and denormal float32 patterns at aligned offsets (values and scales)."""
    patterns = (b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\x7f\x7f", b"\x01\x00\x00\x00",
                b"\xff\xff\xff\xff", b"\x80\x00\x00\x00")  # fmt: skip
    for _ in range(rng.randrange(1, 4)):
        if len(payload) >= 4:
            at = rng.randrange(len(payload) // 4) * 4
            payload[at : at + 4] = rng.choice(patterns)


def mutate_envelope(rng: random.Random, data: bytes) -> bytes:
    """Change the header or payload of a seed envelope, then (mostly) fix its digest and
    re-sign it with a roster key, so the checks behind the signature run."""
    header, _, payload = split_envelope(data)
    payload = bytearray(payload)
    op = rng.randrange(5)
    if op == 0:
        header = mutate_tree(rng, header, "msgpack")
    elif op == 1 and header["tensors"]:
        _tensor_edit(rng, rng.choice(header["tensors"]))
    elif op == 2:
        _scribble_floats(rng, payload)
    elif op == 3:
        header["meta"] = mutate_tree(rng, header["meta"], "msgpack")
        if rng.random() < 0.5 and isinstance(header["meta"], dict):
            header["meta"][rng.choice(("tokens", "weight_sum", "count", "max_staleness",
                                       "contributors"))] = interesting_value(rng, "msgpack")  # fmt: skip
    else:
        header[rng.choice(("kind", "sender", "base_version", "sequence", "model_id"))] = rng.choice(
            ("partial", "delta", "version", AGGREGATOR.peer_id, STRANGER.peer_id, 0, 2**63 - 1, 99)
        )
    return join_envelope(rng, header, bytes(payload), fix=rng.random() < 0.85)


def run_envelope(data: bytes) -> None:
    from comms.envelope import Envelope
    from comms.update import decode_update, expected_nbytes

    env = Envelope.from_bytes(data, max_bytes=MAX_ENVELOPE_BYTES, expected_nbytes=expected_nbytes)
    env.verify(roster())
    check_arrays(decode_update(env, manifest()), "decode_update")


register(Target(
    "envelope", "comms.envelope.Envelope.from_bytes + verify + comms.update.decode_update",
    run_envelope, (CommsError,), envelope_seeds, (mutate_envelope,),
))  # fmt: skip


# --- the gateway's admission, and its WAL records ----------------------------------------------


# What the transport answers with a status code (comms.transport.errors).
ADMISSION_ERRORS = (RejectedError, ProtocolVersionError)


def _policy():
    from aggregator.gateway import AdmissionPolicy
    from aggregator.staleness import get_staleness_function

    return AdmissionPolicy(roster(), get_staleness_function("fedbuff"), max_staleness=16, clip_norm=None,
                           weight_by_samples=True, max_bytes=MAX_ENVELOPE_BYTES)  # fmt: skip


def _admit(data, logged=None, decode=True):
    from aggregator.gateway import admit
    from aggregator.merge import PartialAggregate
    from comms.identity import ReplayGuard

    admitted = admit(data, policy=_policy(), manifests=lambda m: manifest() if m == "global" else None,
                     v_now=lambda m: 5, guard=ReplayGuard(), logged=logged,
                     decode=decode)  # fmt: skip
    if admitted.delta is not None:
        check_arrays(admitted.delta, "admitted delta")
    if admitted.delta is not None or admitted.partial is not None:
        try:  # what admission accepts, the merge must take
            admitted.merge_into(PartialAggregate())
        except ValueError as e:
            raise InvariantError(f"admitted, but the merge refuses it: {e}") from e
    return admitted


def run_gateway(data: bytes) -> None:
    _admit(data, decode=bool(data[-1] & 1) if data else True)


register(Target(
    "gateway", "aggregator.gateway.admit (decode and validate-only) + merge_into",
    run_gateway, ADMISSION_ERRORS, envelope_seeds, (mutate_envelope,),
))  # fmt: skip


def wal_record_seeds() -> list[bytes]:
    from aggregator.gateway import wal_record

    out = []
    for i, env in enumerate(envelope_seeds()[:-1]):  # the signed ones
        # every other record clipped (scale < 1, norm logged), as the norm bound logs them
        admitted = SimpleNamespace(staleness=i % 3, weight=1.0 / math.sqrt(1 + i % 3),
                                   partial=None, norm=2.0 + i, scale=(1.0, 0.25)[i % 2])  # fmt: skip
        out.append(wal_record(admitted, env))
    return out


def mutate_wal_record(rng: random.Random, data: bytes) -> bytes:
    n = int.from_bytes(data[:4], "big")
    head, rest = msgpack.unpackb(data[4 : 4 + n]), data[4 + n :]
    if rng.random() < 0.7:
        head = mutate_tree(rng, head, "msgpack")
    else:
        rest = mutate_envelope(rng, rest)
    try:
        packed = msgpack.packb(head, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        packed = rng.randbytes(8)
    n = len(packed) if rng.random() < 0.9 else rng.choice((0, 2**32 - 1, len(packed) + 1))
    return n.to_bytes(4, "big") + packed + rest


def run_wal_record(data: bytes) -> None:
    from aggregator.gateway import parse_wal_record

    head, body = parse_wal_record(data)
    _admit(body, logged=head)  # the replay path of a restarted aggregator


register(Target(
    "wal_record", "aggregator.gateway.parse_wal_record + admit(logged) (WAL replay)",
    run_wal_record, ADMISSION_ERRORS, wal_record_seeds, (mutate_wal_record,),
))  # fmt: skip


# --- the write-ahead log's segment files ---------------------------------------------------------

SEGMENT = "00000000000000000001.wal"


def wal_log_seeds() -> list[bytes]:
    from aggregator.wal import WriteAheadLog

    out = []
    records = wal_record_seeds()
    for n in (1, 3, 5):
        d = fresh_dir("wal-seed")
        wal = WriteAheadLog(d)
        for i, body in enumerate(records[:n]):
            wal.append(body)
            if i == 1:
                wal.intent(2, msgpack.packb({"seq": 1, "guard": {"global/x": 3}}))
                wal.mark_done(2, msgpack.packb({"seq": 1, "guard": {}}))
        wal.close()
        out.append((d / SEGMENT).read_bytes())
    return out


def _wal_records(data: bytes) -> list[list]:
    from aggregator.wal import _HEAD

    records, pos = [], 0
    while pos + _HEAD.size <= len(data):
        _, rtype, index, length, _ = _HEAD.unpack_from(data, pos)
        body = data[pos + _HEAD.size : pos + _HEAD.size + length]
        records.append([rtype, index, body])
        pos += _HEAD.size + length
    return records


def mutate_wal_log(rng: random.Random, data: bytes) -> bytes:
    """Edit one record's type, index, length or body and write a valid digest for it."""
    from aggregator.wal import _HEAD, MAGIC, _digest

    records = _wal_records(data)
    rec = rng.choice(records)
    op = rng.randrange(4)
    if op == 0:
        rec[0] = rng.choice((0, 1, 2, 3, 4, 255))
    elif op == 1:
        rec[1] = rng.choice((0, 1, 2, 3, 2**32, 2**63, 2**64 - 1))
    elif op == 2:
        rec[2] = havoc(rng, rec[2])
    elif len(records) > 1:
        records.insert(rng.randrange(len(records)), list(rng.choice(records)))
    out = b""
    for rtype, index, body in records:
        out += _HEAD.pack(MAGIC, rtype, index, len(body), _digest(rtype, index, body)) + body
    return out


def run_wal_log(data: bytes) -> None:
    """Open a log whose one segment holds ``data``, read everything a restart reads, append,
    and check that the appended record is found by the next open."""
    from aggregator.wal import WriteAheadLog

    d = fresh_dir("wal")
    (d / SEGMENT).write_bytes(data)
    wal = WriteAheadLog(d, segment_bytes=1 << 20)
    list(wal.pending())
    wal.pending_intents()
    wal.last_mark_note()
    index = wal.append(b"probe")
    wal.compact()
    wal.close()
    again = WriteAheadLog(d, segment_bytes=1 << 20)
    found = [r.body for r in again.pending() if r.index == index]
    again.close()
    if index > again.mark and found != [b"probe"]:
        raise InvariantError(f"record {index} appended after recovery is not found on reopen")


register(Target(
    "wal_log", "aggregator.wal.WriteAheadLog (open/recover, pending, intents, append, reopen)",
    run_wal_log, (CommsError,), wal_log_seeds, (mutate_wal_log,),
))  # fmt: skip


# --- codecs on arbitrary payloads and shapes --------------------------------------------------


def codec_seeds() -> list[bytes]:
    from comms.codecs import get_codec

    out = []
    for i, spec in enumerate(CODEC_SPECS):
        codec = get_codec(spec)
        shape = [(5,), (3, 7), (64,), (2, 2, 9), (0,), (), (5, 7)][i]
        x = np.random.default_rng(i).standard_normal(shape).astype(np.float32)
        out.append(msgpack.packb([codec.spec(), list(shape), codec.encode(x)], use_bin_type=True))
    return out


def _codec_args(data: bytes) -> tuple[Any, Any, bytes]:
    """(spec, shape, payload) from a container, or derived from raw bytes: byte 0 picks the
    codec, byte 1 the shape's length in elements relative to the payload."""
    from comms.codecs import REQUIRED_CODECS

    try:
        spec, shape, payload = msgpack.unpackb(data, raw=False, strict_map_key=False)
        if isinstance(payload, bytes):
            return spec, shape, payload
    except Exception:
        pass
    if len(data) < 2:
        return {"name": "none"}, [len(data)], data
    payload = data[2:]
    numel = [len(payload) // 4, len(payload) // 2, len(payload), data[1], 2**31][data[1] % 5]
    return {"name": REQUIRED_CODECS[data[0] % len(REQUIRED_CODECS)]}, [numel], payload


def mutate_codec_input(rng: random.Random, data: bytes) -> bytes:
    from comms.codecs import codec_from_spec

    spec, shape, payload = msgpack.unpackb(data, raw=False)
    op = rng.randrange(4)
    if op == 0:
        spec = mutate_tree(rng, spec, "msgpack")
    elif op == 1:
        shape = rng.choice(([10**12], [2**31], [0], [-1], [1.5], [2**32, 2**32], ["3"], None,
                            [len(payload)], [rng.randrange(1, 300)]))  # fmt: skip
    elif op == 2:
        payload = bytearray(payload)
        _scribble_floats(rng, payload)
        payload = bytes(payload)
    else:
        payload = havoc(rng, payload)
    if rng.random() < 0.5:  # a payload of the size the (new) spec and shape imply
        try:
            numel = math.prod(int(d) for d in shape)
            size = codec_from_spec(spec).encoded_nbytes(numel)
            if 0 <= size <= 1 << 16:
                payload = rng.randbytes(size)
        except Exception:
            pass
    try:
        return msgpack.packb([spec, shape, payload], use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return data


def run_codec(data: bytes) -> None:
    """``decode`` and ``validate`` must refuse the same inputs, with the same error type; a
    decoded array must be finite float32 of the declared shape."""
    from comms.codecs import codec_from_spec

    spec, shape, payload = _codec_args(data)
    codec = codec_from_spec(spec)
    try:
        codec.validate(payload, shape)
        refused = None
    except RejectedError as e:
        refused = e
    try:
        out = codec.decode(payload, shape)
    except RejectedError as e:
        if refused is None or type(refused) is not type(e):
            raise InvariantError(f"validate said {refused!r}, decode raised {e!r}") from e
        raise
    if refused is not None:
        raise InvariantError(f"validate refused ({refused}) what decode accepts")
    if out.dtype != np.float32 or list(out.shape) != [int(d) for d in shape]:
        raise InvariantError(f"decode returned {out.dtype} {out.shape} for shape {shape}")
    if not np.isfinite(out).all():
        raise InvariantError("decode returned non-finite values")


register(Target(
    "codecs", "comms.codecs: codec_from_spec, Codec.validate and Codec.decode",
    run_codec, (RejectedError,), codec_seeds, (mutate_codec_input,),
))  # fmt: skip


# --- chunk streams: resumable upload reassembly --------------------------------------------------


def _chunk_messages(upload_id: str, blob: bytes, size: int, start: int = 0) -> list[list]:
    from comms.chunks import digest, split_chunks

    d = digest(blob)
    return [[upload_id, len(blob), d, c.offset, c.data, b"", c.crc32]
            for c in split_chunks(blob, size, start)]  # fmt: skip


def chunk_seeds() -> list[bytes]:
    blob = bytes(range(256)) * 5
    a = _chunk_messages("up-a", blob, 300)
    b = _chunk_messages("up-b", blob[:700], 128)
    resumed = a[:2] + a[1:]  # a resent chunk (refused), then the rest
    interleaved = [m for pair in zip(a, b, strict=False) for m in pair] + a[len(b) :]
    with_digest = [[*m[:5], hashlib.sha256(m[4]).digest(), None] for m in b]
    empty = _chunk_messages("up-e", b"", 16)
    return [msgpack.packb(m, use_bin_type=True)
            for m in (a, resumed, interleaved, with_digest, empty)]  # fmt: skip


def mutate_chunks(rng: random.Random, data: bytes) -> bytes:
    from comms.chunks import chunk_crc32

    msgs = msgpack.unpackb(data, raw=False)
    msg = rng.choice(msgs)
    op = rng.randrange(6)
    if op == 0:
        msg[rng.randrange(7)] = interesting_value(rng, "msgpack")
    elif op == 1:
        msg[rng.choice((1, 3))] = rng.choice((0, 1, 2**20, 2**30 + 1, 2**63, 2**64 - 1, msg[3] + 1))
    elif op == 2:  # damaged data with a matching CRC: only the whole-blob digest can tell
        msg[4] = havoc(rng, msg[4])
        msg[6] = chunk_crc32(msg[4])
    elif op == 3:
        msgs.insert(rng.randrange(len(msgs) + 1), list(rng.choice(msgs)))
    elif op == 4:
        del msgs[rng.randrange(len(msgs))]
    else:
        msg[5], msg[6] = rng.choice(((b"", None), (rng.randbytes(32), None), (b"x", msg[6])))
    try:
        return msgpack.packb(msgs, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return data


def _as_message(m: Any) -> tuple:
    """A message as protobuf would type it: ``PushChunk``'s fields (str, uint64, bytes...)."""
    m = list(m) if isinstance(m, list) else [m]
    m += [None] * (7 - len(m))

    def u(x, bits):
        return x % (1 << bits) if type(x) is int else 0

    def b(x):
        return x if isinstance(x, bytes) else str(x).encode() if x is not None else b""

    crc = m[6] % (1 << 32) if type(m[6]) is int else None
    return str(m[0] or ""), u(m[1], 64), b(m[2]), u(m[3], 64), b(m[4]), b(m[5]), crc


def _messages(data: bytes) -> list[tuple]:
    try:
        msgs = msgpack.unpackb(data, raw=False, strict_map_key=False)
        if isinstance(msgs, list) and msgs:
            return [_as_message(m) for m in msgs[:64]]
    except Exception:
        pass
    # Raw bytes: a declared size and digest, then the rest cut into 7-byte chunks.
    total = int.from_bytes(data[:4], "big")
    d, rest = data[4:36], data[36:]
    from comms.chunks import chunk_crc32

    return [("raw", total, d, off, rest[off : off + 7], b"", chunk_crc32(rest[off : off + 7]))
            for off in range(0, max(len(rest), 1), 7)]  # fmt: skip


def run_chunks(data: bytes) -> None:
    """Feed the messages to an ``UploadTable`` as the Push servicer does (open on a new id,
    ``expect``, ``verify_chunk``, ``add``, ``finish`` once complete); each refused message
    ends its stream, as it would on the wire; the first refusal is reported."""
    from comms.chunks import UploadTable, digest, verify_chunk

    now = [0.0]
    table = UploadTable(max_upload_bytes=1 << 20, max_uploads=3, max_bytes=2 << 20,
                        expiry_s=5.0, clock=lambda: now[0])  # fmt: skip
    first: RejectedError | None = None
    for upload_id, total, blob_digest, offset, chunk, chunk_digest, crc in _messages(data):
        now[0] += 1.0
        try:
            if upload_id in table.outcomes:
                continue
            upload = table.open(upload_id, total, blob_digest, {})
            if upload.assembler is None:
                continue
            upload.assembler.expect(offset, len(chunk))
            verify_chunk(chunk, chunk_digest, crc, offset=offset, name=upload_id)
            upload.assembler.add(offset, chunk, verified=True)
            if upload.assembler.complete:
                blob = upload.assembler.finish()
                if len(blob) != total or digest(blob) != blob_digest:
                    raise InvariantError(f"upload {upload_id!r} finished with the wrong bytes")
                table.record(upload, "delivered")
        except RejectedError as e:
            first = first or e
            if upload_id in table.partial and table.partial[upload_id].assembler is None:
                table.forget(upload_id)
    if first is not None:
        raise first


register(Target(
    "chunks", "comms.chunks: UploadTable.open, ChunkAssembler.expect/add/finish, verify_chunk",
    run_chunks, (RejectedError,), chunk_seeds, (mutate_chunks,),
))  # fmt: skip


# --- DHT records ---------------------------------------------------------------------------------

DHT_NOW = 1_900_000_000.0


def discovery_seeds() -> list[bytes]:
    from comms.discovery import encode_record

    entries = [
        ("island", ISLAND.peer_id, ISLAND, {"address": "10.0.0.1:7000", "load": 0.5}),
        ("aggregator", "leaf-eu", AGGREGATOR, {"address": "10.0.0.2:7100", "role": "leaf",
                                                "model_ids": ["global"], "load": 3}),
        ("model", "global", AGGREGATOR, {"version": 12, "root": "10.0.0.3:7000"}),
        ("expert", "e0", ISLAND, {"cluster": 0, "uri": "file:///x"}),
    ]  # fmt: skip
    out = []
    for kind, name, ident, fields in entries:
        value = encode_record(ident, kind, name, fields, DHT_NOW + 60)
        out.append(msgpack.packb([kind, name, value, DHT_NOW + 60], use_bin_type=True))
    return out


def mutate_discovery(rng: random.Random, data: bytes) -> bytes:
    from comms.discovery import signed_payload

    kind, name, value, dht_exp = msgpack.unpackb(data, raw=False)
    op = rng.randrange(4)
    if op == 0:
        value = mutate_tree(rng, value, "msgpack")
    elif op == 1:
        value["exp"] = rng.choice(
            (math.nan, math.inf, -1.0, 0, DHT_NOW, DHT_NOW + 1e9, 2**63, True)
        )
    elif op == 2:
        value["fields"] = mutate_tree(rng, value["fields"], "msgpack")
    else:
        name = interesting_value(rng, "msgpack")
    if isinstance(value, dict) and rng.random() < 0.8:  # re-sign what the owner would sign
        owner = next((k for k in KEYS.values() if k.public_key == value.get("pk")), None)
        with contextlib.suppress(Exception):
            value["sig"] = owner.sign(signed_payload(kind, name, value["fields"], value["exp"]))
    try:
        return msgpack.packb([kind, name, value, dht_exp], use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return data


def run_discovery(data: bytes) -> None:
    """A DHT entry as hivemind hands it over (msgpack-decoded), through ``decode_record``."""
    from comms.discovery import decode_record

    try:
        kind, name, value, dht_exp = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        kind, name, dht_exp = "island", ISLAND.peer_id, DHT_NOW + 60
        try:
            value = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception:
            value = data
    if not isinstance(dht_exp, int | float) or isinstance(dht_exp, bool):
        dht_exp = DHT_NOW + 60  # hivemind's own expiration is always a float
    with_roster = roster() if len(data) % 2 else None
    record = decode_record(str(kind), name, value, float(dht_exp), DHT_NOW, with_roster)
    if not (math.isfinite(record.expiration) and record.expiration > DHT_NOW):
        raise InvariantError(f"record accepted with expiration {record.expiration}")


register(Target(
    "discovery", "comms.discovery.decode_record (signed, expiring DHT records)",
    run_discovery, (RejectedError,), discovery_seeds, (mutate_discovery,),
))  # fmt: skip

# --- signed read requests (gRPC Fetch / Subscribe) ------------------------------------------------
#
# One input is a short series of reads at one server, each step ``[method, request, advance_s]``:
# the serialized ``FetchRequest`` / ``SubscribeRequest`` as gRPC hands it to the servicer, and
# how far the server's clock moves before it arrives. Each request is admitted as
# ``_Servicer._admit_read`` does (``ReadAuth`` from its ``auth`` field, then
# ``ReadGuard.check``) by a guard with small nonce caps, so replays and full tables are reached
# within one input. A reference model of the guard's rules says what each request deserves
# (the reason of a refusal, or admission), and the guard must agree.

READ_NOW = 1_900_000_000.0  # the server's clock at the first step
READ_WINDOW_S = 120.0
READ_MAX_NONCES, READ_MAX_PER_SENDER = 8, 4
READ_MAX_STEPS = 64
READ_PUBLIC = "open"
READ_REASONS = ("unsigned", "unknown_reader", "read_expired", "read_future",
                "bad_read_signature", "read_replay", "too_many_reads")  # fmt: skip


def _read_request(method: str, model_id: str, version: int, auth: Any = None) -> bytes:
    from comms.proto import archipelago_pb2 as pb

    if method == "Subscribe":
        msg = pb.SubscribeRequest(model_id=model_id, from_version=version, protocol_version=3)
    else:
        msg = pb.FetchRequest(model_id=model_id, version=version, protocol_version=3)
    if auth is not None:
        msg.auth.sender, msg.auth.timestamp_ms = auth.sender, auth.timestamp_ms
        msg.auth.nonce, msg.auth.signature = auth.nonce, auth.signature
    return msg.SerializeToString()


def _signed_read(signer, method: str, model_id: str, version: int, at: float,
                 nonce: bytes) -> bytes:  # fmt: skip
    from comms.reads import ReadAuth, read_signing_bytes

    ts = int(at * 1000)
    body = read_signing_bytes(method, model_id, version, signer.peer_id, ts, nonce)
    return _read_request(method, model_id, version,
                         ReadAuth(signer.peer_id, ts, nonce, signer.sign(body)))  # fmt: skip


def _nonce(rng: random.Random) -> bytes:
    return rng.randbytes(16)


def reads_seeds() -> list[bytes]:
    rng = random.Random(7)
    t = READ_NOW
    valid = [
        ["Fetch", _signed_read(ISLAND, "Fetch", "global", -1, t, _nonce(rng)), 0.0],
        ["Subscribe", _signed_read(AGGREGATOR, "Subscribe", "global", 5, t + 1, _nonce(rng)), 1.5],
        ["Fetch", _signed_read(ISLAND, "Fetch", "global", 12, t + 2, _nonce(rng)), 1.0],
    ]
    public = [
        ["Subscribe", _read_request("Subscribe", READ_PUBLIC, 0), 0.0],
        ["Fetch", _signed_read(ISLAND, "Fetch", READ_PUBLIC, -1, t, _nonce(rng)), 0.0],
    ]
    later = [  # the nonces of the first two expire; then a read signed 100 s behind the server
        *valid[:2],
        ["Fetch", _signed_read(ISLAND, "Fetch", "global", 3, t + 250, _nonce(rng)), 250.0],
        ["Subscribe", _signed_read(ISLAND, "Subscribe", "global", 0, t + 150, _nonce(rng)), 0.0],
    ]
    refused = [  # replayed, from a stranger, unsigned: each refused, the valid ones admitted
        *valid[:1],
        valid[0],
        ["Fetch", _signed_read(STRANGER, "Fetch", "global", -1, t, _nonce(rng)), 0.0],
        ["Fetch", _read_request("Fetch", "global", -1), 0.0],
        valid[2],
    ]
    stepped_back = [  # a read's nonce is forgotten, then the clock steps back and it returns
        valid[0],
        ["Fetch", _signed_read(ISLAND, "Fetch", "global", -1, t + 121, _nonce(rng)), 121.0],
        [*valid[0][:2], -2.0],
    ]
    flood = [["Fetch", _signed_read(ISLAND, "Fetch", "global", -1, t, _nonce(rng)), 0.0]
             for _ in range(READ_MAX_PER_SENDER + 1)]  # fmt: skip
    return [msgpack.packb(steps, use_bin_type=True)
            for steps in (valid, valid[:1], public, later, refused, stepped_back, flood)]  # fmt: skip


def _read_steps(data: bytes) -> list[tuple[str, bytes, float]]:
    """The steps of an input; anything else is one Fetch whose request is the input."""
    try:
        steps = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        steps = None
    if not isinstance(steps, list):
        return [("Subscribe" if len(data) % 2 else "Fetch", data, 0.0)]
    out = []
    for step in steps[:READ_MAX_STEPS]:
        if isinstance(step, bytes):
            step = ["Fetch", step, 0.0]
        if not isinstance(step, list) or len(step) < 2:
            continue
        method = "Subscribe" if step[0] == "Subscribe" else "Fetch"  # the RPC decides
        request = step[1] if isinstance(step[1], bytes) else b""
        advance = step[2] if len(step) > 2 else 0.0
        if isinstance(advance, bool) or not isinstance(advance, int | float):
            advance = 0.0
        advance = float(advance) if math.isfinite(advance) else 0.0
        # the clock may step back too (an NTP correction)
        out.append((method, request, min(max(advance, -10 * READ_WINDOW_S), 10 * READ_WINDOW_S)))
    return out


def _parse_read(method: str, raw: bytes) -> tuple[str, int, Any]:
    """(model id, version, ReadAuth or None) as the servicer reads them from the request.

    Bytes that are not such a request never reach the servicer (gRPC refuses them); they
    still feed the guard here, as fields cut from the bytes."""
    from google.protobuf.message import DecodeError

    from comms.proto import archipelago_pb2 as pb
    from comms.reads import ReadAuth

    cls = pb.SubscribeRequest if method == "Subscribe" else pb.FetchRequest
    try:
        msg = cls.FromString(raw)
    except DecodeError:
        sender = ISLAND.peer_id if raw[:1] < b"\x80" else raw[1:17].hex()
        ts = int.from_bytes(raw[17:25], "big")
        auth = ReadAuth(sender, ts, raw[25:41], raw[41:105])
        return raw[105:].decode("utf-8", "replace"), int.from_bytes(raw[:2], "big"), auth
    version = msg.from_version if method == "Subscribe" else msg.version
    auth = None
    if msg.HasField("auth"):
        a = msg.auth
        auth = ReadAuth(a.sender, a.timestamp_ms, a.nonce, a.signature)
    return msg.model_id, version, auth


def _expected_read(method, model_id, version, auth, now, latest, live) -> str | None:
    """What the guard's rules say of one request: None (admit) or the reason of a refusal.
    ``latest``: the latest time the clock has shown (``now`` or later, if it stepped back);
    ``live``: (sender, nonce) -> timestamp of admitted reads still in the window."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from comms.reads import read_signing_bytes

    if model_id == READ_PUBLIC:
        return None
    if auth is None or not auth.sender:
        return "unsigned"
    entry = roster().get(auth.sender)
    if entry is None:
        return "unknown_reader"
    skew = auth.timestamp_ms / 1000 - now
    if abs(skew) > READ_WINDOW_S:
        return "read_expired" if skew < 0 else "read_future"
    body = read_signing_bytes(method, model_id, version, auth.sender, auth.timestamp_ms,
                              auth.nonce)  # fmt: skip
    try:
        if len(auth.nonce) != 16:
            raise ValueError("nonce length")
        Ed25519PublicKey.from_public_bytes(entry.public_key).verify(auth.signature, body)
    except (InvalidSignature, ValueError):
        return "bad_read_signature"
    if latest - auth.timestamp_ms / 1000 > READ_WINDOW_S:  # behind the latest clock
        return "read_expired"
    key = (auth.sender, bytes(auth.nonce))
    if key in live:
        return "read_replay"
    if (
        len(live) >= READ_MAX_NONCES
        or sum(1 for s, _ in live if s == auth.sender) >= READ_MAX_PER_SENDER
    ):
        return "too_many_reads"
    return None


def run_reads(data: bytes) -> None:
    """Each step through ``ReadGuard.check`` as the servicer admits a Fetch or Subscribe;
    the guard must decide as the reference model does, never admit the same signed request
    twice (a key may reuse a forgotten nonce in a request it signs anew), and never remember
    more than its caps. The first refusal is reported."""
    from comms.reads import ReadGuard

    now = [READ_NOW]
    latest = READ_NOW
    guard = ReadGuard(roster(), public_models=(READ_PUBLIC,), window_s=READ_WINDOW_S,
                      clock=lambda: now[0], max_nonces=READ_MAX_NONCES,
                      max_nonces_per_sender=READ_MAX_PER_SENDER)  # fmt: skip
    live: dict[tuple[str, bytes], float] = {}
    ever: set[tuple[str, bytes, int]] = set()  # every admitted signed request
    first: RejectedError | None = None
    for i, (method, raw, advance) in enumerate(_read_steps(data)):
        now[0] += advance
        latest = max(latest, now[0])  # every check reads the clock
        live = {k: ts for k, ts in live.items() if not ts + READ_WINDOW_S < latest}
        model_id, version, auth = _parse_read(method, raw)
        want = _expected_read(method, model_id, version, auth, now[0], latest, live)
        try:
            got = guard.check(method, model_id, version, auth)
        except (ReadDeniedError, TooManyReadsError) as e:
            if e.reason not in READ_REASONS or not str(e).strip():
                raise InvariantError(f"step {i}: refusal without a known reason: {e!r}") from e
            if e.reason != want:
                raise InvariantError(
                    f"step {i}: refused ({e.reason}: {e}) where the rules say {want or 'admit'}"
                ) from e
            first = first or e
        else:
            if want is not None:
                raise InvariantError(f"step {i}: admitted a {method} that deserves {want}")
            if model_id == READ_PUBLIC:
                if got is not None:
                    raise InvariantError(f"step {i}: a public read returned reader {got!r}")
            else:
                if got != auth.sender:
                    raise InvariantError(f"step {i}: admitted {auth.sender} as {got!r}")
                key = (auth.sender, bytes(auth.nonce))
                if (*key, auth.timestamp_ms) in ever:
                    raise InvariantError(f"step {i}: admitted the same signed request twice")
                live[key] = auth.timestamp_ms / 1000
                ever.add((*key, auth.timestamp_ms))
        if len(guard) > READ_MAX_NONCES:
            raise InvariantError(f"step {i}: the guard remembers {len(guard)} nonces")
    if first is not None:
        raise first


def mutate_reads(rng: random.Random, data: bytes) -> bytes:
    """Edit one request's field (re-signed by its sender's key most of the time), replay or
    reorder a step, flood one key with fresh reads, or move the clock at a step."""
    from comms.reads import ReadAuth

    steps = msgpack.unpackb(data, raw=False)
    op = rng.randrange(8)  # half of them edit a field
    if op == 0 or not steps:  # a flood of fresh, valid reads from one key
        signer = rng.choice((ISLAND, AGGREGATOR))
        at = READ_NOW + rng.choice((0.0, 1.0, 100.0))
        for _ in range(rng.randrange(1, 2 * READ_MAX_NONCES)):
            method = rng.choice(("Fetch", "Subscribe"))
            steps.append([method, _signed_read(signer, method, "global", rng.randrange(9), at,
                                               _nonce(rng)), 0.0])  # fmt: skip
    elif op == 1:  # a step sent again, now or later
        step = list(rng.choice(steps))
        step[2] = rng.choice((0.0, 1.0, READ_WINDOW_S - 0.001, READ_WINDOW_S, READ_WINDOW_S + 0.001,
                              2 * READ_WINDOW_S, 0.5))  # fmt: skip
        steps.insert(rng.randrange(len(steps) + 1), step)
    elif op == 2:  # the server's clock
        step = rng.choice(steps)
        step[2] = rng.choice((0.0, 0.001, READ_WINDOW_S, READ_WINDOW_S + 0.001, 1e6, -5.0,
                              -READ_WINDOW_S, -2 * READ_WINDOW_S - 0.001,
                              math.nan, math.inf, 2**64, True, "soon"))  # fmt: skip
    elif op == 3:  # steps reordered, dropped or sent as the other method
        if rng.random() < 0.5:
            rng.shuffle(steps)
        elif rng.random() < 0.5:
            del steps[rng.randrange(len(steps))]
        else:
            step = rng.choice(steps)
            step[0] = rng.choice(("Fetch", "Subscribe", "Push", "", None, 7))
    else:  # one field of one request, then (usually) signed again by its sender
        step = rng.choice(steps)
        method = step[0] if step[0] in ("Fetch", "Subscribe") else "Fetch"
        model_id, version, auth = _parse_read(method, step[1])
        fields = {"model_id": model_id, "version": version, "sender": "", "ts": 0,
                  "nonce": b"", "sig": b""}  # fmt: skip
        if auth is not None:
            fields.update(sender=auth.sender, ts=auth.timestamp_ms, nonce=auth.nonce,
                          sig=auth.signature)  # fmt: skip
        key = rng.choice(("model_id", "version", "sender", "ts", "ts", "nonce", "sig"))
        now_ms = int(READ_NOW * 1000)
        window_ms = int(READ_WINDOW_S * 1000)
        fields[key] = rng.choice({
            "model_id": ("", "global", READ_PUBLIC, "other", "g\x00lobal", "é" * 40, "a" * 5000),
            "version": (-1, 0, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, -2),
            "sender": ("", ISLAND.peer_id, AGGREGATOR.peer_id, STRANGER.peer_id,
                       ISLAND.peer_id.upper(), ISLAND.peer_id[:-1], "x" * 300),
            "ts": (0, 1, now_ms - window_ms - 1, now_ms - window_ms, now_ms + window_ms,
                   now_ms + window_ms + 1, now_ms, 2**63, 2**64 - 1, now_ms + 999),
            "nonce": (b"", b"\x00" * 15, b"\x00" * 16, b"\x00" * 17, _nonce(rng),
                      _nonce(rng) * 64),
            "sig": (b"", b"\x00" * 64, rng.randbytes(63), rng.randbytes(65),
                    bytes([fields["sig"][0] ^ 1]) + fields["sig"][1:] if fields["sig"] else b""),
        }[key])  # fmt: skip
        signer = KEYS.get(fields["sender"])
        if signer is not None and key != "sig" and rng.random() < 0.8:
            from comms.reads import read_signing_bytes

            with contextlib.suppress(Exception):
                fields["sig"] = signer.sign(read_signing_bytes(
                    method, fields["model_id"], fields["version"], fields["sender"],
                    fields["ts"], fields["nonce"]))  # fmt: skip
        auth = ReadAuth(fields["sender"], fields["ts"], fields["nonce"], fields["sig"])
        if op == 5 and rng.random() < 0.3:
            auth = None  # the auth field left out
        with contextlib.suppress(ValueError, TypeError, OverflowError):
            step[1] = _read_request(method, fields["model_id"], fields["version"], auth)
    try:
        return msgpack.packb(steps, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return data


register(Target(
    "reads", "comms.reads.ReadGuard.check on Fetch / Subscribe requests (signed reads)",
    run_reads, (ReadDeniedError, TooManyReadsError), reads_seeds, (mutate_reads,),
))  # fmt: skip


# --- dashboard summaries a child sends its parent (the transport's Report) ----------------------


def summary_seeds() -> list[bytes]:
    from aggregator.dashboard.summaries import summary_envelope

    island = {"name": "island0", "peer": ISLAND.peer_id, "leaf": "leaf0", "model_id": "global",
              "age_s": 1.5, "interval_s": 4.0, "pushes": 12, "bytes_up": 123456,
              "steps_pushed": 240, "rejected": {"stale": 1},
              "points": [{"age_s": 3.0, "step": 200, "train_loss": 2.5, "val_loss": 2.6,
                          "val_version": 9}]}  # fmt: skip
    aggregator = {"name": "leaf0", "role": "leaf", "peer": AGGREGATOR.peer_id, "parent": "root",
                  "address": "127.0.0.1:1", "age_s": 0.0, "uptime_s": 60.0, "version": 9,
                  "buffered": 1, "outbox": 0, "workers": 0}  # fmt: skip
    rejection = {"at": "12:00:00", "sender": STRANGER.peer_id, "model_id": "global",
                 "reason": "signature", "age_s": 5.0, "message": "not in the roster"}  # fmt: skip
    docs = [
        {"aggregators": [aggregator], "islands": [island], "rejections": [rejection]},
        {"aggregators": [], "islands": [], "rejections": []},
        {"islands": [dict(island, name=f"island{i}") for i in range(5)]},
    ]
    return [summary_envelope(AGGREGATOR, doc, seq) for seq, doc in enumerate(docs, start=1)]


def run_summary(data: bytes) -> None:
    from aggregator.dashboard.summaries import checked_summary

    sender, _, summary = checked_summary(data, roster())
    if sender != AGGREGATOR.peer_id:
        raise InvariantError(f"a summary from {sender[:12]} passed, not the roster's aggregator")
    if set(summary) != {"aggregators", "islands", "rejections"} or not all(
        isinstance(v, list) and all(isinstance(x, dict) for x in v) for v in summary.values()
    ):
        raise InvariantError(f"checked summary has the wrong form: {summary!r:.120}")


register(Target(
    "summary", "aggregator.dashboard.summaries.checked_summary (Report: a child's summary)",
    run_summary, ADMISSION_ERRORS, summary_seeds, (mutate_envelope,),
))  # fmt: skip
