"""The link from a leaf or mid to its parent: connecting, the replica, partials up, versions down.

The parent is the configured address or, without one, the closest eligible aggregator found
through discovery. A line's replica starts from the parent's current snapshot. Partial
aggregates go up in order through one outbox: a flush *intent* is logged before the partial is
queued, and a *mark* once the parent acknowledged it (a parent that already holds it answers
"replay", which counts as delivered). Versions come down through a subscription: each ``u_v``
is verified, applied to the replica and re-published to this aggregator's own subscribers; a
gap or a version the parent no longer has refetches the replica. With the direction check on,
the subscription starts one version early when the line lacks the current ``u_v`` (after a
start or a refetch): that one only becomes the reference (:mod:`aggregator.direction_check`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid

import msgpack

from aggregator.faults import fault_point
from aggregator.lines import ModelLine
from aggregator.merge import PartialAggregate
from aggregator.outer import apply_update
from aggregator.wal import WriteAheadLog
from comms.envelope import Envelope
from comms.errors import (
    CommsError,
    ConfigError,
    LinkError,
    MalformedError,
    NotFoundError,
    RejectedError,
    ReplayError,
)
from comms.placement import Candidate, choose_closest, eligible
from comms.tls import TLSMismatchError
from comms.transport import TransportClient
from comms.update import Manifest, decode_update, encode_update

log = logging.getLogger("aggregator.service")  # one log for all the service's parts

# Most seconds between two tries to reach an unreachable parent (its first replica, a partial):
# a parent back from a restart is found within this (with the transport's reconnect backoff,
# comms.transport.options.RECONNECT_BACKOFF_S), at the cost of one try per this while it is down.
PARENT_RETRY_S = 2.0
PARENT_WARN_EVERY_S = 30.0  # an unreachable parent is logged once per this, not at every try


class ParentLink:
    """The parent side of :class:`~aggregator.service.AggregatorService` (leaf and mid).

    Uses the service's ``config``, ``role``, ``discovery``, ``identity``, ``roster``, ``guard``,
    ``metrics``, ``parent_address``, ``_outbox``, :meth:`_publish` (:mod:`aggregator.publish`)
    and :meth:`_set_reference` (:mod:`aggregator.direction_check`); sets ``parent`` (and ``parent_address`` when discovery finds
    it).
    """

    async def _connect_parent(self) -> None:
        if not self.parent_address:
            if self.discovery is None:
                raise ConfigError("parent: a leaf or mid needs a parent address or dht_peers")
            roles = ("mid", "root") if self.role == "leaf" else ("root",)
            records = await asyncio.to_thread(self.discovery.lookup, "aggregator")
            candidates = eligible([Candidate.from_record(r) for r in records], roles)
            self.parent_address = (await choose_closest(candidates)).address
        self.parent = TransportClient(
            self.parent_address, self.config.tls.client_tls(),
            deadline_s=self.config.push_deadline_s, identity=self.identity,
        )  # fmt: skip

    async def _first_replica(self, line: ModelLine) -> None:
        """At start, the parent's current theta; while the parent is unreachable (restarting
        too, after a crash of both) wait for it instead of exiting, trying again every
        ``PARENT_RETRY_S`` at most so that a parent back from a restart is found soon (a
        WARNING at the first failure, then every ``PARENT_WARN_EVERY_S``)."""
        delay, warned = 0.5, -math.inf
        while True:
            try:
                return await self._open_replica(line)
            except TLSMismatchError:
                raise  # a config to fix (its message says what), not a parent to wait for
            except LinkError as e:
                if time.monotonic() - warned >= PARENT_WARN_EVERY_S:
                    warned = time.monotonic()
                    log.warning(
                        "%s: parent %s unreachable for the replica of %s (%s); retrying every "
                        "%.0f s",
                        self.config.name, self.parent_address, line.model_id, e, PARENT_RETRY_S,
                    )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(2 * delay, PARENT_RETRY_S)

    async def _open_replica(self, line: ModelLine) -> None:
        data = await self.parent.fetch(line.model_id, -1)
        env = await asyncio.to_thread(self._verified, data, "snapshot", line.model_id)
        line.theta = decode_update(env)
        line.manifest = Manifest.from_arrays(line.theta)
        line.version = env.header.base_version
        log.info("%s: replica of %s at version %d", self.config.name, line.model_id, line.version,
                 extra={"model_id": line.model_id, "version": line.version})  # fmt: skip

    def _verified(self, data: bytes, kind: str, model_id: str) -> Envelope:
        env = Envelope.from_bytes(data, max_bytes=1 << 40)
        env.verify(self.roster, roles=("aggregator",))
        if env.header.kind != kind or env.header.model_id != model_id:
            raise MalformedError(
                f"expected a {kind} of {model_id!r}, got a {env.header.kind} of "
                f"{env.header.model_id!r}"
            )
        return env

    async def _queue_partial(
        self, line: ModelLine, partial: PartialAggregate, index: int, seq: int, resend=False
    ) -> None:
        norms = line.norm_bound.state() if line.norm_bound is not None else []
        note = msgpack.packb({"seq": seq, "guard": self.guard.state(), "norms": norms})
        if not resend:
            await asyncio.to_thread(line.wal.intent, index, note)
            fault_point("leaf.after_intent")
        contributors = sorted([s, q] for s, q in partial.contributors)
        env = encode_update(
            partial.weighted_sum,
            codec="none",
            model_id=line.model_id,
            kind="partial",
            sender=self.identity.peer_id,
            sequence=seq,
            base_version=line.version,
            meta={
                "weight_sum": float(partial.weight_sum),
                "count": int(partial.count),
                "work": float(partial.work),
                "max_staleness": int(partial.max_staleness),
                "contributors": contributors,
            },
            identity=self.identity,
        )
        await self._outbox.put((line, index, seq, env.to_bytes(), note, partial.count))

    async def _send_partials(self) -> None:
        """Push queued partials to the parent in order, retrying until each is acknowledged."""
        while True:
            line, index, seq, data, note, count = await self._outbox.get()
            attempt = 0
            # one upload id per encoding: a partial re-sent after a restart is encoded anew (its
            # header differs) and must not resume, or clash with, an upload of the old bytes
            upload_id = f"{self.identity.peer_id}-{seq}-{uuid.uuid4().hex[:12]}"
            while True:
                try:
                    await self.parent.push(data, upload_id=upload_id)
                    self.metrics.partials_sent.inc()
                    self.metrics.bytes_out.inc(len(data))
                    break
                except ReplayError:
                    log.info("%s: parent already holds partial %d", self.config.name, seq)
                    break
                except RejectedError as e:
                    log.error(
                        "%s: parent refused partial %d of %s (%d updates lost): %s",
                        self.config.name, seq, line.model_id, count, e,
                        extra={"model_id": line.model_id},
                    )  # fmt: skip
                    self.metrics.partials_dropped.labels(e.reason).inc()
                    break
                except (LinkError, CommsError, OSError) as e:
                    attempt += 1
                    delay = min(PARENT_RETRY_S, 0.2 * 2**attempt)
                    log.warning(
                        "%s: parent unreachable for partial %d (%s); retry in %.1fs",
                        self.config.name, seq, e, delay,
                    )  # fmt: skip
                    await asyncio.sleep(delay)
            fault_point("leaf.before_mark")
            await asyncio.to_thread(_mark, line.wal, index, note)

    # ================================================================== following the parent

    async def _follow_parent(self, line: ModelLine) -> None:
        """Apply each u_v the parent publishes to the replica and re-serve it to children."""
        while True:
            try:
                start = line.version + 1
                if self._lacks_reference(line):  # ask for the current u_v once per version
                    start = line.reference_asked = line.version
                async for version, data in self.parent.subscribe(line.model_id, start):
                    env = await asyncio.to_thread(self._verified, data, "version", line.model_id)
                    if version == start == line.version and env.header.base_version == start - 1:
                        u = await asyncio.to_thread(decode_update, env, line.manifest)
                        await asyncio.to_thread(self._set_reference, line, version, u)
                        continue
                    if version != line.version + 1 or env.header.base_version != line.version:
                        raise MalformedError(
                            f"version {version} does not follow {line.version}; refetching"
                        )
                    u = await asyncio.to_thread(decode_update, env, line.manifest)
                    async with line.lock:
                        await asyncio.to_thread(apply_update, line.theta, u)
                        await asyncio.to_thread(self._set_reference, line, version, u)
                        line.remember(version, data)
                        await self._publish(line, version)
                    self.metrics.version.labels(line.model_id).set(version)
            except asyncio.CancelledError:
                raise
            except (CommsError, RejectedError) as e:
                log.warning("%s: following %s: %s", self.config.name, line.model_id, e)
                await asyncio.sleep(0.5)
                if isinstance(e, MalformedError | NotFoundError):
                    async with line.lock:
                        await self._open_replica(line)
                        line.cache.clear()

    def _lacks_reference(self, line: ModelLine) -> bool:
        ref = line.reference
        return (
            self._direction_on
            and line.version >= 1
            and (ref is None or ref.version != line.version)
            and line.reference_asked != line.version
        )


def _mark(wal: WriteAheadLog, index: int, note: bytes) -> None:
    if index > wal.mark:
        wal.mark_done(index, note)
        wal.compact()
