"""The version stream: follow the model's global versions, in order, with their arrival times.

``follow(v)`` subscribes to the model's versions from ``v + 1``. Each version is a signed
``version`` envelope holding ``u_v = theta_v - theta_{v-1}``; its signature is checked against
the roster (role ``aggregator``) when one is configured, and the envelope is buffered in order
with the time it arrived. A version that skips ahead makes the engine resubscribe from the one
it lacks. The buffer is bounded: when it overflows, or when the aggregator no longer holds the
versions the island needs, ``take_versions`` raises ``VersionGapError`` and the caller fetches
a snapshot (``island.sync.joiner``). Each version's meta lists the ``(island, sequence)``
updates it merged; ``merged_sequences`` reports this island's.

The island checks what it receives against its own model: ``expect_manifest`` (called by
``LocalUpdate.start``) sets the names, shapes and dtypes every version and snapshot must have.
A version that differs (a wrong or hostile aggregator, another model under the same id) is
refused on arrival with a ``ShapeMismatchError`` that says what differs, logged and counted
in ``versions_refused``; it never enters the buffer, so the anchor is untouched, and the
stream resubscribes from that version (with backoff) until a version that fits arrives or
the aggregator no longer holds it (then a snapshot, checked the same way).

``VersionStream`` is the version half of ``SyncEngine`` (a mixin: the engine owns the state,
the lock and the clients). ``_follow_loop`` runs on the engine's loop thread; the rest is
called from the training thread (decoding runs there, at the round boundary).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from comms.envelope import DEFAULT_MAX_ENVELOPE_BYTES, Envelope
from comms.errors import (
    CommsError,
    LinkError,
    MalformedError,
    NotFoundError,
    ReadDeniedError,
    RejectedError,
    ShapeMismatchError,
)
from comms.transport import RemoteError
from comms.update import Manifest, decode_update, expected_nbytes

if TYPE_CHECKING:
    from comms.aio import LoopThread
    from comms.identity import Identity, Roster
    from island.sync.config import SyncConfig, SyncStats

log = logging.getLogger(__name__)

VERSION_SIGNER_ROLES = ("aggregator",)


def manifest_differences(manifest: Manifest, specs, limit: int = 5) -> list[str]:
    """What differs between ``manifest`` and an envelope's tensor specs (empty: they fit):
    missing and unexpected names, then each tensor whose shape or dtype differs."""
    got = {s.name: s for s in specs}
    want = {name: (shape, dtype) for name, shape, dtype in manifest.tensors}
    out = []
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        out.append(f"missing {len(missing)} tensor(s) {missing[:limit]}")
    if extra:
        out.append(f"{len(extra)} unexpected tensor(s) {extra[:limit]}")
    changed = []
    for name in sorted(set(want) & set(got)):
        (shape, dtype), spec = want[name], got[name]
        if tuple(spec.shape) != tuple(shape):
            changed.append(f"{name!r} has shape {tuple(spec.shape)}, the model {tuple(shape)}")
        elif spec.dtype != dtype:
            changed.append(f"{name!r} has dtype {spec.dtype}, the model {dtype}")
    if changed:
        more = f" (and {len(changed) - limit} more)" if len(changed) > limit else ""
        out.append("; ".join(changed[:limit]) + more)
    return out


def check_manifest(env: Envelope, manifest: Manifest | None, what: str) -> None:
    """Raise ``ShapeMismatchError`` naming every difference unless ``env``'s tensors are
    exactly ``manifest``'s (names, shapes, dtypes); nothing to check without a manifest."""
    if manifest is None:
        return
    differences = manifest_differences(manifest, env.header.tensors)
    if differences:
        raise ShapeMismatchError(
            f"{what} of model {env.header.model_id!r} (signed by {env.header.sender}) does "
            "not fit this island's model: " + "; ".join(differences)
        )


class VersionGapError(CommsError):
    """The versions after the island's anchor are no longer available: fetch a snapshot."""


class SyncTimeoutError(TimeoutError):
    """Sync mode waited ``sync_timeout_s`` for a global version that did not come."""


class VersionStream:
    """Follow, buffer and hand out global versions (the version half of ``SyncEngine``)."""

    # set by SyncEngine.__init__
    config: SyncConfig
    identity: Identity
    roster: Roster | None
    address: str
    _verify: bool
    _loop: LoopThread
    _lock: threading.Lock
    _changed: threading.Condition
    _versions: collections.OrderedDict[int, Envelope]
    _merged_own: set[int] | None
    _fractions: dict[int, float]  # version -> share of an outer step it took (meta "fraction")
    _arrivals: collections.OrderedDict[int, float]
    _received: int | None
    _first_available: int
    _lost_after: int | None
    _stats: SyncStats
    _closed: bool
    _follow_task: asyncio.Task | None
    _manifest: Manifest | None = None  # what every version and snapshot must hold

    def expect_manifest(self, manifest: Manifest) -> None:
        """Refuse from now on every version and snapshot whose tensors (names, shapes,
        dtypes) are not ``manifest``'s: the island's own model, as it pushes it (float32)."""
        if not isinstance(manifest, Manifest):
            raise TypeError(f"expected a comms.update.Manifest, got {type(manifest).__name__}")
        self._manifest = manifest

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
            except ReadDeniedError as err:  # not the version's fault: this island's key
                log.error(
                    f"model {self.model_id}: {self.address} refuses this island's reads "
                    f"(key {self.identity.peer_id}): {err}; retrying"
                )
            except RejectedError as err:
                log.error(
                    "model %s: refused version %d from %s: %s",
                    self.model_id, next_version, self.address, err,
                )  # fmt: skip
                with self._lock:  # counted once said: a count always has its reason in the log
                    self._stats.versions_refused += 1
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
        what = f"version {version}" if version is not None else kind
        check_manifest(env, self._manifest, what)
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
        decode or fit the manifest (one buffered before ``expect_manifest``): fetch a
        snapshot. Every version is decoded and checked before any is returned, so a caller
        applies all of them or none. Call from the training thread (decoding runs here).
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
            try:
                check_manifest(env, self._manifest, f"version {v}")
                decoded.append((v, decode_update(env, self._manifest)))
            except RejectedError as err:  # checked and signed, yet unusable: start over
                with self._lock:
                    self._stats.versions_refused += 1
                log.error(
                    "model %s: refused version %d from %s: %s", self.model_id, v, self.address, err
                )
                raise VersionGapError(
                    f"model {self.model_id}: version {v} does not decode ({err}); fetch a snapshot"
                ) from err
        for v, env in taken:  # contributors only of versions the caller will apply
            self._note_contributors(v, env)
        return decoded

    def _note_contributors(self, version: int, env: Envelope) -> None:
        """Remember which of this island's sequences ``version`` holds (``None``: unknown)."""
        fraction = env.header.meta.get("fraction", 1.0)
        ok = isinstance(fraction, int | float) and 0.0 < fraction <= 1.0
        self._fractions[version] = float(fraction) if ok else 1.0
        while len(self._fractions) > 64:  # read at the boundary that adopts them
            self._fractions.pop(next(iter(self._fractions)))
        listed = env.header.meta.get("contributors")
        if listed is None:
            self._merged_own = None
            return
        me = self.identity.peer_id
        own = {int(q) for s, q in listed if s == me}
        if self._merged_own is not None:
            self._merged_own |= own

    def step_fraction(self, version: int) -> float:
        """The share of a full outer step the root took for ``version`` (its meta
        ``fraction``; 1 when not listed: a full version, or an older root)."""
        return self._fractions.get(version, 1.0)

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
