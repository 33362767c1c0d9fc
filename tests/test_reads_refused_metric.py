"""Refused reads are counted in the aggregator's Prometheus metrics, by reason, through a real
gRPC server and the /metrics endpoint."""

import aiohttp
import pytest
from aggtools import make_federation

from aggregator.service import AggregatorService
from comms.errors import ReadDeniedError
from comms.identity import Identity
from comms.transport import TransportClient


async def test_refused_reads_are_counted_by_reason_in_prometheus(tmp_path):
    fed = make_federation(tmp_path, 1, aggregators=("root",))
    cfg = fed.config("root", "root", buffer_k=1)
    cfg.http = "127.0.0.1:0"
    root = AggregatorService(cfg)
    await root.start()
    try:
        for reader, reason in (
            (None, "unsigned"),
            (Identity.generate(), "unknown_reader"),
            (None, "unsigned"),
        ):
            async with TransportClient(root.address, identity=reader, retries=0) as c:
                with pytest.raises(ReadDeniedError) as info:
                    await c.fetch("global", -1)
                assert info.value.reason == reason
        async with TransportClient(root.address, retries=0) as c:  # a Subscribe, unsigned
            with pytest.raises(ReadDeniedError):
                async for _ in c.subscribe("global", 1, retries=0):
                    pass
        async with TransportClient(root.address, identity=fed.islands[0]) as c:  # admitted
            assert await c.fetch("global", -1)
        url = f"http://{root.http_address}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as r:
            text = await r.text()
        assert 'archipelago_reads_refused_total{reason="unsigned"} 3.0' in text
        assert 'archipelago_reads_refused_total{reason="unknown_reader"} 1.0' in text
    finally:
        await root.stop()
