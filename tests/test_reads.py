"""Signed reads: the ReadGuard by hand (injected clock), then Fetch and Subscribe through real
gRPC servers on loopback with real keys."""

import logging
import os
import time

import grpc
import pytest

from comms import PROTOCOL_VERSION
from comms.errors import ReadDeniedError, TooManyReadsError
from comms.identity import Identity, Roster
from comms.proto import archipelago_pb2 as pb
from comms.proto import archipelago_pb2_grpc as pb_grpc
from comms.reads import NONCE_BYTES, ReadAuth, ReadGuard, read_signing_bytes, sign_read
from comms.transport import (
    RemoteRejected,
    SupersededError,
    TransportClient,
    TransportServer,
    remote_error,
)

T0 = 1_800_000_000.0  # a fixed wall-clock time for the guard's injected clock


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keys():
    island, admin, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    roster = Roster()
    roster.add(island.public_key, "island", "island0")
    roster.add(admin.public_key, "admin", "ops")
    return island, admin, stranger, roster


def signed(identity, method="Fetch", model_id="lm", version=-1, at=T0):
    return sign_read(identity, method, model_id, version, clock=lambda: at)


def refused(guard, *args) -> ReadDeniedError:
    with pytest.raises(ReadDeniedError) as info:
        guard.check(*args)
    return info.value


# ---------------------------------------------------------------- the guard, by hand


def test_roster_members_of_any_role_are_admitted_once(keys):
    island, admin, _, roster = keys
    guard = ReadGuard(roster, clock=Clock())
    assert guard.check("Fetch", "lm", -1, signed(island)) == island.peer_id
    auth = signed(admin, "Subscribe", "lm", 5)
    assert guard.check("Subscribe", "lm", 5, auth) == admin.peer_id
    err = refused(guard, "Subscribe", "lm", 5, auth)  # the very same request again
    assert err.reason == "read_replay"
    assert "replayed request" in str(err) and "sign every request afresh" in str(err)
    assert len(guard) == 2


def test_unsigned_and_unknown_readers_are_told_what_to_do(keys):
    _, _, stranger, roster = keys
    guard = ReadGuard(roster, clock=Clock())
    err = refused(guard, "Fetch", "lm", -1, None)
    assert err.reason == "unsigned" and err.grpc_code == "PERMISSION_DENIED"
    assert "unsigned" in str(err) and "public_read = true" in str(err)
    assert "identity" in str(err)
    err = refused(guard, "Fetch", "lm", -1, signed(stranger))
    assert err.reason == "unknown_reader"
    assert stranger.peer_id in str(err) and "add its public key" in str(err)


@pytest.mark.parametrize(
    "field, value",
    [("model_id", "other"), ("version", 3), ("method", "Subscribe")],
)
def test_a_request_altered_after_signing_is_refused(keys, field, value):
    island, _, _, roster = keys
    guard = ReadGuard(roster, clock=Clock())
    auth = signed(island, "Fetch", "lm", -1)
    call = {"method": "Fetch", "model_id": "lm", "version": -1, field: value}
    err = refused(guard, call["method"], call["model_id"], call["version"], auth)
    assert err.reason == "bad_read_signature"
    assert "altered after signing" in str(err)


def test_forged_fields_of_the_auth_itself_are_refused(keys):
    island, admin, _, roster = keys
    guard = ReadGuard(roster, clock=Clock())
    auth = signed(island)
    forgeries = [
        ReadAuth(admin.peer_id, auth.timestamp_ms, auth.nonce, auth.signature),  # other sender
        ReadAuth(island.peer_id, auth.timestamp_ms + 1, auth.nonce, auth.signature),
        ReadAuth(island.peer_id, auth.timestamp_ms, os.urandom(NONCE_BYTES), auth.signature),
        ReadAuth(island.peer_id, auth.timestamp_ms, auth.nonce, auth.signature[:-1]),
    ]
    for forged in forgeries:
        assert refused(guard, "Fetch", "lm", -1, forged).reason == "bad_read_signature"
    # a short nonce is refused even when properly signed
    body = read_signing_bytes("Fetch", "lm", -1, island.peer_id, auth.timestamp_ms, b"n")
    short = ReadAuth(island.peer_id, auth.timestamp_ms, b"n", island.sign(body))
    assert "nonce is 1 bytes" in str(refused(guard, "Fetch", "lm", -1, short))
    assert guard.check("Fetch", "lm", -1, auth) == island.peer_id  # the genuine one still works


def test_timestamps_outside_the_window_are_refused_either_way(keys):
    island, _, _, roster = keys
    clock = Clock()
    guard = ReadGuard(roster, window_s=120, clock=clock)
    err = refused(guard, "Fetch", "lm", -1, signed(island, at=T0 - 121))
    assert err.reason == "read_expired" and "signed 121 s ago" in str(err)
    err = refused(guard, "Fetch", "lm", -1, signed(island, at=T0 + 121))
    assert err.reason == "read_future" and "121 s ahead" in str(err)
    assert "NTP" in str(err)
    # skew up to the window is tolerated both ways
    assert guard.check("Fetch", "lm", -1, signed(island, at=T0 - 120)) == island.peer_id
    assert guard.check("Fetch", "lm", -1, signed(island, at=T0 + 119.5)) == island.peer_id


def test_nonces_are_forgotten_once_the_window_refuses_their_replay(keys):
    island, _, _, roster = keys
    clock = Clock()
    guard = ReadGuard(roster, window_s=10, clock=clock)
    auth = signed(island)
    guard.check("Fetch", "lm", -1, auth)
    clock.now = T0 + 10  # still inside the window: the nonce is remembered
    assert refused(guard, "Fetch", "lm", -1, auth).reason == "read_replay"
    assert len(guard) == 1
    clock.now = T0 + 10.5  # outside: the window refuses it, the nonce may go
    assert refused(guard, "Fetch", "lm", -1, auth).reason == "read_expired"
    guard.check("Fetch", "lm", -1, signed(island, at=clock.now))
    assert len(guard) == 1  # the old nonce was dropped when the new one came in


def test_a_clock_stepping_back_does_not_let_a_forgotten_nonce_be_replayed(keys):
    """Nonces go by the latest time the clock has shown: after the clock steps back (an NTP
    correction), a request whose nonce was forgotten is still refused, as expired."""
    island, _, _, roster = keys
    clock = Clock()
    guard = ReadGuard(roster, window_s=120, clock=clock)
    first = signed(island, at=T0)
    guard.check("Fetch", "lm", -1, first)
    clock.now = T0 + 121
    guard.check("Fetch", "lm", -1, signed(island, at=clock.now))  # forgets the first nonce
    assert len(guard) == 1
    clock.now = T0 + 119  # stepped back 2 s: the first request is inside the current window
    err = refused(guard, "Fetch", "lm", -1, first)
    assert err.reason == "read_expired"
    assert "stepped back 2 s" in str(err) and "NTP" in str(err)
    # fresh requests are still admitted, on either clock's time within the window
    assert guard.check("Fetch", "lm", -1, signed(island, at=clock.now)) == island.peer_id
    assert guard.check("Fetch", "lm", -1, signed(island, at=T0 + 2)) == island.peer_id
    # the future side follows the current clock
    assert refused(guard, "Fetch", "lm", -1, signed(island, at=T0 + 240)).reason == "read_future"


def test_full_nonce_tables_refuse_rather_than_forget(keys):
    island, admin, _, roster = keys
    clock = Clock()
    guard = ReadGuard(roster, window_s=10, clock=clock, max_nonces=3, max_nonces_per_sender=2)
    for _ in range(2):
        guard.check("Fetch", "lm", -1, signed(island))
    with pytest.raises(TooManyReadsError) as info:  # this reader's share is used up
        guard.check("Fetch", "lm", -1, signed(island))
    assert info.value.grpc_code == "RESOURCE_EXHAUSTED"
    assert "limit 2 per reader" in str(info.value)
    guard.check("Fetch", "lm", -1, signed(admin))  # others still read
    with pytest.raises(TooManyReadsError, match="3 signed reads within 20 s"):
        guard.check("Fetch", "lm", -1, signed(admin))
    clock.now = T0 + 11  # the window moved on: room again
    guard.check("Fetch", "lm", -1, signed(island, at=clock.now))
    assert len(guard) == 1


def test_public_models_need_no_signature_and_an_empty_roster_admits_nobody(keys):
    island, _, _, _ = keys
    guard = ReadGuard(Roster(), public_models=["open"], clock=Clock())
    assert guard.check("Fetch", "open", -1, None) is None
    assert guard.check("Subscribe", "open", 1, None) is None
    assert refused(guard, "Fetch", "lm", -1, signed(island)).reason == "unknown_reader"


def test_guard_arguments_are_checked(keys):
    roster = keys[3]
    with pytest.raises(ValueError, match="window_s"):
        ReadGuard(roster, window_s=0)
    with pytest.raises(ValueError, match="max_nonces_per_sender"):
        ReadGuard(roster, max_nonces=5, max_nonces_per_sender=6)
    with pytest.raises(ValueError, match="method"):
        sign_read(keys[0], "Push", "lm", 1)


# ---------------------------------------------------------------- through gRPC


class Models:
    """A handler serving model "lm" (versions 1-3, snapshot at -1) and "open"; the first
    ``fail_first`` reads fail with a retryable status (ABORTED) after any versions sent."""

    def __init__(self, fail_first: int = 0):
        self.versions = {v: bytes([v]) * (1500 + v) for v in range(1, 4)}
        self.snapshot = os.urandom(5000)
        self.fail_first = fail_first
        self.reads = 0

    def _maybe_fail(self):
        self.reads += 1
        if self.reads <= self.fail_first:
            raise SupersededError("the link dropped (test)")

    async def on_push(self, upload_id, data, metadata):
        return {}

    async def subscribe(self, model_id, from_version):
        for v in range(max(1, from_version), 4):
            yield v, self.versions[v]
            if v == 1:
                self._maybe_fail()

    async def fetch(self, model_id, version):
        self._maybe_fail()
        return self.snapshot


@pytest.fixture
async def served(keys):
    handler = Models()
    guard = ReadGuard(keys[3], public_models=["open"])
    server = TransportServer(handler, chunk_size=1000, read_guard=guard)
    await server.start()
    yield server, handler, guard
    await server.stop(0)


def client_for(server, identity=None, **kwargs) -> TransportClient:
    kwargs = {"deadline_s": 10.0, "backoff_s": 0.01, **kwargs}
    return TransportClient(f"127.0.0.1:{server.port}", identity=identity, **kwargs)


async def test_a_roster_member_fetches_and_subscribes(served, keys):
    server, handler, guard = served
    async with client_for(server, keys[0]) as client:
        assert await client.fetch("lm", -1) == handler.snapshot
        got = [item async for item in client.subscribe("lm", 1)]
    assert got == sorted(handler.versions.items())
    assert len(guard) == 2


@pytest.mark.parametrize("method", ["fetch", "subscribe"])
async def test_unsigned_and_unknown_reads_are_permission_denied(served, keys, method, caplog):
    caplog.set_level(logging.INFO, logger="comms.transport")
    server, handler, _ = served
    for identity, reason in ((None, "unsigned"), (keys[2], "unknown_reader")):
        async with client_for(server, identity) as client:
            with pytest.raises(ReadDeniedError) as info:
                if method == "fetch":
                    await client.fetch("lm", -1)
                else:
                    [item async for item in client.subscribe("lm", 1)]
        err = info.value
        assert isinstance(err, RemoteRejected)
        assert err.code is grpc.StatusCode.PERMISSION_DENIED and err.reason == reason
        assert ("public_read" in err.message) == (reason == "unsigned")
    assert handler.reads == 0
    assert server.stats.rejected == {"unsigned": 1, "unknown_reader": 1}
    assert "refused a read from ipv4:127.0.0.1" in caplog.text  # the operator sees who


async def test_a_public_model_is_read_unsigned(served):
    server, handler, _ = served
    async with client_for(server) as client:
        assert await client.fetch("open", -1) == handler.snapshot
        assert len([item async for item in client.subscribe("open", 2)]) == 2


async def raw_fetch(server, request: pb.FetchRequest) -> bytes:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = pb_grpc.TransportStub(channel).Fetch(request, timeout=5)
        return b"".join([msg.data async for msg in call])


def fetch_request(auth: ReadAuth, model_id="lm", version=-1) -> pb.FetchRequest:
    return pb.FetchRequest(
        model_id=model_id,
        version=version,
        protocol_version=PROTOCOL_VERSION,
        auth=pb.ReadAuth(
            sender=auth.sender,
            timestamp_ms=auth.timestamp_ms,
            nonce=auth.nonce,
            signature=auth.signature,
        ),
    )


async def denied(server, request) -> ReadDeniedError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_fetch(server, request)
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    err = remote_error(info.value)
    assert isinstance(err, ReadDeniedError)
    return err


async def test_a_captured_request_cannot_be_replayed(served, keys):
    server, handler, _ = served
    request = fetch_request(sign_read(keys[0], "Fetch", "lm", -1))
    assert await raw_fetch(server, request) == handler.snapshot
    err = await denied(server, request)
    assert err.reason == "read_replay" and "replayed request" in err.message
    assert handler.reads == 1


async def test_tampered_expired_and_future_requests_are_denied(served, keys):
    server, handler, _ = served
    island = keys[0]
    for model_id, version in (("other", -1), ("lm", 2)):  # signed for "lm" at -1
        request = fetch_request(sign_read(island, "Fetch", "lm", -1), model_id, version)
        assert (await denied(server, request)).reason == "bad_read_signature"
    for offset, reason in ((-300, "read_expired"), (300, "read_future")):
        auth = sign_read(island, "Fetch", "lm", -1, clock=lambda o=offset: time.time() + o)
        err = await denied(server, fetch_request(auth))
        assert err.reason == reason and "120 s window" in err.message
    assert handler.reads == 0


async def test_each_retry_and_resubscription_is_signed_afresh(keys):
    """The handler fails the first read of each kind with a retryable status; the client's
    second attempt is admitted only if it carries a new nonce."""
    handler = Models(fail_first=1)
    server = TransportServer(handler, chunk_size=1000, read_guard=ReadGuard(keys[3]))
    await server.start()
    try:
        async with client_for(server, keys[0]) as client:
            assert await client.fetch("lm", -1) == handler.snapshot
            handler.reads = 0
            got = [item async for item in client.subscribe("lm", 1)]
            assert client.stats.retries == 2
    finally:
        await server.stop(0)
    assert got == sorted(handler.versions.items())
    assert server.stats.rejected == {"superseded": 2}


async def test_over_the_nonce_cap_a_read_is_resource_exhausted(keys):
    guard = ReadGuard(keys[3], max_nonces=1, max_nonces_per_sender=1)
    server = TransportServer(Models(), read_guard=guard)
    await server.start()
    try:
        async with client_for(server, keys[0]) as client:
            await client.fetch("lm", -1)
            with pytest.raises(TooManyReadsError) as info:
                await client.fetch("lm", -1)
    finally:
        await server.stop(0)
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
