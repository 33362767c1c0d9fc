"""Chunk framing for blobs that cross a wire: split, digest, reassemble, resume.

A blob (a serialized envelope, a snapshot, an encoded model update) is cut into chunks of at
most ``chunk_size`` bytes. Each chunk carries its byte offset in the blob and a BLAKE2b digest
of its bytes; the whole blob has a BLAKE2b digest too. The receiver's ``ChunkAssembler``
accepts chunks strictly in order (each one at the current end of what it holds), so
``received_bytes`` is always a clean resume point: a sender that lost its connection asks how
many bytes arrived and sends only the rest.

``UploadTable`` is a receiver's bookkeeping of uploads: partial ones (bounded in count and
bytes, expiring when idle) and the outcomes of delivered ones, so a retried upload gets the
same answer instead of a second delivery.

Pure: no I/O, no threads; time comes from an injected clock. Callers serialize access (the
transport does so on its single asyncio loop).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from comms.errors import DigestMismatchError, MalformedError, OversizeError

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
"""Bytes per chunk: big enough to amortize per-message overhead, small enough for one gRPC
message and for a dropped link to cost little."""

DIGEST_SIZE = 32
"""BLAKE2b digest length in bytes (256 bits)."""

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
    """BLAKE2b-256 of ``data``: the digest used for chunks and whole blobs."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


@dataclass(frozen=True)
class Chunk:
    """One piece of a blob: ``data`` starts at byte ``offset``; ``digest`` is BLAKE2b of data."""

    offset: int
    data: bytes
    digest: bytes


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
        yield Chunk(offset=start, data=b"", digest=digest(b""))
        return
    for offset in range(start, len(blob), chunk_size):
        data = bytes(view[offset : offset + chunk_size])
        yield Chunk(offset=offset, data=data, digest=digest(data))


class ChunkAssembler:
    """Reassembles one blob from in-order chunks, checking every digest and every size.

    ``total_size`` and ``blob_digest`` are what the sender declared up front; the declared
    size is checked against ``max_bytes`` before any data is accepted, so an oversized upload
    is refused at its first message.
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
        self._buffer = bytearray()
        self._hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)

    @property
    def received_bytes(self) -> int:
        """Bytes accepted so far: the offset the next chunk must start at."""
        return len(self._buffer)

    @property
    def complete(self) -> bool:
        return len(self._buffer) == self.total_size

    def add(self, offset: int, data: bytes, chunk_digest: bytes) -> int:
        """Accept one chunk; return how many bytes it added.

        Raises OffsetMismatchError if ``offset`` is not ``received_bytes``, OversizeError if
        the chunk runs past the declared total size, DigestMismatchError if its digest is
        wrong. A refused chunk leaves the assembler unchanged.
        """
        if offset != len(self._buffer):
            raise OffsetMismatchError(len(self._buffer), offset, what=self.name)
        end = offset + len(data)
        if end > self.total_size:
            raise OversizeError(
                f"{self.name}: chunk [{offset}, {end}) runs past the declared total size "
                f"{self.total_size}"
            )
        if digest(data) != chunk_digest:
            raise DigestMismatchError(
                f"{self.name}: digest mismatch for chunk at offset {offset} "
                f"({len(data)} bytes); the chunk was corrupted or mislabeled"
            )
        self._buffer += data
        self._hasher.update(data)
        return len(data)

    def finish(self) -> bytes:
        """Return the whole blob once complete, after checking the whole-blob digest."""
        if not self.complete:
            raise MalformedError(
                f"{self.name}: incomplete, {len(self._buffer)} of {self.total_size} bytes "
                f"received; resume from offset {len(self._buffer)}"
            )
        if self._hasher.digest() != self.blob_digest:
            raise DigestMismatchError(
                f"{self.name}: whole-blob digest mismatch over {self.total_size} bytes; "
                f"the blob must be sent again from the start"
            )
        return bytes(self._buffer)


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
