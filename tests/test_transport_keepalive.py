"""Keepalive on loopback: a link cut without a reset is found dead and calls resume soon after
it is mended; a server permits the pings of a client with the same ``Keepalive``.

The cut is a TCP proxy between client and server (``CuttableLink``). Cut, it keeps both
connections open and drops every byte either way, as behind a route that vanished: nothing is
reset, no FIN arrives. A connection that lost bytes stays silent after the link is mended,
standing for TCP's retransmission, which backs off exponentially during a cut and gets
through only up to minutes later (about 30 s after the chaos run's 30-s cut); here it never
does, so only a client that gives up on the connection itself gets through.
"""

import asyncio
import functools
import itertools
import time

from comms.errors import NotFoundError
from comms.transport import Keepalive, TransportClient, TransportServer

# Scaled down from DEFAULT_KEEPALIVE (10 s, 10 s) so that the test takes seconds; both ends
# get the same one, as the daemons do.
FAST = Keepalive(time_s=1.0, timeout_s=1.0)
CUT_S = 3 * (FAST.time_s + FAST.timeout_s)  # long enough to find two connections dead
# After the mend: at most one connection opened during the cut is still to be found dead
# (time + timeout), then the client's backoff (under 1 s here) and a reconnect; the rest is
# room for a loaded CI machine. Without keepalive the calls never resume (see the docstring).
RECOVERY_BOUND_S = FAST.time_s + FAST.timeout_s + 6.0


class CuttableLink:
    """A loopback TCP proxy to ``127.0.0.1:target_port`` whose link can be cut and mended."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.is_cut = False
        self.opened = 0  # connections the client opened
        self.given_up = {"client": 0, "server": 0}  # silent connections an end closed
        self._listener: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._listener = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        return self._listener.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._listener is not None:
            self._listener.close()

    async def _connect(self, client_r, client_w) -> None:
        self.opened += 1
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [client_w, server_w]
        link = {"silent": False}
        await asyncio.gather(
            self._pipe(client_r, server_w, link, "client"),
            self._pipe(server_r, client_w, link, "server"),
        )

    async def _pipe(self, src, dst, link: dict, side: str) -> None:
        """Forward ``side``'s bytes; while cut, drop them, and the connection stays silent.
        A close is passed on only on a connection that lost nothing."""
        try:
            while data := await src.read(65536):
                if self.is_cut or link["silent"]:
                    link["silent"] = True
                    continue
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        if link["silent"]:
            self.given_up[side] += 1
        else:
            dst.close()


class LiveVersions:
    """A real handler: versions published while subscribers wait, pushes held until released."""

    def __init__(self):
        self.versions: dict[int, bytes] = {}
        self.published = asyncio.Condition()
        self.pushes: list[str] = []
        self.release_pushes = asyncio.Event()

    async def publish(self, version: int, data: bytes) -> None:
        async with self.published:
            self.versions[version] = data
            self.published.notify_all()

    async def subscribe(self, model_id, from_version):
        for version in itertools.count(from_version):
            async with self.published:
                await self.published.wait_for(
                    functools.partial(self.versions.__contains__, version)
                )
            yield version, self.versions[version]

    async def on_push(self, upload_id, data, metadata):
        self.pushes.append(upload_id)
        await self.release_pushes.wait()  # e.g. an aggregator's fsync; the ack comes after
        return {"status": "accepted", "pushes": len(self.pushes)}

    async def fetch(self, model_id, version):
        raise NotFoundError(f"no snapshots here ({model_id}@{version})")


async def _served(handler, keepalive: Keepalive) -> tuple[TransportServer, CuttableLink, str]:
    server = TransportServer(handler, keepalive=keepalive)
    link = CuttableLink(await server.start())
    return server, link, f"127.0.0.1:{await link.start()}"


async def test_a_cut_link_is_found_dead_and_a_push_and_a_subscription_resume_once_mended():
    handler = LiveVersions()
    await handler.publish(1, b"v1" * 1000)
    server, link, address = await _served(handler, FAST)
    # retries: a cut fails an attempt every time + timeout; the island's engine would requeue
    client = TransportClient(address, keepalive=FAST, retries=20, max_backoff_s=0.5)
    versions = client.subscribe("lm", from_version=1)
    calls: list[asyncio.Task] = []
    try:
        async with asyncio.timeout(10):
            assert (await anext(versions))[0] == 1
            push = asyncio.create_task(client.push(b"delta" * 1000, upload_id="delta-1"))
            calls.append(push)
            while not handler.pushes:  # the server holds the whole push; its ack is to come
                await asyncio.sleep(0.01)
        next_version = asyncio.create_task(anext(versions))
        calls.append(next_version)

        link.is_cut = True
        handler.release_pushes.set()  # the ack goes into the cut link
        await handler.publish(2, b"v2" * 1000)  # and so does version 2
        await asyncio.sleep(CUT_S)
        assert not push.done() and not next_version.done()

        link.is_cut = False
        mended = time.monotonic()
        try:
            async with asyncio.timeout(RECOVERY_BOUND_S):
                ack = await push
                version, data = await next_version
        except TimeoutError:
            raise AssertionError(
                f"the push and the subscription did not resume within {RECOVERY_BOUND_S} s "
                f"of the mend (silent connections closed: {link.given_up})"
            ) from None
        recovery_s = time.monotonic() - mended
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await versions.aclose()
        await client.close()
        await server.stop(0)
        await link.close()
    print(f"recovery after the mend: {recovery_s:.2f} s (bound {RECOVERY_BOUND_S:.1f} s)")
    assert link.given_up["client"] >= 1, "the client kept a silent connection"
    assert link.given_up["server"] >= 1, "the server kept a silent reader"
    assert (version, data) == (2, b"v2" * 1000)
    assert ack == {"status": "accepted", "pushes": "1"}  # the server's answer to the first try
    assert handler.pushes == ["delta-1"]  # delivered once: the retry was answered, not merged
    assert client.stats.retries >= 2  # the push and the subscription each failed over


async def test_a_server_permits_the_pings_of_a_client_with_the_same_keepalive():
    # A client pinging more often than its server allows is sent GOAWAY too_many_pings after
    # two strikes and reconnects: a second connection through the proxy.
    keepalive = Keepalive(time_s=0.2, timeout_s=1.0)
    handler = LiveVersions()
    await handler.publish(1, b"v1")
    server, link, address = await _served(handler, keepalive)
    client = TransportClient(address, keepalive=keepalive, retries=0)
    try:
        async with asyncio.timeout(10):
            versions = client.subscribe("lm", from_version=1)
            assert (await anext(versions))[0] == 1
            await versions.aclose()
            await asyncio.sleep(15 * keepalive.time_s)  # an idle channel: about 15 pings
            versions = client.subscribe("lm", from_version=1)
            assert (await anext(versions))[0] == 1
            await versions.aclose()
    finally:
        await client.close()
        await server.stop(0)
        await link.close()
    assert link.opened == 1
