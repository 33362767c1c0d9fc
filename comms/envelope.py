"""The update envelope: one signed message on the wire, a header plus a contiguous payload.

Every update that crosses a link (a delta from an island, a partial aggregate from a child
aggregator, a version ``u_v`` published by the root, a full snapshot) travels as one
envelope. The envelope knows nothing of codecs: each tensor's payload is opaque bytes plus the
codec's spec (a dict), which the codec layer interprets.

Wire layout (all integers big-endian)::

    offset  size  field
    0       4     magic b"ARCP"
    4       2     u16 protocol version (comms.PROTOCOL_VERSION)
    6       4     u32 header length H
    10      H     header, msgpack (strict types, bin type for bytes; never pickle)
    10+H    1     u8 signature length S, 0 (unsigned) or 64 (Ed25519)
    11+H    S     signature
    11+H+S  ...   payload: every tensor's bytes, back to back, in header order

The header is a msgpack map with exactly these keys: ``protocol`` (int, equal to the preamble
version), ``model_id`` (str), ``kind`` (``delta`` | ``partial`` | ``version`` | ``snapshot`` |
``summary``, a child aggregator's dashboard report: no tensors, sent by ``Report``, never logged),
``base_version`` (int >= 0), ``sender`` (peer id), ``sequence`` (int >= 0), ``created_at``
(float, seconds since the epoch), ``tensors`` (a list of maps ``name``, ``shape``, ``dtype``,
``codec``, ``offset``, ``nbytes``), ``payload_size`` (int), ``payload_digest`` (bin, 32 bytes),
``digest`` (the digest's algorithm, ``sha256``) and ``meta`` (a map of kind-specific
values: ``steps`` and ``tokens`` for deltas; ``weight_sum``, ``count`` and ``max_staleness``
for partials).

The Ed25519 signature covers ``SIGNING_CONTEXT + header bytes`` exactly as they were received
(never a re-serialization). The header holds the payload's digest, so the signature covers the
payload too. The context prefix keeps a signature made for an envelope from being valid for any
other message signed by the same key.

Decoding (``Envelope.from_bytes``, ``parse_header``) treats its input as hostile: the total
size is checked against ``max_bytes`` before anything is parsed, every field's type and range is
checked, and every failure raises a typed error from ``comms.errors`` that names the field and
what was expected; nothing else escapes. Payloads are ``memoryview`` slices of the input
buffer (no copy): keep the buffer unchanged while the envelope is in use.

Pure data and functions; no I/O, no shared state: safe to use from any thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import operator
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from comms import PROTOCOL_VERSION
from comms.errors import (
    DigestMismatchError,
    MalformedError,
    OversizeError,
    ProtocolVersionError,
    RejectedError,
    ShapeMismatchError,
    SignatureError,
)
from comms.identity import ROLES, SIGNATURE_BYTES, Identity, ReplayGuard, Roster, RosterEntry

MAGIC = b"ARCP"
KINDS = ("delta", "partial", "version", "snapshot", "summary")
DIGEST_ALGORITHM = "sha256"  # protocol 3; "blake2b-256" in protocol 2 (2.5x slower here)
DIGEST_BYTES = 32
SIGNING_CONTEXT = b"archipelago-envelope\x00"

_PREAMBLE = struct.Struct(">4sHI")  # magic, protocol version, header length
PREAMBLE_BYTES = _PREAMBLE.size  # 10

DEFAULT_MAX_HEADER_BYTES = 16 << 20
DEFAULT_MAX_ENVELOPE_BYTES = 2 << 30
"""A sensible ``max_bytes`` for callers without a configured limit."""

MAX_NAME_CHARS = 1024  # model ids, tensor names, senders
MAX_DTYPE_CHARS = 64
MAX_NDIM = 64
MAX_NESTING = 8  # depth of lists/maps inside ``meta`` and codec specs
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1  # what msgpack can carry
_U63 = (1 << 63) - 1  # bound for counters, offsets and sizes

ExpectedNbytes = Callable[[dict, tuple[int, ...]], "int | None"]
"""Hook from the codec layer: the payload size a (codec spec, shape) implies, or None."""


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor's encoded bytes lie in the payload, and how to decode them."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # the source dtype, e.g. "float32", "bfloat16"
    codec: dict  # the codec's spec; opaque to the envelope
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Header:
    """The routing and integrity information of one envelope."""

    protocol: int
    model_id: str
    kind: str
    base_version: int
    sender: str
    sequence: int
    created_at: float
    tensors: tuple[TensorSpec, ...]
    payload_size: int
    payload_digest: bytes
    digest: str = DIGEST_ALGORITHM
    meta: dict = field(default_factory=dict)

    def tensor(self, name: str) -> TensorSpec:
        """The spec of tensor ``name``; ``ShapeMismatchError`` if the envelope lacks it."""
        for spec in self.tensors:
            if spec.name == name:
                return spec
        have = [s.name for s in self.tensors[:8]]
        raise ShapeMismatchError(
            f"envelope from {self.sender} for model {self.model_id!r} has no tensor {name!r} "
            f"(it carries {len(self.tensors)}: {have}{'...' if len(self.tensors) > 8 else ''})"
        )


# The wire keys are the field names.
_HEADER_KEYS = tuple(f.name for f in dataclasses.fields(Header))
_TENSOR_KEYS = tuple(f.name for f in dataclasses.fields(TensorSpec))


# ---------------------------------------------------------------- validation of decoded values


def _malformed(what: str, expected: str, got: Any) -> MalformedError:
    shown = repr(got)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return MalformedError(f"envelope header: {what} must be {expected}, got {shown}")


def _int(what: str, value: Any, lo: int = 0, hi: int = _U63) -> int:
    if type(value) is not int:
        raise _malformed(what, "an int", value)
    if not lo <= value <= hi:
        raise _malformed(what, f"in [{lo}, {hi}]", value)
    return value


def _str(what: str, value: Any, max_chars: int = MAX_NAME_CHARS) -> str:
    if type(value) is not str:
        raise _malformed(what, "a str", value)
    if not 0 < len(value) <= max_chars:
        raise _malformed(what, f"a non-empty str of at most {max_chars} chars", value)
    return value


def _value(what: str, value: Any, depth: int = 0) -> None:
    """Check that ``value`` is plain data msgpack carries exactly: no ext types, finite floats."""
    if depth > MAX_NESTING:
        raise _malformed(what, f"nested at most {MAX_NESTING} deep", "deeper")
    if value is None or type(value) in (bool, str, bytes):
        return
    if type(value) is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise _malformed(what, f"an int in [{_INT_MIN}, {_INT_MAX}]", value)
    elif type(value) is float:
        if not math.isfinite(value):
            raise _malformed(what, "a finite float", value)
    elif type(value) in (list, tuple):  # tuples only from local callers; they decode as lists
        for i, item in enumerate(value):
            _value(f"{what}[{i}]", item, depth + 1)
    elif type(value) is dict:
        _mapping(what, value, depth + 1)
    else:
        raise _malformed(what, "None, bool, int, float, str, bytes, list or dict", value)


def _mapping(what: str, value: Any, depth: int = 0) -> dict:
    if type(value) is not dict:
        raise _malformed(what, "a map", value)
    for key, item in value.items():
        if type(key) is not str:
            raise _malformed(f"a key of {what}", "a str", key)
        _value(f"{what}[{key!r}]", item, depth)
    return value


def _exact_keys(what: str, obj: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise MalformedError(f"envelope header: {what} lacks field(s) {missing}")
    extra = [k for k in obj if k not in keys]
    if extra:
        raise MalformedError(f"envelope header: {what} has unknown field(s) {extra[:8]!r}")


def _tensor_from_wire(i: int, obj: Any) -> TensorSpec:
    what = f"tensors[{i}]"
    if type(obj) is not dict:
        raise _malformed(what, "a map", obj)
    _exact_keys(what, obj, _TENSOR_KEYS)
    name = _str(f"{what}.name", obj["name"])
    shape = obj["shape"]
    if type(shape) is not list or len(shape) > MAX_NDIM:
        raise _malformed(f"tensor {name!r} shape", f"a list of at most {MAX_NDIM} ints", shape)
    dims = tuple(_int(f"tensor {name!r} shape[{d}]", n) for d, n in enumerate(shape))
    return TensorSpec(
        name=name,
        shape=dims,
        dtype=_str(f"tensor {name!r} dtype", obj["dtype"], MAX_DTYPE_CHARS),
        codec=_mapping(f"tensor {name!r} codec", obj["codec"]),
        offset=_int(f"tensor {name!r} offset", obj["offset"]),
        nbytes=_int(f"tensor {name!r} nbytes", obj["nbytes"]),
    )


def _check_layout(tensors: Sequence[TensorSpec], payload_size: int) -> None:
    """Tensors must tile the payload exactly: in order, no overlap, no gap, nothing outside."""
    seen: set[str] = set()
    end = 0
    for spec in tensors:
        if spec.name in seen:
            raise MalformedError(f"envelope header: tensor name {spec.name!r} appears twice")
        seen.add(spec.name)
        if spec.offset < end:
            raise MalformedError(
                f"envelope header: tensor {spec.name!r} at offset {spec.offset} overlaps the "
                f"previous tensor, which ends at {end}"
            )
        if spec.offset > end:
            raise MalformedError(
                f"envelope header: tensor {spec.name!r} at offset {spec.offset} leaves a gap "
                f"after the previous tensor, which ends at {end}"
            )
        end = spec.offset + spec.nbytes
        if end > payload_size:
            raise MalformedError(
                f"envelope header: tensor {spec.name!r} spans bytes [{spec.offset}, {end}), "
                f"outside the payload of {payload_size} bytes"
            )
    if end != payload_size:
        raise MalformedError(
            f"envelope header: tensors cover {end} bytes but payload_size is {payload_size}"
        )


def _check_expected_nbytes(tensors: Sequence[TensorSpec], expected_nbytes: ExpectedNbytes) -> None:
    for spec in tensors:
        try:
            want = expected_nbytes(spec.codec, spec.shape)
        except RejectedError:
            raise
        except Exception as e:  # the spec is peer input; a hook that trips on it means "bad spec"
            raise MalformedError(
                f"envelope header: codec spec of tensor {spec.name!r} is invalid: {e}"
            ) from e
        if want is not None and want != spec.nbytes:
            raise MalformedError(
                f"envelope header: tensor {spec.name!r} has {spec.nbytes} payload bytes; its "
                f"codec spec and shape {spec.shape} imply {want}"
            )


def header_from_wire(obj: Any) -> Header:
    """Validate a decoded msgpack header and build a ``Header``; ``MalformedError`` if bad."""
    if type(obj) is not dict:
        raise _malformed("the header", "a map", obj)
    _exact_keys("the header", obj, _HEADER_KEYS)
    protocol = _int("protocol", obj["protocol"])
    if protocol != PROTOCOL_VERSION:
        raise MalformedError(
            f"envelope header: protocol {protocol} disagrees with the preamble's "
            f"version {PROTOCOL_VERSION}"
        )
    kind = obj["kind"]
    if type(kind) is not str or kind not in KINDS:
        raise _malformed("kind", f"one of {KINDS}", kind)
    created_at = obj["created_at"]
    if type(created_at) not in (float, int) or not math.isfinite(created_at) or created_at < 0:
        raise _malformed("created_at", "a finite float >= 0", created_at)
    raw_tensors = obj["tensors"]
    if type(raw_tensors) is not list:
        raise _malformed("tensors", "a list", raw_tensors)
    tensors = tuple(_tensor_from_wire(i, t) for i, t in enumerate(raw_tensors))
    payload_size = _int("payload_size", obj["payload_size"])
    _check_layout(tensors, payload_size)
    digest_name = obj["digest"]
    if type(digest_name) is not str or digest_name != DIGEST_ALGORITHM:
        raise _malformed("digest", repr(DIGEST_ALGORITHM), digest_name)
    payload_digest = obj["payload_digest"]
    if type(payload_digest) is not bytes or len(payload_digest) != DIGEST_BYTES:
        raise _malformed("payload_digest", f"{DIGEST_BYTES} bytes", payload_digest)
    return Header(
        protocol=protocol,
        model_id=_str("model_id", obj["model_id"]),
        kind=kind,
        base_version=_int("base_version", obj["base_version"]),
        sender=_str("sender", obj["sender"]),
        sequence=_int("sequence", obj["sequence"]),
        created_at=float(created_at),
        tensors=tensors,
        payload_size=payload_size,
        payload_digest=payload_digest,
        digest=digest_name,
        meta=_mapping("meta", obj["meta"]),
    )


def header_to_wire(header: Header) -> dict:
    """The msgpack-ready map of ``header`` (inverse of ``header_from_wire``)."""
    wire = dataclasses.asdict(header)
    wire["tensors"] = [dict(t, shape=list(t["shape"])) for t in wire["tensors"]]
    return wire


# ---------------------------------------------------------------- framing


def _as_bytes_view(data: Any) -> memoryview:
    try:
        view = memoryview(data)
    except TypeError as e:
        raise MalformedError(f"an envelope must be bytes-like, got {type(data).__name__}") from e
    if view.ndim != 1 or view.itemsize != 1:
        try:
            view = view.cast("B")
        except TypeError as e:
            raise MalformedError("an envelope buffer must be C-contiguous bytes") from e
    elif view.format != "B":
        view = view.cast("B")
    return view


def _unpack_header(raw: memoryview) -> Any:
    try:
        return msgpack.unpackb(
            raw,
            raw=False,  # str stays str, bin stays bytes; invalid UTF-8 is an error
            strict_map_key=True,
            use_list=True,
            timestamp=0,
        )
    except Exception as e:  # msgpack raises an open set of types on hostile input
        raise MalformedError(f"envelope header is not valid msgpack: {e}") from e


@dataclass(frozen=True)
class _Frame:
    header: Header
    header_bytes: bytes
    signature: bytes
    payload_start: int


def _read_frame(view: memoryview, max_header_bytes: int) -> _Frame:
    """Parse preamble, header and signature from the front of ``view`` (payload untouched)."""
    magic = bytes(view[:4])
    if magic != MAGIC[: len(magic)]:
        raise MalformedError(f"not an envelope: magic is {magic!r}, expected {MAGIC!r}")
    version = struct.unpack_from(">H", view, 4)[0] if len(view) >= 6 else PROTOCOL_VERSION
    if version != PROTOCOL_VERSION:
        raise ProtocolVersionError(
            f"the peer speaks envelope protocol version {version}; this build speaks version "
            f"{PROTOCOL_VERSION}: run the same Archipelago release on both ends"
        )
    if len(view) < PREAMBLE_BYTES:
        raise MalformedError(
            f"envelope truncated: {len(view)} bytes, the preamble needs {PREAMBLE_BYTES}"
        )
    _, _, header_len = _PREAMBLE.unpack_from(view, 0)
    if header_len > max_header_bytes:
        raise OversizeError(
            f"envelope header declares {header_len} bytes; the limit is {max_header_bytes}"
        )
    sig_at = PREAMBLE_BYTES + header_len
    if len(view) < sig_at + 1:
        raise MalformedError(
            f"envelope truncated: header and signature length need {sig_at + 1} bytes, "
            f"got {len(view)}"
        )
    header_bytes = bytes(view[PREAMBLE_BYTES:sig_at])
    sig_len = view[sig_at]
    if sig_len not in (0, SIGNATURE_BYTES):
        raise MalformedError(f"envelope signature length must be 0 or 64, got {sig_len}")
    payload_start = sig_at + 1 + sig_len
    if len(view) < payload_start:
        raise MalformedError(
            f"envelope truncated: signature needs {payload_start} bytes, got {len(view)}"
        )
    header = header_from_wire(_unpack_header(memoryview(header_bytes)))
    return _Frame(header, header_bytes, bytes(view[sig_at + 1 : payload_start]), payload_start)


def parse_header(data: Any, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Header:
    """Read only the header, for routing; ``data`` may stop anywhere after the signature.

    Checks the preamble, the header's fields and the tensor layout, not the payload or its
    digest and not the signature: call ``Envelope.from_bytes`` and ``verify`` before trusting
    the contents.
    """
    return _read_frame(_as_bytes_view(data), max_header_bytes).header


def payload_digest(payload: Any) -> bytes:
    """SHA-256 of the payload bytes."""
    return hashlib.sha256(payload).digest()


# ---------------------------------------------------------------- the envelope


@dataclass(frozen=True)
class Envelope:
    """A header, its exact serialized bytes, an optional signature and the payload."""

    header: Header
    header_bytes: bytes
    payload: memoryview
    signature: bytes = b""

    @classmethod
    def build(
        cls,
        *,
        model_id: str,
        kind: str,
        sender: str,
        sequence: int,
        tensors: Sequence[tuple[str, Sequence[int], str, dict, Any]],
        base_version: int = 0,
        meta: dict | None = None,
        created_at: float | None = None,
    ) -> Envelope:
        """Lay out ``(name, shape, dtype, codec_spec, payload)`` tensors and compute the digest.

        ``payload`` is any C-contiguous buffer (bytes, bytearray, memoryview, numpy array);
        it is copied once into the envelope's contiguous payload. Invalid fields raise
        ``MalformedError`` naming the field, exactly as a receiver would.
        """
        views = []
        for name, _shape, _dtype, _codec, data in tensors:
            view = memoryview(data)
            if not view.c_contiguous:
                raise ValueError(f"payload of tensor {name!r} is not C-contiguous")
            views.append(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
        payload = bytearray(sum(v.nbytes for v in views))
        specs, offset = [], 0
        for (name, shape, dtype, codec, _), view in zip(tensors, views, strict=True):
            payload[offset : offset + view.nbytes] = view
            dims = tuple(operator.index(d) for d in shape)  # numpy ints welcome
            specs.append(TensorSpec(name, dims, dtype, codec, offset, view.nbytes))
            offset += view.nbytes
        header = Header(
            protocol=PROTOCOL_VERSION,
            model_id=model_id,
            kind=kind,
            base_version=base_version,
            sender=sender,
            sequence=sequence,
            created_at=time.time() if created_at is None else float(created_at),
            tensors=tuple(specs),
            payload_size=len(payload),
            payload_digest=payload_digest(payload),
            meta={} if meta is None else meta,
        )
        header_bytes = _pack_header(header)
        # Decode our own bytes: the builder's Header is exactly what every receiver will see,
        # and a field a receiver would refuse is refused here, by the same checks.
        header = header_from_wire(_unpack_header(memoryview(header_bytes)))
        return cls(header, header_bytes, memoryview(payload).toreadonly())

    @classmethod
    def from_bytes(
        cls,
        data: Any,
        *,
        max_bytes: int,
        expected_nbytes: ExpectedNbytes | None = None,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> Envelope:
        """Decode and check an envelope; payload views share ``data``'s memory.

        Raises ``OversizeError`` (before parsing) if ``data`` exceeds ``max_bytes``,
        ``ProtocolVersionError`` for another protocol version, ``DigestMismatchError`` if the
        payload does not match its digest and ``MalformedError`` for anything else wrong.
        ``expected_nbytes(codec_spec, shape)``, when given, lets the codec layer refuse a tensor
        whose byte count disagrees with its spec. Does not check the signature: call ``verify``.
        """
        view = _as_bytes_view(data)
        if len(view) > max_bytes:
            raise OversizeError(f"envelope is {len(view)} bytes; the limit is {max_bytes}")
        frame = _read_frame(view, max_header_bytes)
        header = frame.header
        payload = view[frame.payload_start :]
        if len(payload) != header.payload_size:
            raise MalformedError(
                f"envelope payload is {len(payload)} bytes; the header declares "
                f"payload_size {header.payload_size}"
                + (" (truncated)" if len(payload) < header.payload_size else "")
            )
        if expected_nbytes is not None:
            _check_expected_nbytes(header.tensors, expected_nbytes)
        got = payload_digest(payload)
        if got != header.payload_digest:
            raise DigestMismatchError(
                f"payload digest of envelope from {header.sender} (sequence {header.sequence}) "
                f"is {got.hex()[:16]}..., the header declares {header.payload_digest.hex()[:16]}..."
            )
        return cls(header, frame.header_bytes, payload, frame.signature)

    # -------------------------------------------------------------- access

    def tensor_payload(self, name: str) -> memoryview:
        """The encoded bytes of tensor ``name`` (a view, no copy)."""
        spec = self.header.tensor(name)
        return self.payload[spec.offset : spec.offset + spec.nbytes]

    def tensors(self) -> Iterator[tuple[TensorSpec, memoryview]]:
        """Each tensor's spec and encoded bytes, in payload order."""
        for spec in self.header.tensors:
            yield spec, self.payload[spec.offset : spec.offset + spec.nbytes]

    @property
    def is_signed(self) -> bool:
        return bool(self.signature)

    # -------------------------------------------------------------- signatures

    def sign(self, identity: Identity) -> Envelope:
        """A copy signed by ``identity``, which must be the header's sender."""
        if identity.peer_id != self.header.sender:
            raise ValueError(
                f"cannot sign: the envelope's sender is {self.header.sender}, "
                f"the identity is {identity.peer_id}"
            )
        signature = identity.sign(SIGNING_CONTEXT + self.header_bytes)
        return dataclasses.replace(self, signature=signature)

    def verify(
        self,
        roster: Roster,
        roles: tuple[str, ...] = ROLES,
        replay_guard: ReplayGuard | None = None,
    ) -> RosterEntry:
        """Check the sender is in ``roster`` in one of ``roles`` and signed this envelope.

        Raises ``UnknownPeerError`` or ``SignatureError``; with ``replay_guard``, also
        ``ReplayError`` if the sequence is not above the sender's last accepted one (the
        guard is only read: commit the sequence once the envelope is durably accepted).
        """
        sender = self.header.sender
        roster.require(sender, roles)
        if not self.signature:
            raise SignatureError(f"envelope from {sender} is not signed")
        entry = roster.verify(sender, self.signature, SIGNING_CONTEXT + self.header_bytes, roles)
        if replay_guard is not None:
            replay_guard.check(sender, self.header.sequence)
        return entry

    # -------------------------------------------------------------- encoding

    def prefix_bytes(self) -> bytes:
        """Preamble, header and signature: everything before the payload."""
        preamble = _PREAMBLE.pack(MAGIC, PROTOCOL_VERSION, len(self.header_bytes))
        return preamble + self.header_bytes + bytes([len(self.signature)]) + self.signature

    def wire_parts(self) -> tuple[bytes, memoryview]:
        """``(prefix, payload)``: send both in order to avoid joining a large payload."""
        return self.prefix_bytes(), self.payload

    def to_bytes(self) -> bytes:
        return b"".join(self.wire_parts())

    @property
    def wire_size(self) -> int:
        return (
            PREAMBLE_BYTES + len(self.header_bytes) + 1 + len(self.signature) + self.payload.nbytes
        )


def _pack_header(header: Header) -> bytes:
    wire = header_to_wire(header)
    # Check every value before packing so that a bad field is named, not reported by msgpack.
    for key, value in wire.items():
        _value(key, value)
    return msgpack.packb(wire, use_bin_type=True)
