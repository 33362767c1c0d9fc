"""The ordered push queue: a round's delta in, delivered to the aggregator in sequence order.

``submit_delta`` compresses a round's pseudo-gradient with the configured codec and error
feedback (what the codec lost is carried into the next push, so the sum of what was sent plus
the residual equals the sum of the true deltas), signs it as a ``delta`` envelope with a
strictly increasing per-island ``sequence``, and queues it. A background task sends the queue
in sequence order, one push at a time (the aggregator's replay guard refuses a sequence at or
below one it accepted, so order matters). Outcomes: accepted (the ack carries ``staleness``,
``weight`` and ``v_now``); ``ReplayError``, which means delivered earlier (a resend after a
crash); ``StaleError``, dropped and counted, the round's progress is lost; any other
``RejectedError``, dropped and counted. A link that stays down past the client's own retries
(``LinkError``, ``DeadlineExceededError``) keeps the push queued and retries later with backoff
on a fresh channel. The queue holds at most ``max_pending_pushes`` waiting pushes; when it
overflows the oldest waiting one is dropped, logged and counted (the one being transmitted is
never dropped). With an ack log (``SyncEngine(ack_log=PATH)``; the daemon keeps it beside its
snapshots, ``acks.jsonl``) every answered push is one JSON line there. ``state_dict`` keeps the
next sequence, the residuals and the undelivered pushes for a restart.

``PushQueue`` is the push half of ``SyncEngine`` (a mixin: the engine owns the state, the lock
and the clients). ``submit_delta`` and the state methods run in the training thread;
``_push_loop`` runs on the engine's loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from comms.errors import LinkError, RejectedError, ReplayError, StaleError
from comms.faults import fault_point
from comms.transport import RemoteError
from comms.update import encode_update

if TYPE_CHECKING:
    from comms.aio import LoopThread
    from comms.codecs import Codec, ErrorFeedback
    from comms.identity import Identity
    from island.sync.auto import UplinkEstimate
    from island.sync.config import SyncConfig, SyncStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushOutcome:
    """What became of one submitted delta (the result of ``submit_delta``'s future).

    ``status``: ``accepted``, ``replayed`` (delivered earlier), ``stale`` or ``rejected``
    (dropped by the aggregator), ``dropped`` (pending-queue overflow) or ``abandoned`` (the
    engine closed before it was sent; it stays in ``state_dict()`` for the next start).
    """

    sequence: int
    status: str
    ack: dict[str, str] = field(default_factory=dict)
    reason: str = ""


@dataclass
class PendingPush:
    """A queued push: its signed envelope, and the future its outcome resolves."""

    sequence: int
    base_version: int
    meta: dict
    data: bytes
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    in_flight: bool = False

    @property
    def upload_id(self) -> str:
        # The digest makes a resend of the same bytes resume or dedupe at the transport, and
        # keeps different bytes under a reused sequence from colliding there.
        return f"delta-{self.sequence}-{hashlib.blake2b(self.data, digest_size=8).hexdigest()}"

    @property
    def steps(self) -> int:
        steps = self.meta.get("steps", 0)
        return steps if isinstance(steps, int) else 0


class PushQueue:
    """Submit deltas and send them in order (the push half of ``SyncEngine``)."""

    # set by SyncEngine.__init__
    config: SyncConfig
    identity: Identity
    address: str
    _codec: Codec
    _error_feedback: ErrorFeedback | None
    _uplink: UplinkEstimate
    _loop: LoopThread
    _lock: threading.Lock
    _changed: threading.Condition
    _pending: collections.deque[PendingPush]
    _next_sequence: int
    _stats: SyncStats
    _closed: bool
    _wake: asyncio.Event
    ack_log: str

    def submit_delta(
        self, delta: Mapping[str, Any], base_version: int, meta: Mapping[str, Any] | None = None
    ) -> concurrent.futures.Future[PushOutcome]:
        """Encode ``delta`` (codec + error feedback), sign it and queue it for pushing.

        Returns at once (the push runs on the loop thread) with a future of its
        ``PushOutcome``. ``meta`` carries ``steps``, ``tokens`` and ``round``. Call from the
        training thread.
        """
        if self._closed:
            raise RuntimeError("sync engine is closed; no more deltas can be pushed")
        with self._lock:
            sequence, codec = self._next_sequence, self._codec
            self._stats.codec = codec.name
        env = encode_update(
            delta,
            codec=codec,
            model_id=self.model_id,
            kind="delta",
            sender=self.identity.peer_id,
            sequence=sequence,
            base_version=base_version,
            meta=dict(meta or {}),
            error_feedback=self._error_feedback,
            identity=self.identity,
        )
        item = PendingPush(sequence, base_version, dict(meta or {}), env.to_bytes())
        item.future.sequence = sequence  # known at once: LocalUpdate tracks its own deltas
        with self._lock:
            self._next_sequence = sequence + 1
            self._stats.pushes_submitted += 1
            dropped = self._enqueue(item)
        self._resolve_dropped(dropped)
        return item.future

    def _enqueue(self, item: PendingPush) -> list[PendingPush]:
        """Append (lock held); drop the oldest waiting pushes beyond the bound and return them
        (their futures are resolved by the caller, outside the lock)."""
        self._pending.append(item)
        dropped = []
        while sum(not p.in_flight for p in self._pending) > self.config.max_pending_pushes:
            oldest = next(p for p in self._pending if not p.in_flight)
            self._pending.remove(oldest)
            dropped.append(oldest)
            self._stats.pushes_dropped += 1
            self._stats.steps_lost += oldest.steps
            log.error(
                f"model {self.model_id}: pending-push queue is full ({len(self._pending)} "
                f"waiting for the link to {self.address}); dropped the delta of sequence "
                f"{oldest.sequence} ({oldest.steps} steps): its progress is lost"
            )
        self._stats.pushes_pending = len(self._pending)
        self._changed.notify_all()
        with contextlib.suppress(RuntimeError):  # loop already stopped: close() handles it
            self._loop.loop.call_soon_threadsafe(self._wake.set)
        return dropped

    @staticmethod
    def _resolve_dropped(dropped: list[PendingPush]) -> None:
        for item in dropped:
            item.future.set_result(PushOutcome(item.sequence, "dropped", reason="queue_full"))

    def _next_push(self) -> PendingPush | None:
        with self._lock:
            if not self._pending:
                return None
            item = self._pending[0]
            item.in_flight = True
            return item

    def _finish(self, item: PendingPush, outcome: PushOutcome) -> None:
        with self._lock:
            item.in_flight = False
            if item in self._pending:
                self._pending.remove(item)
            self._stats.pushes_pending = len(self._pending)
            self._changed.notify_all()
        if not item.future.done():
            item.future.set_result(outcome)

    async def _push_loop(self) -> None:
        """Send the pending queue in order, forever; the loop's only pusher."""
        delay = self.config.retry_interval_s
        while True:
            self._wake.clear()
            item = self._next_push()
            if item is None:
                await self._wake.wait()
                continue
            client = self._client("push")
            sent_at = time.perf_counter()
            try:
                ack = await client.push(item.data, upload_id=item.upload_id)
                fault_point("island.after_ack")
            except (LinkError, OSError) as err:  # includes DeadlineExceededError
                with self._lock:
                    item.in_flight = False
                    self._stats.push_link_failures += 1
                log.warning(
                    f"model {self.model_id}: push of sequence {item.sequence} to {self.address} "
                    f"failed ({err}); kept queued, retrying in {delay:.1f} s"
                )
                await self._retire_client("push")
                with contextlib.suppress(TimeoutError):  # not wait_for: it can drop a cancel
                    async with asyncio.timeout(delay):
                        await self._wake.wait()  # a new push: try now
                delay = min(2 * delay, self.config.max_retry_interval_s)
                continue
            except Exception as err:  # typed rejections and anything unexpected: never retried
                outcome = self._rejected(item, err)
                self._record_ack(item, outcome)
                self._finish(item, outcome)
            else:
                self._observe_uplink(len(item.data), time.perf_counter() - sent_at)
                outcome = self._accepted(item, ack)
                self._record_ack(item, outcome)
                self._finish(item, outcome)
            delay = self.config.retry_interval_s

    def _observe_uplink(self, nbytes: int, seconds: float) -> None:
        """A delivered push measures the uplink: its bytes over send-to-ack seconds."""
        with self._lock:
            self._uplink.observe(nbytes, seconds)
            self._stats.uplink_bps = self._uplink.rate_bps or 0.0

    def _record_ack(self, item: PendingPush, outcome: PushOutcome) -> None:
        """One JSON line in the ack log (if configured) per push the aggregator answered:
        what this island saw acknowledged (``accepted``), or answered as delivered earlier
        (``replayed``), stale or rejected. Written before the outcome is acted on; a line
        survives the process's ``kill -9`` (the page cache holds it; no fsync)."""
        if not self.ack_log:
            return
        record = {
            "t": round(time.time(), 3), "sender": self.identity.peer_id, "model_id": self.model_id,
            "sequence": item.sequence, "status": outcome.status, "base_version": item.base_version,
            "steps": item.steps, "round": item.meta.get("round"), **outcome.ack,
        }  # fmt: skip
        if outcome.reason:
            record["reason"] = outcome.reason[:200]
        try:
            with open(self.ack_log, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            log.warning("could not write the ack log %s: %s", self.ack_log, err)

    def _accepted(self, item: PendingPush, ack: dict[str, str]) -> PushOutcome:
        with self._lock:
            stats = self._stats
            stats.pushes_accepted += 1
            stats.last_staleness = _int_field(ack, "staleness", stats.last_staleness)
            stats.last_v_now = _int_field(ack, "v_now", stats.last_v_now)
            with contextlib.suppress(KeyError, ValueError):
                stats.last_weight = float(ack["weight"])
        log.info(
            f"model {self.model_id}: push of sequence {item.sequence} accepted (staleness "
            f"{ack.get('staleness', '?')}, weight {ack.get('weight', '?')}, v_now {ack.get('v_now', '?')})"
        )
        return PushOutcome(item.sequence, "accepted", dict(ack))

    def _rejected(self, item: PendingPush, err: Exception) -> PushOutcome:
        what = f"model {self.model_id}: push of sequence {item.sequence} (round "
        what += f"{item.meta.get('round', '?')}, {item.steps} steps, base version "
        what += f"{item.base_version})"
        reason = getattr(err, "reason", type(err).__name__)
        with self._lock:
            if isinstance(err, ReplayError):
                self._stats.pushes_replayed += 1
                status = "replayed"
            elif isinstance(err, StaleError):
                self._stats.pushes_stale += 1
                self._stats.steps_lost += item.steps
                status = "stale"
            else:
                self._stats.pushes_rejected += 1
                self._stats.steps_lost += item.steps
                status = "rejected"
        if status == "replayed":
            log.info("%s was delivered earlier (%s); counted as delivered", what, err)
        elif status == "stale":
            log.warning("%s refused as too stale: %s; its progress is lost", what, err)
        elif isinstance(err, RejectedError | RemoteError):
            log.error("%s rejected (%s): %s; dropped, its progress is lost", what, reason, err)
        else:
            log.error("%s failed unexpectedly; dropped", what, exc_info=err)
        return PushOutcome(item.sequence, status, reason=f"{reason}: {err}")

    def state_dict(self) -> dict[str, Any]:
        """What must survive a restart: the next sequence, the error-feedback residuals and
        the pushes not yet delivered (their envelopes as uint8 arrays, to resend as is)."""
        with self._lock:
            pending = [
                {
                    "sequence": p.sequence,
                    "base_version": p.base_version,
                    "meta": dict(p.meta),
                    "envelope": np.frombuffer(p.data, dtype=np.uint8).copy(),
                }
                for p in self._pending
            ]
            next_sequence = self._next_sequence
        residuals = self._error_feedback.residuals() if self._error_feedback else {}
        return {"next_sequence": next_sequence, "residuals": residuals, "pending": pending}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s contents before the first push; pending pushes are
        resent first (an aggregator that already has one answers replay: delivered)."""
        with self._lock:
            if self._stats.pushes_submitted or self._pending:
                raise RuntimeError("load_state_dict must come before the first submit_delta")
        try:
            next_sequence = int(state["next_sequence"])
            residuals = dict(state.get("residuals", {}))
            pending = [
                PendingPush(
                    int(p["sequence"]),
                    int(p["base_version"]),
                    dict(p["meta"]),
                    np.asarray(p["envelope"], dtype=np.uint8).tobytes(),
                )
                for p in state.get("pending", [])
            ]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"sync engine state is incomplete or malformed: {err!r}") from err
        if residuals and self._error_feedback is None:
            log.warning(f"model {self.model_id}: codec 'none' keeps no residuals; ignored")
        elif self._error_feedback is not None:
            self._error_feedback.load_residuals(residuals)
        with self._lock:
            self._next_sequence = max(self._next_sequence, next_sequence)
            dropped = [
                d for p in sorted(pending, key=lambda p: p.sequence) for d in self._enqueue(p)
            ]
        self._resolve_dropped(dropped)


def _int_field(ack: Mapping[str, str], key: str, default: int) -> int:
    try:
        return int(ack[key])
    except (KeyError, ValueError):
        return default
