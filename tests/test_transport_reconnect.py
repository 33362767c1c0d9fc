"""A peer back from a restart is reached soon: the client's reconnect backoff is capped.

gRPC backs off between connection attempts (1 s, then x1.6 per failure, up to 120 s) and fails
every call at once until its next attempt, however often the caller retries. Measured on
loopback with gRPC's defaults: after a server was down 15 or 30 s, a client retrying every
0.2 s reached it again 10.7 and 9.9 s after it was back. The transport caps the backoff
(``comms.transport.options.RECONNECT_BACKOFF_S``, 2 s at most), so a leaf finds its restarted
root, and an island its leaf, within about 2 s.
"""

import asyncio
import socket
import time

import pytest

from comms.errors import LinkError, NotFoundError
from comms.transport import TransportClient, TransportServer
from comms.transport.options import RECONNECT_BACKOFF_S

pytestmark = pytest.mark.slow

# Long enough that gRPC's default backoff has grown past 10 s (attempts about 15.9 and 26.4 s
# after the first failure, +-20% jitter): without the cap the next attempt comes 5 to 15 s
# after the server is back.
DOWN_S = 16.5
# The capped backoff (2 s) and a call, with room for a loaded machine.
REACHED_WITHIN_S = RECONNECT_BACKOFF_S[1] + 2.5


class NoSnapshots:
    async def fetch(self, model_id, version):
        raise NotFoundError(f"no snapshots here ({model_id}@{version})")

    async def subscribe(self, model_id, from_version):
        return
        yield

    async def on_push(self, upload_id, data, metadata):
        return {"status": "accepted"}


def _reserved_port() -> socket.socket:
    """A port kept from other processes while the server is down (a port found free and
    closed could be taken during the outage): bound, not listening, so a dial is refused as
    at a closed port, with SO_REUSEPORT, which gRPC's listener sets too when it binds it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    return s


async def test_a_client_reaches_a_server_back_from_a_long_outage_within_the_capped_backoff():
    placeholder = _reserved_port()
    port = placeholder.getsockname()[1]
    client = TransportClient(f"127.0.0.1:{port}", retries=0)
    server, up_at, failures = None, None, 0
    started = time.monotonic()
    try:
        while True:
            if server is None and time.monotonic() - started >= DOWN_S:
                server = TransportServer(NoSnapshots(), port=port)
                await server.start()
                placeholder.close()
                up_at = time.monotonic()
            try:
                await client.fetch("global", -1, retries=0)
            except NotFoundError:  # the server's answer: reached
                break
            except LinkError:
                failures += 1
            if up_at is not None:
                assert time.monotonic() - up_at < 30.0, "never reached the server"
            await asyncio.sleep(0.2)
        reached_after = time.monotonic() - up_at
    finally:
        placeholder.close()
        await client.close()
        if server is not None:
            await server.stop(0)
    assert failures >= 20  # the outage was seen, call after call
    assert reached_after <= REACHED_WITHIN_S, (
        f"reached {reached_after:.1f} s after the server came back"
    )
