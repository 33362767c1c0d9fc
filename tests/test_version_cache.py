"""A leaf's cache of recent u_v is bounded by bytes (``version_cache_mb``), not only by count:
256 versions of a large model would not fit in memory."""

import pytest
from aggtools import delta_bytes, make_federation, random_delta

from aggregator.config import AggregatorConfig
from aggregator.lines import VERSION_CACHE, VERSION_CACHE_BYTES, ModelLine
from aggregator.service import AggregatorService
from comms.errors import ConfigError, NotFoundError
from comms.transport import TransportClient

MiB = 1 << 20


def test_big_versions_are_evicted_oldest_first_by_bytes(tmp_path):
    assert 256 * MiB == VERSION_CACHE_BYTES  # the default
    line = ModelLine("m", wal=None)
    blob = bytes(64 * MiB)  # one object for every version: the cache counts each entry
    for v in range(1, 11):
        line.remember(v, blob)
        assert line.cache_bytes <= VERSION_CACHE_BYTES
    assert list(line.cache) == [7, 8, 9, 10]  # 4 x 64 MiB = the bound
    line.cache_limit_bytes = 130 * MiB
    line.remember(11, blob)
    assert list(line.cache) == [10, 11]
    line.remember(12, bytes(150 * MiB))  # larger than the bound alone: the newest is kept
    assert list(line.cache) == [12]
    with pytest.raises(NotFoundError, match="no longer cached"):
        line.version_bytes(11)
    small = ModelLine("m", wal=None)  # small versions: the count bound still holds
    for v in range(1, VERSION_CACHE + 11):
        small.remember(v, b"u")
    assert len(small.cache) == VERSION_CACHE and next(iter(small.cache)) == 11


def test_version_cache_mb_must_be_positive():
    cfg = AggregatorConfig(name="leaf", parent="127.0.0.1:1", version_cache_mb=0)
    with pytest.raises(ConfigError, match="version_cache_mb"):
        cfg.validate()


async def test_a_leaf_keeps_only_version_cache_mb_of_versions(tmp_path):
    fed = make_federation(
        tmp_path, 1, aggregators=("root", "leaf0"), shapes={"w": (256, 256)}
    )  # 256 KiB versions (codec none)
    root = AggregatorService(fed.config("root", "root", buffer_k=1))
    root_addr = await root.start()
    cfg = fed.config("leaf0", "leaf", parent=root_addr, buffer_k=1)
    cfg.version_cache_mb = 0.6  # two versions fit, three do not
    leaf = AggregatorService(cfg)
    await leaf.start()
    try:
        async with TransportClient(root_addr) as c:
            for s in range(1, 6):
                await c.push(
                    delta_bytes(fed.islands[0], random_delta(fed.theta0, s), s, base_version=s - 1)
                )
        line = leaf.lines["global"]
        for _ in range(500):
            if line.version == 5:
                break
            await _sleep(0.02)
        assert line.version == 5
        assert list(line.cache) == [4, 5] and line.cache_bytes <= 0.6 * MiB
        async with TransportClient(leaf.address, identity=fed.islands[0], retries=0) as reader:
            async for version, data in reader.subscribe("global", 4):
                assert version == 4 and data == line.cache[4]
                break
    finally:
        await leaf.stop()
        await root.stop()


async def _sleep(seconds):
    import asyncio

    await asyncio.sleep(seconds)
