"""gRPC transport on loopback: resumable push, subscribe, fetch, errors, limits, TLS, deadlines."""

import asyncio
import datetime
import filecmp
import ipaddress
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from comms import PROTOCOL_VERSION
from comms.aio import LoopThread
from comms.chunks import digest
from comms.errors import (
    DigestMismatchError,
    LinkError,
    MalformedError,
    NotFoundError,
    OversizeError,
    ProtocolVersionError,
    StaleError,
)
from comms.proto import archipelago_pb2 as pb
from comms.proto import archipelago_pb2_grpc as pb_grpc
from comms.shaper import TokenBucketShaper
from comms.transport import (
    ClientTLS,
    DeadlineExceededError,
    RemoteError,
    RemoteRejected,
    ServerTLS,
    TransportClient,
    TransportServer,
    remote_error,
)

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]


class MemoryHandler:
    """A small real handler: keeps pushes and versions in memory."""

    def __init__(self):
        self.pushes: list[tuple[str, bytes, dict]] = []
        self.versions = {"lm": {v: bytes([v]) * (2500 + v) for v in range(1, 6)}}
        self.snapshots = {("lm", 7): os.urandom(10_000), ("lm", 0): b""}
        self.release = asyncio.Event()
        self.subscriptions: list[tuple[str, int]] = []

    async def on_push(self, upload_id, data, metadata):
        if metadata.get("test") == "stale":
            raise StaleError("update based on version 3 is 9 versions behind (bound 5)")
        if metadata.get("test") == "hang":
            await self.release.wait()
        self.pushes.append((upload_id, data, metadata))
        return {"sequence": len(self.pushes), "size": len(data)}

    async def subscribe(self, model_id, from_version):
        self.subscriptions.append((model_id, from_version))
        if model_id == "quiet":
            await self.release.wait()
        for version, data in sorted(self.versions["lm"].items()):
            if version >= from_version:
                yield version, data
        if model_id == "live":  # a live feed stays open for versions to come
            await self.release.wait()

    async def fetch(self, model_id, version):
        if model_id == "boom":
            raise ZeroDivisionError("a bug in the handler")
        if model_id == "hang":
            await self.release.wait()
        if (model_id, version) not in self.snapshots:
            raise NotFoundError(f"model {model_id!r} has no version {version}")
        return self.snapshots[model_id, version]


class DropLinkOnce:
    """Fault injection: the link drops once, just before byte ``fail_at`` would be sent,
    after the server has taken in everything sent so far."""

    def __init__(self, fail_at: int, server: TransportServer):
        self.fail_at, self.server = fail_at, server
        self.sent, self.dropped = 0, False

    async def transmit(self, nbytes: int) -> None:
        if not self.dropped and self.sent + nbytes > self.fail_at:
            self.dropped = True
            for _ in range(500):  # wait (at most 5 s) until the server holds what was sent
                if self.server.stats.bytes_accepted >= self.sent:
                    break
                await asyncio.sleep(0.01)
            raise LinkError(f"link dropped at byte {self.sent}")
        self.sent += nbytes


@pytest.fixture
def handler():
    return MemoryHandler()


@pytest.fixture
async def server(handler):
    server = TransportServer(handler, chunk_size=1000)
    await server.start()
    yield server
    handler.release.set()
    await server.stop(0)


def client_for(server, **kwargs) -> TransportClient:
    kwargs = {"deadline_s": 10.0, "backoff_s": 0.01, **kwargs}
    return TransportClient(f"127.0.0.1:{server.port}", **kwargs)


@pytest.fixture
async def client(server):
    client = client_for(server)
    yield client
    await client.close()


def test_committed_generated_code_matches_a_fresh_regeneration(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    script = REPO / "scripts" / "gen_protos.sh"
    subprocess.run(["bash", str(script), str(tmp_path)], check=True, env=env, timeout=60)
    names = ["archipelago_pb2.py", "archipelago_pb2_grpc.py", "archipelago_pb2.pyi"]
    _, mismatch, errors = filecmp.cmpfiles(
        REPO / "comms" / "proto", tmp_path / "comms" / "proto", names, shallow=False
    )
    assert (mismatch, errors) == ([], []), "run scripts/gen_protos.sh and commit the result"


async def test_push_delivers_blob_metadata_and_returns_ack_fields(server, client, handler):
    ack = await client.push(b"hello island", upload_id="u1", metadata={"peer": "island-3"})
    assert ack == {"sequence": "1", "size": "12"}
    assert handler.pushes == [("u1", b"hello island", {"peer": "island-3"})]
    assert client.stats.bytes_sent == server.stats.bytes_accepted == 12
    assert await client.push(b"", upload_id="empty") == {"sequence": "2", "size": "0"}
    assert handler.pushes[-1] == ("empty", b"", {})


async def test_interrupted_64mib_push_resumes_and_sends_each_byte_once(server, handler):
    blob = os.urandom(64 * MiB)
    shaper = DropLinkOnce(fail_at=32 * MiB, server=server)
    client = client_for(server, shaper=shaper, max_message_bytes=8 * MiB)
    try:
        ack = await client.push(blob, upload_id="big")
    finally:
        await client.close()
    assert shaper.dropped
    assert client.stats.retries == 1
    assert ack["size"] == str(64 * MiB)
    assert server.stats.bytes_accepted == 64 * MiB  # every byte exactly once
    assert server.stats.bytes_received == 64 * MiB
    assert client.stats.bytes_sent == 64 * MiB  # nothing acknowledged was sent again
    ((upload_id, data, _),) = handler.pushes
    assert upload_id == "big"
    assert digest(data) == digest(blob)


async def test_push_over_a_lossy_emulated_link_arrives_once(server, handler):
    blob = os.urandom(2 * MiB)
    shaper = TokenBucketShaper(rate_bps=float("inf"), loss=0.3, seed=7)
    client = client_for(server, shaper=shaper, chunk_size=64 * 1024, retries=20)
    try:
        ack = await client.push(blob, upload_id="lossy")
    finally:
        await client.close()
    assert shaper.drops >= 3
    assert client.stats.retries == shaper.drops
    assert ack["size"] == str(2 * MiB)
    assert server.stats.bytes_accepted == 2 * MiB
    assert [digest(data) for _, data, _ in handler.pushes] == [digest(blob)]


async def test_retried_push_of_a_delivered_upload_gets_the_same_ack_once(server, client, handler):
    first = await client.push(b"x" * 5000, upload_id="again")
    sent = client.stats.bytes_sent
    second = await client.push(b"x" * 5000, upload_id="again")
    assert first == second == {"sequence": "1", "size": "5000"}
    assert len(handler.pushes) == 1
    assert client.stats.bytes_sent == sent


async def test_hung_push_handler_times_out_and_is_delivered_once(server, handler):
    client = client_for(server, deadline_s=0.3, min_bandwidth_bytes_per_s=1e9)
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError) as info:
        await client.push(b"y" * 3000, upload_id="slow", metadata={"test": "hang"}, retries=1)
    assert time.monotonic() - start < 5
    assert isinstance(info.value, TimeoutError)
    assert client.stats.bytes_sent == 3000  # the retry resent nothing
    handler.release.set()
    assert await client.push(b"y" * 3000, upload_id="slow") == {"sequence": "1", "size": "3000"}
    assert len(handler.pushes) == 1
    await client.close()


async def test_subscribe_yields_versions_in_order_from_from_version(server, client, handler):
    received = [item async for item in client.subscribe("lm", from_version=3)]
    assert [version for version, _ in received] == [3, 4, 5]
    assert [data for _, data in received] == [handler.versions["lm"][v] for v in (3, 4, 5)]
    assert client.stats.bytes_received == sum(2500 + v for v in (3, 4, 5))  # 3 chunks each


async def test_subscribe_reconnects_from_the_next_version_after_a_dropped_link(handler):
    first_server = TransportServer(handler)
    port = await first_server.start()
    client = client_for(first_server, backoff_s=0.05)
    stream = client.subscribe("live", from_version=1)
    assert (await anext(stream))[0] == 1
    await first_server.stop(0)  # the link drops while the client holds version 1
    handler.versions["lm"][6] = b"six"  # published while the link was down
    second_server = TransportServer(handler, port=port)
    await second_server.start()
    try:
        # Some of 2..5 may still arrive on the first stream; the rest after reconnecting,
        # with no gap and no duplicate.
        assert [(await anext(stream))[0] for _ in range(5)] == [2, 3, 4, 5, 6]
    finally:
        await stream.aclose()
        await client.close()
        handler.release.set()
        await second_server.stop(0)
    (first, resumed) = handler.subscriptions
    assert first == ("live", 1)
    assert resumed[0] == "live"
    assert 2 <= resumed[1] <= 6
    assert client.stats.retries >= 1


async def test_subscribe_idle_timeout(server, client):
    with pytest.raises(DeadlineExceededError):
        async for _ in client.subscribe("quiet", 0, idle_timeout_s=0.2, retries=0):
            pass


async def test_fetch_reassembles_a_multi_chunk_snapshot(server, client, handler):
    data = await client.fetch("lm", 7)
    assert data == handler.snapshots["lm", 7]
    assert server.stats.bytes_sent == client.stats.bytes_received == 10_000  # 10 chunks
    assert await client.fetch("lm", 0) == b""


@pytest.mark.parametrize(
    ("call", "error", "code", "text"),
    [
        ("push", StaleError, "FAILED_PRECONDITION", "9 versions behind"),
        ("fetch", NotFoundError, "NOT_FOUND", "has no version 8"),
    ],
)
async def test_rejections_come_back_typed_with_the_message(server, client, call, error, code, text):
    with pytest.raises(error) as info:
        if call == "push":
            await client.push(b"delta", metadata={"test": "stale"})
        else:
            await client.fetch("lm", 8)
    assert isinstance(info.value, RemoteRejected)
    assert info.value.code is grpc.StatusCode[code]
    assert info.value.reason == error.reason
    assert text in info.value.message
    assert client.stats.retries == 0


async def test_unexpected_handler_error_is_internal_and_the_server_keeps_serving(
    server, client, handler
):
    with pytest.raises(RemoteError) as info:
        await client.fetch("boom", 1)
    assert info.value.code is grpc.StatusCode.INTERNAL
    assert not isinstance(info.value, RemoteRejected)
    assert "ZeroDivisionError" in info.value.message
    assert "a bug" not in info.value.message  # internals stay in the server log
    assert server.stats.internal_errors == 1
    assert await client.fetch("lm", 7) == handler.snapshots["lm", 7]


async def test_oversized_push_is_refused_before_it_is_read(handler):
    server = TransportServer(handler, max_upload_bytes=1 * MiB)
    await server.start()
    client = client_for(server, chunk_size=256 * 1024)
    try:
        with pytest.raises(OversizeError) as info:
            await client.push(b"z" * (8 * MiB))
    finally:
        await client.close()
        await server.stop(0)
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "exceeds the limit of 1048576 bytes" in info.value.message
    assert server.stats.bytes_accepted == server.stats.bytes_received == 0
    assert client.stats.bytes_sent < 8 * MiB
    assert handler.pushes == []


async def raw_push(server, *messages: pb.PushChunk):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        return await pb_grpc.TransportStub(channel).Push(iter(messages), timeout=5)


def header(data: bytes, **fields) -> pb.PushChunk:
    base = {
        "upload_id": "raw",
        "protocol_version": PROTOCOL_VERSION,
        "total_size": len(data),
        "blob_digest": digest(data),
        "offset": 0,
        "data": data,
        "chunk_digest": digest(data),
    }
    return pb.PushChunk(**{**base, **fields})


async def test_wrong_chunk_digest_is_refused_with_data_loss(server, handler):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_push(server, header(b"payload", chunk_digest=digest(b"tampered")))
    assert info.value.code() is grpc.StatusCode.DATA_LOSS
    assert isinstance(remote_error(info.value), DigestMismatchError)
    assert handler.pushes == []
    assert server.stats.rejected == {"digest": 1}


async def test_wrong_chunk_crc32_is_refused_with_data_loss(server, handler):
    bad = zlib.crc32(b"payload") ^ 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_push(server, header(b"payload", chunk_digest=b"", chunk_crc32=bad))
    assert info.value.code() is grpc.StatusCode.DATA_LOSS
    assert handler.pushes == []
    ok = header(b"payload", upload_id="crc", chunk_digest=b"", chunk_crc32=zlib.crc32(b"payload"))
    assert (await raw_push(server, ok)).received_bytes == 7
    assert handler.pushes == [("crc", b"payload", {})]


async def test_chunk_without_any_check_is_malformed(server, handler):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_push(server, header(b"payload", chunk_digest=b""))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(remote_error(info.value), MalformedError)
    assert "carries no check" in info.value.details()
    assert handler.pushes == []


async def test_whole_blob_digest_mismatch_is_data_loss_and_the_upload_starts_over(
    server, client, handler
):
    blob = os.urandom(3 * MiB)  # big enough for the worker-thread path
    chunks = [
        header(
            blob[i : i + 1000],
            upload_id="torn",
            total_size=len(blob),
            blob_digest=digest(b"another blob"),
            offset=i,
            chunk_digest=b"",
            chunk_crc32=zlib.crc32(blob[i : i + 1000]),
        )
        for i in range(0, 5000, 1000)
    ]
    last = header(
        blob[5000:],
        upload_id="torn",
        total_size=len(blob),
        blob_digest=digest(b"another blob"),
        offset=5000,
        chunk_digest=b"",
        chunk_crc32=zlib.crc32(blob[5000:]),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_push(server, *chunks, last)
    assert info.value.code() is grpc.StatusCode.DATA_LOSS
    assert "whole-blob digest mismatch" in info.value.details()
    assert handler.pushes == []
    query = pb.UploadQuery(upload_id="torn", protocol_version=PROTOCOL_VERSION)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        state = await pb_grpc.TransportStub(channel).UploadStatus(query, timeout=5)
    assert not state.known  # forgotten: the same upload id starts over, and then succeeds
    assert await client.push(blob, upload_id="torn") == {"sequence": "1", "size": str(3 * MiB)}
    assert handler.pushes[0][1] == blob


async def test_subscribers_of_a_version_share_one_split_and_digest(server, handler):
    handler.versions["lm"][3] = os.urandom(2 * MiB)  # past the worker-thread threshold
    clients = [client_for(server) for _ in range(4)]
    try:

        async def versions(client):
            return [item async for item in client.subscribe("lm", from_version=1)]

        got = await asyncio.gather(*(versions(c) for c in clients))
    finally:
        for c in clients:
            await c.close()
    want = sorted(handler.versions["lm"].items())
    assert all(received == want for received in got)
    assert server._servicer.sent_chunks.builds == len(want)  # once per version, not per stream
    assert server.stats.bytes_sent == 4 * sum(len(d) for _, d in want)


async def test_fetch_reuses_messages_only_for_the_same_bytes(server, client, handler):
    first = await client.fetch("lm", 7)
    assert await client.fetch("lm", 7) == first
    assert server._servicer.sent_chunks.builds == 1
    handler.snapshots["lm", 7] = os.urandom(10_000)  # same key, new bytes: never served stale
    assert await client.fetch("lm", 7) == handler.snapshots["lm", 7] != first
    assert server._servicer.sent_chunks.builds == 2


async def test_chunk_at_a_wrong_offset_names_the_expected_offset(server):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_push(server, header(b"payload", offset=4))
    assert info.value.code() is grpc.StatusCode.OUT_OF_RANGE
    assert "offset 4, expected offset 0" in info.value.details()


class ReportingHandler(MemoryHandler):
    """The memory handler that also takes reports (an aggregator's dashboard summaries)."""

    def __init__(self):
        super().__init__()
        self.reports: list[bytes] = []

    async def on_report(self, data):
        if data == b"bad":
            raise MalformedError("not a summary")
        self.reports.append(data)
        return {"status": "kept", "size": len(data)}


async def test_report_reaches_the_handler_and_bad_ones_come_back_typed(server, client):
    with pytest.raises(NotFoundError, match="takes no reports"):  # a handler without on_report
        await client.report(b"summary", retries=0)
    handler = ReportingHandler()
    reporting = TransportServer(handler, chunk_size=1000, max_report_bytes=1000)
    await reporting.start()
    try:
        async with client_for(reporting) as c:
            assert await c.report(b"summary", retries=0) == {"status": "kept", "size": "7"}
            with pytest.raises(MalformedError, match="not a summary"):
                await c.report(b"bad", retries=0)
            with pytest.raises(OversizeError, match="at most 1000"):  # before the handler
                await c.report(b"x" * 1001, retries=0)
            with pytest.raises(ProtocolVersionError):
                await client_for(reporting, protocol_version=PROTOCOL_VERSION + 1).report(b"s")
            assert await c.report(b"again", retries=0) == {"status": "kept", "size": "5"}
    finally:
        await reporting.stop(0)
    assert handler.reports == [b"summary", b"again"] and handler.pushes == []
    assert reporting.stats.rejected == {"malformed": 1, "oversize": 1, "protocol_version": 1}


async def test_protocol_version_mismatch_names_both_versions(server, handler):
    other = PROTOCOL_VERSION + 1
    client = client_for(server, protocol_version=other)
    for call in (client.fetch("lm", 7), client.push(b"data")):
        with pytest.raises(ProtocolVersionError) as info:
            await call
        assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert f"peer speaks {other}" in info.value.message
        assert f"server speaks {PROTOCOL_VERSION}" in info.value.message
    with pytest.raises(grpc.aio.AioRpcError) as raw:
        await raw_push(server, header(b"data", protocol_version=other))
    assert raw.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    await client.close()
    assert handler.pushes == []


def self_signed(common_name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def test_mutual_tls_push_and_fetch(handler):
    server_cert, server_key = self_signed("aggregator")
    client_cert, client_key = self_signed("island")
    server = TransportServer(handler, tls=ServerTLS(server_cert, server_key, client_cert))
    await server.start()
    address = f"localhost:{server.port}"
    good = TransportClient(address, ClientTLS(server_cert, client_cert, client_key))
    no_cert = TransportClient(address, ClientTLS(server_cert), deadline_s=2, retries=0)
    plaintext = TransportClient(address, deadline_s=2, retries=0)
    try:
        assert await good.push(b"secret delta", upload_id="tls") == {"sequence": "1", "size": "12"}
        assert await good.fetch("lm", 7) == handler.snapshots["lm", 7]
        for refused in (no_cert, plaintext):
            with pytest.raises(LinkError):
                await refused.push(b"intruder")
    finally:
        for client in (good, no_cert, plaintext):
            await client.close()
        await server.stop(0)
    assert [upload_id for upload_id, _, _ in handler.pushes] == ["tls"]


async def test_hung_fetch_raises_a_typed_timeout_quickly(server):
    client = client_for(server, deadline_s=0.3)
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="hang@1"):
        await client.fetch("hang", 1, retries=0)
    assert time.monotonic() - start < 3
    await client.close()


async def test_unreachable_server_is_a_link_error_after_retries():
    client = TransportClient("127.0.0.1:1", deadline_s=1, retries=2, backoff_s=0.01)
    with pytest.raises(LinkError, match="gave up after 3 attempt"):
        await client.push(b"nobody home")
    assert client.stats.retries == 2
    await client.close()


def test_sync_caller_pushes_through_a_loop_thread(handler):
    with LoopThread() as loop_thread:
        server = TransportServer(handler)
        port = loop_thread.run(server.start(), timeout=10)
        client = TransportClient(f"127.0.0.1:{port}")
        future = loop_thread.submit(client.push(b"from the training loop", upload_id="sync"))
        assert future.result(timeout=10) == {"sequence": "1", "size": "22"}
        loop_thread.run(client.close(), timeout=5)
        loop_thread.run(server.stop(0), timeout=5)
    assert handler.pushes[0][1] == b"from the training loop"


class EndlessVersions:
    """Publishes a multi-chunk version after another, without end, to every subscriber."""

    def __init__(self, size: int):
        self.blob = os.urandom(size)

    async def subscribe(self, model_id, from_version):
        version = from_version
        while True:
            yield version, self.blob
            version += 1
            await asyncio.sleep(0)


async def test_cancelled_subscribers_all_stop_while_versions_stream():
    # asyncio.wait_for (Python 3.11) returns a read that completes just as the task is
    # cancelled, swallowing the cancellation: the subscription then runs on forever. With
    # 64 KiB chunks of 256 KiB versions, about a quarter of the cancellations land so.
    server = TransportServer(EndlessVersions(256 * 1024), chunk_size=64 * 1024)
    await server.start()
    client = client_for(server, chunk_size=64 * 1024)
    received = 0

    async def consume():
        nonlocal received
        async for _ in client.subscribe("lm", from_version=1, idle_timeout_s=10):
            received += 1

    leaked = 0
    try:
        for _ in range(5):
            tasks = [asyncio.create_task(consume()) for _ in range(64)]
            while received < 64:  # all streams are busy
                await asyncio.sleep(0.01)
            for task in tasks:
                task.cancel()
            # a cancelled subscription stops in milliseconds; a leaked one never: the wait is
            # long so that a loaded machine's slow cancellations are not counted as leaks
            _, running = await asyncio.wait(tasks, timeout=10)
            leaked += len(running)
            while running:  # stop the leaked ones so that the next round starts clean
                for task in running:
                    task.cancel()
                _, running = await asyncio.wait(running, timeout=0.1)
            received = 0
    finally:
        await client.close()
        await server.stop(0)
    assert leaked == 0, f"{leaked} of 320 cancelled subscriptions kept running"
