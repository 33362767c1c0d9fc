"""What a transport server and client are configured with: TLS material and message limits.

``ServerTLS`` and ``ClientTLS`` hold PEM bytes (``comms.tls`` makes them). Both ends size
their gRPC messages with ``max_message_bytes`` and refuse a ``chunk_size`` that would not fit
in one message with its other fields.
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
