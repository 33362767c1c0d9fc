"""Chunk framing: split, digest, in-order reassembly, limits and resume points."""

import hashlib
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from comms.chunks import (
    ChunkAssembler,
    OffsetMismatchError,
    UploadTable,
    chunk_crc32,
    digest,
    split_chunks,
    verify_chunk,
)
from comms.errors import DigestMismatchError, MalformedError, OversizeError, RejectedError

BLOB = bytes(range(256)) * 40  # 10240 bytes


def assembler_for(blob: bytes, max_bytes: int = 1 << 20) -> ChunkAssembler:
    return ChunkAssembler(len(blob), digest(blob), max_bytes)


def test_digest_is_sha256():
    assert digest(b"abc") == hashlib.sha256(b"abc").digest()
    assert len(digest(b"")) == 32


def test_split_offsets_sizes_and_digests():
    chunks = list(split_chunks(BLOB, chunk_size=4096))
    assert [c.offset for c in chunks] == [0, 4096, 8192]
    assert [len(c.data) for c in chunks] == [4096, 4096, 2048]
    assert all(c.digest == digest(c.data) for c in chunks)
    assert b"".join(c.data for c in chunks) == BLOB


def test_split_from_a_resume_point():
    chunks = list(split_chunks(BLOB, chunk_size=4096, start=5000))
    assert chunks[0].offset == 5000
    assert b"".join(c.data for c in chunks) == BLOB[5000:]


def test_split_of_nothing_left_yields_one_empty_chunk():
    (chunk,) = split_chunks(BLOB, start=len(BLOB))
    assert (chunk.offset, chunk.data, chunk.digest) == (len(BLOB), b"", digest(b""))


@pytest.mark.parametrize(("chunk_size", "start"), [(0, 0), (16, -1), (16, len(BLOB) + 1)])
def test_split_rejects_bad_arguments(chunk_size, start):
    with pytest.raises(ValueError):
        list(split_chunks(BLOB, chunk_size=chunk_size, start=start))


@given(blob=st.binary(max_size=3000), chunk_size=st.integers(1, 700))
def test_round_trip(blob, chunk_size):
    assembler = assembler_for(blob)
    for chunk in split_chunks(blob, chunk_size):
        assembler.add(chunk.offset, chunk.data, chunk.digest)
    assert assembler.complete
    assert assembler.finish() == blob


def test_chunks_carry_a_crc32_and_reassemble_checked_by_it():
    chunks = list(split_chunks(BLOB, chunk_size=4096))
    assert [c.crc32 for c in chunks] == [zlib.crc32(c.data) for c in chunks]
    assert chunk_crc32(b"abc") == zlib.crc32(b"abc") == 0x352441C2
    assembler = assembler_for(BLOB)
    for chunk in chunks:
        assembler.add(chunk.offset, chunk.data, crc32=chunk.crc32)
    assert assembler.finish() == BLOB


def test_wrong_crc32_is_refused_and_changes_nothing():
    assembler = assembler_for(BLOB)
    good = zlib.crc32(BLOB[:100])
    with pytest.raises(DigestMismatchError, match="chunk at offset 0"):
        assembler.add(0, BLOB[:100], crc32=good ^ 1)
    # Both checks given: both must hold.
    with pytest.raises(DigestMismatchError):
        assembler.add(0, BLOB[:100], digest(b"other"), crc32=good)
    assert assembler.received_bytes == 0
    assert assembler.add(0, BLOB[:100], digest(BLOB[:100]), crc32=good) == 100


def test_chunk_with_no_check_is_malformed():
    assembler = assembler_for(BLOB)
    with pytest.raises(MalformedError, match="carries no check"):
        assembler.add(0, BLOB[:100])
    with pytest.raises(MalformedError, match="carries no check"):
        verify_chunk(BLOB[:100])
    assert assembler.received_bytes == 0


def test_verified_add_checks_position_but_not_bytes():
    assembler = assembler_for(BLOB)
    verify_chunk(BLOB[:100], crc32=zlib.crc32(BLOB[:100]))  # what a worker thread runs
    assert assembler.add(0, BLOB[:100], verified=True) == 100
    with pytest.raises(OffsetMismatchError):
        assembler.expect(0, 10)
    with pytest.raises(OversizeError):
        assembler.expect(100, len(BLOB))
    with pytest.raises(OffsetMismatchError):
        assembler.add(0, BLOB[:100], verified=True)
    assert assembler.received_bytes == 100


def test_received_bytes_is_the_resume_point():
    assembler = assembler_for(BLOB)
    chunks = list(split_chunks(BLOB, chunk_size=1000))
    for chunk in chunks[:4]:
        assembler.add(chunk.offset, chunk.data, chunk.digest)
    assert assembler.received_bytes == 4000
    assert not assembler.complete
    for chunk in split_chunks(BLOB, chunk_size=3000, start=assembler.received_bytes):
        assembler.add(chunk.offset, chunk.data, chunk.digest)
    assert assembler.finish() == BLOB


@pytest.mark.parametrize("offset", [0, 2000])
def test_chunk_at_another_offset_names_both(offset):
    assembler = assembler_for(BLOB)
    first = next(split_chunks(BLOB, chunk_size=1000))
    assembler.add(first.offset, first.data, first.digest)
    data = BLOB[offset : offset + 1000]
    with pytest.raises(OffsetMismatchError) as info:
        assembler.add(offset, data, digest(data))
    assert (info.value.expected, info.value.got) == (1000, offset)
    assert "expected offset 1000" in str(info.value)
    assert f"offset {offset}" in str(info.value)
    assert isinstance(info.value, RejectedError)
    assert assembler.received_bytes == 1000  # refused chunks change nothing


def test_wrong_chunk_digest_is_refused():
    assembler = assembler_for(BLOB)
    with pytest.raises(DigestMismatchError, match="offset 0"):
        assembler.add(0, BLOB[:100], digest(b"something else"))
    assert assembler.received_bytes == 0


def test_declared_size_over_the_limit_is_refused_up_front():
    with pytest.raises(OversizeError, match="exceeds the limit of 100 bytes"):
        ChunkAssembler(101, digest(b""), max_bytes=100)


def test_chunk_past_the_declared_size_is_refused():
    assembler = ChunkAssembler(10, digest(b"0123456789"), max_bytes=100)
    data = b"0123456789A"
    with pytest.raises(OversizeError, match="past the declared total size 10"):
        assembler.add(0, data, digest(data))


def test_whole_blob_digest_is_checked_on_finish():
    assembler = ChunkAssembler(len(BLOB), digest(b"another blob"), max_bytes=1 << 20)
    for chunk in split_chunks(BLOB, chunk_size=4096):
        assembler.add(chunk.offset, chunk.data, chunk.digest)
    with pytest.raises(DigestMismatchError, match="whole-blob"):
        assembler.finish()


def test_finish_before_complete_says_where_to_resume():
    assembler = assembler_for(BLOB)
    assembler.add(0, BLOB[:10], digest(BLOB[:10]))
    with pytest.raises(MalformedError, match="resume from offset 10"):
        assembler.finish()


@pytest.mark.parametrize(("size", "blob_digest"), [(-1, digest(b"")), (5, b"short")])
def test_bad_header_is_malformed(size, blob_digest):
    with pytest.raises(MalformedError):
        ChunkAssembler(size, blob_digest, max_bytes=100)


def test_empty_blob():
    assembler = assembler_for(b"")
    (chunk,) = split_chunks(b"")
    assembler.add(chunk.offset, chunk.data, chunk.digest)
    assert assembler.finish() == b""


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def open_upload(table: UploadTable, upload_id: str, size: int):
    return table.open(upload_id, size, digest(bytes(size)), {"peer": "p"})


def test_upload_table_resumes_the_same_upload_and_refuses_a_different_blob():
    table = UploadTable(max_upload_bytes=100)
    upload = open_upload(table, "a", 10)
    upload.assembler.add(0, bytes(4), digest(bytes(4)))
    assert open_upload(table, "a", 10) is upload
    assert upload.received_bytes == 4
    with pytest.raises(MalformedError, match="already in progress"):
        open_upload(table, "a", 11)
    with pytest.raises(OversizeError):
        open_upload(table, "b", 101)
    assert list(table.partial) == ["a"]


def test_upload_table_expires_idle_partial_uploads_and_outcomes():
    clock = FakeClock()
    table = UploadTable(max_upload_bytes=100, expiry_s=60, clock=clock)
    open_upload(table, "a", 10)
    table.record(open_upload(table, "b", 0), {"sequence": "1"})
    assert table.outcomes["b"].result == {"sequence": "1"}
    assert table.outcomes["b"].complete
    clock.now = 59
    table.sweep()
    assert ("a" in table.partial, "b" in table.outcomes) == (True, True)
    clock.now = 61
    table.sweep()
    assert (table.partial, dict(table.outcomes)) == ({}, {})


def test_upload_table_evicts_the_oldest_idle_upload_and_refuses_when_all_busy():
    clock = FakeClock()
    table = UploadTable(max_upload_bytes=100, max_uploads=2, max_bytes=150, clock=clock)
    open_upload(table, "old", 50)
    clock.now = 1
    open_upload(table, "new", 50)
    clock.now = 2
    open_upload(table, "big", 90)  # 190 > 150 bytes: evicts "old"
    assert sorted(table.partial) == ["big", "new"]
    for upload in table.partial.values():
        upload.owner = object()  # both streaming right now
    with pytest.raises(OversizeError, match="retry later") as info:
        open_upload(table, "more", 1)
    assert info.value.reason == "busy"
