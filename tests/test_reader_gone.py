"""A reader that goes away in the middle of a version (a failed write, or the handler
cancelled when gRPC saw the reset first): one INFO line, no error, and the
server keeps serving (comms/transport/server.py)."""

import asyncio
import logging
import os

import grpc
import pytest

from comms import PROTOCOL_VERSION
from comms.proto import archipelago_pb2 as pb
from comms.proto import archipelago_pb2_grpc as pb_grpc
from comms.transport import TransportClient, TransportServer

MiB = 1 << 20
CHUNK = 5 * MiB  # above a default gRPC channel's 4 MiB receive limit


class Versions:
    """Three-chunk versions, one after another, to every subscriber; fetch of any version."""

    def __init__(self):
        self.blob = os.urandom(3 * CHUNK - 7)

    async def subscribe(self, model_id, from_version):
        version = max(1, from_version)
        while True:
            yield version, self.blob
            version += 1
            await asyncio.sleep(0)

    async def fetch(self, model_id, version):
        return self.blob


async def _read_then_leave(port: int, how: str, method: str) -> None:
    if how == "small_limit":  # a reader whose channel refuses the server's chunk size
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    else:
        opts = [("grpc.max_receive_message_length", 64 * MiB)]
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts)
    stub = pb_grpc.TransportStub(channel)
    if method == "Subscribe":
        call = stub.Subscribe(
            pb.SubscribeRequest(model_id="m", from_version=1, protocol_version=PROTOCOL_VERSION)
        )
    else:
        call = stub.Fetch(
            pb.FetchRequest(model_id="m", version=1, protocol_version=PROTOCOL_VERSION)
        )
    try:
        async for _ in call:  # leave after the first chunk of the first version
            break
    except grpc.aio.AioRpcError:
        pass  # the small-limit reader's own side gives up
    if how == "cancel":
        call.cancel()
    await channel.close(grace=None)


@pytest.mark.parametrize("method", ["Subscribe", "Fetch"])
async def test_a_reader_leaving_mid_version_logs_no_error_and_the_server_serves_on(caplog, method):
    caplog.set_level(logging.DEBUG)
    server = TransportServer(Versions(), chunk_size=CHUNK, max_message_bytes=16 * MiB)
    port = await server.start()
    try:
        for how in ("small_limit", "cancel", "close", "small_limit"):
            await _read_then_leave(port, how, method)
        await asyncio.sleep(0.5)  # let the server notice every departure
        async with TransportClient(
            f"127.0.0.1:{port}", chunk_size=CHUNK, max_message_bytes=16 * MiB, deadline_s=20
        ) as client:  # and it serves on
            async for version, data in client.subscribe("m", from_version=4):
                assert (version, len(data)) == (4, 3 * CHUNK - 7)
                break
            assert len(await client.fetch("m", 1)) == 3 * CHUNK - 7
    finally:
        await server.stop(0)
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == []
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert gone and all(r.levelno == logging.INFO for r in gone)
    assert server.stats.readers_gone >= 1
