"""The transport client: push with resumption, subscribe with reconnection, fetch; retries.

Every call has a deadline; retryable failures (``RETRYABLE_CODES``, a dropped link) are
retried with exponential backoff, a push resuming at the offset the server reports. Failures
that are not retried become typed errors (``comms.transport.errors.remote_error``).
With an ``identity`` every Fetch and Subscribe request is signed (``comms.reads``), afresh for
each attempt and each resubscription: a new nonce and timestamp every time.

Concurrency: create anywhere, use on one event loop; a synchronous caller goes through
``comms.aio.LoopThread``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NoReturn, Protocol

import grpc

from comms import PROTOCOL_VERSION
from comms.chunks import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_UPLOAD_BYTES, ChunkAssembler, digest
from comms.chunks import split_chunks as _split
from comms.errors import LinkError, MalformedError
from comms.identity import Identity
from comms.proto import archipelago_pb2 as pb
from comms.proto import archipelago_pb2_grpc as pb_grpc
from comms.reads import sign_read
from comms.tls import TLSMismatchError, diagnose
from comms.transport.errors import DeadlineExceededError, remote_error
from comms.transport.messages import _crc_of, _off_loop
from comms.transport.options import (
    DEFAULT_KEEPALIVE,
    DEFAULT_MAX_MESSAGE_BYTES,
    ClientTLS,
    Keepalive,
    _check_chunk_size,
    _message_options,
    reconnect_options,
)

log = logging.getLogger("comms.transport")

RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,  # a chunk raced a resume; ask for the offset again
    }
)


class LinkShaper(Protocol):
    """Link emulation hook (``comms.shaper``): sleeps per chunk, may raise LinkError."""

    async def transmit(self, nbytes: int) -> None: ...


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
    the server's chunk size (and the server's, this client's ``chunk_size``). ``identity``
    signs every Fetch and Subscribe; without one only public models can be read.
    ``keepalive`` (``comms.transport.options.Keepalive``) drops a connection that went silent,
    so a call on a cut link fails and is retried instead of waiting for TCP; the server
    must permit its pings (the same ``Keepalive`` at both ends).
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
        identity: Identity | None = None,
        keepalive: Keepalive = DEFAULT_KEEPALIVE,
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
        self.identity = identity
        self.keepalive = keepalive
        self.stats = ClientStats()
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.TransportStub | None = None

    @property
    def stub(self) -> pb_grpc.TransportStub:
        """The stub, opening the channel on first use (inside the running loop)."""
        if self._stub is None:
            options = _message_options(self.max_message_bytes)
            options += self.keepalive.client_options() + reconnect_options()
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

    def _read_auth(self, method: str, model_id: str, version: int) -> pb.ReadAuth | None:
        """A fresh read signature for one request, or None without an identity."""
        if self.identity is None:
            return None
        auth = sign_read(self.identity, method, model_id, version)
        return pb.ReadAuth(
            sender=auth.sender,
            timestamp_ms=auth.timestamp_ms,
            nonce=auth.nonce,
            signature=auth.signature,
        )

    async def _check_tls(self, err: BaseException) -> None:
        """After a connection the server closed or a failed handshake: ``TLSMismatchError``
        (not retried) when the ends disagree about TLS (``comms.tls.diagnose`` says how)."""
        if not isinstance(err, grpc.aio.AioRpcError) or err.code() != grpc.StatusCode.UNAVAILABLE:
            return
        details = (err.details() or "").lower()
        if "socket closed" not in details and "handshake" not in details:
            return
        problem = await asyncio.to_thread(diagnose, self.address, self.tls)
        if problem is not None:
            raise TLSMismatchError(problem) from None

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
                await self._check_tls(err)
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

    async def report(self, data: bytes, retries: int | None = None) -> dict[str, str]:
        """Send one ``Report`` (a signed envelope of kind "summary"); return the ack's fields.
        A report is telemetry: callers pass few ``retries`` and send a fresh one later."""
        retries = self.retries if retries is None else retries
        request = pb.ReportRequest(protocol_version=self.protocol_version, envelope=data)
        for attempt in range(retries + 1):
            try:
                ack = await self.stub.Report(request, timeout=self._transfer_deadline(len(data)))
                return dict(ack.fields)
            except (grpc.aio.AioRpcError, LinkError, OSError) as err:
                _raise_if_final(err)
                await self._check_tls(err)
                if attempt == retries:
                    _raise_gave_up(err, "report", attempt + 1)
                await self._backoff(attempt)
        raise AssertionError("unreachable")

    async def fetch(self, model_id: str, version: int, retries: int | None = None) -> bytes:
        """Download one blob of ``model_id`` at ``version``, checked by digest."""
        retries = self.retries if retries is None else retries
        what = f"fetch {model_id}@{version}"
        for attempt in range(retries + 1):
            request = pb.FetchRequest(
                model_id=model_id,
                version=version,
                protocol_version=self.protocol_version,
                auth=self._read_auth("Fetch", model_id, version),
            )
            call = self.stub.Fetch(request)
            try:
                data = await self._read_blob(call, what, self.deadline_s)
                if data is None:
                    raise MalformedError(f"{what}: the server ended the stream without data")
                return data[1]
            except (grpc.aio.AioRpcError, LinkError, OSError) as err:
                _raise_if_final(err)
                await self._check_tls(err)
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
                auth=self._read_auth("Subscribe", model_id, next_version),
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
                await self._check_tls(err)
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
                # Not asyncio.wait_for: on Python 3.11 it returns a read that completes as the
                # task is cancelled and drops the cancellation, so the stream reads on forever.
                async with asyncio.timeout(first_timeout if assembler is None else chunk_timeout):
                    msg = await call.read()
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
