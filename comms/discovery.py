"""Discovery: signed, expiring records in a hivemind DHT.

Islands, aggregators, model versions and experts announce themselves as DHT records with a TTL.
All records of one kind live under one DHT key (``archipelago/v1/<kind>``), one subkey per
record name, so ``lookup(kind)`` fetches every live record of that kind in one DHT query.

Each record is signed by its owner's Ed25519 key. The stored value carries the owner's public
key and a signature over a canonical msgpack encoding of ``(protocol version, kind, name,
fields, expiration)``; the expiration is signed, so a replayed record cannot outlive its TTL.
``lookup`` verifies every record and drops (logs, and counts by reason in ``dropped``) records
that are malformed, forged, expired, whose name claims another owner (an island's name is its
peer id), or, with a roster, whose owner is not in the roster in a role allowed for that kind.

The DHT only stores; trust comes from the signatures checked here. A peer that can write to the
DHT can still hide a record by writing a forged one under the same name with a later expiration
(the DHT keeps the latest); lookups drop the forgery, and the owner's next announcement with a
later expiration takes the name back.

Concurrency: hivemind runs the DHT node in its own process with its own event loop; the methods
here are blocking, thread-safe, and each one takes a timeout. Async callers use
``asyncio.to_thread``. ``keep_announced`` re-announces from a daemon thread.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hivemind
import msgpack
from hivemind.utils import get_dht_time

from comms import PROTOCOL_VERSION
from comms.errors import (
    ConfigError,
    LinkError,
    MalformedError,
    OversizeError,
    RejectedError,
    SignatureError,
    StaleError,
    UnknownPeerError,
)
from comms.identity import (
    PUBLIC_KEY_BYTES,
    ROLES,
    SIGNATURE_BYTES,
    Identity,
    Roster,
    peer_id_of,
    verify_signature,
)

logger = logging.getLogger(__name__)

KEY_PREFIX = f"archipelago/v{PROTOCOL_VERSION}/"
MAX_FIELDS_BYTES = 8 * 1024  # one record's encoded fields
MAX_NAME_CHARS = 128
MAX_NESTING = 16  # dicts and lists inside a record's fields
MAX_TTL_S = 24 * 3600.0
DEFAULT_TIMEOUT_S = 10.0
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
AGGREGATOR_ROLES = ("leaf", "mid", "root")

# Kinds whose record name must be the owner's peer id: nobody else can announce them.
OWNER_BOUND_KINDS = frozenset({"island"})
# With a roster, which roster roles may announce each kind (other kinds: any role).
ROSTER_ROLES_BY_KIND: dict[str, tuple[str, ...]] = {
    "island": ("island", "admin"),
    "aggregator": ("aggregator", "admin"),
    "model": ("aggregator", "admin"),
    "expert": ROLES,
}


@dataclass(frozen=True)
class Record:
    """A verified discovery record."""

    kind: str
    name: str
    fields: dict[str, Any]
    owner: str  # peer id of the signer
    public_key: bytes
    expiration: float  # DHT time (seconds since the epoch) after which the record is gone


# ---------------------------------------------------------------- pure encoding and checks


def canonical(value: Any, path: str = "fields", depth: int = 0) -> Any:
    """Plain msgpack data with dict keys sorted, tuples as lists; ``MalformedError`` otherwise."""
    if depth > MAX_NESTING:
        raise MalformedError(f"{path}: nested deeper than {MAX_NESTING} levels")
    if isinstance(value, dict):
        out = {}
        for key in sorted(value, key=lambda k: (not isinstance(k, str), str(k))):
            if not isinstance(key, str):
                raise MalformedError(f"{path}: dict keys must be strings, got {key!r}")
            out[key] = canonical(value[key], f"{path}.{key}", depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [canonical(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | str | bytes):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MalformedError(f"{path}: non-finite float {value}")
        return value
    raise MalformedError(
        f"{path}: {type(value).__name__} is not plain data (use dict, list, str, bytes, int, "
        "float, bool or None)"
    )


def signed_payload(kind: str, name: str, fields: dict[str, Any], expiration: float) -> bytes:
    """The bytes an owner signs: canonical msgpack of version, kind, name, fields, expiration."""
    body = [PROTOCOL_VERSION, kind, name, canonical(fields), float(expiration)]
    return msgpack.packb(body, use_bin_type=True)


def check_kind_and_name(kind: str, name: str) -> None:
    if not isinstance(kind, str) or not KIND_PATTERN.match(kind):
        raise MalformedError(f"record kind {kind!r} must match {KIND_PATTERN.pattern}")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise MalformedError(f"record name must be a string of 1..{MAX_NAME_CHARS} characters")


def check_fields(kind: str, fields: Any) -> dict[str, Any]:
    """Canonical fields, within the size limit and the kind's schema."""
    if not isinstance(fields, dict):
        raise MalformedError(f"{kind} record fields must be a dict, got {type(fields).__name__}")
    fields = canonical(fields)
    size = len(msgpack.packb(fields, use_bin_type=True))
    if size > MAX_FIELDS_BYTES:
        raise OversizeError(f"{kind} record fields are {size} bytes; limit {MAX_FIELDS_BYTES}")
    if kind in ("island", "aggregator") and not isinstance(fields.get("address"), str):
        raise MalformedError(f"{kind} record needs an 'address' string field")
    if kind == "aggregator" and fields.get("role") not in AGGREGATOR_ROLES:
        raise MalformedError(
            f"aggregator record 'role' must be one of {AGGREGATOR_ROLES}, got {fields.get('role')!r}"
        )
    load, model_ids = fields.get("load", 0.0), fields.get("model_ids", [])
    if isinstance(load, bool) or not isinstance(load, int | float):
        raise MalformedError(f"{kind} record 'load' must be a number, got {load!r}")
    if not (isinstance(model_ids, list) and all(isinstance(m, str) for m in model_ids)):
        raise MalformedError(f"{kind} record 'model_ids' must be a list of strings")
    return fields


def encode_record(
    identity: Identity, kind: str, name: str, fields: dict[str, Any], expiration: float
) -> dict[str, Any]:
    """The DHT value for a record: fields, expiration, public key and signature."""
    check_kind_and_name(kind, name)
    fields = check_fields(kind, fields)
    sig = identity.sign(signed_payload(kind, name, fields, expiration))
    return {
        "v": PROTOCOL_VERSION,
        "fields": fields,
        "exp": float(expiration),
        "pk": identity.public_key,
        "sig": sig,
    }


def decode_record(
    kind: str,
    name: Any,
    value: Any,
    dht_expiration: float,
    now: float,
    roster: Roster | None = None,
) -> Record:
    """Verify one DHT entry and return its ``Record``; a ``RejectedError`` says why not."""
    if not isinstance(name, str):
        raise MalformedError(f"{kind} record name {name!r} is not a string")
    check_kind_and_name(kind, name)
    if not isinstance(value, dict):
        raise MalformedError(f"{kind}/{name}: value is a {type(value).__name__}, not a dict")
    if value.get("v") != PROTOCOL_VERSION:
        raise MalformedError(f"{kind}/{name}: protocol version {value.get('v')!r}")
    public_key, sig, expiration = value.get("pk"), value.get("sig"), value.get("exp")
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise MalformedError(f"{kind}/{name}: public key missing or not {PUBLIC_KEY_BYTES} bytes")
    if not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
        raise SignatureError(f"{kind}/{name}: signature missing or not {SIGNATURE_BYTES} bytes")
    if not isinstance(expiration, float | int) or isinstance(expiration, bool):
        raise MalformedError(f"{kind}/{name}: expiration missing")
    if not math.isfinite(expiration):  # NaN compares false with every time: it never expires
        raise MalformedError(f"{kind}/{name}: expiration {expiration} is not a finite time")
    fields = check_fields(kind, value.get("fields"))
    verify_signature(public_key, sig, signed_payload(kind, name, fields, expiration))
    owner = peer_id_of(public_key)
    if dht_expiration > expiration + 1e-6:
        raise SignatureError(f"{kind}/{name}: stored with an expiration beyond the signed one")
    if expiration <= now:
        raise StaleError(f"{kind}/{name}: expired {now - expiration:.1f} s ago")
    if kind in OWNER_BOUND_KINDS and name != owner:
        raise UnknownPeerError(f"{kind}/{name}: name claims another owner (signer is {owner})")
    if roster is not None:
        roster.require(owner, ROSTER_ROLES_BY_KIND.get(kind, ROLES))
    return Record(kind, name, fields, owner, public_key, float(expiration))


# ---------------------------------------------------------------- the DHT shell


async def _visible_maddrs(_dht: hivemind.DHT, node: Any) -> list[str]:
    return [str(m) for m in await node.get_visible_maddrs()]


class Discovery:
    """Announce and look up signed records in a hivemind DHT (see the module docstring)."""

    def __init__(
        self,
        dht: hivemind.DHT,
        identity: Identity,
        roster: Roster | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = get_dht_time,
    ):
        self.dht = dht
        self.identity = identity
        self.roster = roster
        self.timeout = timeout
        self.clock = clock
        self.dropped: Counter[str] = Counter()  # reason -> records dropped by lookup
        self._lock = threading.Lock()  # the DHT's request pipe is not safe for concurrent sends

    @classmethod
    def start(
        cls,
        identity: Identity,
        initial_peers: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        roster: Roster | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        **dht_kwargs: Any,
    ) -> Discovery:
        """Start a DHT node listening on ``host:port`` (0: any free port) and join the peers."""
        try:
            dht = hivemind.DHT(
                initial_peers=list(initial_peers) or None,
                host_maddrs=[f"/ip4/{host}/tcp/{port}"],
                start=True,
                await_ready=False,
                **dht_kwargs,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot start a DHT node on {host}:{port}: {e}") from e
        try:
            dht.wait_until_ready(timeout)
        except concurrent.futures.TimeoutError as e:
            dht.shutdown()
            raise LinkError(f"DHT node did not start within {timeout} s") from e
        except Exception as e:
            dht.shutdown()
            raise LinkError(
                f"DHT node failed to start or to reach the initial peers {list(initial_peers)}: "
                f"{e}; check the bootstrap addresses in the config"
            ) from e
        return cls(dht, identity, roster, timeout=timeout)

    def _wait(self, future: Any, what: str, timeout: float | None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError as e:
            future.cancel()
            raise LinkError(f"DHT {what} did not finish within {timeout} s") from e

    def announce(
        self,
        kind: str,
        name: str,
        fields: dict[str, Any],
        ttl: float,
        *,
        timeout: float | None = None,
    ) -> Record:
        """Sign and store a record that lives ``ttl`` seconds; returns what was stored."""
        if not 0 < ttl <= MAX_TTL_S:
            raise ConfigError(f"record ttl must be in (0, {MAX_TTL_S}] seconds, got {ttl}")
        expiration = self.clock() + ttl
        value = encode_record(self.identity, kind, name, fields, expiration)
        with self._lock:
            future = self.dht.store(
                KEY_PREFIX + kind, value, expiration, subkey=name, return_future=True
            )
        if not self._wait(future, f"store of {kind}/{name}", timeout):
            raise LinkError(
                f"DHT refused to store {kind}/{name}: no peer answered, or a record with a later "
                "expiration holds that name"
            )
        return Record(
            kind, name, value["fields"], self.identity.peer_id, self.identity.public_key, expiration
        )

    def lookup(self, kind: str, *, timeout: float | None = None) -> list[Record]:
        """Every live, verified record of ``kind``, sorted by name."""
        check_kind_and_name(kind, "-")
        with self._lock:
            future = self.dht.get(KEY_PREFIX + kind, latest=True, return_future=True)
        found = self._wait(future, f"lookup of {kind}", timeout)
        if found is None or not isinstance(found.value, dict):
            return []
        now = self.clock()
        records = []
        for name, item in found.value.items():
            try:
                records.append(
                    decode_record(kind, name, item.value, item.expiration_time, now, self.roster)
                )
            except RejectedError as e:
                self.dropped[e.reason] += 1
                if e.reason != "stale":
                    logger.warning("dropped %s record %r: %s", kind, name, e)
        return sorted(records, key=lambda r: r.name)

    def lookup_one(self, kind: str, name: str, *, timeout: float | None = None) -> Record | None:
        """The verified record ``kind/name``, or None if there is no live, valid one."""
        return next((r for r in self.lookup(kind, timeout=timeout) if r.name == name), None)

    def keep_announced(
        self,
        kind: str,
        name: str,
        fields: Callable[[], dict[str, Any]],
        ttl: float,
        interval: float | None = None,
    ) -> Announcer:
        """Announce ``fields()`` now (errors raise here), then again every ``interval`` seconds
        (default ttl/3) from a daemon thread until ``stop()``."""
        announcer = Announcer(self, kind, name, fields, ttl, interval or ttl / 3)
        self.announce(kind, name, fields(), ttl)
        announcer.start()
        return announcer

    def bootstrap_addresses(self, *, timeout: float | None = None) -> list[str]:
        """Multiaddrs other peers can pass as ``initial_peers`` to join this DHT."""
        with self._lock:
            future = self.dht.run_coroutine(_visible_maddrs, return_future=True)
        return self._wait(future, "address query", timeout)

    def shutdown(self) -> None:
        self.dht.shutdown()


class Announcer:
    """Keeps one record alive by re-announcing it from a daemon thread; failures are logged,
    counted in ``failures`` and retried at the next interval."""

    def __init__(
        self,
        discovery: Discovery,
        kind: str,
        name: str,
        fields: Callable[[], dict[str, Any]],
        ttl: float,
        interval: float,
    ):
        if not 0 < interval < ttl:
            raise ConfigError(f"announce interval {interval} s must be in (0, ttl={ttl} s)")
        self.discovery, self.kind, self.name = discovery, kind, name
        self.fields, self.ttl, self.interval = fields, ttl, interval
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"announce-{kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.discovery.announce(self.kind, self.name, self.fields(), self.ttl)
            except Exception as e:  # keep announcing through transient DHT failures
                self.failures += 1
                logger.warning("re-announcing %s/%s failed: %s", self.kind, self.name, e)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
