"""Signed reads: who may fetch a model or subscribe to its versions.

A push is a signed envelope checked against the roster (``comms.envelope``). A read is a
small request, so it carries its own signature, ``ReadAuth``: the reader's peer id, when it
was signed (milliseconds since the epoch), a random 16-byte nonce, and an Ed25519 signature
over::

    READ_SIGNING_CONTEXT + msgpack([method, model_id, version, sender, timestamp_ms, nonce])

``method`` is ``"Fetch"`` (``version``: the version asked for, -1 for the current one) or
``"Subscribe"`` (``version``: ``from_version``). The context prefix keeps a read signature
from being valid for any other message the same key signs (an envelope's context differs).

A server's ``ReadGuard`` admits a request when its sender is in the roster (any role), its
timestamp lies within ``window_s`` of the server's clock either way (clock skew), its
signature verifies, and its (sender, nonce) pair has not been seen. A nonce is remembered
until its timestamp leaves the window, after which the window alone refuses a replay; memory
is thus bounded by the read rate times twice the window, with hard caps (``max_nonces``
overall, ``max_nonces_per_sender`` per key). Over a cap the guard refuses the read
(``TooManyReadsError``, RESOURCE_EXHAUSTED) rather than forget a nonce that could still be
replayed. Models in ``public_models`` are served to anyone, signed or not.

Nonces are forgotten by the latest time the server's clock has shown, and a request is too
old when it lies more than ``window_s`` behind that time, even if the clock has since stepped
back (an NTP correction): otherwise a request whose nonce was forgotten would be inside the
window again and its replay admitted. The future side of the window follows the current
clock.

A read signature is not bound to one server: a request captured on the wire could be
replayed once, within the window, at another server with the same roster. TLS
(``comms.tls``) keeps requests from being captured.

``read_signing_bytes`` and ``sign_read`` are pure; a ``ReadGuard`` holds its nonces behind a
lock, so it may be used from any thread.
"""

from __future__ import annotations

import collections
import heapq
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgpack

from comms.errors import ReadDeniedError, SignatureError, TooManyReadsError
from comms.identity import Identity, Roster, verify_signature

READ_SIGNING_CONTEXT = b"archipelago-read\x00"
METHODS = ("Fetch", "Subscribe")
NONCE_BYTES = 16
DEFAULT_WINDOW_S = 120.0  # each way: the clock skew tolerated between reader and server
DEFAULT_MAX_NONCES = 100_000  # ~20 MB; 400 reads/s sustained over twice the window
DEFAULT_MAX_NONCES_PER_SENDER = 10_000  # one key in a tight loop cannot lock out the others


@dataclass(frozen=True)
class ReadAuth:
    """The signature a read request carries (``ReadAuth`` in ``archipelago.proto``)."""

    sender: str  # the reader's peer id
    timestamp_ms: int  # when it was signed, milliseconds since the epoch
    nonce: bytes  # NONCE_BYTES random bytes, fresh for every request
    signature: bytes  # Ed25519 over read_signing_bytes(...)


def read_signing_bytes(
    method: str, model_id: str, version: int, sender: str, timestamp_ms: int, nonce: bytes
) -> bytes:
    """The exact bytes a read signature covers."""
    body = [method, model_id, int(version), sender, int(timestamp_ms), bytes(nonce)]
    return READ_SIGNING_CONTEXT + msgpack.packb(body, use_bin_type=True)


def sign_read(
    identity: Identity,
    method: str,
    model_id: str,
    version: int,
    *,
    clock: Callable[[], float] = time.time,
) -> ReadAuth:
    """A fresh signature (new nonce, current time) for one ``method`` call on ``model_id``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    timestamp_ms, nonce = int(clock() * 1000), os.urandom(NONCE_BYTES)
    body = read_signing_bytes(method, model_id, version, identity.peer_id, timestamp_ms, nonce)
    return ReadAuth(identity.peer_id, timestamp_ms, nonce, identity.sign(body))


class ReadGuard:
    """Admits or refuses read requests; see the module docstring.

    ``clock`` gives the server's wall-clock time in seconds (injectable for tests).
    """

    def __init__(
        self,
        roster: Roster,
        *,
        public_models: Iterable[str] = (),
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.time,
        max_nonces: int = DEFAULT_MAX_NONCES,
        max_nonces_per_sender: int = DEFAULT_MAX_NONCES_PER_SENDER,
    ):
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        if not 1 <= max_nonces_per_sender <= max_nonces:
            raise ValueError(
                f"need 1 <= max_nonces_per_sender <= max_nonces, got "
                f"{max_nonces_per_sender} and {max_nonces}"
            )
        self.roster = roster
        self.public_models = frozenset(public_models)
        self.window_s = window_s
        self.clock = clock
        self.max_nonces = max_nonces
        self.max_nonces_per_sender = max_nonces_per_sender
        self._lock = threading.Lock()
        self._seen: set[tuple[str, bytes]] = set()
        self._forget_at: list[tuple[float, str, bytes]] = []  # heap: when a nonce may go
        self._per_sender: collections.Counter[str] = collections.Counter()
        self._latest = -math.inf  # the latest time the clock has shown; nonces go by it

    def __len__(self) -> int:
        """How many nonces are remembered now."""
        with self._lock:
            return len(self._seen)

    def check(self, method: str, model_id: str, version: int, auth: ReadAuth | None) -> str | None:
        """Admit one request: return the reader's peer id (None for a public model), or raise
        ``ReadDeniedError`` (its ``reason`` says why) or ``TooManyReadsError``."""
        now = self.clock()
        with self._lock:
            self._latest = max(self._latest, now)
        if model_id in self.public_models:
            return None
        what = f"{method} of model {model_id!r}"
        if auth is None or not auth.sender:
            raise ReadDeniedError(
                f"{what} is unsigned, and this server serves the model only to keys in its "
                "roster: give the client an identity whose public key is in the roster "
                "(TransportClient(identity=...); daemons sign with their own key), or ask "
                "the operator to set public_read = true for this model",
                reason="unsigned",
            )
        entry = self.roster.get(auth.sender)
        if entry is None:
            raise ReadDeniedError(
                f"{what}: reader {auth.sender} is not in this server's roster; ask the "
                "operator to add its public key (any role: island, aggregator or admin)",
                reason="unknown_reader",
            )
        self._check_window(what, auth.timestamp_ms / 1000 - now)
        body = read_signing_bytes(
            method, model_id, version, auth.sender, auth.timestamp_ms, auth.nonce
        )
        try:
            if len(auth.nonce) != NONCE_BYTES:
                raise SignatureError(f"nonce is {len(auth.nonce)} bytes, not {NONCE_BYTES}")
            verify_signature(entry.public_key, auth.signature, body)
        except SignatureError as e:
            raise ReadDeniedError(
                f"{what}: the read signature of {auth.sender} is not valid ({e}); the "
                "request was altered after signing, or signed for another method, model or "
                "version: sign each request as sent (comms.reads.sign_read)",
                reason="bad_read_signature",
            ) from e
        self._remember(what, auth, now)
        return auth.sender

    def _check_window(self, what: str, skew_s: float) -> None:
        if abs(skew_s) <= self.window_s:
            return
        if skew_s < 0:
            raise ReadDeniedError(
                f"{what}: signed {-skew_s:.0f} s ago, beyond the {self.window_s:g} s window: "
                "sign each request when it is sent (an old request cannot be replayed), and "
                "check that the reader's clock is not behind (NTP)",
                reason="read_expired",
            )
        raise ReadDeniedError(
            f"{what}: signed {skew_s:.0f} s ahead of this server's clock, beyond the "
            f"{self.window_s:g} s window: the reader's or the server's clock is off; sync "
            "them (NTP)",
            reason="read_future",
        )

    def _remember(self, what: str, auth: ReadAuth, now: float) -> None:
        """Record the nonce, refusing a replay; full tables refuse rather than forget."""
        key = (auth.sender, bytes(auth.nonce))
        span = f"{2 * self.window_s:g} s"
        with self._lock:
            self._forget_expired(self._latest)
            behind_s = self._latest - auth.timestamp_ms / 1000
            if behind_s > self.window_s:  # its nonce may be forgotten: a replay would pass
                raise ReadDeniedError(
                    f"{what}: signed {behind_s:.0f} s before the latest time this server's "
                    f"clock has shown, beyond the {self.window_s:g} s window (the clock "
                    f"stepped back {self._latest - now:.0f} s since): sign each request when "
                    "it is sent, and check the server's and the reader's clocks (NTP)",
                    reason="read_expired",
                )
            if key in self._seen:
                raise ReadDeniedError(
                    f"{what}: replayed request: reader {auth.sender} already used nonce "
                    f"{key[1].hex()}; sign every request afresh (a new nonce and timestamp)",
                    reason="read_replay",
                )
            if len(self._seen) >= self.max_nonces:
                raise TooManyReadsError(
                    f"{what}: this server admitted {len(self._seen)} signed reads within "
                    f"{span} (its limit); retry later"
                )
            if self._per_sender[auth.sender] >= self.max_nonces_per_sender:
                raise TooManyReadsError(
                    f"{what}: reader {auth.sender} sent {self._per_sender[auth.sender]} "
                    f"signed reads within {span} (limit {self.max_nonces_per_sender} per "
                    "reader); slow down and retry later"
                )
            self._seen.add(key)
            self._per_sender[auth.sender] += 1
            # past this time the window refuses the request, so its nonce may be forgotten
            heapq.heappush(self._forget_at, (auth.timestamp_ms / 1000 + self.window_s, *key))

    def _forget_expired(self, now: float) -> None:
        while self._forget_at and self._forget_at[0][0] < now:
            _, sender, nonce = heapq.heappop(self._forget_at)
            self._seen.discard((sender, nonce))
            self._per_sender[sender] -= 1
            if not self._per_sender[sender]:
                del self._per_sender[sender]
