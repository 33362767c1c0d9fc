"""gRPC transport for opaque blobs: resumable chunked push, version subscription, fetch.

The transport moves bytes and knows nothing about what they hold. Three calls
(``comms/proto/archipelago.proto``, package ``archipelago.v1``):

- ``Push``: client-streaming upload of one blob in checked chunks (``comms.chunks``). The
  server keeps partial uploads in memory (bounded in count and bytes, expiring when idle);
  a client that lost its link asks ``UploadStatus`` how many bytes arrived and resumes there,
  never resending acknowledged bytes. A completed blob is handed to the handler exactly once;
  a retried push of a delivered upload gets the same answer.
- ``Subscribe``: server-streaming versions of a model from ``from_version`` on.
- ``Fetch``: one blob of a model (a snapshot), streamed in chunks and checked by digest.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import grpc

from comms import PROTOCOL_VERSION
from comms import errors as _errors
from comms.chunks import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_UPLOAD_BYTES,
    ChunkAssembler,
    OffsetMismatchError,
    PartialUpload,
    UploadTable,
    digest,
    verify_chunk,
)
from comms.chunks import split_chunks as _split
from comms.errors import (
    CommsError,
    ConfigError,
    LinkError,
    MalformedError,
    ProtocolVersionError,
    RejectedError,
)
from comms.proto import archipelago_pb2 as pb
from comms.proto import archipelago_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
OFF_LOOP_BYTES = 1 << 20  # check/hash at least this many bytes in a worker thread (~1 ms)
MESSAGE_OVERHEAD_BYTES = 64 * 1024  # room for the non-data fields of one chunk message
ERROR_TYPE_KEY = "archipelago-error"  # trailing metadata: the comms.errors class name
REASON_KEY = "archipelago-reason"  # trailing metadata: the error's stable reason tag
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,  # a chunk raced a resume; ask for the offset again
    }
)


# ----------------------------------------------------------------------------- interfaces


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


class TransportHandler(Protocol):
    """What a server does with the bytes; plain async functions, testable without sockets.

    Raise a ``comms.errors.RejectedError`` subclass to refuse a request with its status.
    """

    async def on_push(
        self, upload_id: str, data: bytes, metadata: dict[str, str]
    ) -> dict[str, str]:
        """Take one complete uploaded blob; return the ack's fields (e.g. accepted version)."""
        ...

    def subscribe(self, model_id: str, from_version: int) -> AsyncIterator[tuple[int, bytes]]:
        """Yield ``(version, data)`` in increasing version order from ``from_version`` on."""
        ...

    async def fetch(self, model_id: str, version: int) -> bytes:
        """Return one blob of ``model_id`` at ``version``; NotFoundError if not held."""
        ...


class LinkShaper(Protocol):
    """Link emulation hook (``comms.shaper``): sleeps per chunk, may raise LinkError."""

    async def transmit(self, nbytes: int) -> None: ...


# ----------------------------------------------------------------------------- errors


class RemoteError(CommsError):
    """The server answered with an error status. ``code`` is a ``grpc.StatusCode``."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str | None = None):
        Exception.__init__(self, f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason or code.name.lower()


class RemoteRejected(RemoteError):
    """The server refused the request; subclasses are also the matching comms.errors class."""


class DeadlineExceededError(LinkError, TimeoutError):
    """A call ran past its deadline (a slow link, or a server that did not answer)."""


class SupersededError(RejectedError):
    """A push stream replaced by a newer push of the same upload id."""

    reason = "superseded"
    grpc_code = "ABORTED"


# Errors that cross the wire by class name: every RejectedError in comms.errors, and these.
_WIRE_ERRORS: frozenset[type[CommsError]] = frozenset(
    {OffsetMismatchError, SupersededError, ProtocolVersionError}
    | {c for c in vars(_errors).values() if isinstance(c, type) and issubclass(c, RejectedError)}
)
# One client-side class per wire error, e.g. RemoteStaleError(RemoteRejected, StaleError).
_REMOTE_TYPES: dict[str, type[RemoteRejected]] = {
    cls.__name__: type(f"Remote{cls.__name__}", (RemoteRejected, cls), {"__doc__": cls.__doc__})
    for cls in _WIRE_ERRORS
}


def remote_error(err: grpc.aio.AioRpcError) -> RemoteError:
    """The typed client-side exception for a failed call's status and trailing metadata."""
    meta = {key: value for key, value in (err.trailing_metadata() or ())}
    cls = _REMOTE_TYPES.get(meta.get(ERROR_TYPE_KEY, ""), RemoteError)
    return cls(err.code(), err.details() or "", meta.get(REASON_KEY))


def _status_of(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str, tuple]:
    """Map an exception raised while serving ``method`` to (code, details, trailing md)."""
    if isinstance(exc, RejectedError | ProtocolVersionError):
        wire = next(c for c in type(exc).__mro__ if c in _WIRE_ERRORS)
        code_name = getattr(exc, "grpc_code", "FAILED_PRECONDITION")
        reason = getattr(exc, "reason", "protocol_version")
        trailing = ((ERROR_TYPE_KEY, wire.__name__), (REASON_KEY, reason))
        return grpc.StatusCode[code_name], str(exc), trailing
    log.error("unexpected error in %s", method, exc_info=exc)
    details = f"internal error in {method} ({type(exc).__name__}); see the server log"
    return grpc.StatusCode.INTERNAL, details, ((REASON_KEY, "internal"),)


def check_protocol_version(theirs: int) -> None:
    if theirs != PROTOCOL_VERSION:
        raise ProtocolVersionError(
            f"protocol version mismatch: peer speaks {theirs}, this server speaks "
            f"{PROTOCOL_VERSION}; run the same archipelago release on both sides"
        )


# ----------------------------------------------------------------------------- server


@dataclass
class ServerStats:
    bytes_received: int = 0  # chunk data read from push streams
    bytes_accepted: int = 0  # of which appended to an upload (each byte once)
    bytes_sent: int = 0  # chunk data streamed by Subscribe and Fetch
    deliveries: int = 0  # complete uploads handed to the handler
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    internal_errors: int = 0


# ----------------------------------------------------------------------------- servicer


async def _off_loop(fn, nbytes: int, *args, **kwargs):
    """``fn(*args, **kwargs)``, in a worker thread when it touches OFF_LOOP_BYTES or more."""
    if nbytes >= OFF_LOOP_BYTES:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def _crc_of(msg) -> int | None:
    """A chunk message's CRC-32, or None when it carries none (an older sender's)."""
    return msg.chunk_crc32 if msg.HasField("chunk_crc32") else None


def build_chunk_messages(
    message_type, model_id: str, version: int, data: bytes, chunk_size: int
) -> list[tuple[Any, int]]:
    """``(message, data bytes)`` for each ``VersionMessage``/``FetchChunk`` that streams
    ``data``: split, with each chunk's CRC-32 and the blob's SHA-256 digest. The sizes ride
    along because reading a message's bytes field back copies it. Pure; runs in a worker
    thread."""
    blob_digest = digest(data)
    return [
        (
            message_type(
                model_id=model_id,
                version=version,
                data=chunk.data,
                offset=chunk.offset,
                total_size=len(data),
                chunk_crc32=chunk.crc32,
                blob_digest=blob_digest,
            ),
            len(chunk.data),
        )
        for chunk in _split(data, chunk_size)
    ]


@dataclass
class _CachedBlob:
    data: bytes
    messages: asyncio.Future  # -> build_chunk_messages(...)


class ChunkMessageCache:
    """The chunk messages of recently streamed blobs, built once and shared across streams.

    N subscribers of one version (or N fetches of one snapshot) get the very same message
    objects, so the blob is split and digested once, not N times. An entry is keyed by
    (message type, model_id, version) and holds the blob it was built from; it is used only
    for the same bytes (the same object, or equal bytes: a memcmp, ~10x cheaper than the
    digest), so a key whose blob changed (fetch of version -1) is rebuilt, never served
    stale. Concurrent requests for a blob being built wait for that one build. Bounded by
    ``max_entries`` and ``max_bytes`` (each entry counts twice its blob: the blob and the
    messages' copy), least recently used first out; a blob over half of ``max_bytes`` is
    built for its stream alone. Loop-confined: no locks.
    """

    def __init__(self, chunk_size: int, *, max_entries: int = 8, max_bytes: int = 512 << 20):
        self.chunk_size = chunk_size
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.builds = 0  # blobs split and digested (a cache miss each)
        self._entries: OrderedDict[tuple, _CachedBlob] = OrderedDict()

    async def messages(
        self, message_type, model_id: str, version: int, data: bytes
    ) -> list[tuple[Any, int]]:
        """``(message, nbytes)`` for each chunk of ``data`` (see :func:`build_chunk_messages`)."""
        key = (message_type, model_id, version)
        entry = self._entries.get(key)
        if entry is not None and (entry.data is data or entry.data == data):
            self._entries.move_to_end(key)
            return await asyncio.shield(entry.messages)
        build = (message_type, model_id, version, data, self.chunk_size)
        self.builds += 1
        if 2 * len(data) > self.max_bytes:
            return await _off_loop(build_chunk_messages, len(data), *build)
        entry = _CachedBlob(
            data, asyncio.ensure_future(_off_loop(build_chunk_messages, len(data), *build))
        )
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries or (
            sum(2 * len(e.data) for e in self._entries.values()) > self.max_bytes
        ):
            self._entries.popitem(last=False)
        try:
            return await asyncio.shield(entry.messages)
        except Exception:
            if self._entries.get(key) is entry:
                del self._entries[key]
            raise


class _Servicer(pb_grpc.TransportServicer):
    """Decodes requests, calls the handler, maps errors to statuses."""

    def __init__(self, handler: TransportHandler, uploads: UploadTable, chunk_size: int):
        self.handler = handler
        self.uploads = uploads
        self.chunk_size = chunk_size
        self.stats = ServerStats()
        self.sent_chunks = ChunkMessageCache(chunk_size)

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception, method: str):
        code, details, trailing = _status_of(exc, method)
        if code is grpc.StatusCode.INTERNAL:
            self.stats.internal_errors += 1
        else:
            reason = dict(trailing)[REASON_KEY]
            self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        await context.abort(code, details, trailing_metadata=trailing)

    async def Push(self, request_iterator, context) -> pb.PushAck:
        try:
            return await self._push(request_iterator)
        except Exception as exc:
            await self._abort(context, exc, "Push")

    async def UploadStatus(self, request: pb.UploadQuery, context) -> pb.UploadState:
        try:
            return self._upload_state(request)
        except Exception as exc:
            await self._abort(context, exc, "UploadStatus")

    async def Subscribe(self, request: pb.SubscribeRequest, context):
        try:
            check_protocol_version(request.protocol_version)
            versions = self.handler.subscribe(request.model_id, request.from_version)
            async with _closing(versions):
                async for version, data in versions:
                    for msg, nbytes in await self.sent_chunks.messages(
                        pb.VersionMessage, request.model_id, version, data
                    ):
                        self.stats.bytes_sent += nbytes
                        yield msg
        except Exception as exc:
            await self._abort(context, exc, "Subscribe")

    async def Fetch(self, request: pb.FetchRequest, context):
        try:
            check_protocol_version(request.protocol_version)
            data = await self.handler.fetch(request.model_id, request.version)
            messages = await self.sent_chunks.messages(
                pb.FetchChunk, request.model_id, request.version, data
            )
            for msg, nbytes in messages:
                self.stats.bytes_sent += nbytes
                yield msg
        except Exception as exc:
            await self._abort(context, exc, "Fetch")

    def _upload_state(self, request: pb.UploadQuery) -> pb.UploadState:
        check_protocol_version(request.protocol_version)
        self.uploads.sweep()
        state = pb.UploadState(upload_id=request.upload_id)
        known = self.uploads.partial.get(request.upload_id) or self.uploads.outcomes.get(
            request.upload_id
        )
        if known is not None:
            state.known, state.total_size, state.blob_digest = True, *known.header
            state.received_bytes, state.complete = known.received_bytes, known.complete
        return state

    async def _push(self, requests) -> pb.PushAck:
        requests = aiter(requests)
        first = await anext(requests, None)
        if first is None:
            raise MalformedError("empty push stream: the first message must carry the header")
        check_protocol_version(first.protocol_version)
        if not first.upload_id:
            raise MalformedError("push without an upload_id")
        outcome = self.uploads.outcomes.get(first.upload_id)
        if outcome is not None:
            return self._ack(first.upload_id, outcome.total_size, outcome.result)
        upload = self.uploads.open(
            first.upload_id, first.total_size, first.blob_digest, dict(first.metadata)
        )
        if upload.delivery is None:
            await self._receive(upload, first, requests)
        fields = await asyncio.shield(upload.delivery)
        return self._ack(upload.upload_id, upload.total_size, fields)

    async def _receive(self, upload: PartialUpload, first: pb.PushChunk, requests) -> None:
        """Append this stream's chunks; start the delivery once the blob is complete.

        A large chunk is checked in a worker thread; the append happens back on the loop,
        and only if no newer stream took the upload over meanwhile."""
        token = upload.owner = object()  # a newer push of the same upload takes over
        what = f"upload {upload.upload_id!r}"
        try:
            msg = first
            while msg is not None:
                if upload.owner is not token:
                    raise SupersededError(f"{what}: superseded")
                data = msg.data  # read once: each read of a bytes field copies it
                self.stats.bytes_received += len(data)
                upload.assembler.expect(msg.offset, len(data))
                await _off_loop(
                    verify_chunk, len(data), data, msg.chunk_digest, _crc_of(msg),
                    offset=msg.offset, name=what,
                )  # fmt: skip
                if upload.owner is not token:
                    raise SupersededError(f"{what}: superseded")
                self.stats.bytes_accepted += upload.assembler.add(msg.offset, data, verified=True)
                upload.touched = self.uploads.clock()
                if upload.assembler.complete:
                    break
                msg = await anext(requests, None)
        finally:
            if upload.owner is token:
                upload.owner = None
        if not upload.assembler.complete:
            raise MalformedError(
                f"{what}: stream ended at {upload.received_bytes} of "
                f"{upload.total_size} bytes; resume from that offset"
            )
        upload.delivery = asyncio.ensure_future(self._deliver(upload))
        upload.delivery.add_done_callback(lambda task: self._record(upload, task))

    async def _deliver(self, upload: PartialUpload) -> dict[str, str]:
        """Check the whole-blob digest (off the loop when large), then hand the blob over."""
        data = await _off_loop(upload.assembler.finish, upload.total_size)
        upload.assembler = None
        self.stats.deliveries += 1
        return await self.handler.on_push(upload.upload_id, data, dict(upload.metadata))

    def _record(self, upload: PartialUpload, task: asyncio.Future) -> None:
        """Keep a delivery's outcome so a retried push gets the same answer; forget an upload
        whose delivery was cancelled or whose blob failed its digest (it starts over)."""
        if task.cancelled() or upload.assembler is not None:
            self.uploads.forget(upload.upload_id)
        else:
            self.uploads.record(upload, task.exception() or task.result())

    @staticmethod
    def _ack(upload_id: str, total_size: int, result: Any) -> pb.PushAck:
        if isinstance(result, BaseException):
            raise result
        fields = {str(key): str(value) for key, value in (result or {}).items()}
        return pb.PushAck(upload_id=upload_id, received_bytes=total_size, fields=fields)


@contextlib.asynccontextmanager
async def _closing(iterator):
    """Close an async generator when the stream ends or its client goes away."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


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


class TransportServer:
    """A grpc.aio server for one ``TransportHandler``; ``start()`` returns the bound port."""

    def __init__(
        self,
        handler: TransportHandler,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ServerTLS | None = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        uploads: UploadTable | None = None,
    ):
        _check_chunk_size(chunk_size, max_message_bytes)
        self.host, self.port, self.tls = host, port, tls
        self.max_message_bytes = max_message_bytes
        self.uploads = uploads or UploadTable(max_upload_bytes=max_upload_bytes)
        self._servicer = _Servicer(handler, self.uploads, chunk_size)
        self._server: grpc.aio.Server | None = None

    @property
    def stats(self) -> ServerStats:
        return self._servicer.stats

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> int:
        server = grpc.aio.server(options=_message_options(self.max_message_bytes))
        pb_grpc.add_TransportServicer_to_server(self._servicer, server)
        address = f"{self.host}:{self.port}"
        try:
            if self.tls is None:
                self.port = server.add_insecure_port(address)
            else:
                credentials = grpc.ssl_server_credentials(
                    [(self.tls.key_pem, self.tls.cert_pem)],
                    root_certificates=self.tls.client_ca_pem,
                    require_client_auth=self.tls.client_ca_pem is not None,
                )
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError as err:
            raise LinkError(f"cannot listen on {address}: {err}; is the port in use?") from err
        await server.start()
        self._server = server
        log.info("transport server listening on %s (tls=%s)", self.address, self.tls is not None)
        return self.port

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        for upload in list(self.uploads.partial.values()):
            if upload.delivery is not None:
                upload.delivery.cancel()

    async def __aenter__(self) -> TransportServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()


# ----------------------------------------------------------------------------- client


@dataclass
class ClientStats:
    bytes_sent: int = 0  # chunk data handed to the channel
    bytes_received: int = 0  # chunk data read from streams
    retries: int = 0


class TransportClient:
    """Client of one transport server. Create anywhere; use on one event loop.

    Every call has a deadline: ``deadline_s`` plus, for transfers, the time the payload
    takes at ``min_bandwidth_bytes_per_s``. Retryable failures (UNAVAILABLE,
    DEADLINE_EXCEEDED, a dropped link) are retried ``retries`` times with exponential backoff
    from ``backoff_s``; a push that made progress since its last attempt does not use one up.
    ``shaper.transmit(nbytes)`` (``comms.shaper``) is awaited before each pushed chunk; a
    LinkError it raises is handled like a dropped connection. ``max_message_bytes`` must exceed
    the server's chunk size (and the server's, this client's ``chunk_size``).
    """

    def __init__(
        self,
        address: str,
        tls: ClientTLS | None = None,
        *,
        deadline_s: float = 30.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        shaper: LinkShaper | None = None,
        retries: int = 5,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        min_bandwidth_bytes_per_s: float = 1e6,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_download_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        protocol_version: int = PROTOCOL_VERSION,
    ):
        _check_chunk_size(chunk_size, max_message_bytes)
        self.address, self.tls = address, tls
        self.deadline_s = deadline_s
        self.chunk_size = chunk_size
        self.shaper = shaper
        self.retries = retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.min_bandwidth = min_bandwidth_bytes_per_s
        self.max_message_bytes = max_message_bytes
        self.max_download_bytes = max_download_bytes
        self.protocol_version = protocol_version
        self.stats = ClientStats()
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.TransportStub | None = None

    @property
    def stub(self) -> pb_grpc.TransportStub:
        """The stub, opening the channel on first use (inside the running loop)."""
        if self._stub is None:
            options = _message_options(self.max_message_bytes)
            if self.tls is None:
                self._channel = grpc.aio.insecure_channel(self.address, options=options)
            else:
                credentials = grpc.ssl_channel_credentials(
                    self.tls.ca_pem, self.tls.key_pem, self.tls.cert_pem
                )
                if self.tls.server_name:
                    options.append(("grpc.ssl_target_name_override", self.tls.server_name))
                self._channel = grpc.aio.secure_channel(self.address, credentials, options)
            self._stub = pb_grpc.TransportStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> TransportClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def _transfer_deadline(self, nbytes: int) -> float:
        return self.deadline_s + nbytes / self.min_bandwidth

    async def _backoff(self, attempt: int) -> None:
        self.stats.retries += 1
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def push(
        self,
        data: bytes,
        upload_id: str | None = None,
        metadata: dict[str, str] | None = None,
        retries: int | None = None,
    ) -> dict[str, str]:
        """Upload ``data``; return the handler's ack fields. Resumes where the server is."""
        upload_id = upload_id or uuid.uuid4().hex
        blob_digest = await _off_loop(digest, len(data), data)
        retries = self.retries if retries is None else retries
        failures, best_offset = 0, -1
        while True:
            progress = [best_offset]
            try:
                return await self._push_once(data, upload_id, blob_digest, metadata, progress)
            except (grpc.aio.AioRpcError, LinkError, OSError) as err:
                _raise_if_final(err)
                if progress[0] > best_offset:
                    best_offset, failures = progress[0], 0
                failures += 1
                if failures > retries:
                    _raise_gave_up(err, f"push {upload_id}", failures)
                log.info("push %s: %s; resuming (attempt %d)", upload_id, _brief(err), failures)
                await self._backoff(failures - 1)

    async def _push_once(self, data, upload_id, blob_digest, metadata, progress) -> dict:
        query = pb.UploadQuery(upload_id=upload_id, protocol_version=self.protocol_version)
        state = await self.stub.UploadStatus(query, timeout=self.deadline_s)
        start = state.received_bytes if state.known else 0
        if state.known and (state.total_size, state.blob_digest) != (len(data), blob_digest):
            raise MalformedError(
                f"push {upload_id}: the server holds this upload id for another blob "
                f"({state.total_size} bytes); use a new upload id"
            )
        progress[0] = start
        call = self.stub.Push(timeout=self._transfer_deadline(len(data) - start))
        try:
            for index, chunk in enumerate(_split(data, self.chunk_size, start)):
                if self.shaper is not None:
                    await self.shaper.transmit(len(chunk.data))
                if call.done():  # the server answered early (e.g. a rejection)
                    break
                msg = pb.PushChunk(offset=chunk.offset, data=chunk.data, chunk_crc32=chunk.crc32)
                if index == 0:
                    msg.upload_id, msg.protocol_version = upload_id, self.protocol_version
                    msg.total_size, msg.blob_digest = len(data), blob_digest
                    msg.metadata.update(metadata or {})
                try:
                    await call.write(msg)
                except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                    break  # the call ended meanwhile; awaiting it gives the server's status
                self.stats.bytes_sent += len(chunk.data)
            else:
                await call.done_writing()
            ack = await call
        except BaseException:
            call.cancel()
            raise
        return dict(ack.fields)

    async def fetch(self, model_id: str, version: int, retries: int | None = None) -> bytes:
        """Download one blob of ``model_id`` at ``version``, checked by digest."""
        retries = self.retries if retries is None else retries
        what = f"fetch {model_id}@{version}"
        for attempt in range(retries + 1):
            request = pb.FetchRequest(
                model_id=model_id, version=version, protocol_version=self.protocol_version
            )
            call = self.stub.Fetch(request)
            try:
                data = await self._read_blob(call, what, self.deadline_s)
                if data is None:
                    raise MalformedError(f"{what}: the server ended the stream without data")
                return data[1]
            except (grpc.aio.AioRpcError, LinkError, OSError) as err:
                _raise_if_final(err)
                if attempt == retries:
                    _raise_gave_up(err, what, attempt + 1)
                await self._backoff(attempt)
            finally:
                call.cancel()
        raise AssertionError("unreachable")

    async def subscribe(
        self,
        model_id: str,
        from_version: int,
        *,
        idle_timeout_s: float | None = None,
        retries: int | None = None,
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Yield ``(version, data)`` from ``from_version`` on, reconnecting after a dropped
        link from the version after the last one yielded. A subscription has no overall
        deadline; ``idle_timeout_s`` bounds the wait for each version."""
        retries = self.retries if retries is None else retries
        next_version, failures = from_version, 0
        while True:
            request = pb.SubscribeRequest(
                model_id=model_id,
                from_version=next_version,
                protocol_version=self.protocol_version,
            )
            call = self.stub.Subscribe(request)
            try:
                while True:
                    item = await self._read_blob(call, f"subscribe {model_id}", idle_timeout_s)
                    if item is None:
                        return
                    failures = 0
                    next_version = item[0] + 1
                    yield item
            except (grpc.aio.AioRpcError, LinkError, OSError) as err:
                _raise_if_final(err)
                if isinstance(err, DeadlineExceededError) or failures >= retries:
                    _raise_gave_up(err, f"subscribe {model_id}", failures + 1)
                failures += 1
                await self._backoff(failures - 1)
            finally:
                call.cancel()

    async def _read_blob(self, call, what: str, first_timeout: float | None):
        """Read chunk messages until one blob is whole; return (version, data), or None at
        the end of the stream. The first read waits at most ``first_timeout`` (None: no
        limit), each further one the deadline for one chunk."""
        assembler: ChunkAssembler | None = None
        chunk_timeout = self._transfer_deadline(self.chunk_size)
        while True:
            try:
                msg = await asyncio.wait_for(
                    call.read(), first_timeout if assembler is None else chunk_timeout
                )
            except TimeoutError:
                raise DeadlineExceededError(
                    f"{what}: no data from {self.address} within the deadline"
                ) from None
            if msg is grpc.aio.EOF:
                if assembler is not None:
                    raise LinkError(f"{what}: stream ended inside a blob")
                return None
            if assembler is None:
                if msg.offset != 0:
                    raise MalformedError(f"{what}: blob starts at offset {msg.offset}, not 0")
                assembler = ChunkAssembler(
                    msg.total_size, msg.blob_digest, self.max_download_bytes, name=what
                )
            data = msg.data  # read once: each read of a bytes field copies it
            self.stats.bytes_received += assembler.add(
                msg.offset, data, msg.chunk_digest, _crc_of(msg)
            )
            if assembler.complete:
                return msg.version, await _off_loop(assembler.finish, assembler.total_size)


def _brief(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return f"{type(err).__name__}: {err}"


def _raise_if_final(err: BaseException) -> None:
    """Re-raise a non-retryable failure as its typed error; return if it may be retried."""
    if isinstance(err, grpc.aio.AioRpcError) and err.code() not in RETRYABLE_CODES:
        raise remote_error(err) from None


def _raise_gave_up(err: BaseException, what: str, attempts: int) -> NoReturn:
    timed_out = isinstance(err, DeadlineExceededError) or (
        isinstance(err, grpc.aio.AioRpcError) and err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    )
    cls = DeadlineExceededError if timed_out else LinkError
    raise cls(f"{what}: gave up after {attempts} attempt(s): {_brief(err)}") from err
