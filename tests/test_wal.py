"""The write-ahead log keeps every appended record across reopen, cuts torn tails, compacts."""

import os
import subprocess
import sys

import pytest

from aggregator.wal import WalCorruptError, WriteAheadLog


def test_append_reopen_pending(tmp_path):
    wal = WriteAheadLog(tmp_path)
    assert [wal.append(b"a"), wal.append(b"bb"), wal.append(b"ccc")] == [1, 2, 3]
    wal.mark_done(1, b"seq=7")
    wal.close()
    again = WriteAheadLog(tmp_path)
    assert [(r.index, r.body) for r in again.pending()] == [(2, b"bb"), (3, b"ccc")]
    assert again.mark == 1 and again.last_mark_note() == b"seq=7"
    assert again.append(b"d") == 4


def test_torn_tail_is_cut(tmp_path):
    wal = WriteAheadLog(tmp_path)
    wal.append(b"x" * 100)
    wal.append(b"y" * 100)
    wal.close()
    (seg,) = tmp_path.glob("*.wal")
    size = seg.stat().st_size
    with open(seg, "r+b") as f:  # a crash in the middle of the second record's write
        f.truncate(size - 30)
    again = WriteAheadLog(tmp_path)
    assert [r.body for r in again.pending()] == [b"x" * 100]
    assert again.torn_bytes > 0
    assert again.append(b"z") == 2  # the torn record was never acknowledged: index reused
    again.close()
    assert [r.body for r in WriteAheadLog(tmp_path).pending()] == [b"x" * 100, b"z"]


def test_corrupt_record_stops_scan(tmp_path):
    wal = WriteAheadLog(tmp_path)
    wal.append(b"good")
    wal.append(b"bad!")
    wal.close()
    (seg,) = tmp_path.glob("*.wal")
    data = bytearray(seg.read_bytes())
    data[-1] ^= 0xFF
    seg.write_bytes(bytes(data))
    assert [r.body for r in WriteAheadLog(tmp_path).pending()] == [b"good"]


def test_segments_rotate_and_compact(tmp_path):
    wal = WriteAheadLog(tmp_path, segment_bytes=200)
    for i in range(10):
        wal.append(bytes([i]) * 100)
    assert len(list(tmp_path.glob("*.wal"))) >= 5
    wal.mark_done(8)
    removed = wal.compact()
    assert removed >= 3
    wal.close()
    again = WriteAheadLog(tmp_path, segment_bytes=200)
    assert [r.index for r in again.pending()] == [9, 10]


def test_survives_kill_9_after_append(tmp_path):
    code = (
        "import os, sys\n"
        "from aggregator.wal import WriteAheadLog\n"
        f"w = WriteAheadLog({str(tmp_path)!r})\n"
        "for i in range(5):\n"
        "    w.append(b'u%d' % i)\n"
        "print('acked', flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == -9 and "acked" in out.stdout
    assert [r.body for r in WriteAheadLog(tmp_path).pending()] == [b"u%d" % i for i in range(5)]
    assert os.listdir(tmp_path)


def test_intents_survive_until_marked(tmp_path):
    wal = WriteAheadLog(tmp_path)
    for i in range(5):
        wal.append(b"%d" % i)
    wal.intent(2, b"p1")
    wal.intent(4, b"p2")
    wal.mark_done(2, b"p1 acked")
    wal.close()
    again = WriteAheadLog(tmp_path)
    assert [(r.index, r.body) for r in again.pending_intents()] == [(4, b"p2")]
    assert [r.index for r in again.pending()] == [3, 4, 5]


def test_damage_before_a_valid_record_refuses_to_open(tmp_path):
    """A corrupt record followed by a valid one is no torn tail: the records after it were
    acknowledged, so the log refuses to open instead of cutting them off."""
    wal = WriteAheadLog(tmp_path)
    for body in (b"a" * 50, b"b" * 50, b"c" * 50):
        wal.append(body)
    wal.close()
    (seg,) = tmp_path.glob("*.wal")
    before = seg.read_bytes()
    data = bytearray(before)
    data[len(data) // 2] ^= 0xFF  # inside the second record
    seg.write_bytes(bytes(data))
    with pytest.raises(WalCorruptError, match=r"damaged at offset \d+ and a valid record follows"):
        WriteAheadLog(tmp_path)
    assert seg.read_bytes() == bytes(data)  # nothing was cut


def test_a_short_segment_that_is_not_the_newest_refuses_to_open(tmp_path):
    wal = WriteAheadLog(tmp_path, segment_bytes=200)
    for i in range(6):
        wal.append(bytes([i]) * 100)
    wal.close()
    first = sorted(tmp_path.glob("*.wal"))[0]
    first.write_bytes(first.read_bytes()[:-10])
    with pytest.raises(WalCorruptError, match="not the newest segment"):
        WriteAheadLog(tmp_path, segment_bytes=200)


def test_appends_and_marks_from_two_threads_keep_every_record_and_location(tmp_path):
    """A leaf appends pushes (its gateway, under the line's lock) while its partial sender
    writes marks and compacts from another thread. Every appended body must be where
    ``last_location`` says and survive a reopen whole; small segments make rolls and
    compaction happen meanwhile."""
    import threading

    wal = WriteAheadLog(tmp_path / "wal", segment_bytes=4096)
    bodies, located, errors = [], [], []
    done = threading.Event()

    def marker():
        try:
            while not done.is_set():
                if wal.last_index > wal.mark:
                    wal.mark_done(max(wal.mark, wal.last_index - 3), b"note")
                    wal.compact()
                wal.intent(wal.last_index, b"intent")
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=marker)
    t.start()
    try:
        for i in range(400):
            body = os.urandom(100 + i % 200)
            wal.append(body)
            path, offset, length = wal.last_location
            with open(path, "rb") as f:
                f.seek(offset)
                located.append(f.read(length) == body)
            bodies.append(body)
    finally:
        done.set()
        t.join()
    assert errors == [] and all(located)
    wal.close()
    reopened = WriteAheadLog(tmp_path / "wal", segment_bytes=4096)
    assert reopened.torn_bytes == 0 and reopened.last_index >= 400
    kept = [r.body for r in reopened.pending()]
    assert kept and kept == [b for b in bodies if b in kept][-len(kept) :]
    assert kept == bodies[len(bodies) - len(kept) :]  # everything above the mark, in order


def test_a_segment_rolled_by_a_mark_does_not_let_compact_delete_updates_above_it(tmp_path):
    """Updates 1-4 fill a segment; the mark of 3 (a flush of 1-3 acknowledged upstream while
    4 waits for the next) is the write that rolls. Update 4 must survive the compaction and a
    reopen."""
    wal = WriteAheadLog(tmp_path / "wal", segment_bytes=1000)
    bodies = [bytes([i]) * 300 for i in range(1, 5)]
    for body in bodies:
        wal.append(body)  # 333 bytes a record: 1-4 in the first segment, now full
    wal.mark_done(3, b"")  # rolls
    assert len(list((tmp_path / "wal").glob("*.wal"))) == 2
    wal.compact()
    wal.append(b"five")
    wal.close()
    reopened = WriteAheadLog(tmp_path / "wal", segment_bytes=1000)
    assert [r.body for r in reopened.pending()] == [bodies[3], b"five"]
