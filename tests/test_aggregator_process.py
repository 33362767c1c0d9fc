"""Aggregators as real processes (``aggregator serve``): kill -9 and restart lose nothing."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from aggtools import delta_bytes, hand_versions, make_federation, random_delta

from aggregator.outer import NesterovSGD, apply_update
from comms.config import save_config
from comms.envelope import Envelope
from comms.errors import CommsError, ReadDeniedError, ReplayError
from comms.transport import TransportClient
from comms.update import decode_update

pytestmark = pytest.mark.timeout(180)


class Proc:
    """``aggregator serve CONFIG`` as a process; ``fault`` names a fault point
    (``aggregator.faults``) at which it kills itself with SIGKILL."""

    def __init__(self, config_path, log_path, fault: str | None = None):
        self.log = open(log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("ARCHIPELAGO_FAULT", None)
        if fault:
            env["ARCHIPELAGO_FAULT"] = fault
        self.p = subprocess.Popen(
            [sys.executable, "-m", "aggregator", "serve", str(config_path)],
            stdout=subprocess.PIPE, stderr=self.log, env=env,
        )  # fmt: skip
        line = self.p.stdout.readline().decode()
        if "serving on" not in line:
            self.p.kill()
            raise RuntimeError(f"aggregator did not start: {line!r}; see {log_path}")
        self.address = line.split("serving on ")[1].split()[0]
        self.http = line.split(" http ")[1].split()[0] if " http " in line else "-"
        dht = line.split(" dht ")[1].strip() if " dht " in line else "-"
        self.dht = [] if dht == "-" else dht.split(",")

    def kill9(self):
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def died_of_sigkill(self, timeout=20.0) -> bool:
        """Wait for the process to end; whether SIGKILL (its fault point) ended it."""
        try:
            code = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self.log.close()
        return code == -signal.SIGKILL

    def status(self) -> dict:
        with urllib.request.urlopen(f"{self.http}/status", timeout=10) as r:
            return json.loads(r.read())["models"]["global"]

    def rejected(self, reason: str) -> float:
        with urllib.request.urlopen(f"{self.http}/metrics", timeout=10) as r:
            text = r.read().decode()
        prefix = f'archipelago_updates_rejected_total{{reason="{reason}"}} '
        return sum(float(x[len(prefix) :]) for x in text.splitlines() if x.startswith(prefix))

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
        if not self.log.closed:
            self.log.close()


def _poll(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.05)


def _push(address, blob, retries=None):
    async def go():
        async with TransportClient(address) as c:
            return await c.push(blob, retries=retries)

    return asyncio.run(go())


def _assert_theta(theta, want, what):
    for k in sorted(theta.keys() | want.keys()):
        np.testing.assert_allclose(theta[k], want[k], rtol=1e-5, atol=1e-6, err_msg=f"{what} {k}")


async def _theta_at(address, version, reader):
    """The current theta once it reaches ``version``, fetched (signed) by ``reader``."""
    async with TransportClient(address, identity=reader) as c:
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
        version, theta = asyncio.run(_theta_at(root.address, 1, fed.islands[0]))
        assert version == 1
        g = {k: sum(d[k] for d in deltas) / np.float32(4) for k in fed.theta0}
        want = {k: v.copy() for k, v in fed.theta0.items()}
        apply_update(want, NesterovSGD().step(want, g))
        for k in want:  # exactly the four updates, each once
            np.testing.assert_allclose(theta[k], want[k], rtol=1e-5, atol=1e-6)
        # the restarted root resumes theta and version from disk
        root.kill9()
        root = Proc(tmp_path / "root.toml", tmp_path / "root.log")
        version2, theta2 = asyncio.run(_theta_at(root.address, 1, fed.islands[0]))
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
        version, _ = asyncio.run(_theta_at(root.address, 1, fed.islands[0]))
        assert version == 1  # the leaf's partial reached the root it found in the DHT
        with pytest.raises(ReadDeniedError, match="unsigned"):  # reads need a roster key
            asyncio.run(_theta_at(root.address, 1, None))
    finally:
        for p in (leaf, root):
            if p is not None:
                p.stop()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["leaf.after_intent", "leaf.before_mark"])
def test_leaf_killed_mid_flush_delivers_its_partial_exactly_once(tmp_path, fault):
    """The leaf dies during the flush of its first partial: after logging the intent (the
    partial never sent; the K-th push never acknowledged) or once the root acknowledged the
    partial (no mark yet). Restarted, it re-sends the intent's partial under its original
    sequence (the root, holding it already, answers "replay"); the island's retry of its push
    is a replay too; the next partial goes on under the next sequence. The root's theta holds
    every update exactly once."""
    fed = make_federation(tmp_path, 3, aggregators=("root", "leaf0"))
    root_cfg = fed.config("root", "root", buffer_k=3)
    root_cfg.http = "127.0.0.1:0"
    save_config(root_cfg, tmp_path / "root.toml")
    root = Proc(tmp_path / "root.toml", tmp_path / "root.log")
    leaf = None
    try:
        leaf_cfg = fed.config("leaf0", "leaf", parent=root.address, buffer_k=3)
        leaf_cfg.listen, leaf_cfg.http = "127.0.0.1:0", "127.0.0.1:0"
        save_config(leaf_cfg, tmp_path / "leaf.toml")
        leaf = Proc(tmp_path / "leaf.toml", tmp_path / "leaf.log", fault=fault)
        deltas = [[random_delta(fed.theta0, 10 * r + i) for i in range(3)] for r in range(2)]
        blobs = [[delta_bytes(fed.islands[i], deltas[r][i], r + 1, base_version=r)
                  for i in range(3)] for r in range(2)]  # fmt: skip
        for i in range(2):
            assert _push(leaf.address, blobs[0][i])["status"] == "accepted"
        if fault == "leaf.after_intent":  # the K-th push: logged, then the leaf died
            with pytest.raises(CommsError):
                _push(leaf.address, blobs[0][2], retries=0)
        else:
            assert _push(leaf.address, blobs[0][2])["status"] == "accepted"
        assert leaf.died_of_sigkill(), f"the leaf did not die at {fault}"
        if fault == "leaf.before_mark":
            assert root.status()["version"] == 1  # the partial reached the root before the kill
        leaf = Proc(tmp_path / "leaf.toml", tmp_path / "leaf.log")  # the same state dir
        _poll(lambda: leaf.status()["wal_mark"] == 3, what="the re-sent partial's mark")
        with pytest.raises(ReplayError):  # the island's retry of its third push
            _push(leaf.address, blobs[0][2])
        assert root.rejected("replay") == (1 if fault == "leaf.before_mark" else 0)
        _poll(lambda: leaf.status()["version"] == 1, what="the leaf's replica at version 1")
        for i in range(3):  # the next partial: sequence 2, accepted by the root
            assert _push(leaf.address, blobs[1][i])["status"] == "accepted"
        version, theta = asyncio.run(_theta_at(root.address, 2, fed.islands[0]))
        assert version == 2 and root.status()["buffered"] == 0
        rounds = [[(d, 0) for d in deltas[r]] for r in range(2)]
        _assert_theta(theta, hand_versions(fed.theta0, rounds)[-1], "version 2")
    finally:
        for p in (leaf, root):
            if p is not None:
                p.stop()


@pytest.mark.slow
def test_root_killed_with_wal_records_above_its_mark_counts_each_update_once(tmp_path):
    """Two kills: between writing version 1 with its state and the WAL mark (the records of
    version 1 lie above the mark but inside the state), and while an acknowledged update
    waits in the WAL above the mark. After each restart the island's retry of its last push
    is recognised as a replay; theta holds every update exactly once."""
    fed = make_federation(tmp_path, 4, aggregators=("root",))
    cfg = fed.config("root", "root", buffer_k=2)
    cfg.http = "127.0.0.1:0"
    save_config(cfg, tmp_path / "root.toml")
    d = [random_delta(fed.theta0, i) for i in range(4)]
    blobs = [delta_bytes(fed.islands[i], d[i], 1, base_version=i // 2) for i in range(4)]
    root = Proc(tmp_path / "root.toml", tmp_path / "root.log", fault="root.before_mark")
    try:
        assert _push(root.address, blobs[0])["status"] == "accepted"
        with pytest.raises(CommsError):  # the K-th: version 1 is written, then the root dies
            _push(root.address, blobs[1], retries=0)
        assert root.died_of_sigkill(), "the root did not die at root.before_mark"
        root = Proc(tmp_path / "root.toml", tmp_path / "root.log")
        assert (root.status()["version"], root.status()["buffered"]) == (1, 0)
        with pytest.raises(ReplayError):  # the island's retry of its unacknowledged push
            _push(root.address, blobs[1])
        assert _push(root.address, blobs[2])["status"] == "accepted"  # logged, buffered
        root.kill9()
        root = Proc(tmp_path / "root.toml", tmp_path / "root.log")
        assert (root.status()["version"], root.status()["buffered"]) == (1, 1)  # replayed
        with pytest.raises(ReplayError):  # the retry of an update the WAL holds
            _push(root.address, blobs[2])
        assert _push(root.address, blobs[3])["status"] == "accepted"  # the K-th: version 2
        version, theta = asyncio.run(_theta_at(root.address, 2, fed.islands[0]))
        assert version == 2 and root.status()["buffered"] == 0
        rounds = [[(d[0], 0), (d[1], 0)], [(d[2], 0), (d[3], 0)]]
        _assert_theta(theta, hand_versions(fed.theta0, rounds)[-1], "version 2")
    finally:
        root.stop()


def test_leaf_started_while_its_root_is_down_waits_for_it(tmp_path):
    """A leaf restarted while its root is down (both restarted after a crash, in any order)
    waits for the root instead of exiting after its fetch's retries (the chaos harness saw
    leaves exit with LinkError until the root was back)."""
    import socket
    import threading

    fed = make_federation(tmp_path, 1, aggregators=("root", "leaf0"))
    # The root's port stays reserved while the root is down: bound, not listening (the leaf's
    # dials are refused as by a closed port), with SO_REUSEPORT, which gRPC's listener sets
    # too; a port found free and closed could be taken by another process during the wait.
    placeholder = socket.socket()
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    placeholder.bind(("127.0.0.1", 0))
    port = placeholder.getsockname()[1]
    root_cfg = fed.config("root", "root", buffer_k=1)
    root_cfg.listen = f"127.0.0.1:{port}"
    save_config(root_cfg, tmp_path / "root.toml")
    leaf_cfg = fed.config("leaf0", "leaf", parent=root_cfg.listen, buffer_k=1)
    leaf_cfg.listen = "127.0.0.1:0"
    save_config(leaf_cfg, tmp_path / "leaf.toml")
    started: list = []
    waiter = threading.Thread(
        target=lambda: started.append(Proc(tmp_path / "leaf.toml", tmp_path / "leaf.log"))
    )
    waiter.start()
    root = None
    try:
        time.sleep(8.0)  # longer than the fetch's own retries (about 4 s)
        assert waiter.is_alive(), "the leaf exited (or came up) while its root was down"
        root = Proc(tmp_path / "root.toml", tmp_path / "root.log")
        placeholder.close()
        waiter.join(60)
        assert started, "the leaf exited instead of waiting for its root"
        leaf = started[0]
        blob = delta_bytes(fed.islands[0], random_delta(fed.theta0, 0), 1)
        assert _push(leaf.address, blob)["status"] == "accepted"
        version, _ = asyncio.run(_theta_at(leaf.address, 1, fed.islands[0]))
        assert version == 1
    finally:
        placeholder.close()
        waiter.join(60)
        for p in [*started, root]:
            if p is not None:
                p.stop()
