"""Locality-aware placement: pick the closest aggregator with room, by measured round trip.

LIFL (Qi et al., MLSys 2024) places aggregation functions near the clients they serve; here an
island picks its leaf, and a leaf its parent, among the aggregators announced in the DHT:
candidates in an acceptable role whose load is under their fan-in limit, ordered by the
round-trip time of a TCP connect to their gRPC address (median of a few probes).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from comms.errors import LinkError


@dataclass(frozen=True)
class Candidate:
    name: str
    address: str
    role: str
    load: int
    capacity: int  # 0: unlimited
    model_ids: tuple[str, ...]

    @property
    def has_room(self) -> bool:
        return self.capacity <= 0 or self.load < self.capacity

    @classmethod
    def from_record(cls, record: Any) -> Candidate:
        f = record.fields
        return cls(
            record.name,
            str(f["address"]),
            str(f["role"]),
            int(f.get("load", 0)),
            int(f.get("capacity", 0)),
            tuple(f.get("model_ids", ())),
        )


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


async def measure_rtt(address: str, probes: int = 3, timeout: float = 2.0) -> float:
    """Median seconds of a TCP connect to ``address``; LinkError if it never answers."""
    host, port = split_address(address)
    times = []
    for _ in range(probes):
        t0 = time.perf_counter()
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError):
            continue
        times.append(time.perf_counter() - t0)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not times:
        raise LinkError(f"aggregator at {address} did not answer {probes} connection probes")
    return statistics.median(times)


def eligible(
    candidates: Iterable[Candidate], roles: Sequence[str], model_id: str | None = None
) -> list[Candidate]:
    """Candidates in one of ``roles`` (earlier roles preferred), with room, serving the model."""
    out = [
        c
        for c in candidates
        if c.role in roles and c.has_room and (model_id is None or model_id in c.model_ids)
    ]
    return sorted(out, key=lambda c: roles.index(c.role))


async def choose_closest(candidates: Sequence[Candidate], timeout: float = 2.0) -> Candidate:
    """The reachable candidate with the smallest round trip; ties keep the given order."""
    if not candidates:
        raise LinkError("no aggregator with room was found in the DHT")
    rtts = await asyncio.gather(
        *(measure_rtt(c.address, timeout=timeout) for c in candidates), return_exceptions=True
    )
    best = [(r, i) for i, r in enumerate(rtts) if isinstance(r, float)]
    if not best:
        raise LinkError(f"none of {len(candidates)} aggregators answered")
    return candidates[min(best)[1]]
