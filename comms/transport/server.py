"""The transport server: a grpc.aio servicer over a plain ``TransportHandler``.

The servicer only decodes, calls the handler and maps errors to statuses
(``comms.transport.errors``). ``Push`` appends checked chunks to a partial upload in an
``UploadTable`` (``comms.chunks``), resumable from ``UploadStatus``, and hands a complete
blob to the handler exactly once; a retried push of a delivered upload gets the same answer.
``Subscribe`` and ``Fetch`` stream a blob's shared chunk messages (``ChunkMessageCache``),
once the server's ``ReadGuard`` (``comms.reads``), if it has one, admitted the request's
signature; the handler only sees admitted reads. ``Report`` hands one small signed blob (a
child aggregator's dashboard summary, at most ``max_report_bytes``) to the handler's optional
``on_report``; nothing of it is kept here. A refused read is logged and reported to the
handler's optional ``on_read_refused(method, reason)`` (the aggregator counts it). The
messages are written with ``context.write``, so a reader that goes away in the middle of a
blob ends its stream with one INFO line, not an error traceback from inside gRPC.

A delivery that fails with an UNAVAILABLE error (``comms.errors.StorageError``: the handler
could not make it durable) is not remembered: a retry of the same upload is delivered again.

Concurrency: one asyncio loop; server state is touched only from it, so it takes no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc._cython import cygrpc

from comms.chunks import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_UPLOAD_BYTES,
    PartialUpload,
    UploadTable,
    verify_chunk,
)
from comms.errors import LinkError, MalformedError, NotFoundError, OversizeError, RejectedError
from comms.proto import archipelago_pb2 as pb
from comms.proto import archipelago_pb2_grpc as pb_grpc
from comms.reads import ReadAuth, ReadGuard
from comms.transport.errors import (
    REASON_KEY,
    SupersededError,
    _status_of,
    check_protocol_version,
)
from comms.transport.messages import ChunkMessageCache, _crc_of, _off_loop
from comms.transport.options import (
    DEFAULT_KEEPALIVE,
    DEFAULT_MAX_MESSAGE_BYTES,
    Keepalive,
    ServerTLS,
    _check_chunk_size,
    _message_options,
)

log = logging.getLogger("comms.transport")

DEFAULT_MAX_REPORT_BYTES = 1 << 20  # one Report's envelope (a dashboard summary)


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

    # Optional: ``async def on_report(self, data: bytes) -> dict[str, str]`` takes one
    # ``Report`` (a signed envelope of kind "summary", at most ``max_report_bytes``); a
    # handler without it refuses every report with NotFoundError.


@dataclass
class ServerStats:
    bytes_received: int = 0  # chunk data read from push streams
    bytes_accepted: int = 0  # of which appended to an upload (each byte once)
    bytes_sent: int = 0  # chunk data streamed by Subscribe and Fetch
    deliveries: int = 0  # complete uploads handed to the handler
    reads_refused: dict[str, int] = field(default_factory=dict)  # reason -> count
    readers_gone: int = 0  # Subscribe/Fetch streams whose reader left mid-blob
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    internal_errors: int = 0


class _Servicer(pb_grpc.TransportServicer):
    """Decodes requests, calls the handler, maps errors to statuses."""

    def __init__(
        self,
        handler: TransportHandler,
        uploads: UploadTable,
        chunk_size: int,
        read_guard: ReadGuard | None = None,
        max_report_bytes: int = DEFAULT_MAX_REPORT_BYTES,
    ):
        self.handler = handler
        self.read_guard = read_guard
        self.max_report_bytes = max_report_bytes
        self.uploads = uploads
        self.chunk_size = chunk_size
        self.stats = ServerStats()
        self.sent_chunks = ChunkMessageCache(chunk_size)
        self.stopping = False  # set by TransportServer.stop: cancellations are then its own

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

    async def Subscribe(self, request: pb.SubscribeRequest, context) -> None:
        try:
            check_protocol_version(request.protocol_version)
            self._admit_read("Subscribe", request, request.from_version, context)
            versions = self.handler.subscribe(request.model_id, request.from_version)
            async with _closing(versions):
                async for version, data in versions:
                    messages = await self.sent_chunks.messages(
                        pb.VersionMessage, request.model_id, version, data
                    )
                    await self._write(context, messages, "Subscribe", request, version)
        except Exception as exc:
            await self._abort(context, exc, "Subscribe")

    async def Fetch(self, request: pb.FetchRequest, context) -> None:
        try:
            check_protocol_version(request.protocol_version)
            self._admit_read("Fetch", request, request.version, context)
            data = await self.handler.fetch(request.model_id, request.version)
            messages = await self.sent_chunks.messages(
                pb.FetchChunk, request.model_id, request.version, data
            )
            await self._write(context, messages, "Fetch", request, request.version)
        except Exception as exc:
            await self._abort(context, exc, "Fetch")

    async def Report(self, request: pb.ReportRequest, context) -> pb.ReportAck:
        try:
            check_protocol_version(request.protocol_version)
            data = request.envelope
            if len(data) > self.max_report_bytes:
                raise OversizeError(
                    f"report of {len(data)} bytes; this server takes at most "
                    f"{self.max_report_bytes} (send fewer records)"
                )
            on_report = getattr(self.handler, "on_report", None)
            if on_report is None:
                raise NotFoundError("this server takes no reports")
            fields = await on_report(data)
            return pb.ReportAck(fields={str(k): str(v) for k, v in (fields or {}).items()})
        except Exception as exc:
            await self._abort(context, exc, "Report")

    async def _write(self, context, messages, method: str, request, version: int) -> None:
        """Send one blob's messages. A reader that went away meanwhile (a closed laptop, a
        restarted island) is logged at INFO and ends the call as a cancellation: gRPC then
        sends no status on the dead stream (which would fail and log an error)."""
        for i, (msg, nbytes) in enumerate(messages):
            try:
                await context.write(msg)
            except (Exception, asyncio.CancelledError) as exc:
                # the reader's departure shows either as a failed write or, when gRPC
                # saw the stream reset first, as this task being cancelled
                if isinstance(exc, asyncio.CancelledError):
                    if self.stopping:
                        raise  # the server stopping, not the reader leaving
                elif not (isinstance(exc, cygrpc.BaseError) or context.done()):
                    raise
                self.stats.readers_gone += 1
                log.info(
                    "%s of %s version %d: reader %s went away at chunk %d of %d (%s)",
                    method, request.model_id, version, context.peer(), i, len(messages),
                    type(exc).__name__,
                )  # fmt: skip
                raise asyncio.CancelledError from None
            self.stats.bytes_sent += nbytes

    def _admit_read(self, method: str, request, version: int, context) -> None:
        """Raise ReadDeniedError / TooManyReadsError unless the guard admits this read."""
        if self.read_guard is None:
            return
        auth = None
        if request.HasField("auth"):
            a = request.auth
            auth = ReadAuth(a.sender, a.timestamp_ms, a.nonce, a.signature)
        try:
            self.read_guard.check(method, request.model_id, version, auth)
        except RejectedError as e:
            log.info("refused a read from %s: %s (%s)", context.peer(), e, e.reason)
            self.stats.reads_refused[e.reason] = self.stats.reads_refused.get(e.reason, 0) + 1
            report = getattr(self.handler, "on_read_refused", None)
            if report is not None:
                report(method, e.reason)
            raise

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
        if task.cancelled() or upload.assembler is not None or _transient(task.exception()):
            self.uploads.forget(upload.upload_id)
        else:
            self.uploads.record(upload, task.exception() or task.result())

    @staticmethod
    def _ack(upload_id: str, total_size: int, result: Any) -> pb.PushAck:
        if isinstance(result, BaseException):
            raise result
        fields = {str(key): str(value) for key, value in (result or {}).items()}
        return pb.PushAck(upload_id=upload_id, received_bytes=total_size, fields=fields)


def _transient(exc: BaseException | None) -> bool:
    """A refusal that says "later" (UNAVAILABLE, e.g. a full disk): a retry must try again."""
    return isinstance(exc, RejectedError) and exc.grpc_code == "UNAVAILABLE"


@contextlib.asynccontextmanager
async def _closing(iterator):
    """Close an async generator when the stream ends or its client goes away."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


class TransportServer:
    """A grpc.aio server for one ``TransportHandler``; ``start()`` returns the bound port.

    With a ``read_guard`` (``comms.reads.ReadGuard``) every Subscribe and Fetch must carry a
    read signature it admits; without one, reads are open to anyone who reaches the port.
    ``keepalive`` (``comms.transport.options.Keepalive``): the server pings its clients
    (a reader behind a dead link is dropped) and permits the pings of clients with the same
    ``Keepalive``; a client pinging more often gets GOAWAY ``too_many_pings``.
    """

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
        read_guard: ReadGuard | None = None,
        keepalive: Keepalive = DEFAULT_KEEPALIVE,
        max_report_bytes: int = DEFAULT_MAX_REPORT_BYTES,
    ):
        _check_chunk_size(chunk_size, max_message_bytes)
        self.host, self.port, self.tls = host, port, tls
        self.max_message_bytes = max_message_bytes
        self.keepalive = keepalive
        self.uploads = uploads or UploadTable(max_upload_bytes=max_upload_bytes)
        self._servicer = _Servicer(handler, self.uploads, chunk_size, read_guard, max_report_bytes)
        self._server: grpc.aio.Server | None = None

    @property
    def stats(self) -> ServerStats:
        return self._servicer.stats

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> int:
        options = _message_options(self.max_message_bytes) + self.keepalive.server_options()
        server = grpc.aio.server(options=options)
        self._servicer.stopping = False
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
        self._servicer.stopping = True
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
