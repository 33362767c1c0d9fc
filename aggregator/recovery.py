"""Recovery from the write-ahead log when a model line opens.

What lies above the WAL's mark is re-merged with the weights it was first admitted with; a
flush whose intent was logged before a crash is decided again at the same record and its
partial re-sent with its original sequence number; the replay guard and the partial sequence
come back from the notes of the last mark and of the pending intents. Nothing acknowledged is
lost, nothing is counted twice. An island delta is re-merged with the clip scale logged at its
admission (never decided again), and the window of the norm bound is rebuilt from the mark's
note (the root's: its saved state) and the logged norms of what is replayed.
"""

from __future__ import annotations

import asyncio
import logging

import msgpack

from aggregator.gateway import parse_wal_record
from aggregator.lines import ModelLine
from comms.identity import ReplayGuard

log = logging.getLogger("aggregator.service")  # one log for all the service's parts


class WalRecovery:
    """The WAL replay of :class:`~aggregator.service.AggregatorService`.

    Uses the service's ``config``, ``clock``, ``guard`` (replaced by the merged one),
    ``metrics``, ``_admit``, ``_submit_to_pool``, ``_observe_admitted``, :meth:`_queue_partial`
    (:mod:`aggregator.parent`) and :meth:`_maybe_flush` (:mod:`aggregator.flush`).
    """

    async def _replay(self, line: ModelLine) -> None:
        """Re-merge what the WAL holds above the mark; re-send flushes decided before a crash."""
        intents = line.wal.pending_intents()
        # a root's mark may come from its saved state alone (it died before the WAL mark)
        mark_note = line.wal.last_mark_note() if line.wal.mark else b""
        notes = [msgpack.unpackb(mark_note)] if mark_note else []
        # a leaf's window as of its mark (the root's came with its saved state)
        nb = line.norm_bound
        if nb is not None and notes and isinstance(notes[0], dict) and "norms" in notes[0]:
            nb.load(notes[0]["norms"])
        notes += [msgpack.unpackb(r.body) for r in intents]
        for note in notes:
            if isinstance(note, dict):
                self.guard = _merged_guard(self.guard, note.get("guard", {}))
                line.partial_seq = max(line.partial_seq, int(note.get("seq", 0)))
        bounds = [(r.index, msgpack.unpackb(r.body)) for r in intents]
        replayed, backlog = 0, []  # backlog: pool events, submitted together (one burst)
        for record in line.wal.pending():
            head, data = parse_wal_record(record.body)
            admitted = await asyncio.to_thread(self._admit, data, head, line.pool is None)
            self.guard.commit(admitted.replay_key, admitted.sequence)
            self._observe_admitted(line, admitted, replay=True)  # the norm window, as logged
            if line.pool is not None and admitted.delta is None:  # a backlog: workers scale up
                head = len(record.body) - len(data)
                backlog.append(admitted.pool_event((record.path, record.offset + head, len(data))))
            else:
                admitted.merge_into(line.buffer)
            line.buffer_index = record.index
            line.oldest_at = line.oldest_at or self.clock()
            replayed += 1
            while bounds and record.index == bounds[0][0]:
                index, note = bounds.pop(0)
                self._submit_backlog(line, backlog)
                await line.collect_pool()
                partial, _ = line.take_buffer()
                await self._queue_partial(line, partial, index, int(note["seq"]), resend=True)
        self._submit_backlog(line, backlog)
        if replayed:
            log.warning(
                "%s: replayed %d logged updates of %s from the WAL",
                self.config.name, replayed, line.model_id,
            )  # fmt: skip
            self.metrics.replayed.inc(replayed)
        if line.buffered:
            async with line.lock:
                await self._maybe_flush(line)

    @staticmethod
    def _submit_backlog(line: ModelLine, backlog: list) -> None:
        if backlog:
            line.pool.submit_many(backlog)
            line.pooled += len(backlog)
            backlog.clear()


def _merged_guard(guard: ReplayGuard, state: dict) -> ReplayGuard:
    merged = guard.state()
    for sender, seq in state.items():
        merged[sender] = max(int(seq), merged.get(sender, int(seq)))
    return ReplayGuard(merged)
