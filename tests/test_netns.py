"""Shaped links between real network namespaces: measured TCP rate and RTT across one link.

Needs root and iproute2 (``ip``, ``tc``). Uses its own prefix, so it never touches a set of
links someone brought up by hand, and tears down even when an assertion fails.
"""

from __future__ import annotations

import dataclasses
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


def _transfer(cfg, k: int, payload_bytes: int, warmup_bytes: int) -> tuple[dict, float]:
    """Pings then a bulk transfer from island k to the hub over k's link: the receiver's
    figures (``total``, ``rate_bps`` past the warm-up) and the median RTT."""
    hub_ip = netns.hub_address(k)
    receiver = subprocess.Popen(
        netns.exec_argv(
            "hub",
            [sys.executable, "-c", RECEIVER, hub_ip, str(PORT), str(warmup_bytes)],
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
                f"isl{k}",
                [sys.executable, "-c", SENDER, hub_ip, str(PORT), str(payload_bytes)],
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
    return json.loads(out), json.loads(sender.stdout)["rtt_s"]


def _link_rate(
    cfg, k: int, payload_bytes: int, warmup_bytes: int, want_bps: float, rel: float, tries: int = 3
) -> tuple[dict, float, list[float]]:
    """A link's rate as the best of up to ``tries`` transfers, stopping at the first within
    ``rel`` of ``want_bps``: a busy machine can only slow a transfer down (a starved receiver
    closes its TCP window and the link idles), never push it past the shaper. Returns the best
    transfer, its RTT and every rate seen, so the caller can hold each one to the upper bound."""
    seen, best = [], None
    for _ in range(tries):
        measured, rtt_s = _transfer(cfg, k, payload_bytes, warmup_bytes)
        assert measured["total"] == payload_bytes
        seen.append(measured["rate_bps"])
        if best is None or measured["rate_bps"] > best[0]["rate_bps"]:
            best = (measured, rtt_s)
        if abs(measured["rate_bps"] - want_bps) <= rel * want_bps:
            break
    return best[0], best[1], seen


def test_shaped_link_rate_and_rtt_then_teardown(link):
    cfg = link
    assert set(netns.list_namespaces()) >= {cfg.hub, cfg.island(0)}
    measured, rtt_s, seen = _link_rate(cfg, 0, PAYLOAD_BYTES, WARMUP_BYTES, RATE_BPS, 0.15)
    print(
        f"backend {cfg.backend}: goodput {measured['rate_bps'] / 1e6:.2f} Mbit/s "
        f"(set {RATE_BPS / 1e6:g}; transfers {[round(r / 1e6, 2) for r in seen]}), "
        f"rtt {rtt_s * 1e3:.1f} ms (one-way delay {cfg.delay_s * 1e3:g})"
    )
    # TCP/IP headers take ~4% of each 1500-byte packet; the rest is the shaper's accuracy.
    assert measured["rate_bps"] == pytest.approx(RATE_BPS, rel=0.15), seen
    assert max(seen) <= RATE_BPS * 1.15, seen  # no transfer ever beats the shaper
    assert 2 * cfg.delay_s * 0.9 <= rtt_s <= 2 * cfg.delay_s + 0.02

    removed = netns.down(cfg.prefix)
    assert set(removed) == {cfg.hub, cfg.island(0)}
    assert not netns.our_namespaces(cfg.prefix, netns.list_namespaces())
    assert netns.down(cfg.prefix) == []  # idempotent


NEEDS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0, reason="network namespaces and tc need root (CAP_NET_ADMIN)"
)
# Two islands, rates 4x apart: each link measured alone must be within 25% of its own rate,
# which no single rate for both can satisfy (and a loaded machine's slack of a few % can't break).
ISLAND_RATES_BPS = (24e6, 6e6)
RATE_TOLERANCE = 0.25


@NEEDS_ROOT
@pytest.mark.parametrize(
    ("backend", "delays_s"), [("veth", (0.0, 0.0)), ("auto", (0.01, 0.04))],
    ids=["veth-0ms", "auto-10ms-40ms"],
)  # fmt: skip
def test_each_island_link_runs_at_its_own_rate_and_delay(backend, delays_s, tmp_path, monkeypatch):
    """``up`` with one rate (and delay) per island: each link, measured alone, runs at its own
    rate, and its RTT is twice its own delay (the TUN forwarder holds each link's packets for
    that link's delay)."""
    monkeypatch.setenv("ARCHIPELAGO_NETNS_STATE", str(tmp_path / "state"))
    prefix = f"archr{os.getpid() % 100000}"
    rates = [f"{int(r)}bit" for r in ISLAND_RATES_BPS]
    try:
        cfg = netns.up(2, rates, list(delays_s), prefix=prefix, backend=backend)
        assert [cfg.link_rate(k) for k in range(2)] == list(ISLAND_RATES_BPS)
        results = []
        for k, rate in enumerate(ISLAND_RATES_BPS):
            payload = int(rate / 8 * 1.5)  # 1.5 s at the link's rate, warm-up included
            measured, rtt_s, seen = _link_rate(cfg, k, payload, payload // 6, rate, RATE_TOLERANCE)
            results.append((measured, rtt_s, seen))
            print(f"isl{k} ({cfg.backend}): goodput {measured['rate_bps'] / 1e6:.2f} Mbit/s "
                  f"(set {rate / 1e6:g}; transfers {[round(r / 1e6, 2) for r in seen]}), "
                  f"rtt {rtt_s * 1e3:.1f} ms (one-way {cfg.link_delay(k) * 1e3:g})")  # fmt: skip
        for k, (measured, rtt_s, seen) in enumerate(results):
            assert measured["rate_bps"] == pytest.approx(ISLAND_RATES_BPS[k], rel=RATE_TOLERANCE), (
                f"island {k}'s link",
                seen,
            )
            assert max(seen) <= ISLAND_RATES_BPS[k] * (1 + RATE_TOLERANCE), (f"island {k}", seen)
            assert 2 * delays_s[k] * 0.9 <= rtt_s <= 2 * delays_s[k] + 0.02, f"island {k}'s rtt"
        status = netns.status(prefix)
        assert status["config"]["rates_bps"] == list(ISLAND_RATES_BPS)
    finally:
        netns.down(prefix)
    assert not netns.our_namespaces(prefix, netns.list_namespaces())


@NEEDS_ROOT
def test_cli_up_with_one_rate_per_island_then_down(tmp_path, capsys, monkeypatch):
    """``python -m comms.netns up 3 --rates ...``: each link's tbf carries its own rate."""
    monkeypatch.setenv("ARCHIPELAGO_NETNS_STATE", str(tmp_path / "state"))
    prefix = f"archc{os.getpid() % 100000}"
    try:
        code = netns.main(["--prefix", prefix, "up", "3", "--rates", "8mbit,2mbit,500kbit"])
        assert code == 0, capsys.readouterr().err
        assert "isl2: 0.5 Mbit/s" in capsys.readouterr().out
        for k, want in enumerate(("8Mbit", "2Mbit", "500Kbit")):
            qdiscs = subprocess.run(
                ["tc", "-n", f"{prefix}-isl{k}", "qdisc", "show", "dev", netns.ISLAND_IFACE],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            assert f"rate {want}" in qdiscs, (k, qdiscs)
    finally:
        assert netns.main(["--prefix", prefix, "down"]) == 0
    assert not netns.our_namespaces(prefix, netns.list_namespaces())


def test_per_island_values_and_their_errors(capsys):
    assert netns.per_island("10mbit", 3, netns.parse_rate, "rate") == (10e6, ())
    assert netns.per_island(["100mbit", "2mbit"], 2, netns.parse_rate, "rate") == (
        100e6,
        (100e6, 2e6),
    )
    assert netns.per_island("0ms,50ms", 2, netns.parse_delay, "delay")[1] == (0.0, 0.05)
    cfg = netns.LinkConfig(2, 1e6, rates_bps=[3e6, 1e6], delays_s=[0.0, 0.05])
    assert (cfg.link_rate(0), cfg.link_rate(1), cfg.link_delay(1)) == (3e6, 1e6, 0.05)
    assert netns.tbf_args(cfg, 0)[2] == "3000000bit" and netns.tbf_args(cfg, 1)[2] == "1000000bit"
    assert netns.LinkConfig(2, 5e6).link_rate(1) == 5e6  # one rate for every link
    # the state file holds the config as JSON (lists); cut() and the forwarder read it back
    back = netns.LinkConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert back == cfg and hash(back) == hash(cfg)  # lists read back as tuples: hashable
    with pytest.raises(ConfigError, match=r"rates: give one per island \(4\), got 3"):
        netns.per_island(["1mbit"] * 3, 4, netns.parse_rate, "rate")
    with pytest.raises(ConfigError, match="island 1's rate: rate '10mbits'"):
        netns.per_island(["1mbit", "10mbits"], 2, netns.parse_rate, "rate")
    with pytest.raises(ConfigError, match="rates_bps: give one value per island"):
        netns.LinkConfig(3, 1e6, rates_bps=[1e6, 2e6])
    with pytest.raises(ConfigError, match="rates must be positive"):
        netns.LinkConfig(2, 1e6, rates_bps=[1e6, 0.0])
    with pytest.raises(ConfigError, match="jitter"):  # within the shortest link's delay
        netns.LinkConfig(2, 1e6, delays_s=[0.05, 0.005], jitter_s=0.01)
    # the CLI: bad input is one line on stderr and exit status 2, before anything is created
    assert netns.main(["--prefix", "archbad", "up", "4", "--rates", "1mbit,2mbit"]) == 2
    assert "rates: give one per island (4), got 2" in capsys.readouterr().err
    assert netns.main(["--prefix", "archbad", "up", "2", "--rates", "1mbit,2furlongs"]) == 2
    assert "island 1's rate" in capsys.readouterr().err
    assert netns.main(["--prefix", "archbad", "up", "2", "--rate", "1mbit",
                       "--delays", "5ms"]) == 2  # fmt: skip
    assert "delays: give one per island (2), got 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --rate and --rates together
        netns.main(["up", "2", "--rate", "1mbit", "--rates", "1mbit,2mbit"])


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
