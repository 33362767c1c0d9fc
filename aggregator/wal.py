"""A write-ahead log: an update is on disk (fsynced) before the gateway acknowledges it.

Layout: a directory of segment files ``00000000000000000001.wal`` named by the index of their
first record. Each record is::

    magic b"AWAL" | u8 type | u64 index | u32 length | 16-byte blake2b(type, index, body) | body

Record types: ``UPDATE`` (an accepted envelope), ``INTENT`` (a flush decided: the updates up
to its index form one partial aggregate, whose note names it, so a restart re-sends exactly
that partial) and ``MARK`` (a checkpoint: every update with an index at or below the mark's
has been merged and handed on durably, so replay skips it).
``append`` returns only after ``os.fsync`` of the segment, so an acknowledged update survives
``kill -9`` and power loss. On open the log is scanned; a torn tail (a partial or corrupt last
record, which was never acknowledged since the ack follows the fsync; or one whose index
is beyond 2**63 - 1, which this log never writes) is cut off. Damage anywhere else (a
corrupt record followed by a valid one, or a short segment that is not the last) cannot come
from a crash, since every record is fsynced before the next is written: it is disk corruption
of acknowledged records, and the log refuses to open (``WalCorruptError``, naming the segment
and offset) rather than silently drop what follows. Segments
entirely below the newest mark are deleted by ``compact``.

A write that fails (``ENOSPC`` on a full disk, ``EIO``, ``EROFS``) raises
:class:`~comms.errors.StorageError` (UNAVAILABLE, reason ``disk_full`` or ``disk_error``): the
update is not acknowledged, and the bytes of the failed record are cut off the segment at once
(or before the next write, if the cut itself failed), so the log never holds a torn record
followed by a valid one. A mark that cannot be written is not recorded (``mark_done`` returns
False and nothing is compacted): a mark only lets a restart skip work, the next one covers it.
The log's :class:`StorageHealth` logs a failing disk once and its recovery once.

Concurrency: every write (``append``, ``intent``, ``mark_done``, ``compact``) holds the log's
lock, so threads may share it: a leaf appends pushes from its gateway while its partial
sender marks and compacts (unserialized, a mark could cut an append in flight as a torn write
or a roll close its file). ``last_location`` is set by ``append`` only; read it under the
same lock as the append (the gateway holds its line's). Each write blocks for the fsync, so
call it through ``asyncio.to_thread`` from async code. Not safe for several processes at once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from comms.errors import CommsError, StorageError

MAGIC = b"AWAL"
_HEAD = struct.Struct("<4sBQI16s")
UPDATE = 1
MARK = 2
INTENT = 3
MAX_INDEX = 2**63 - 1  # a record beyond it is corrupt: the next index must fit the u64 field
# out of space: a full file system, a quota, a file size limit (RLIMIT_FSIZE)
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

log = logging.getLogger("aggregator.storage")


def storage_error(
    err: OSError, what: str, then: str = "nothing was acknowledged, retry later"
) -> StorageError:
    """The refusal for a write that failed with ``err``: ``disk full: ...`` or ``disk error``."""
    full = err.errno in _FULL_ERRNOS
    kind = "disk full" if full else "disk error"
    return StorageError(
        f"{kind}: {what} failed ({err.strerror or err}); {then}",
        reason="disk_full" if full else "disk_error",
    )


class StorageHealth:
    """Whether the writes of one log (or store) currently fail; for /status and metrics.

    The first failure is logged as a warning and recovery once as info; the failures between
    are only counted, so a full disk under a stream of retried pushes does not flood the log.
    """

    def __init__(self, where: str):
        self.where = where
        self.failing = False
        self.since: float | None = None  # wall time of the first failure of this episode
        self.last_error = ""
        self.failures = 0  # failed writes since this process started
        self.episodes = 0  # times the disk went from writable to failing

    def failed(self, err: OSError, what: str, **then) -> StorageError:
        exc = storage_error(err, what, **then)
        self.failures += 1
        self.last_error = str(exc)
        if not self.failing:
            self.failing, self.since = True, time.time()
            self.episodes += 1
            log.warning(
                "%s: %s; refusing what cannot be made durable until writes succeed again",
                self.where, exc,
            )  # fmt: skip
        return exc

    def succeeded(self) -> None:
        if self.failing:
            log.info(
                "%s: writes succeed again after %.1f s (%d failed writes so far)",
                self.where, time.time() - (self.since or time.time()), self.failures,
            )  # fmt: skip
            self.failing, self.since = False, None

    def status(self) -> dict:
        return {
            "failing": self.failing,
            "since": self.since,
            "failures": self.failures,
            "last_error": self.last_error or None,
        }


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


class WalCorruptError(CommsError):
    """A segment is damaged where no crash could have damaged it: acknowledged records are
    unreadable. The aggregator does not start; an operator decides (see the message)."""


@dataclass(frozen=True)
class WalRecord:
    type: int
    index: int
    body: bytes
    path: str = ""  # where the body lies on disk (a merge worker can read it from there)
    offset: int = 0


@dataclass(frozen=True)
class _Loc:
    type: int
    index: int
    segment: Path
    offset: int
    length: int


def _digest(rtype: int, index: int, body: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(struct.pack("<BQ", rtype, index))
    h.update(body)
    return h.digest()


def _record_at(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """(type, index, end) of a whole, checksummed record starting at ``pos``, else None."""
    if pos + _HEAD.size > len(data):
        return None
    magic, rtype, index, length, digest = _HEAD.unpack_from(data, pos)
    end = pos + _HEAD.size + length
    if magic != MAGIC or end > len(data) or index > MAX_INDEX:
        return None
    if _digest(rtype, index, memoryview(data)[pos + _HEAD.size : end]) != digest:
        return None
    return rtype, index, end


def _scan(path: Path, data: bytes) -> tuple[list[_Loc], int]:
    """Where each record of one segment lies, and the byte length of its valid prefix."""
    records, pos = [], 0
    while (found := _record_at(data, pos)) is not None:
        rtype, index, end = found
        records.append(_Loc(rtype, index, path, pos + _HEAD.size, end - pos - _HEAD.size))
        pos = end
    return records, pos


def _valid_record_after(data: bytes, start: int) -> int | None:
    """The offset of the first whole, checksummed record after ``start``, if any."""
    pos = data.find(MAGIC, start + 1)
    while pos != -1:
        if _record_at(data, pos) is not None:
            return pos
        pos = data.find(MAGIC, pos + 1)
    return None


def _check_damage(seg: Path, data: bytes, valid: int, last: bool) -> None:
    """Refuse damage that is not a torn tail (see the module docstring)."""
    after = _valid_record_after(data, valid)
    if last and after is None:
        return
    where = (
        f"a valid record follows at offset {after}"
        if after is not None
        else "it is not the newest segment"
    )
    raise WalCorruptError(
        f"write-ahead log segment {seg} is damaged at offset {valid} and {where}: "
        "acknowledged updates after the damage cannot be read. This is disk corruption, "
        "not a crash. Keep a copy of the directory; to start anyway, move the segment "
        "aside (the updates it holds are then lost) or restore it from a backup."
    )


class WriteAheadLog:
    def __init__(self, directory: str | os.PathLike, segment_bytes: int = 256 << 20):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self._found: list[_Loc] = []
        self.torn_bytes = 0
        self.last_index = 0
        self.mark = 0
        self.health = StorageHealth(f"write-ahead log {self.dir}")
        self._torn = False  # a failed write may have left bytes after _file_size
        self._lock = threading.RLock()  # one write at a time, whatever the thread
        segments = self._segments()
        for seg in segments:
            data = seg.read_bytes()
            records, valid = _scan(seg, data)
            size = len(data)
            if valid < size:  # torn tail: never acknowledged, cut it off
                _check_damage(seg, data, valid, last=seg == segments[-1])
                self.torn_bytes += size - valid
                with open(seg, "r+b") as f:
                    f.truncate(valid)
                    os.fsync(f.fileno())
            for r in records:
                self.last_index = max(self.last_index, r.index)
                if r.type == MARK:
                    self.mark = max(self.mark, r.index)
            self._found.extend(records)
        self._file = None
        self._file_size = 0
        self.last_location: tuple[str, int, int] | None = None  # (path, offset, length)
        self._open_tail()

    def _segments(self) -> list[Path]:
        return sorted(self.dir.glob("*.wal"))

    def _open_tail(self) -> None:
        segs = self._segments()
        if segs and segs[-1].stat().st_size < self.segment_bytes:
            path = segs[-1]
        else:
            path = self.dir / f"{self.last_index + 1:020d}.wal"
        self._file = open(path, "ab", buffering=0)  # unbuffered: nothing left behind a failure
        self._file_size = self._file.tell()
        fsync_dir(self.dir)

    def _cut_torn(self) -> None:
        """Cut what a failed write left after the last whole record (raises if it cannot)."""
        if not self._torn:
            return
        fd = self._file.fileno()
        os.ftruncate(fd, self._file_size)
        os.fsync(fd)
        self._torn = False

    @staticmethod
    def _segment_name(first_index: int) -> str:
        return f"{first_index:020d}.wal"

    def _roll(self, index: int) -> None:
        path = self.dir / self._segment_name(index)
        new = open(path, "ab", buffering=0)
        try:
            fsync_dir(self.dir)
        except OSError:
            new.close()
            path.unlink(missing_ok=True)
            raise
        self._file.close()
        self._file, self._file_size = new, 0

    def _write(self, rtype: int, index: int, body: bytes | memoryview) -> tuple[str, int, int]:
        """Append one record durably, or raise StorageError leaving no part of it behind;
        returns where its body lies (path, offset, length). Call with the lock held."""
        try:
            self._cut_torn()
            # a new segment is named by the next *update's* index, whatever record rolls it: a
            # mark or intent carries an older index, and a segment named by it would claim
            # updates above the mark and be deleted by compact() with them
            first = self.last_index + 1
            if (
                self._file_size >= self.segment_bytes
                and self._segment_name(first) != Path(self._file.name).name
            ):
                self._roll(first)
        except OSError as err:
            raise self.health.failed(err, f"writing to {self.dir}") from err
        head = _HEAD.pack(MAGIC, rtype, index, len(body), _digest(rtype, index, body))
        fd = self._file.fileno()
        try:
            self._torn = True
            _write_all(fd, head)
            _write_all(fd, body)
            os.fsync(fd)
        except OSError as err:
            exc = self.health.failed(err, f"appending a record to {self._file.name}")
            # at once: a restart must not find this record's bytes (if the cut fails too, it
            # is retried before the next write, and a restart cuts it as a torn tail)
            with contextlib.suppress(OSError):
                self._cut_torn()
            raise exc from err
        self._torn = False
        location = (self._file.name, self._file_size + len(head), len(body))
        self._file_size += len(head) + len(body)
        self.health.succeeded()
        return location

    def append(self, body: bytes | memoryview) -> int:
        """Durably append one update; returns its index (1, 2, ...). ``last_location`` then
        says where its body lies, so a merge worker can read it from the file."""
        with self._lock:
            index = self.last_index + 1
            self.last_location = self._write(UPDATE, index, body)
            self.last_index = index
            return index

    def mark_done(self, index: int, note: bytes = b"") -> bool:
        """Record that every update with an index <= ``index`` is merged and handed on.

        Returns False if the mark could not be written (a full disk): the mark stays where it
        was, nothing is compacted, and a restart re-does the work above it (which the parent's
        or the root's state recognises); the next mark covers this one."""
        with self._lock:
            if index < self.mark:
                raise ValueError(f"mark {index} is below the current mark {self.mark}")
            try:
                self._write(MARK, index, note)
            except StorageError:
                return False
            self.mark = index
            return True

    @staticmethod
    def _read(loc: _Loc) -> WalRecord:
        with open(loc.segment, "rb") as f:
            f.seek(loc.offset)
            body = f.read(loc.length)
        return WalRecord(loc.type, loc.index, body, str(loc.segment), loc.offset)

    def intent(self, index: int, note: bytes) -> None:
        """Record that the updates up to ``index`` (above the previous intent) form one flush."""
        with self._lock:
            self._write(INTENT, index, note)

    def pending_intents(self) -> list[WalRecord]:
        """Intents found on open above the newest mark, in order: flushes to re-send."""
        return [self._read(x) for x in self._found if x.type == INTENT and x.index > self.mark]

    def pending(self) -> Iterator[WalRecord]:
        """Updates found on open above the newest mark, in order: what a restart replays."""
        for loc in self._found:
            if loc.type == UPDATE and loc.index > self.mark:
                yield self._read(loc)

    def last_mark_note(self) -> bytes:
        """The note of the newest mark found on open (e.g. the sequence it handed on)."""
        marks = [loc for loc in self._found if loc.type == MARK and loc.index == self.mark]
        return self._read(marks[-1]).body if marks else b""

    def compact(self) -> int:
        """Delete segments whose records are all at or below the mark; returns how many."""
        with self._lock:
            segs = self._segments()
            removed = 0
            for seg, nxt in itertools.pairwise(segs):
                first_of_next = int(nxt.stem)
                if first_of_next - 1 <= self.mark:
                    seg.unlink()
                    removed += 1
            if removed:
                fsync_dir(self.dir)
            return removed

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a file created or renamed in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
