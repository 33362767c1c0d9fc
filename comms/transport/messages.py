"""Chunk messages of a streamed blob: built, checked and shared off the event loop.

``build_chunk_messages`` splits one blob into ``VersionMessage``/``FetchChunk`` messages with
a CRC-32 per chunk and the blob's SHA-256 digest; ``ChunkMessageCache`` builds them once per
blob and shares them across every stream sending the same bytes. Checking or hashing a large
buffer (both release the GIL) runs in a worker thread via ``_off_loop``, on pure inputs.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from comms.chunks import digest
from comms.chunks import split_chunks as _split

OFF_LOOP_BYTES = 1 << 20  # check/hash at least this many bytes in a worker thread (~1 ms)


async def _off_loop(fn, nbytes: int, *args, **kwargs):
    """``fn(*args, **kwargs)``, in a worker thread when it touches OFF_LOOP_BYTES or more."""
    if nbytes >= OFF_LOOP_BYTES:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def _crc_of(msg) -> int | None:
    """A chunk message's CRC-32, or None when it carries none (an older sender's)."""
    return msg.chunk_crc32 if msg.HasField("chunk_crc32") else None


def build_chunk_messages(
    message_type, model_id: str, version: int, data: bytes, chunk_size: int
) -> list[tuple[Any, int]]:
    """``(message, data bytes)`` for each ``VersionMessage``/``FetchChunk`` that streams
    ``data``: split, with each chunk's CRC-32 and the blob's SHA-256 digest. The sizes ride
    along because reading a message's bytes field back copies it. Pure; runs in a worker
    thread."""
    blob_digest = digest(data)
    return [
        (
            message_type(
                model_id=model_id,
                version=version,
                data=chunk.data,
                offset=chunk.offset,
                total_size=len(data),
                chunk_crc32=chunk.crc32,
                blob_digest=blob_digest,
            ),
            len(chunk.data),
        )
        for chunk in _split(data, chunk_size)
    ]


@dataclass
class _CachedBlob:
    data: bytes
    messages: asyncio.Future  # -> build_chunk_messages(...)


class ChunkMessageCache:
    """The chunk messages of recently streamed blobs, built once and shared across streams.

    N subscribers of one version (or N fetches of one snapshot) get the very same message
    objects, so the blob is split and digested once, not N times. An entry is keyed by
    (message type, model_id, version) and holds the blob it was built from; it is used only
    for the same bytes (the same object, or equal bytes: a memcmp, ~10x cheaper than the
    digest), so a key whose blob changed (fetch of version -1) is rebuilt, never served
    stale. Concurrent requests for a blob being built wait for that one build. Bounded by
    ``max_entries`` and ``max_bytes`` (each entry counts twice its blob: the blob and the
    messages' copy), least recently used first out; a blob over half of ``max_bytes`` is
    built for its stream alone. Loop-confined: no locks.
    """

    def __init__(self, chunk_size: int, *, max_entries: int = 8, max_bytes: int = 512 << 20):
        self.chunk_size = chunk_size
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.builds = 0  # blobs split and digested (a cache miss each)
        self._entries: OrderedDict[tuple, _CachedBlob] = OrderedDict()

    async def messages(
        self, message_type, model_id: str, version: int, data: bytes
    ) -> list[tuple[Any, int]]:
        """``(message, nbytes)`` for each chunk of ``data`` (see :func:`build_chunk_messages`)."""
        key = (message_type, model_id, version)
        entry = self._entries.get(key)
        if entry is not None and (entry.data is data or entry.data == data):
            self._entries.move_to_end(key)
            return await asyncio.shield(entry.messages)
        build = (message_type, model_id, version, data, self.chunk_size)
        self.builds += 1
        if 2 * len(data) > self.max_bytes:
            return await _off_loop(build_chunk_messages, len(data), *build)
        entry = _CachedBlob(
            data, asyncio.ensure_future(_off_loop(build_chunk_messages, len(data), *build))
        )
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries or (
            sum(2 * len(e.data) for e in self._entries.values()) > self.max_bytes
        ):
            self._entries.popitem(last=False)
        try:
            return await asyncio.shield(entry.messages)
        except Exception:
            if self._entries.get(key) is entry:
                del self._entries[key]
            raise
