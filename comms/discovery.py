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

Processes and files. The DHT node is a process forked from the caller's, and it starts hivemind's
``p2pd`` (libp2p daemon), which listens on a unix socket ``/tmp/hivemind-p2pd-<id>.sock``
(hivemind's client may add ``/tmp/hivemind-p2pclient-<id>.sock``; the directory is fixed in
hivemind, ``TMPDIR`` does not move it). ``shutdown`` stops both and removes the socket. So does
the node process on SIGTERM (multiprocessing sends it one at the caller's exit), and, within
about ``PARENT_POLL_S``, when the process that started it dies, even by SIGKILL: hivemind's
process alone would live on, orphaned, with its p2pd. What no code can clean is a node process
or p2pd killed by SIGKILL itself (a whole process group killed, say): p2pd exits when its
node process dies, but its socket file (empty) stays in /tmp. ``Discovery.start`` removes such
files first: this user's hivemind sockets older than ``STALE_SOCKET_MIN_AGE_S`` on which
nothing listens any more (``remove_stale_sockets``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import logging
import math
import os
import re
import signal
import socket
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hivemind
import msgpack
from hivemind.utils import get_dht_time
from hivemind.utils.logging import use_hivemind_log_handler

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
# hivemind's lines go to the root logger, in the process's format (comms.logs), not its own
use_hivemind_log_handler("nowhere")

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


# ---------------------------------------------------------------- hivemind's processes and sockets

HIVEMIND_SOCKETS = "/tmp/hivemind-*.sock"  # hivemind.p2p.P2P._UNIX_SOCKET_PREFIX + ...
STALE_SOCKET_MIN_AGE_S = 60.0  # never judge a socket younger than this (it may be starting)
PARENT_POLL_S = 0.5  # how often the DHT node process checks that its starter is alive
P2PD_STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child
    found = _proc_stat(pid)
    return found is not None and found[0] not in ("Z", "X")


def p2pd_children(parent: int) -> list[tuple[int, str | None]]:
    """``(pid, control socket path)`` of every live p2pd whose parent is ``parent`` (Linux
    ``/proc``; empty elsewhere)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            info = _proc_stat(pid)
            if info is None or info[1] != parent or info[0] in ("Z", "X"):
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if not argv or not argv[0].endswith(b"p2pd"):
                continue
            listen = next((a for a in argv if a.startswith(b"-listen=/unix")), b"")
            found.append((pid, listen[len(b"-listen=/unix") :].decode() or None))
    return found


def _client_socket_of(daemon_socket: str) -> str:
    """hivemind names a P2P's client socket after its daemon's (``p2pclient-<same id>``)."""
    return daemon_socket.replace("/hivemind-p2pd-", "/hivemind-p2pclient-")


def _remove_socket(path: str | None) -> bool:
    if not path or not path.startswith("/tmp/hivemind-"):
        return False
    for p in (path, _client_socket_of(path)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    return True


def stop_p2pd(
    processes: Sequence[tuple[int, str | None]], grace_s: float = P2PD_STOP_GRACE_S
) -> None:
    """SIGTERM each p2pd, SIGKILL those alive after ``grace_s``; remove their sockets."""
    for pid, _ in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(_alive(pid) for pid, _ in processes) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid, _ in processes:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for _, path in processes:
        _remove_socket(path)


def _listening(path: str) -> bool:
    """Whether something accepts connections on the unix socket ``path`` (in any network
    namespace: ``/proc/net/unix`` lists this one's, a connect reaches all)."""
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        if any(line.rstrip("\n").endswith(" " + path) for line in f):
            return True
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:  # busy, timed out: not provably stale
        return True
    finally:
        s.close()


def remove_stale_sockets(min_age_s: float = STALE_SOCKET_MIN_AGE_S) -> list[str]:
    """Remove this user's hivemind unix sockets in /tmp that nothing listens on any more and
    that are older than ``min_age_s`` (left by a p2pd killed with SIGKILL); returns them."""
    removed = []
    now = time.time()
    for path in sorted(glob.glob(HIVEMIND_SOCKETS)):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
            continue
        if now - st.st_mtime < min_age_s or _listening(path):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    if removed:
        logger.info("removed %d stale hivemind socket(s) from /tmp: %s", len(removed), removed)
    return removed


def _stop_node_process(reason: str) -> None:
    """In the DHT node process: stop its p2pd, remove its sockets, exit."""
    with contextlib.suppress(Exception):
        logger.info("DHT node process %d: %s; stopping its p2pd", os.getpid(), reason)
    try:
        stop_p2pd(p2pd_children(os.getpid()))
    finally:
        os._exit(0)


class _DHTProcess(hivemind.DHT):
    """hivemind's DHT node process, cleaning up after itself: on SIGTERM, and when the process
    that started it is gone (checked every ``PARENT_POLL_S``), it stops its p2pd and removes
    the socket before it exits; after a normal shutdown it checks that p2pd is gone."""

    def run(self) -> None:
        starter = getattr(self, "_parent_pid", None) or os.getppid()
        signal.signal(signal.SIGTERM, lambda signum, frame: _stop_node_process("SIGTERM"))
        threading.Thread(
            target=_watch_starter, args=(starter,), name="dht-starter-watch", daemon=True
        ).start()
        try:
            super().run()
        finally:
            stop_p2pd(p2pd_children(os.getpid()))


def _watch_starter(starter: int) -> None:
    while os.getppid() == starter:
        time.sleep(PARENT_POLL_S)
    _stop_node_process(f"the process that started it (pid {starter}) is gone")


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
        with contextlib.suppress(Exception):  # housekeeping must never stop a start
            remove_stale_sockets()
        try:
            dht = _DHTProcess(
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
        """Stop the DHT node process and its p2pd, and remove p2pd's socket. Idempotent."""
        children = p2pd_children(self.dht.pid) if self.dht.pid is not None else []
        self.dht.shutdown()
        # the node process stops its p2pd; if it was killed instead, p2pd is orphaned or gone
        leftover = [(pid, path) for pid, path in children if _alive(pid)]
        stop_p2pd(leftover, grace_s=1.0)
        for _, path in children:
            if path and os.path.exists(path) and not _listening(path):
                _remove_socket(path)


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
