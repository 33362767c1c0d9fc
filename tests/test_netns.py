"""Shaped links between real network namespaces: measured TCP rate and RTT across one link.

Needs root and iproute2 (``ip``, ``tc``). Uses its own prefix, so it never touches a set of
links someone brought up by hand, and tears down even when an assertion fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from comms import netns
from comms.errors import ConfigError

pytestmark = pytest.mark.netns

RATE_BPS = 20e6
DELAY_S = 0.02
PORT = 5201
PAYLOAD_BYTES = 3_000_000
WARMUP_BYTES = 500_000  # past slow start; the rate is measured over the rest

# Receiver, run in the hub: first echoes 1-byte pings, then times a bulk transfer.
RECEIVER = """
import json, socket, sys, time
host, port, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
srv = socket.create_server((host, port))
srv.settimeout(15)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(15)
while (b := conn.recv(1)):
    conn.sendall(b)
conn.close()
conn, _ = srv.accept()
conn.settimeout(15)
total, t_warm = 0, None
while (chunk := conn.recv(1 << 16)):
    total += len(chunk)
    if t_warm is None and total >= warmup:
        t_warm, warm_bytes = time.perf_counter(), total
t_end = time.perf_counter()
print(json.dumps({"total": total, "rate_bps": (total - warm_bytes) * 8 / (t_end - t_warm)}))
"""

# Sender, run in the island: 10 pings (median RTT), then the bulk payload.
SENDER = """
import json, socket, statistics, sys, time
host, port, nbytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=15)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(10):
    t = time.perf_counter()
    s.sendall(b"x")
    assert s.recv(1) == b"x"
    rtts.append(time.perf_counter() - t)
s.close()
s = socket.create_connection((host, port), timeout=15)
block = b"\\0" * (1 << 16)
sent = 0
while sent < nbytes:
    n = min(len(block), nbytes - sent)
    s.sendall(block[:n])
    sent += n
s.close()
print(json.dumps({"rtt_s": statistics.median(rtts)}))
"""


@pytest.fixture(params=[("auto", DELAY_S), ("veth", 0.0)], ids=["auto-20ms", "veth-0ms"])
def link(request, tmp_path, monkeypatch):
    """One shaped island link: the default backend with delay, and plain veth + tbf."""
    backend, delay_s = request.param
    monkeypatch.setenv("ARCHIPELAGO_NETNS_STATE", str(tmp_path / "state"))
    prefix = f"archt{os.getpid() % 100000}"
    try:
        yield netns.up(1, f"{int(RATE_BPS)}bit", delay_s, prefix=prefix, backend=backend)
    finally:
        netns.down(prefix)


def test_shaped_link_rate_and_rtt_then_teardown(link):
    cfg = link
    assert set(netns.list_namespaces()) >= {cfg.hub, cfg.island(0)}
    hub_ip = netns.hub_address(0)
    receiver = subprocess.Popen(
        netns.exec_argv(
            "hub",
            [sys.executable, "-c", RECEIVER, hub_ip, str(PORT), str(WARMUP_BYTES)],
            cfg.prefix,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout.readline().strip() == "ready", receiver.stderr.read()
        sender = subprocess.run(
            netns.exec_argv(
                "isl0",
                [sys.executable, "-c", SENDER, hub_ip, str(PORT), str(PAYLOAD_BYTES)],
                cfg.prefix,
            ),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert sender.returncode == 0, sender.stderr
        out, err = receiver.communicate(timeout=30)
        assert receiver.returncode == 0, err
    finally:
        receiver.kill()
        receiver.wait()

    measured = json.loads(out)
    rtt_s = json.loads(sender.stdout)["rtt_s"]
    print(
        f"backend {cfg.backend}: goodput {measured['rate_bps'] / 1e6:.2f} Mbit/s "
        f"(set {RATE_BPS / 1e6:g}), rtt {rtt_s * 1e3:.1f} ms (one-way delay {cfg.delay_s * 1e3:g})"
    )
    assert measured["total"] == PAYLOAD_BYTES
    # TCP/IP headers take ~4% of each 1500-byte packet; the rest is the shaper's accuracy.
    assert measured["rate_bps"] == pytest.approx(RATE_BPS, rel=0.15)
    assert 2 * cfg.delay_s * 0.9 <= rtt_s <= 2 * cfg.delay_s + 0.02

    removed = netns.down(cfg.prefix)
    assert set(removed) == {cfg.hub, cfg.island(0)}
    assert not netns.our_namespaces(cfg.prefix, netns.list_namespaces())
    assert netns.down(cfg.prefix) == []  # idempotent


def test_parsing_and_names():
    assert netns.parse_rate("10mbit") == 10e6
    assert netns.parse_rate("1.5gbit") == 1.5e9
    assert netns.parse_rate("1mbps") == 8e6  # tc: bytes per second
    assert netns.parse_delay("50ms") == pytest.approx(0.05)
    assert netns.parse_delay("2s") == 2.0
    assert netns.parse_loss("0.1%") == pytest.approx(0.001)
    assert netns.parse_loss("0.25") == 0.25
    for bad in (
        lambda: netns.parse_rate("fast"),
        lambda: netns.parse_loss("120%"),
        lambda: netns.parse_delay("5 parsecs"),
        lambda: netns.LinkConfig(1, 1e6, prefix="Bad-Prefix"),
        lambda: netns.exec_argv("other-ns", ["true"]),
    ):
        with pytest.raises(ConfigError):
            bad()
    existing = ["arch-hub", "arch-isl0", "arch-isl12", "arch-hubx", "archx-hub", "other", "arch-"]
    assert netns.our_namespaces("arch", existing) == ["arch-hub", "arch-isl0", "arch-isl12"]
    assert netns.exec_argv("isl3", ["ls"]) == ["ip", "netns", "exec", "arch-isl3", "ls"]
