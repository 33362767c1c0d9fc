"""Comms smoke demo: three islands push signed, int8-compressed updates to an aggregator they
find through the DHT, over slow emulated links; one link drops and the push resumes; a forged
and a replayed envelope are refused.

What runs, all on 127.0.0.1:

- a two-node hivemind DHT (``comms.discovery``): the aggregator's node and the node the islands
  look things up through; the aggregator announces a signed ``aggregator`` record;
- the aggregator: a ``TransportServer`` (``comms.transport``) whose handler,
  ``SummingAggregator``, parses each pushed envelope, checks its signature against a
  ``Roster``, its sequence against a ``ReplayGuard`` and its tensors against a ``Manifest``,
  decodes it (``comms.update``) and sums the deltas of each round;
- three islands, each with its own Ed25519 identity and its own link (``TokenBucketShaper``,
  50 Mbit/s, 20 ms one way). Every round each island draws a random ~8 MB float32 update,
  compresses it with int8 plus error feedback (``ErrorFeedback``: what int8 rounds away is
  sent in the next round), signs it and pushes it. In round 1 island-2's link drops half way
  through and the push resumes from the bytes the aggregator already holds. After round 1 a
  forged envelope (claims island-1, signed by an outside key) and a replay of island-2's
  round-1 envelope are pushed; both must be refused, and the rounds after go on.

It prints per-push lines, then per island the bytes, time and effective rate, the compression
ratio against float32, the relative error of the merged sum, and the rejections. It exits 0
when every update arrived, both bad envelopes were refused for the right reason and the merged
sum is within 2% of the exact float32 sum; otherwise 1 with the reason.

Concurrency: the DHT nodes run in hivemind's own processes; the aggregator's server and the
islands share one asyncio loop in a background thread (``comms.aio.LoopThread``), with blocking
DHT calls and numpy work sent to worker threads (``asyncio.to_thread``); the main thread waits
for it with a timeout. Everything is stopped on exit, Ctrl+C included.

    python scripts/demo.py [--quick] [--rounds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from benchlib import format_table, write_json

from comms.aio import LoopThread
from comms.codecs import ErrorFeedback, get_codec
from comms.discovery import Discovery
from comms.envelope import SIGNING_CONTEXT, Envelope
from comms.errors import CommsError, LinkError, MalformedError, NotFoundError, RejectedError
from comms.identity import Identity, ReplayGuard, Roster
from comms.shaper import TokenBucketShaper
from comms.transport import RemoteRejected, TransportClient, TransportServer
from comms.update import Manifest, decode_update, encode_update, expected_nbytes

MODEL_ID = "demo-lm"
AGGREGATOR_NAME = "agg-root"
ISLAND_NAMES = ("island-1", "island-2", "island-3")
FLAKY_ISLAND = 1  # index of the island whose link drops in round 1
LINK_RATE_BPS = 50e6
LINK_LATENCY_S = 0.020
CHUNK_BYTES = 128 * 1024  # above the link's bandwidth-delay product, so latency costs little
MAX_ENVELOPE_BYTES = 64 << 20
MAX_REL_ERROR = 0.02
DHT_TIMEOUT_S = 20.0
DISCOVERY_POLL_S = 0.2

# A toy model's parameters: name -> shape. Full: 2.1 M parameters (8.4 MB of float32).
FULL_SHAPES = {
    "embed.weight": (8192, 128),
    "block0.mlp.weight": (1024, 1024),
    "block0.mlp.bias": (1024,),
    "head.weight": (128, 256),
}
QUICK_SHAPES = {
    "embed.weight": (2048, 128),
    "block0.mlp.weight": (512, 512),
    "block0.mlp.bias": (512,),
    "head.weight": (128, 256),
}


class DemoFailure(Exception):
    """Something the demo checks did not hold."""


# ----------------------------------------------------------------------------- pure helpers


def relative_error(approx: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> float:
    """``||approx - exact|| / ||exact||`` over all tensors together (float64)."""
    num = sum(float(np.sum((approx[n].astype(np.float64) - exact[n]) ** 2)) for n in exact)
    den = sum(float(np.sum(exact[n].astype(np.float64) ** 2)) for n in exact)
    return (num / den) ** 0.5


def add_into(total: dict[str, np.ndarray], tensors: dict[str, np.ndarray]) -> None:
    for name, value in tensors.items():
        total[name] += value


def zeros_like(manifest: Manifest) -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, np.float32) for name, shape, _ in manifest.tensors}


def random_update(rng: np.random.Generator, manifest: Manifest) -> dict[str, np.ndarray]:
    """A pseudo-gradient-like update: small Gaussian values, a different scale per tensor."""
    return {
        name: (rng.standard_normal(shape, dtype=np.float32) * 1e-3 * (1 + i)).astype(np.float32)
        for i, (name, shape, _) in enumerate(manifest.tensors)
    }


def megabytes(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f} MB"


# ----------------------------------------------------------------------------- aggregator


@dataclass
class Rejection:
    sender: str
    reason: str
    message: str


class SummingAggregator:
    """Transport handler: verify, check and decode island deltas; sum them per round.

    A round is the envelope's ``base_version``. Every refusal raises the typed error (the
    transport answers the client with its status) and is recorded in ``rejections``.
    """

    def __init__(self, roster: Roster, manifest: Manifest, model_id: str = MODEL_ID):
        self.roster, self.manifest, self.model_id = roster, manifest, model_id
        self.replay_guard = ReplayGuard()
        self.sums: dict[int, dict[str, np.ndarray]] = {}
        self.accepted: list[tuple[str, int]] = []  # (sender, sequence)
        self.rejections: list[Rejection] = []

    async def on_push(self, upload_id: str, data: bytes, metadata: dict[str, str]) -> dict:
        sender = "?"
        try:
            env = Envelope.from_bytes(
                data, max_bytes=MAX_ENVELOPE_BYTES, expected_nbytes=expected_nbytes
            )
            sender = env.header.sender
            return await self._accept(env)
        except RejectedError as err:
            self.rejections.append(Rejection(sender, err.reason, str(err)))
            raise

    async def _accept(self, env: Envelope) -> dict[str, str]:
        header = env.header
        if header.model_id != self.model_id or header.kind != "delta":
            raise MalformedError(
                f"this aggregator takes deltas of {self.model_id!r}, "
                f"got a {header.kind} of {header.model_id!r}"
            )
        env.verify(self.roster, roles=("island",), replay_guard=self.replay_guard)
        deltas = await asyncio.to_thread(decode_update, env, self.manifest)
        # Check again and record atomically: another push may have run while decoding.
        self.replay_guard.check_and_commit(header.sender, header.sequence)
        total = self.sums.setdefault(header.base_version, zeros_like(self.manifest))
        add_into(total, deltas)
        self.accepted.append((header.sender, header.sequence))
        return {"accepted": "true", "round": str(header.base_version)}

    def subscribe(self, model_id: str, from_version: int):
        raise NotFoundError(f"the demo aggregator publishes no versions of {model_id!r}")

    async def fetch(self, model_id: str, version: int) -> bytes:
        raise NotFoundError(f"the demo aggregator holds no snapshot of {model_id!r}")


# ----------------------------------------------------------------------------- islands


class LinkWithOutage:
    """A shaped link that can be told to drop the connection once, ``nbytes`` from now.

    ``dropped_after`` lists, for each drop, how many bytes had crossed since it was armed.
    """

    def __init__(self, shaper: TokenBucketShaper):
        self.shaper = shaper
        self.sent = 0
        self.armed_at = 0
        self.drop_at: int | None = None
        self.dropped_after: list[int] = []

    def drop_once_after(self, nbytes: int) -> None:
        self.armed_at, self.drop_at = self.sent, self.sent + nbytes

    async def transmit(self, nbytes: int) -> None:
        if self.drop_at is not None and self.sent + nbytes > self.drop_at:
            self.drop_at = None
            self.dropped_after.append(self.sent - self.armed_at)
            raise LinkError(f"emulated outage after {self.dropped_after[-1]} bytes")
        await self.shaper.transmit(nbytes)
        self.sent += nbytes


@dataclass
class IslandStats:
    name: str
    peer_id: str
    delivered: int = 0
    payload_bytes: int = 0  # envelope bytes delivered
    link_bytes: int = 0  # bytes put on the link, resent ones included
    seconds: float = 0.0  # wall time of the pushes
    retries: int = 0
    link_drops: int = 0

    @property
    def effective_mbps(self) -> float:
        return self.payload_bytes * 8 / self.seconds / 1e6 if self.seconds else 0.0


@dataclass
class Island:
    name: str
    identity: Identity
    manifest: Manifest
    rng: np.random.Generator
    link: LinkWithOutage
    feedback: ErrorFeedback = field(default_factory=ErrorFeedback)
    client: TransportClient | None = None
    stats: IslandStats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = IslandStats(self.name, self.identity.peer_id)

    async def find_aggregator(self, discovery: Discovery, deadline_s: float) -> str:
        """The address of a live aggregator for MODEL_ID, looked up in the DHT."""
        give_up = time.monotonic() + deadline_s
        while True:
            for record in await asyncio.to_thread(discovery.lookup, "aggregator"):
                if MODEL_ID in record.fields.get("model_ids", []):
                    return record.fields["address"]
            if time.monotonic() > give_up:
                raise DemoFailure(f"{self.name}: no aggregator for {MODEL_ID} in the DHT")
            await asyncio.sleep(DISCOVERY_POLL_S)

    def connect(self, address: str) -> None:
        self.client = TransportClient(
            address, chunk_size=CHUNK_BYTES, shaper=self.link, deadline_s=30.0, backoff_s=0.2
        )

    def encode(self, update: dict[str, np.ndarray], round_index: int) -> Envelope:
        return encode_update(
            update,
            codec="int8",
            model_id=MODEL_ID,
            kind="delta",
            sender=self.identity.peer_id,
            sequence=round_index,
            base_version=round_index,
            meta={"steps": 100, "tokens": 100 * 4096},
            error_feedback=self.feedback,
            identity=self.identity,
        )

    async def push(self, blob: bytes) -> float:
        """Push one envelope; return the seconds it took. Updates ``stats``."""
        sent_before, retries_before = self.client.stats.bytes_sent, self.client.stats.retries
        drops_before = len(self.link.dropped_after)
        start = time.perf_counter()
        ack = await self.client.push(blob)
        seconds = time.perf_counter() - start
        if ack.get("accepted") != "true":
            raise DemoFailure(f"{self.name}: the aggregator did not accept the update: {ack}")
        s = self.stats
        s.delivered += 1
        s.payload_bytes += len(blob)
        s.link_bytes += self.client.stats.bytes_sent - sent_before
        s.seconds += seconds
        s.retries += self.client.stats.retries - retries_before
        s.link_drops += len(self.link.dropped_after) - drops_before
        return seconds


# ----------------------------------------------------------------------------- the demo


@dataclass
class Scenario:
    shapes: dict[str, tuple[int, ...]]
    rounds: int
    seed: int


async def run_round(islands: list[Island], round_index: int, say) -> tuple[dict, dict, bytes]:
    """Every island encodes and pushes one update. Returns the exact float32 sum, the sum of
    plain int8 round trips (no error feedback) and island-2's envelope (for the replay)."""
    manifest = islands[0].manifest
    exact, plain_int8 = zeros_like(manifest), zeros_like(manifest)
    int8 = get_codec("int8")
    blobs: dict[str, bytes] = {}

    def int8_round_trip(update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: int8.decode(int8.encode(v), v.shape) for name, v in update.items()}

    async def one(island: Island) -> None:
        update = await asyncio.to_thread(random_update, island.rng, manifest)
        add_into(exact, update)
        add_into(plain_int8, await asyncio.to_thread(int8_round_trip, update))
        env = await asyncio.to_thread(island.encode, update, round_index)
        blob = env.to_bytes()
        blobs[island.name] = blob
        flaky = round_index == 1 and island is islands[FLAKY_ISLAND]
        if flaky:
            island.link.drop_once_after(len(blob) // 2)
        sent_before = island.client.stats.bytes_sent
        seconds = await island.push(blob)
        rate = len(blob) * 8 / seconds / 1e6
        line = f"  round {round_index}  {island.name}  {megabytes(len(blob))} in {seconds:.2f} s"
        line += f" = {rate:.1f} Mbit/s"
        if flaky:
            on_link = island.client.stats.bytes_sent - sent_before
            line += (
                f"  (link dropped after {megabytes(island.link.dropped_after[-1])}; push "
                f"resumed, {on_link - len(blob)} bytes sent twice)"
            )
        say(line)

    await asyncio.gather(*(one(island) for island in islands))
    return exact, plain_int8, blobs[islands[FLAKY_ISLAND].name]


async def push_bad_envelopes(
    address: str, island: Island, replay_blob: bytes, outsider: Identity, say
) -> list[dict[str, str]]:
    """Push a forged and a replayed envelope; both must be refused. Returns what happened."""
    update = random_update(np.random.default_rng(99), island.manifest)
    honest = encode_update(
        update,
        codec="int8",
        model_id=MODEL_ID,
        kind="delta",
        sender=island.identity.peer_id,  # claims to be island-1 ...
        sequence=10_000,
        base_version=1,
    )
    forged = dataclasses.replace(  # ... but is signed by a key that is not in the roster
        honest, signature=outsider.sign(SIGNING_CONTEXT + honest.header_bytes)
    )
    cases = [
        (
            "forged",
            f"claims {island.name}, signed by an outside key",
            forged.to_bytes(),
            "signature",
        ),
        (
            "replayed",
            f"{ISLAND_NAMES[FLAKY_ISLAND]}'s round-1 envelope, sent again",
            replay_blob,
            "replay",
        ),
    ]
    results = []
    async with TransportClient(address, deadline_s=30.0) as client:
        for what, story, blob, expected in cases:
            try:
                await client.push(blob)
            except RemoteRejected as err:
                say(f"  rejected {what} envelope ({story}): {err.reason} ({err.code.name})")
                results.append(
                    {
                        "what": what,
                        "reason": err.reason,
                        "expected_reason": expected,
                        "grpc_code": err.code.name,
                        "message": err.message,
                    }
                )
                if err.reason != expected:
                    raise DemoFailure(
                        f"the {what} envelope was refused for {err.reason!r}, "
                        f"expected {expected!r}: {err.message}"
                    ) from err
            else:
                raise DemoFailure(f"the aggregator accepted the {what} envelope")
    return results


async def federate(
    scenario: Scenario, agg_node: Discovery, island_node: Discovery, idents: dict, say
) -> dict[str, Any]:
    """Start the aggregator, run the islands for ``scenario.rounds`` rounds, return figures."""
    manifest = Manifest(tuple((n, tuple(s), "float32") for n, s in scenario.shapes.items()))
    roster: Roster = idents["roster"]
    aggregator = SummingAggregator(roster, manifest)
    server = TransportServer(aggregator, "127.0.0.1", 0, max_upload_bytes=MAX_ENVELOPE_BYTES)
    islands = [
        Island(
            name,
            idents[name],
            manifest,
            np.random.default_rng([scenario.seed, i]),
            LinkWithOutage(TokenBucketShaper(LINK_RATE_BPS, LINK_LATENCY_S, seed=i)),
        )
        for i, name in enumerate(ISLAND_NAMES)
    ]
    await server.start()
    try:
        fields = {"address": server.address, "role": "root", "model_ids": [MODEL_ID]}
        await asyncio.to_thread(agg_node.announce, "aggregator", AGGREGATOR_NAME, fields, 120.0)
        say(f"[aggregator] serving on {server.address}; announced in the DHT as {AGGREGATOR_NAME}")

        addresses = await asyncio.gather(
            *(island.find_aggregator(island_node, DHT_TIMEOUT_S) for island in islands)
        )
        for island, address in zip(islands, addresses, strict=True):
            island.connect(address)
        say(f"[islands] {len(islands)} islands found {AGGREGATOR_NAME} at {addresses[0]}")

        exact_total, plain_total = zeros_like(manifest), zeros_like(manifest)
        merged_total = zeros_like(manifest)
        round_errors, rejections = [], []
        for round_index in range(1, scenario.rounds + 1):
            exact, plain, replay_blob = await run_round(islands, round_index, say)
            add_into(exact_total, exact)
            add_into(plain_total, plain)
            merged = aggregator.sums.get(round_index)
            if merged is None:
                raise DemoFailure(f"round {round_index}: the aggregator summed no update")
            add_into(merged_total, merged)
            round_errors.append(relative_error(merged, exact))
            say(
                f"round {round_index}: merged {len(islands)} updates; relative error of this "
                f"round's sum {round_errors[-1]:.2%}, of the running sum "
                f"{relative_error(merged_total, exact_total):.2%}"
            )
            if round_index == 1:
                rejections = await push_bad_envelopes(
                    addresses[0], islands[0], replay_blob, idents["outsider"], say
                )
        return {
            "islands": [dataclasses.asdict(island.stats) for island in islands],
            "island_rates_mbps": {i.name: i.stats.effective_mbps for i in islands},
            "aggregator": {
                "address": server.address,
                "accepted": len(aggregator.accepted),
                "rejected": [dataclasses.asdict(r) for r in aggregator.rejections],
                "server_rejected": dict(server.stats.rejected),
            },
            "rejections": rejections,
            "round_rel_errors": round_errors,
            "merged_rel_error": relative_error(merged_total, exact_total),
            "merged_rel_error_without_error_feedback": relative_error(plain_total, exact_total),
        }
    finally:
        for island in islands:
            if island.client is not None:
                await island.client.close()
        await server.stop(0)


def start_dht(say) -> tuple[list[Discovery], dict]:
    """Identities, the roster and two DHT nodes (the aggregator's and the islands')."""
    idents: dict[str, Any] = {name: Identity.generate() for name in (*ISLAND_NAMES, "aggregator")}
    roster = Roster()
    roster.add(idents["aggregator"].public_key, "aggregator", AGGREGATOR_NAME)
    for name in ISLAND_NAMES:
        roster.add(idents[name].public_key, "island", name)
    idents["roster"], idents["outsider"] = roster, Identity.generate()

    start = time.perf_counter()
    nodes = [Discovery.start(idents["aggregator"], roster=roster, timeout=DHT_TIMEOUT_S)]
    try:
        peers = nodes[0].bootstrap_addresses()
        gateway = Identity.generate()  # the islands' DHT node only looks up; it announces nothing
        nodes.append(
            Discovery.start(gateway, initial_peers=peers, roster=roster, timeout=DHT_TIMEOUT_S)
        )
    except BaseException:
        nodes[0].shutdown()
        raise
    say(f"[dht] 2 nodes up on 127.0.0.1 in {time.perf_counter() - start:.1f} s")
    return nodes, idents


def check(figures: dict[str, Any], rounds: int) -> None:
    """Raise DemoFailure unless every update arrived and the merged sum is accurate."""
    for island in figures["islands"]:
        if island["delivered"] != rounds:
            raise DemoFailure(f"{island['name']}: {island['delivered']} of {rounds} delivered")
    if not any(island["link_drops"] for island in figures["islands"]):
        raise DemoFailure("the flaky link never dropped, so no resume was shown")
    worst = max(figures["merged_rel_error"], *figures["round_rel_errors"])
    if worst > MAX_REL_ERROR:
        raise DemoFailure(f"merged int8 sum is off by {worst:.2%} (more than {MAX_REL_ERROR:.0%})")


def summarize(figures: dict[str, Any], manifest_numel: int, say) -> None:
    fp32 = 4 * manifest_numel
    rows = [
        [
            s["name"],
            s["delivered"],
            megabytes(s["payload_bytes"]),
            megabytes(s["link_bytes"]),
            round(s["seconds"], 2),
            round(figures["island_rates_mbps"][s["name"]], 1),
            s["link_drops"],
        ]
        for s in figures["islands"]
    ]
    headers = ["island", "updates", "delivered", "on the link", "seconds", "Mbit/s", "drops"]
    say("")
    say(format_table(headers, rows))
    per_update = figures["islands"][0]["payload_bytes"] / figures["islands"][0]["delivered"]
    link_bytes_per_s = LINK_RATE_BPS / 8
    say(
        f"compression: {megabytes(per_update)} per signed int8 update vs {megabytes(fp32)} "
        f"of float32 = {figures['compression_ratio_vs_fp32']:.2f}x smaller "
        f"({per_update / link_bytes_per_s:.2f} s instead of {fp32 / link_bytes_per_s:.2f} s "
        f"per update on the link)"
    )
    say(
        f"merged sum over all rounds: relative error {figures['merged_rel_error']:.2%} "
        f"(int8 without error feedback: {figures['merged_rel_error_without_error_feedback']:.2%})"
    )
    reasons = ", ".join(f"{r['what']} -> {r['reason']}" for r in figures["rejections"])
    say(f"rejected: {reasons}; the aggregator kept serving")


def run(args: argparse.Namespace) -> dict[str, Any]:
    def say(line: str) -> None:
        print(line, flush=True)

    scenario = Scenario(QUICK_SHAPES if args.quick else FULL_SHAPES, args.rounds, args.seed)
    numel = sum(int(np.prod(s)) for s in scenario.shapes.values())
    say(
        f"comms demo: {len(ISLAND_NAMES)} islands -> 1 aggregator, {args.rounds} rounds of "
        f"{megabytes(4 * numel)} float32 updates, int8 + error feedback, signed; links "
        f"{LINK_RATE_BPS / 1e6:.0f} Mbit/s, {LINK_LATENCY_S * 1e3:.0f} ms"
    )
    started = time.perf_counter()
    nodes, idents = start_dht(say)
    try:
        coro = federate(scenario, nodes[0], nodes[1], idents, say)
        # A loop of our own in its own thread: hivemind has set up one in the main thread.
        with LoopThread("demo-loop") as loop:
            figures = loop.run(coro, timeout=args.timeout)
    except TimeoutError as err:
        raise DemoFailure(f"the demo did not finish within {args.timeout:g} s") from err
    finally:
        for node in reversed(nodes):
            node.shutdown()
    per_update = figures["islands"][0]["payload_bytes"] / figures["islands"][0]["delivered"]
    figures.update(
        quick=args.quick,
        rounds=args.rounds,
        params_per_update=numel,
        fp32_bytes_per_update=4 * numel,
        compression_ratio_vs_fp32=4 * numel / per_update,
        link={"rate_mbps": LINK_RATE_BPS / 1e6, "latency_ms": LINK_LATENCY_S * 1e3},
        seconds=time.perf_counter() - started,
    )
    summarize(figures, numel, say)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 MB updates instead of 8 MB")
    parser.add_argument("--rounds", type=int, default=3, help="updates per island (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random updates")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this (s)")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        figures = run(args)
        write_json(args.json, figures)
        check(figures, args.rounds)
    except KeyboardInterrupt:
        print("interrupted; the aggregator, the islands and the DHT are stopped", file=sys.stderr)
        return 130
    except (DemoFailure, CommsError) as err:
        print(f"demo failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"demo OK in {figures['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
