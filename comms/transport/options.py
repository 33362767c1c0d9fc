"""What a transport server and client are configured with: TLS material, message limits and
keepalive pings.

``ServerTLS`` and ``ClientTLS`` hold PEM bytes (``comms.tls`` makes them). Both ends size
their gRPC messages with ``max_message_bytes`` and refuse a ``chunk_size`` that would not fit
in one message with its other fields. ``Keepalive`` says how soon a connection that went
silent is declared dead; a server permits the pings of a client with the same ``Keepalive``.
"""

from __future__ import annotations

from dataclasses import dataclass

from comms.errors import ConfigError

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


MESSAGE_OVERHEAD_BYTES = 64 * 1024  # room for the non-data fields of one chunk message


@dataclass(frozen=True)
class ServerTLS:
    """PEM material for a TLS server; with ``client_ca_pem`` clients must present a cert."""

    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None = None


@dataclass(frozen=True)
class ClientTLS:
    """PEM material for a TLS client: the CA that signed the server, optional client cert
    (mTLS), and ``server_name`` when the address's host is not a name in the server cert."""

    ca_pem: bytes
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive pings: how a connection that went silent is found dead.

    A link cut without a reset (a route gone, a cable pulled: packets just vanish) leaves a
    TCP connection that looks open. A call on it, a push in flight or a subscription waiting
    for its next version, would wait until TCP's exponentially backed-off retransmission
    gets through after the link is back (about 30 s after a 30-s cut: the chaos run's
    ``cut``, docs/reliability.md) or its deadline passes. With keepalive each end pings its
    peer once the connection has been quiet for ``time_s`` and closes the connection when the
    ack has not come within ``timeout_s``: its calls end UNAVAILABLE and the client retries
    them on a new connection (a push resumes at the server's offset or gets the answer of its
    delivery, a subscription resumes after its last version).

    A ping is answered behind the bytes already queued towards the peer, so on a slow link a
    large transfer delays it: ``timeout_s`` must exceed that queue's drain time or a busy
    connection is dropped (a push then retries, and fails again). Measured through the
    ``comms.netns`` TUN link with 100 ms delay: a 1.5 MB push at 500 kbit/s tripped a 5-s
    timeout, not a 10-s one; at 2 and 10 Mbit/s (6 and 30 MB) 5 s held too.

    A server allows a client's pings down to ``time_s / 2`` apart (jitter); pings more
    frequent than that, more than twice in a row, are answered with GOAWAY
    ``too_many_pings``. So a client must not ping more often than the server's
    ``Keepalive`` says: give both ends the same one (the daemons use ``DEFAULT_KEEPALIVE``).
    """

    time_s: float = 10.0  # a cut is found 10 to 20 s after it (time_s + timeout_s at most)
    timeout_s: float = 10.0  # the ack's wait; room for ~10 s of queued bytes (see above)

    def __post_init__(self):
        if not (self.time_s > 0 and self.timeout_s > 0):
            raise ConfigError(
                f"keepalive time_s ({self.time_s}) and timeout_s ({self.timeout_s}) must be > 0"
            )

    def _common(self) -> list[tuple[str, int]]:
        return [
            ("grpc.keepalive_time_ms", _ms(self.time_s)),
            ("grpc.keepalive_timeout_ms", _ms(self.timeout_s)),
            # gRPC core (1.85) times a keepalive ping out with the timeout of any ping
            # (default 1 min with keepalive on), not keepalive_timeout_ms: set both.
            ("grpc.http2.ping_timeout_ms", _ms(self.timeout_s)),
            ("grpc.keepalive_permit_without_calls", 1),  # an idle channel is checked too
            ("grpc.http2.max_pings_without_data", 0),  # else pings stop after 2 on a quiet call
        ]

    def client_options(self) -> list[tuple[str, int]]:
        return self._common()

    def server_options(self) -> list[tuple[str, int]]:
        """The server pings its clients too (a dead reader's stream is dropped), and allows
        the pings of a client with this ``Keepalive``, with or without calls in flight."""
        return [
            *self._common(),
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(self.time_s / 2)),
        ]


DEFAULT_KEEPALIVE = Keepalive()


# gRPC's own reconnect backoff (initial 1 s, x1.6 per failed attempt, up to 120 s) decides how
# soon a channel tries its peer again; until then every call fails at once "failed to connect to
# all addresses", however often the caller retries. Measured on loopback: after a peer was down
# 15 or 30 s, a client retrying every 0.2 s reached it again 10.7 and 9.9 s after it was back.
# Aggregators and islands restart (a crash, a deploy) and their children must find them soon:
# with the backoff capped at 2 s, one connection attempt per peer every 2 s at most while it is
# down (a SYN on a dead address), and a peer that is back is reached within 2 s.
RECONNECT_BACKOFF_S = (0.5, 2.0)  # (first, most) seconds between connection attempts


def reconnect_options(backoff_s: tuple[float, float] = RECONNECT_BACKOFF_S) -> list:
    first, most = backoff_s
    return [
        ("grpc.initial_reconnect_backoff_ms", _ms(first)),
        ("grpc.max_reconnect_backoff_ms", _ms(most)),
    ]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def _check_chunk_size(chunk_size: int, max_message_bytes: int) -> None:
    if not 1 <= chunk_size <= max_message_bytes - MESSAGE_OVERHEAD_BYTES:
        raise ConfigError(
            f"chunk_size {chunk_size} must be between 1 and max_message_bytes - "
            f"{MESSAGE_OVERHEAD_BYTES} = {max_message_bytes - MESSAGE_OVERHEAD_BYTES}"
        )
