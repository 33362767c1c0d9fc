"""``SyncEngine``: an island's sync engine assembled from its parts, and the clients' lifecycle.

The engine owns the shared state of its parts (``PushQueue`` in ``pushes``, ``VersionStream``
in ``versions``, ``SnapshotJoiner`` in ``joiner``) behind one ``threading.Lock``, a
``comms.aio.LoopThread`` (given, or started and owned here) with one pusher and one follower
task, and one ``TransportClient`` per role, replaced after a link failure and closed at
shutdown with its byte counts banked. ``close`` waits for queued pushes, then stops both tasks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from comms.aio import LoopThread
from comms.codecs import ErrorFeedback, get_codec
from comms.envelope import Envelope
from comms.identity import Identity, Roster
from comms.transport import ClientTLS, LinkShaper, TransportClient
from island.sync.auto import UplinkEstimate
from island.sync.config import SyncConfig, SyncStats
from island.sync.joiner import SnapshotJoiner
from island.sync.pushes import PendingPush, PushOutcome, PushQueue
from island.sync.versions import VersionStream

log = logging.getLogger(__name__)

ClientFactory = Callable[[], TransportClient]


class SyncEngine(PushQueue, VersionStream, SnapshotJoiner):
    """Push deltas, follow versions; see the module docstring.

    ``transport`` is the aggregator's ``host:port`` (clients are built with ``tls``,
    ``shaper`` and ``identity``, which signs the version stream and snapshot fetches) or a
    factory returning a new ``TransportClient`` (called again after a link failure; give its
    clients the identity, or reads of a non-public model are refused). With ``loop=None``
    the engine starts and owns a ``LoopThread``.
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
        ack_log: str = "",
    ):
        config.validate()
        self.ack_log = ack_log  # JSON lines: every push the aggregator answered (pushes.py)
        self.config = config
        self.identity = identity
        self.roster = roster
        if isinstance(transport, str):
            self._new_client: ClientFactory = functools.partial(
                TransportClient, transport, tls=tls, shaper=shaper, identity=identity
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
        # with auto the codec may change between rounds: the residual carries across codecs
        self._error_feedback = (
            ErrorFeedback(config.error_feedback_decay)
            if self._codec.name != "none" or config.auto
            else None
        )
        self._uplink = UplinkEstimate()
        self._owns_loop = loop is None
        self._loop = (loop or LoopThread(name="island-sync")).start()

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # pending queue or versions changed
        self._pending: collections.deque[PendingPush] = collections.deque()
        self._next_sequence = 1
        self._versions: collections.OrderedDict[int, Envelope] = collections.OrderedDict()
        self._merged_own: set[int] | None = set()
        self._fractions: dict[int, float] = {}
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

    def set_codec(self, name: str, params: dict | None = None) -> None:
        """Push the next deltas with codec ``name`` (``auto``; error feedback carries on)."""
        codec = get_codec(name, **dict(params or {}))
        with self._lock:
            self._codec = codec

    def set_round_plan(self, plan: dict) -> None:
        with self._lock:
            self._stats.round_plan = dict(plan)

    @property
    def uplink_bps(self) -> float | None:
        """The measured uplink rate (None before the first accepted push)."""
        with self._lock:
            return self._uplink.rate_bps

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


def _log_crash(task: asyncio.Task) -> None:
    """A background task must never end with an error unnoticed."""
    if not task.cancelled() and task.exception() is not None:
        log.error("sync engine task %s crashed", task.get_name(), exc_info=task.exception())
