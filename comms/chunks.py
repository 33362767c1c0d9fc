"""Chunk framing for blobs that cross a wire: split, check, reassemble, resume.

A blob (a serialized envelope, a snapshot, an encoded model update) is cut into chunks of at
most ``chunk_size`` bytes. Each chunk carries its byte offset in the blob and a check of its
bytes; the whole blob has a SHA-256 digest, declared up front and checked once every byte
has arrived, which protects the blob end to end. The receiver's ``ChunkAssembler`` accepts
chunks strictly in order (each one at the current end of what it holds), so
``received_bytes`` is always a clean resume point: a sender that lost its connection asks how
many bytes arrived and sends only the rest.

The per-chunk check is a CRC-32 (zlib's): it exists to refuse a damaged or mislabeled chunk
before it is appended, so a resumed upload never builds on bad bytes, and an accidental-error
check does that; it adds nothing against tampering, which the whole-blob digest (and the
envelope's signature inside) catch, whatever the chunk check. CRC-32 runs at about 4.2 GB/s
here, and the whole-blob digest alone already costs a pass. The digest is SHA-256 (protocol 3;
BLAKE2b-256 before): hashlib's SHA-256 uses the SHA instructions of current x86 and ARMv8 CPUs
and ran at 1.78 GB/s on this project's 2-core EPYC against BLAKE2b's 0.71, and every update
is hashed at least twice per hop. A chunk carrying a SHA-256 ``chunk_digest`` instead of a
CRC is still accepted and checked.

``UploadTable`` is a receiver's bookkeeping of uploads: partial ones (bounded in count and
bytes, expiring when idle) and the outcomes of delivered ones, so a retried upload gets the
same answer instead of a second delivery.

Pure: no I/O, no threads; time comes from an injected clock. Callers serialize access to an
assembler (the transport does so on its single asyncio loop); :func:`verify_chunk` and
:func:`digest` touch no shared state and may run in worker threads.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from comms.errors import DigestMismatchError, MalformedError, OversizeError

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
"""Bytes per chunk: big enough to amortize per-message overhead, small enough for one gRPC
message and for a dropped link to cost little."""

DIGEST_SIZE = 32
"""SHA-256 digest length in bytes (256 bits)."""

DEFAULT_MAX_UPLOAD_BYTES = 1024 * 1024 * 1024

log = logging.getLogger(__name__)


class OffsetMismatchError(MalformedError):
    """A chunk that does not start where the receiver's data ends.

    Senders recover by asking the receiver for ``received_bytes`` and resuming there.
    """

    reason = "offset"
    grpc_code = "OUT_OF_RANGE"

    def __init__(self, expected: int, got: int, *, what: str = "upload"):
        super().__init__(
            f"{what}: chunk at offset {got}, expected offset {expected}; "
            f"query the received byte count and resume from there"
        )
        self.expected = expected
        self.got = got


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of ``data``: the whole-blob digest (and the optional chunk digest)."""
    return hashlib.sha256(data).digest()


def chunk_crc32(data: bytes | bytearray | memoryview) -> int:
    """CRC-32 (zlib's polynomial) of one chunk's bytes, as an unsigned 32-bit int."""
    return zlib.crc32(data)


def verify_chunk(
    data: bytes,
    chunk_digest: bytes = b"",
    crc32: int | None = None,
    *,
    offset: int = 0,
    name: str = "blob",
) -> None:
    """Check one chunk against the check it came with: ``crc32`` and/or a SHA-256
    ``chunk_digest`` (whichever are given; at least one must be). Raises DigestMismatchError
    on a mismatch, MalformedError when the chunk carries no check."""
    if crc32 is None and not chunk_digest:
        raise MalformedError(
            f"{name}: chunk at offset {offset} carries no check (neither chunk_crc32 nor "
            f"chunk_digest)"
        )
    bad = (crc32 is not None and chunk_crc32(data) != crc32) or (
        bool(chunk_digest) and digest(data) != chunk_digest
    )
    if bad:
        raise DigestMismatchError(
            f"{name}: digest mismatch for chunk at offset {offset} "
            f"({len(data)} bytes); the chunk was corrupted or mislabeled"
        )


@dataclass(frozen=True)
class Chunk:
    """One piece of a blob: ``data`` starts at byte ``offset``; ``crc32`` is its check."""

    offset: int
    data: bytes
    crc32: int

    @property
    def digest(self) -> bytes:
        """SHA-256 of the data (computed on demand), for receivers that want it."""
        return digest(self.data)


def split_chunks(
    blob: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE, start: int = 0
) -> Iterator[Chunk]:
    """Yield the chunks of ``blob`` from byte ``start`` on, each at most ``chunk_size`` bytes.

    An empty remainder (``start == len(blob)``) yields one empty chunk, so a receiver always
    sees at least one message carrying the offset.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if not 0 <= start <= len(blob):
        raise ValueError(f"start must be within the blob [0, {len(blob)}], got {start}")
    view = memoryview(blob)
    if start == len(blob):
        yield Chunk(offset=start, data=b"", crc32=chunk_crc32(b""))
        return
    for offset in range(start, len(blob), chunk_size):
        data = bytes(view[offset : offset + chunk_size])
        yield Chunk(offset=offset, data=data, crc32=chunk_crc32(data))


class ChunkAssembler:
    """Reassembles one blob from in-order chunks, checking every chunk, every size and, at
    :meth:`finish`, the whole-blob digest.

    ``total_size`` and ``blob_digest`` are what the sender declared up front; the declared
    size is checked against ``max_bytes`` before any data is accepted, so an oversized upload
    is refused at its first message. Accepted chunks are kept as they came (no copy) and
    joined once by :meth:`finish`.
    """

    def __init__(self, total_size: int, blob_digest: bytes, max_bytes: int, *, name: str = "blob"):
        self.name = name
        if total_size < 0:
            raise MalformedError(f"{name}: declared total size {total_size} is negative")
        if total_size > max_bytes:
            raise OversizeError(
                f"{name}: declared size {total_size} bytes exceeds the limit of {max_bytes} "
                f"bytes; send a smaller blob or raise the receiver's max upload size"
            )
        if len(blob_digest) != DIGEST_SIZE:
            raise MalformedError(
                f"{name}: blob digest must be {DIGEST_SIZE} bytes, got {len(blob_digest)}"
            )
        self.total_size = total_size
        self.blob_digest = blob_digest
        self._chunks: list[bytes] = []
        self._received = 0

    @property
    def received_bytes(self) -> int:
        """Bytes accepted so far: the offset the next chunk must start at."""
        return self._received

    @property
    def complete(self) -> bool:
        return self._received == self.total_size

    def expect(self, offset: int, nbytes: int) -> None:
        """Refuse a chunk of ``nbytes`` at ``offset`` that cannot be appended now: one not at
        ``received_bytes`` (OffsetMismatchError) or running past the declared total size
        (OversizeError). Cheap; lets a caller check the position before checking the bytes."""
        if offset != self._received:
            raise OffsetMismatchError(self._received, offset, what=self.name)
        end = offset + nbytes
        if end > self.total_size:
            raise OversizeError(
                f"{self.name}: chunk [{offset}, {end}) runs past the declared total size "
                f"{self.total_size}"
            )

    def add(
        self,
        offset: int,
        data: bytes,
        chunk_digest: bytes = b"",
        crc32: int | None = None,
        *,
        verified: bool = False,
    ) -> int:
        """Accept one chunk; return how many bytes it added.

        Raises OffsetMismatchError if ``offset`` is not ``received_bytes``, OversizeError if
        the chunk runs past the declared total size, DigestMismatchError if its check
        (``crc32`` or the SHA-256 ``chunk_digest``) is wrong, MalformedError if it has none.
        ``verified=True`` skips the check: the caller ran :func:`verify_chunk` on these bytes
        already (in a worker thread, say). A refused chunk leaves the assembler unchanged.
        """
        self.expect(offset, len(data))
        if not verified:
            verify_chunk(data, chunk_digest, crc32, offset=offset, name=self.name)
        if data:
            self._chunks.append(bytes(data))  # no copy for bytes
            self._received += len(data)
        return len(data)

    def finish(self) -> bytes:
        """Return the whole blob once complete, after checking the whole-blob digest.

        One SHA-256 pass over the blob: a caller on an event loop runs this in a worker
        thread for a large blob."""
        if not self.complete:
            raise MalformedError(
                f"{self.name}: incomplete, {self._received} of {self.total_size} bytes "
                f"received; resume from offset {self._received}"
            )
        hasher = hashlib.sha256()
        for chunk in self._chunks:
            hasher.update(chunk)
        if hasher.digest() != self.blob_digest:
            raise DigestMismatchError(
                f"{self.name}: whole-blob digest mismatch over {self.total_size} bytes; "
                f"the blob must be sent again from the start"
            )
        return self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)


@dataclass
class PartialUpload:
    """An upload a receiver holds: receiving (``assembler`` set) or complete and delivering."""

    upload_id: str
    total_size: int
    blob_digest: bytes
    metadata: dict[str, str]
    touched: float
    assembler: ChunkAssembler | None  # None once complete and handed on
    owner: object | None = None  # token of the stream feeding it now
    delivery: Any = None  # set by the caller while the complete blob is being handled

    @property
    def header(self) -> tuple[int, bytes]:
        return self.total_size, self.blob_digest

    @property
    def received_bytes(self) -> int:
        return self.total_size if self.assembler is None else self.assembler.received_bytes

    @property
    def complete(self) -> bool:
        return self.assembler is None

    @property
    def idle(self) -> bool:
        return self.owner is None and self.delivery is None


@dataclass
class UploadOutcome:
    """What the receiver answered for a delivered upload: a result or an exception."""

    total_size: int
    blob_digest: bytes
    result: Any
    finished: float
    complete: bool = field(default=True, init=False)

    @property
    def header(self) -> tuple[int, bytes]:
        return self.total_size, self.blob_digest

    @property
    def received_bytes(self) -> int:
        return self.total_size


class UploadTable:
    """Partial and recently delivered uploads of one receiver, bounded and expiring.

    Partial uploads are bounded by count and by declared bytes; when full, the least recently
    touched idle upload is evicted (its sender starts it again). Idle uploads expire after
    ``expiry_s``. Outcomes of delivered uploads are kept (at most ``max_outcomes``, also for
    ``expiry_s``) so a retried upload gets the same answer without a second delivery.
    """

    def __init__(
        self,
        *,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_uploads: int = 64,
        max_bytes: int = 4 * DEFAULT_MAX_UPLOAD_BYTES,
        expiry_s: float = 600.0,
        max_outcomes: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_upload_bytes = max_upload_bytes
        self.max_uploads = max_uploads
        self.max_bytes = max_bytes
        self.expiry_s = expiry_s
        self.max_outcomes = max_outcomes
        self.clock = clock
        self.partial: dict[str, PartialUpload] = {}
        self.outcomes: OrderedDict[str, UploadOutcome] = OrderedDict()

    def sweep(self) -> None:
        """Drop idle partial uploads and outcomes older than ``expiry_s``."""
        cutoff = self.clock() - self.expiry_s
        for upload in [u for u in self.partial.values() if u.idle and u.touched < cutoff]:
            log.info("upload %s expired at %d bytes", upload.upload_id, upload.received_bytes)
            del self.partial[upload.upload_id]
        while self.outcomes and next(iter(self.outcomes.values())).finished < cutoff:
            self.outcomes.popitem(last=False)

    def open(
        self, upload_id: str, total_size: int, blob_digest: bytes, metadata: dict[str, str]
    ) -> PartialUpload:
        """The partial upload ``upload_id``, created if new (size and room checked first)."""
        upload = self.partial.get(upload_id)
        if upload is not None:
            if upload.header != (total_size, blob_digest):
                raise MalformedError(
                    f"upload {upload_id!r} is already in progress for another blob "
                    f"({upload.total_size} bytes); use a new upload id"
                )
            return upload
        name = f"upload {upload_id!r}"
        assembler = ChunkAssembler(total_size, blob_digest, self.max_upload_bytes, name=name)
        self.sweep()
        self._make_room(total_size)
        upload = PartialUpload(
            upload_id, total_size, blob_digest, metadata, self.clock(), assembler
        )
        self.partial[upload_id] = upload
        return upload

    def _make_room(self, nbytes: int) -> None:
        def full() -> bool:
            reserved = sum(u.total_size for u in self.partial.values())
            return len(self.partial) >= self.max_uploads or reserved + nbytes > self.max_bytes

        while full():
            idle = [u for u in self.partial.values() if u.idle]
            if not idle:
                raise OversizeError(
                    f"receiver holds {len(self.partial)} uploads in progress and cannot take "
                    f"another {nbytes} bytes now; retry later",
                    reason="busy",
                )
            victim = min(idle, key=lambda u: u.touched)
            log.info("evicting idle upload %s to make room", victim.upload_id)
            del self.partial[victim.upload_id]

    def record(self, upload: PartialUpload, result: Any) -> None:
        """Move a delivered upload from partial to outcomes, keeping its ``result``."""
        self.partial.pop(upload.upload_id, None)
        self.outcomes[upload.upload_id] = UploadOutcome(*upload.header, result, self.clock())
        while len(self.outcomes) > self.max_outcomes:
            self.outcomes.popitem(last=False)

    def forget(self, upload_id: str) -> None:
        """Drop a partial upload (unrecoverable, or its delivery was cancelled)."""
        self.partial.pop(upload_id, None)
