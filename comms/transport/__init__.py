"""gRPC transport for opaque blobs: resumable chunked push, version subscription, fetch.

The transport moves bytes and knows nothing about what they hold. Four calls
(``comms/proto/archipelago.proto``, package ``archipelago.v1``):

- ``Push``: client-streaming upload of one blob in checked chunks (``comms.chunks``). The
  server keeps partial uploads in memory (bounded in count and bytes, expiring when idle);
  a client that lost its link asks ``UploadStatus`` how many bytes arrived and resumes there,
  never resending acknowledged bytes. A completed blob is handed to the handler exactly once;
  a retried push of a delivered upload gets the same answer.
- ``Subscribe``: server-streaming versions of a model from ``from_version`` on.
- ``Fetch``: one blob of a model (a snapshot), streamed in chunks and checked by digest.
- ``Report``: one small signed blob for the server's dashboard (a child aggregator's summary),
  unary, handed to the handler's optional ``on_report``; telemetry, never made durable.

Subscribe and Fetch requests carry a read signature (``comms.reads``) when the client has an
``identity``; a server with a ``read_guard`` refuses any read it does not admit.

The servicer only decodes, calls a plain ``TransportHandler`` and maps
``comms.errors.RejectedError`` subclasses to their gRPC status (``err.grpc_code``); any other
exception becomes INTERNAL, is logged, and the server keeps serving. Clients turn statuses
back into typed errors (``RemoteRejected`` subclasses that are also the matching
``comms.errors`` class, e.g. ``except StaleError`` catches a remote stale rejection).

Concurrency: everything runs on one asyncio event loop (grpc.aio). Server state is touched
only from that loop, so it takes no locks. Checking the bytes of a large chunk or blob (CRC-32,
SHA-256; both release the GIL) runs in a worker thread (``asyncio.to_thread``) on pure inputs,
so one big hash does not stall every other stream; the results are applied back on the loop.
The chunk messages of a blob that Subscribe or Fetch streams are built (split, checked,
digested) once and shared by every stream sending the same bytes (``ChunkMessageCache``).
A synchronous caller reaches a client through ``comms.aio.LoopThread``.

Modules: ``server`` (servicer, ``TransportServer``, ``TransportHandler``), ``client``
(``TransportClient``, retries and resumption), ``errors`` (remote errors, status mapping),
``messages`` (chunk messages and their cache), ``options`` (``ServerTLS``, ``ClientTLS``,
message limits, ``Keepalive``: pings that find a silent connection dead). Import from
``comms.transport``; the names below are its interface.
"""

from comms.chunks import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_UPLOAD_BYTES
from comms.transport.client import RETRYABLE_CODES, ClientStats, LinkShaper, TransportClient
from comms.transport.errors import (
    ERROR_TYPE_KEY,
    REASON_KEY,
    DeadlineExceededError,
    RemoteError,
    RemoteRejected,
    SupersededError,
    check_protocol_version,
    remote_error,
)
from comms.transport.messages import OFF_LOOP_BYTES, ChunkMessageCache, build_chunk_messages
from comms.transport.options import (
    DEFAULT_KEEPALIVE,
    DEFAULT_MAX_MESSAGE_BYTES,
    MESSAGE_OVERHEAD_BYTES,
    ClientTLS,
    Keepalive,
    ServerTLS,
)
from comms.transport.server import (
    DEFAULT_MAX_REPORT_BYTES,
    ServerStats,
    TransportHandler,
    TransportServer,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_KEEPALIVE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_REPORT_BYTES",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "ERROR_TYPE_KEY",
    "MESSAGE_OVERHEAD_BYTES",
    "OFF_LOOP_BYTES",
    "REASON_KEY",
    "RETRYABLE_CODES",
    "ChunkMessageCache",
    "ClientStats",
    "ClientTLS",
    "DeadlineExceededError",
    "Keepalive",
    "LinkShaper",
    "RemoteError",
    "RemoteRejected",
    "ServerStats",
    "ServerTLS",
    "SupersededError",
    "TransportClient",
    "TransportHandler",
    "TransportServer",
    "build_chunk_messages",
    "check_protocol_version",
    "remote_error",
]
