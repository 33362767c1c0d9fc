"""Aggregators as real processes (``aggregator serve``): kill -9 and restart lose nothing."""

import asyncio
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from aggtools import delta_bytes, make_federation, random_delta

from aggregator.outer import NesterovSGD, apply_update
from comms.config import save_config
from comms.envelope import Envelope
from comms.errors import ReplayError
from comms.transport import TransportClient
from comms.update import decode_update

pytestmark = pytest.mark.timeout(180)


class Proc:
    def __init__(self, config_path, log_path):
        self.log = open(log_path, "ab")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "aggregator", "serve", str(config_path)],
            stdout=subprocess.PIPE, stderr=self.log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        line = self.p.stdout.readline().decode()
        if "serving on" not in line:
            self.p.kill()
            raise RuntimeError(f"aggregator did not start: {line!r}; see {log_path}")
        self.address = line.split("serving on ")[1].split()[0]
        dht = line.split(" dht ")[1].strip() if " dht " in line else "-"
        self.dht = [] if dht == "-" else dht.split(",")

    def kill9(self):
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
        self.log.close()


async def _theta_at(address, version):
    async with TransportClient(address) as c:
        for _ in range(200):
            env = Envelope.from_bytes(await c.fetch("global", -1), max_bytes=1 << 30)
            if env.header.base_version >= version:
                return env.header.base_version, decode_update(env)
            await asyncio.sleep(0.05)
    raise TimeoutError(f"version {version} never reached at {address}")


def test_leaf_killed_after_ack_replays_its_wal(tmp_path):
    fed = make_federation(tmp_path, 4, aggregators=("root", "leaf0"))
    root_cfg = fed.config("root", "root", buffer_k=4)
    save_config(root_cfg, tmp_path / "root.toml")
    root = Proc(tmp_path / "root.toml", tmp_path / "root.log")
    leaf = None
    try:
        leaf_cfg = fed.config("leaf0", "leaf", parent=root.address, buffer_k=4)
        leaf_cfg.listen = "127.0.0.1:0"
        save_config(leaf_cfg, tmp_path / "leaf.toml")
        leaf = Proc(tmp_path / "leaf.toml", tmp_path / "leaf.log")
        deltas = [random_delta(fed.theta0, i) for i in range(4)]

        async def push(address, i, seq):
            async with TransportClient(address) as c:
                return await c.push(delta_bytes(fed.islands[i], deltas[i], seq))

        for i in range(3):  # acknowledged, buffered below K
            assert asyncio.run(push(leaf.address, i, 1))["status"] == "accepted"
        leaf.kill9()
        leaf = Proc(tmp_path / "leaf.toml", tmp_path / "leaf.log")  # same state dir
        with pytest.raises(ReplayError):  # the replay guard came back from the WAL
            asyncio.run(push(leaf.address, 0, 1))
        assert asyncio.run(push(leaf.address, 3, 1))["status"] == "accepted"  # the K-th
        version, theta = asyncio.run(_theta_at(root.address, 1))
        assert version == 1
        g = {k: sum(d[k] for d in deltas) / np.float32(4) for k in fed.theta0}
        want = {k: v.copy() for k, v in fed.theta0.items()}
        apply_update(want, NesterovSGD().step(want, g))
        for k in want:  # exactly the four updates, each once
            np.testing.assert_allclose(theta[k], want[k], rtol=1e-5, atol=1e-6)
        # the restarted root resumes theta and version from disk
        root.kill9()
        root = Proc(tmp_path / "root.toml", tmp_path / "root.log")
        version2, theta2 = asyncio.run(_theta_at(root.address, 1))
        assert version2 == 1
        for k in theta:
            assert np.array_equal(theta[k], theta2[k])
    finally:
        for p in (leaf, root):
            if p is not None:
                p.stop()


def test_a_leaf_finds_its_parent_in_the_dht(tmp_path):
    """Processes, as users run them: the root starts a DHT (hivemind forks its node before any
    gRPC thread exists); the leaf has no parent address, only the DHT's, and picks the root."""
    fed = make_federation(tmp_path, 1, aggregators=("root", "leaf0"))
    root_cfg = fed.config("root", "root", buffer_k=1)
    root_cfg.dht = True
    save_config(root_cfg, tmp_path / "root.toml")
    root = Proc(tmp_path / "root.toml", tmp_path / "root.log")
    leaf = None
    try:
        assert root.dht, "the root printed no DHT address"
        leaf_cfg = fed.config("leaf0", "leaf", buffer_k=1)
        leaf_cfg.dht_peers = root.dht
        save_config(leaf_cfg, tmp_path / "leaf.toml")
        leaf = Proc(tmp_path / "leaf.toml", tmp_path / "leaf.log")

        async def push():
            async with TransportClient(leaf.address) as c:
                return await c.push(delta_bytes(fed.islands[0], random_delta(fed.theta0, 0), 1))

        assert asyncio.run(push())["status"] == "accepted"
        version, _ = asyncio.run(_theta_at(root.address, 1))
        assert version == 1  # the leaf's partial reached the root it found in the DHT
    finally:
        for p in (leaf, root):
            if p is not None:
                p.stop()
