"""Ed25519 identities, the roster of allowed public keys, and replay protection.

An ``Identity`` holds a private key and signs bytes. A ``Roster`` maps a peer id to its public
key and role (``island``, ``aggregator``, ``admin``) and verifies signatures. A ``ReplayGuard``
remembers the highest sequence number accepted from each sender: a sequence must strictly
increase, so a replayed or duplicated message is recognised and refused.

A peer id is the hex of the first 16 bytes of blake2b(public key): stable, short and derived
from the key, so it cannot be claimed without the key.

A private key file (here and in ``comms.tls``) is refused when its mode grants group or others
any permission: ``chmod 600`` it. ``ARCHIPELAGO_ALLOW_OPEN_KEYS=1`` in the environment accepts
such files anyway (a shared scratch machine, a read-only mount that cannot be chmod-ed).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InternalError, InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from comms.errors import ConfigError, ReplayError, SignatureError, UnknownPeerError

ROLES = ("island", "aggregator", "admin")
ALLOW_OPEN_KEYS_ENV = "ARCHIPELAGO_ALLOW_OPEN_KEYS"

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


def read_private_key_file(path: str | os.PathLike) -> bytes:
    """The bytes of a private key file; ``ConfigError`` if it cannot be read, or if its mode
    lets group or others at it (unless ``ARCHIPELAGO_ALLOW_OPEN_KEYS=1``)."""
    try:
        with open(path, "rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)  # of the file read, not a name
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read key file {path}: {e.strerror}") from e
    if mode & 0o077 and os.environ.get(ALLOW_OPEN_KEYS_ENV) != "1":
        raise ConfigError(
            f"key file {path} has mode {mode:04o}: group or others may use it, and a private "
            f"key must be its owner's alone; run `chmod 600 {path}` (or set "
            f"{ALLOW_OPEN_KEYS_ENV}=1 to accept it anyway)"
        )
    return data


def peer_id_of(public_key: bytes) -> str:
    """The peer id derived from a raw 32-byte Ed25519 public key."""
    return hashlib.blake2b(public_key, digest_size=16).hexdigest()


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> None:
    """Raise ``SignatureError`` unless ``signature`` is ``data`` signed by ``public_key``."""
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError) as e:
        raise SignatureError("signature does not verify against the sender's public key") from e


class Identity:
    """A private Ed25519 key and the peer id derived from it."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: str = peer_id_of(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the private key as unencrypted PKCS8 PEM, readable by the owner only."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a stale temp file may have been created with wider permissions
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Identity:
        data = read_private_key_file(path)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm, InternalError) as e:
            # InternalError: OpenSSL refusing key bytes that do not fit the key's algorithm
            raise ConfigError(f"{path} is not an unencrypted PEM private key ({e})") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> Identity:
        if Path(path).exists():
            return cls.load(path)
        ident = cls.generate()
        ident.save(path)
        return ident


@dataclass(frozen=True)
class RosterEntry:
    peer_id: str
    public_key: bytes
    role: str
    name: str = ""


class Roster:
    """Public keys allowed to talk to a service, each with a role.

    Stored as JSON: ``{"peers": [{"public_key": HEX, "role": "island", "name": "..."}]}``.
    """

    def __init__(self, entries: list[RosterEntry] | None = None):
        self._entries: dict[str, RosterEntry] = {}
        self._lock = threading.Lock()
        for e in entries or []:
            self._add(e)

    def _add(self, entry: RosterEntry) -> None:
        if entry.role not in ROLES:
            raise ConfigError(f"roster role must be one of {ROLES}, got {entry.role!r}")
        if len(entry.public_key) != PUBLIC_KEY_BYTES:
            raise ConfigError(f"public key of {entry.name or entry.peer_id} is not 32 bytes")
        if entry.peer_id != peer_id_of(entry.public_key):
            raise ConfigError(f"peer id {entry.peer_id} does not match its public key")
        with self._lock:
            self._entries[entry.peer_id] = entry

    def add(self, public_key: bytes, role: str, name: str = "") -> str:
        peer_id = peer_id_of(public_key)
        self._add(RosterEntry(peer_id, bytes(public_key), role, name))
        return peer_id

    def get(self, peer_id: str) -> RosterEntry | None:
        with self._lock:
            return self._entries.get(peer_id)

    def __contains__(self, peer_id: str) -> bool:
        return self.get(peer_id) is not None

    def __len__(self) -> int:
        return len(self._entries)

    def require(self, peer_id: str, roles: tuple[str, ...] = ROLES) -> RosterEntry:
        """The entry for ``peer_id``; ``UnknownPeerError`` if absent or in another role."""
        entry = self.get(peer_id)
        if entry is None:
            raise UnknownPeerError(f"peer {peer_id} is not in the roster")
        if entry.role not in roles:
            raise UnknownPeerError(
                f"peer {peer_id} has role {entry.role!r}; this call needs one of {roles}"
            )
        return entry

    def verify(
        self, peer_id: str, signature: bytes, data: bytes, roles: tuple[str, ...] = ROLES
    ) -> RosterEntry:
        """Check that ``peer_id`` is allowed in one of ``roles`` and signed ``data``."""
        entry = self.require(peer_id, roles)
        verify_signature(entry.public_key, signature, data)
        return entry

    def to_json(self) -> str:
        with self._lock:
            peers = [
                {"public_key": e.public_key.hex(), "role": e.role, "name": e.name}
                for e in self._entries.values()
            ]
        return json.dumps({"peers": peers}, indent=2)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Roster:
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read roster {path}: {e.strerror}") from e
        except ValueError as e:  # bad JSON or UTF-8, or an integer past the digit limit
            raise ConfigError(f"roster {path} is not valid JSON: {e}") from e
        except RecursionError as e:
            raise ConfigError(f"roster {path} is not valid JSON: nested too deep") from e
        peers = doc.get("peers", []) if isinstance(doc, dict) else None
        if not isinstance(peers, list):
            raise ConfigError(f'roster {path}: expected {{"peers": [...]}} at the top level')
        roster = cls()
        for i, p in enumerate(peers):
            try:
                pk = bytes.fromhex(p["public_key"])
                if peer_id_of(pk) in roster:
                    raise ConfigError("this public key is listed twice")
                roster.add(pk, p["role"], p.get("name", ""))
            except (KeyError, ValueError, TypeError, AttributeError, ConfigError) as e:
                raise ConfigError(f"roster {path}: peers[{i}] is invalid: {e}") from e
        return roster


class ReplayGuard:
    """Highest accepted sequence per sender; a sequence must strictly increase.

    ``check`` only reads; ``commit`` records a sequence once the message has been durably
    accepted, so a message rejected later in the pipeline can be sent again.
    The state is a plain dict so a service can persist it (``state()``, then
    ``ReplayGuard(state)`` or ``load_state(state)``). ``check`` then ``commit`` is not atomic:
    a caller that handles one sender from several tasks at once uses ``check_and_commit``.
    """

    def __init__(self, state: dict[str, int] | None = None):
        self._last: dict[str, int] = dict(state or {})
        self._lock = threading.Lock()

    @staticmethod
    def _refuse_if_seen(sender: str, sequence: int, last: int | None) -> None:
        if last is not None and sequence <= last:
            raise ReplayError(
                f"sequence {sequence} from {sender} is not above the last accepted ({last}): "
                "replayed or duplicated message"
            )

    def check(self, sender: str, sequence: int) -> None:
        with self._lock:
            last = self._last.get(sender)
        self._refuse_if_seen(sender, sequence, last)

    def commit(self, sender: str, sequence: int) -> None:
        with self._lock:
            self._last[sender] = max(sequence, self._last.get(sender, sequence))

    def check_and_commit(self, sender: str, sequence: int) -> None:
        with self._lock:
            self._refuse_if_seen(sender, sequence, self._last.get(sender))
            self._last[sender] = sequence

    def load_state(self, state: dict[str, int]) -> None:
        with self._lock:
            self._last = dict(state)

    def last(self, sender: str) -> int | None:
        with self._lock:
            return self._last.get(sender)

    def state(self) -> dict[str, int]:
        with self._lock:
            return dict(self._last)
