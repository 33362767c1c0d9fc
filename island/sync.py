"""The island's sync engine: pushes round deltas to its aggregator and follows global versions.

Local-update training (DiLoCo, Douillard et al. 2023; CO2, Sun et al., ICLR 2024) needs two
things from the network, and this module is both:

- **Pushes.** ``submit_delta`` compresses a round's pseudo-gradient with the configured codec
  and error feedback (what the codec lost is carried into the next push, so the sum of what
  was sent plus the residual equals the sum of the true deltas), signs it as a ``delta``
  envelope with a strictly increasing per-island ``sequence``, and queues it. A background
  task sends the queue in sequence order, one push at a time (the aggregator's replay guard
  refuses a sequence at or below one it accepted, so order matters). Outcomes:
  accepted (the ack carries ``staleness``, ``weight`` and ``v_now``); ``ReplayError``, which
  means delivered earlier (a resend after a crash); ``StaleError``, dropped and counted, the
  round's progress is lost; any other ``RejectedError``, dropped and counted. A link that stays
  down past the client's own retries (``LinkError``, ``DeadlineExceededError``) keeps the push
  queued and retries later with backoff on a fresh channel. The queue holds at most
  ``max_pending_pushes`` waiting pushes; when it overflows the oldest waiting one is dropped,
  logged and counted (the one being transmitted is never dropped).
- **Versions.** ``follow(v)`` subscribes to the model's versions from ``v + 1``. Each version
  is a signed ``version`` envelope holding ``u_v = theta_v - theta_{v-1}``; its signature is
  checked against the roster (role ``aggregator``) when one is configured, and the envelope
  is buffered in order. A version that skips ahead makes the engine resubscribe from the one
  it lacks. The buffer is bounded: when it overflows, or when the aggregator no longer holds
  the versions the island needs, ``take_versions`` raises ``VersionGapError`` and the caller
  fetches a snapshot (``fetch_snapshot``: ``theta_v`` exactly, then follows from ``v + 1``).

Concurrency: the training loop is synchronous and calls this engine from one thread. The
network side lives on a ``comms.aio.LoopThread`` (given, or owned by the engine): one pusher
task and one follower task, each with its own ``TransportClient`` (channels are replaced
after a link failure). Shared state (the pending queue, the version buffer, counters) sits
behind one ``threading.Lock`` held only for bookkeeping, never across I/O. Encoding and error
feedback run in the calling thread, so the residuals always match what was queued; decoding
versions runs in the calling thread too, at the round boundary. Every blocking call takes a
timeout.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from comms.aio import LoopThread
from comms.codecs import ErrorFeedback, get_codec
from comms.envelope import DEFAULT_MAX_ENVELOPE_BYTES, Envelope
from comms.errors import (
    CommsError,
    ConfigError,
    LinkError,
    MalformedError,
    NotFoundError,
    RejectedError,
    ReplayError,
    StaleError,
)
from comms.identity import Identity, Roster
from comms.transport import ClientTLS, LinkShaper, RemoteError, TransportClient
from comms.update import decode_update, encode_update, expected_nbytes

log = logging.getLogger(__name__)

ClientFactory = Callable[[], TransportClient]
VERSION_SIGNER_ROLES = ("aggregator",)


@dataclass
class SyncConfig:
    """How an island syncs one model with its aggregator (the ``[sync]`` table)."""

    model_id: str = ""  # the model this island trains (an aggregator serves many); required
    every: int = 100  # H: inner steps per round (DiLoCo uses 500; smaller syncs more often)
    codec: str = "int8"  # codec of pushed deltas: none, fp16, bf16, int8, int4, topk
    codec_params: dict[str, Any] = field(default_factory=dict)  # e.g. {block = 128}
    mode: Literal["overlapped", "sync"] = "overlapped"  # overlapped never waits at a boundary
    # where a round starts: "eager" = the newest global version plus this island's own deltas
    # still in flight (applied locally until a version holds them); "lookahead" = the newest
    # version moved by the root's outer step with those deltas as its pseudo-gradient
    # (island.lookahead; needs outer_lr/outer_momentum equal to the root's Nesterov step);
    # "reset" = the version alone
    rebase: Literal["eager", "lookahead", "reset"] = "eager"
    # when an overlapped island adopts a version: "boundary" = at the next round boundary;
    # "arrival" = at the first inner step after it arrives, moving the round's progress onto
    # it (the round's start shifts, its progress is kept), so a round runs on a stale start
    # only until the version that merges the previous round arrives
    adopt: Literal["boundary", "arrival"] = "arrival"
    outer_lr: float = 0.7  # lookahead: the root's outer Nesterov lr and momentum
    outer_momentum: float = 0.9
    max_pending_pushes: int = 8  # pushes waiting for a link; on overflow the oldest is dropped
    sync_timeout_s: float = 600.0  # sync mode: longest wait for the next global version
    snapshot_timeout_s: float = 300.0  # longest wait for a snapshot download
    verify_versions: bool = True  # check version signatures (when a roster is configured)
    max_buffered_versions: int = 256  # versions held for the next boundary; beyond: snapshot
    close_timeout_s: float = 30.0  # at shutdown, longest wait for pushes still in flight
    retry_interval_s: float = 1.0  # first wait before retrying a failed link (then doubles)
    max_retry_interval_s: float = 30.0  # cap of that backoff

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key."""
        if not self.model_id:
            raise ConfigError("model_id: set the id of the model this island trains")
        if self.mode not in ("overlapped", "sync"):
            raise ConfigError(f"mode: must be 'overlapped' or 'sync', got {self.mode!r}")
        if self.rebase not in ("eager", "lookahead", "reset"):
            raise ConfigError(
                f"rebase: must be 'eager', 'lookahead' or 'reset', got {self.rebase!r}"
            )
        if self.adopt not in ("boundary", "arrival"):
            raise ConfigError(f"adopt: must be 'boundary' or 'arrival', got {self.adopt!r}")
        if not (self.outer_lr > 0 and 0 <= self.outer_momentum < 1):
            raise ConfigError(
                f"outer_lr/outer_momentum: need lr > 0 and momentum in [0, 1), got "
                f"{self.outer_lr!r}, {self.outer_momentum!r}"
            )
        for key in ("every", "max_pending_pushes", "max_buffered_versions", "sync_timeout_s",
                    "snapshot_timeout_s", "retry_interval_s"):  # fmt: skip
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)!r}")
        if self.max_retry_interval_s < self.retry_interval_s:
            raise ConfigError("max_retry_interval_s: must be >= retry_interval_s")
        get_codec(self.codec, **self.codec_params)  # ConfigError for a bad codec


class VersionGapError(CommsError):
    """The versions after the island's anchor are no longer available: fetch a snapshot."""


class SyncTimeoutError(TimeoutError):
    """Sync mode waited ``sync_timeout_s`` for a global version that did not come."""


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
class SyncStats:
    """Counters for the status page and metrics."""

    pushes_submitted: int = 0
    pushes_accepted: int = 0
    pushes_replayed: int = 0
    pushes_stale: int = 0
    pushes_rejected: int = 0
    pushes_dropped: int = 0
    pushes_pending: int = 0  # gauge: queued now, waiting or in flight
    push_link_failures: int = 0  # push attempts that failed for a link reason (then retried)
    steps_lost: int = 0  # inner steps of stale, rejected or dropped deltas
    versions_received: int = 0
    versions_refused: int = 0  # bad signature, malformed, wrong model
    version_gaps: int = 0  # skipped versions seen on the stream, or evicted from the buffer
    subscription_restarts: int = 0
    snapshots_fetched: int = 0
    newest_version: int = -1
    last_staleness: int = -1  # of the last accepted push
    last_weight: float = 0.0
    last_v_now: int = -1
    bytes_sent: int = 0
    bytes_received: int = 0
    blocked_s: float = 0.0  # training-thread time spent waiting on the network


@dataclass
class _PendingPush:
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


class SyncEngine:
    """Push deltas, follow versions; see the module docstring.

    ``transport`` is the aggregator's ``host:port`` (clients are built with ``tls`` and
    ``shaper``) or a factory returning a new ``TransportClient`` (called again after a link
    failure). With ``loop=None`` the engine starts and owns a ``LoopThread``.
    """

    def __init__(
        self,
        config: SyncConfig,
        identity: Identity,
        transport: str | ClientFactory,
        roster: Roster | None = None,
        loop: LoopThread | None = None,
        shaper: LinkShaper | None = None,
        tls: ClientTLS | None = None,
    ):
        config.validate()
        self.config = config
        self.identity = identity
        self.roster = roster
        if isinstance(transport, str):
            self._new_client: ClientFactory = functools.partial(
                TransportClient, transport, tls=tls, shaper=shaper
            )
            self.address = transport
        elif callable(transport):
            if shaper is not None or tls is not None:
                raise ValueError("with a client factory, give shaper and tls to its clients")
            self._new_client = transport
            self.address = "<client factory>"  # until the first client tells
        else:
            raise TypeError("transport must be an address 'host:port' or a client factory")
        self._verify = config.verify_versions and roster is not None
        if config.verify_versions and roster is None:
            log.warning("model %s: no roster configured; versions are not verified", self.model_id)
        self._codec = get_codec(config.codec, **config.codec_params)
        self._error_feedback = ErrorFeedback() if self._codec.name != "none" else None
        self._owns_loop = loop is None
        self._loop = (loop or LoopThread(name="island-sync")).start()

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # pending queue or versions changed
        self._pending: collections.deque[_PendingPush] = collections.deque()
        self._next_sequence = 1
        self._versions: collections.OrderedDict[int, Envelope] = collections.OrderedDict()
        self._merged_own: set[int] | None = set()
        self._arrivals: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._received: int | None = None  # newest version received in order; None: not following
        self._first_available: int = 0  # versions below this one are gone from the buffer
        self._lost_after: int | None = None  # the aggregator no longer holds versions after this
        self._stats = SyncStats()
        self._closed = False
        self._wake = asyncio.Event()  # set from any thread through the loop: queue has work
        self._clients: dict[str, TransportClient] = {}
        self._follow_task: asyncio.Task | None = None
        self._push_task: asyncio.Task = self._loop.run(self._spawn(self._push_loop()), 10.0)

    @property
    def model_id(self) -> str:
        return self.config.model_id

    # ------------------------------------------------------------------ pushes

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
            sequence = self._next_sequence
        env = encode_update(
            delta,
            codec=self._codec,
            model_id=self.model_id,
            kind="delta",
            sender=self.identity.peer_id,
            sequence=sequence,
            base_version=base_version,
            meta=dict(meta or {}),
            error_feedback=self._error_feedback,
            identity=self.identity,
        )
        item = _PendingPush(sequence, base_version, dict(meta or {}), env.to_bytes())
        item.future.sequence = sequence  # known at once: LocalUpdate tracks its own deltas
        with self._lock:
            self._next_sequence = sequence + 1
            self._stats.pushes_submitted += 1
            dropped = self._enqueue(item)
        self._resolve_dropped(dropped)
        return item.future

    def _enqueue(self, item: _PendingPush) -> list[_PendingPush]:
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
    def _resolve_dropped(dropped: list[_PendingPush]) -> None:
        for item in dropped:
            item.future.set_result(PushOutcome(item.sequence, "dropped", reason="queue_full"))

    def _next_push(self) -> _PendingPush | None:
        with self._lock:
            if not self._pending:
                return None
            item = self._pending[0]
            item.in_flight = True
            return item

    def _finish(self, item: _PendingPush, outcome: PushOutcome) -> None:
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
            try:
                ack = await client.push(item.data, upload_id=item.upload_id)
            except (LinkError, OSError) as err:  # includes DeadlineExceededError
                with self._lock:
                    item.in_flight = False
                    self._stats.push_link_failures += 1
                log.warning(
                    f"model {self.model_id}: push of sequence {item.sequence} to {self.address} "
                    f"failed ({err}); kept queued, retrying in {delay:.1f} s"
                )
                await self._retire_client("push")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)  # a new push: try now
                delay = min(2 * delay, self.config.max_retry_interval_s)
                continue
            except Exception as err:  # typed rejections and anything unexpected: never retried
                self._finish(item, self._rejected(item, err))
            else:
                self._finish(item, self._accepted(item, ack))
            delay = self.config.retry_interval_s

    def _accepted(self, item: _PendingPush, ack: dict[str, str]) -> PushOutcome:
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

    def _rejected(self, item: _PendingPush, err: Exception) -> PushOutcome:
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

    # ------------------------------------------------------------------ versions

    def follow(self, after_version: int) -> None:
        """Follow the model's versions after ``after_version`` (restarting any subscription
        and emptying the buffer)."""
        if self._closed:
            raise RuntimeError("sync engine is closed")
        self._loop.run(self._restart_follow(after_version), 10.0)

    async def _restart_follow(self, after_version: int) -> None:
        if self._follow_task is not None:
            self._follow_task.cancel()
            await asyncio.gather(self._follow_task, return_exceptions=True)
        with self._lock:
            self._versions.clear()
            self._received = after_version
            self._first_available = after_version + 1
            self._lost_after = None
            self._stats.newest_version = after_version
            self._changed.notify_all()
        self._follow_task = await self._spawn(self._follow_loop(after_version + 1))

    async def _follow_loop(self, next_version: int) -> None:
        """Subscribe from ``next_version``; resubscribe after a gap, a bad version or a
        dropped link, with backoff. Ends only when the aggregator lacks the versions."""
        delay = self.config.retry_interval_s
        while True:
            client = self._client("follow")
            try:
                stream = client.subscribe(self.model_id, next_version)
                async with contextlib.aclosing(stream) as versions:
                    async for version, data in versions:
                        if version < next_version:
                            continue  # a duplicate after a reconnect
                        if version > next_version:
                            self._count_gap(next_version, version)
                            break
                        env = await asyncio.to_thread(self._open, data, "version", version)
                        self._store_version(version, env)
                        next_version, delay = version + 1, self.config.retry_interval_s
                log.info("model %s: resubscribing from version %d", self.model_id, next_version)
            except NotFoundError as err:
                with self._lock:
                    self._lost_after = next_version - 1
                    self._changed.notify_all()
                log.warning(
                    f"model {self.model_id}: the aggregator no longer holds version "
                    f"{next_version} ({err}); the next round boundary fetches a snapshot"
                )
                return
            except RejectedError as err:
                with self._lock:
                    self._stats.versions_refused += 1
                log.error("model %s: refused version %d: %s", self.model_id, next_version, err)
            except (LinkError, OSError, RemoteError) as err:
                log.warning(f"model {self.model_id}: version stream from {self.address}: {err}")
                await self._retire_client("follow")
            with self._lock:
                self._stats.subscription_restarts += 1
            await asyncio.sleep(delay)
            delay = min(2 * delay, self.config.max_retry_interval_s)

    def _count_gap(self, expected: int, got: int) -> None:
        with self._lock:
            self._stats.version_gaps += 1
        log.warning(
            f"model {self.model_id}: version stream skipped from {expected} to {got}; "
            f"resubscribing from {expected}"
        )

    def _open(self, data: bytes, kind: str, version: int | None = None) -> Envelope:
        """Parse and check a version or snapshot envelope; verify it when configured."""
        env = Envelope.from_bytes(
            data, max_bytes=DEFAULT_MAX_ENVELOPE_BYTES, expected_nbytes=expected_nbytes
        )
        header = env.header
        if header.kind != kind or header.model_id != self.model_id:
            raise MalformedError(
                f"expected a {kind!r} envelope of model {self.model_id!r}, got a "
                f"{header.kind!r} envelope of model {header.model_id!r}"
            )
        if version is not None and header.base_version != version - 1:
            raise MalformedError(
                f"version {version} envelope has base_version {header.base_version}; "
                f"expected {version - 1}"
            )
        if self._verify:
            env.verify(self.roster, roles=VERSION_SIGNER_ROLES)
        return env

    def _store_version(self, version: int, env: Envelope) -> None:
        with self._lock:
            self._versions[version] = env
            self._arrivals[version] = time.perf_counter()
            while len(self._arrivals) > 64:
                self._arrivals.popitem(last=False)
            self._received = version
            self._stats.versions_received += 1
            self._stats.newest_version = version
            while len(self._versions) > self.config.max_buffered_versions:
                evicted, _ = self._versions.popitem(last=False)
                self._first_available = evicted + 1
                self._stats.version_gaps += 1
            self._changed.notify_all()

    def arrival_time(self, version: int) -> float | None:
        """``time.perf_counter()`` when ``version`` was received (one of the newest 64), or
        None (not received through the stream, e.g. from a snapshot)."""
        with self._lock:
            return self._arrivals.get(version)

    def newest_version(self) -> int | None:
        """The newest version received in order (None before ``follow``/``fetch_snapshot``)."""
        with self._lock:
            return self._received

    def take_versions(self, after: int) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Every buffered version after ``after``, in order, decoded to float32 ``u_v``.

        Versions up to the newest returned leave the buffer. Raises ``VersionGapError`` when
        some of them are gone (evicted, or no longer held by the aggregator) or one does not
        decode: fetch a snapshot. Call from the training thread (decoding runs here).
        """
        with self._lock:
            if self._received is None:
                raise RuntimeError("not following any version: call fetch_snapshot() or follow()")
            if self._lost_after is not None or (
                after < self._received and after + 1 < self._first_available
            ):
                raise VersionGapError(
                    f"model {self.model_id}: the versions after {after} are no longer "
                    "available here or at the aggregator; fetch a snapshot"
                )
            taken = [(v, env) for v, env in self._versions.items() if v > after]
            self._versions.clear()  # the rest are at or below ``after``: of no further use
            if taken:
                self._first_available = max(self._first_available, taken[-1][0] + 1)
        decoded = []
        for v, env in taken:
            self._note_contributors(v, env)
            try:
                decoded.append((v, decode_update(env)))
            except RejectedError as err:  # checked and signed, yet undecodable: start over
                raise VersionGapError(
                    f"model {self.model_id}: version {v} does not decode ({err}); fetch a snapshot"
                ) from err
        return decoded

    def _note_contributors(self, version: int, env: Envelope) -> None:
        """Remember which of this island's sequences ``version`` holds (``None``: unknown)."""
        listed = env.header.meta.get("contributors")
        if listed is None:
            self._merged_own = None
            return
        me = self.identity.peer_id
        own = {int(q) for s, q in listed if s == me}
        if self._merged_own is not None:
            self._merged_own |= own

    def merged_sequences(self) -> set[int] | None:
        """This island's sequences held by the versions taken since the last call; ``None``
        when a version did not list its contributors (an older root): then assume all."""
        merged, self._merged_own = self._merged_own, set()
        return merged

    def wait_for_version(self, after: int, timeout: float) -> int:
        """Block until a version newer than ``after`` is received; return the newest.

        Returns early if the versions were lost (``take_versions`` then raises
        ``VersionGapError``). Raises ``SyncTimeoutError`` after ``timeout`` seconds.
        """
        start = time.perf_counter()
        try:
            with self._lock:
                arrived = self._changed.wait_for(
                    lambda: (
                        (self._received is not None and self._received > after)
                        or self._lost_after is not None
                        or self._closed
                    ),
                    timeout,
                )
                if not arrived:
                    raise SyncTimeoutError(
                        f"model {self.model_id}: no global version newer than {after} arrived "
                        f"from {self.address} within {timeout:g} s; is the aggregator running "
                        "and merging? (raise sync.sync_timeout_s for slow rounds)"
                    )
                return self._received
        finally:
            self._add_blocked(time.perf_counter() - start)

    def fetch_snapshot(self, timeout: float | None = None) -> tuple[int, dict[str, np.ndarray]]:
        """Download the newest full model ``(v, theta_v)`` and follow versions after ``v``."""
        timeout = self.config.snapshot_timeout_s if timeout is None else timeout
        start = time.perf_counter()
        try:
            data = self._loop.run(self._fetch(), timeout)
            env = self._open(data, "snapshot")
            params = decode_update(env)
            version = env.header.base_version
            with self._lock:
                self._stats.snapshots_fetched += 1
            self.follow(version)
            log.info("model %s: loaded snapshot of version %d", self.model_id, version)
            return version, params
        finally:
            self._add_blocked(time.perf_counter() - start)

    async def _fetch(self) -> bytes:
        client = self._new_client()
        try:
            return await client.fetch(self.model_id, -1)
        finally:
            with self._lock:
                self._stats.bytes_received += client.stats.bytes_received
            await client.close()

    # ------------------------------------------------------------------ clients and stats

    def _client(self, role: str) -> TransportClient:
        client = self._clients.get(role)
        if client is None:
            client = self._clients[role] = self._new_client()
            self.address = getattr(client, "address", self.address)
        return client

    async def _retire_client(self, role: str) -> None:
        """Close a client (after a failure, or at close) and bank its byte counts."""
        client = self._clients.pop(role, None)
        if client is None:
            return
        with self._lock:
            self._stats.bytes_sent += client.stats.bytes_sent
            self._stats.bytes_received += client.stats.bytes_received
        with contextlib.suppress(Exception):
            await client.close()

    def _add_blocked(self, seconds: float) -> None:
        with self._lock:
            self._stats.blocked_s += seconds

    @property
    def stats(self) -> dict[str, Any]:
        """A copy of the counters (bytes include the live clients')."""
        with self._lock:
            stats = dataclasses.asdict(self._stats)
        for client in list(self._clients.values()):
            stats["bytes_sent"] += client.stats.bytes_sent
            stats["bytes_received"] += client.stats.bytes_received
        return stats

    # ------------------------------------------------------------------ state and lifetime

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
                _PendingPush(
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

    def close(self, timeout: float = 30.0) -> None:
        """Stop: wait up to ``timeout`` s for queued pushes to be delivered, then stop both
        tasks. Pushes still queued are abandoned (their futures say so) and stay in
        ``state_dict()``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        start = time.perf_counter()
        with self._lock:
            self._changed.notify_all()  # wakes wait_for_version
            self._changed.wait_for(lambda: not self._pending, timeout)
        try:
            if self._loop.running:
                self._loop.run(self._shutdown(), max(1.0, timeout - (time.perf_counter() - start)))
        finally:
            with self._lock:
                abandoned = list(self._pending)
                for item in abandoned:
                    item.in_flight = False
            for item in abandoned:
                if not item.future.done():
                    item.future.set_result(PushOutcome(item.sequence, "abandoned"))
            if abandoned:
                log.warning(
                    f"model {self.model_id}: closed with undelivered pushes (sequences "
                    f"{[p.sequence for p in abandoned]}); state_dict() keeps them for a restart"
                )
            if self._owns_loop:
                self._loop.stop()

    async def _shutdown(self) -> None:
        tasks = [t for t in (self._push_task, self._follow_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for role in list(self._clients):
            await self._retire_client(role)

    @staticmethod
    async def _spawn(coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(_log_crash)
        return task

    def __enter__(self) -> SyncEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _int_field(ack: Mapping[str, str], key: str, default: int) -> int:
    try:
        return int(ack[key])
    except (KeyError, ValueError):
        return default


def _log_crash(task: asyncio.Task) -> None:
    """A background task must never end with an error unnoticed."""
    if not task.cancelled() and task.exception() is not None:
        log.error("sync engine task %s crashed", task.get_name(), exc_info=task.exception())
