"""Emulated wide-area links between Linux network namespaces (needs root, ``ip`` and ``tc``).

``up N`` creates a hub namespace ``<prefix>-hub`` (where aggregators run) and N island
namespaces ``<prefix>-isl0..`` (where islands run). Island k is joined to the hub by its own
point-to-point link, island side 10.231.k.2, hub side 10.231.k.1; the hub forwards between
islands, so island-to-island traffic crosses two links. Every link is shaped in both
directions: ``tbf`` for the rate, and a fixed one-way delay plus random packet loss.

Two backends carry the links:

- ``veth``: a veth pair per link; delay and loss by ``tc netem`` (the kernel's usual path).
- ``tun``: two TUN devices per link with a small forwarder process that holds each packet for
  the delay and drops it with the loss probability; rate by ``tbf`` on both TUN devices. For
  kernels built without ``sch_netem``. The forwarder is one Python process for all links,
  started by ``up`` and stopped by ``down``.

``auto`` (the default) takes ``veth`` when the link needs no delay or loss or the kernel has
netem, and ``tun`` otherwise. Everything created lives in namespaces named ``<prefix>-hub`` and
``<prefix>-isl<k>``; nothing in the root namespace is touched, and ``down`` removes exactly
those namespaces (and is safe to run twice). State (config, forwarder pid and log) sits in
``$ARCHIPELAGO_NETNS_STATE/<prefix>`` (default ``/run/archipelago-netns``).

Links may differ: ``--rates 100mbit,10mbit,10mbit,2mbit`` gives island k's link the k-th rate
(both directions), and ``--delays 0ms,50ms,50ms,50ms`` its own one-way delay; ``--rate`` and
``--delay`` give every link the same. The backend is chosen once for all links.

Jitter (``--jitter 10ms``): each packet's delay is drawn uniformly in delay +- jitter (netem
``delay D J distribution uniform``; the forwarder the same), so packets may be reordered.
``cut K`` silences island K's link (no packet passes either way, no connection is reset) until
``cut K --restore``.

CLI: ``python -m comms.netns up N --rate 10mbit --delay 50ms [--loss 0.1%] [--jitter 10ms]``
(or ``--rates R0,R1,...`` / ``--delays D0,D1,...``, one per island),
``down``, ``cut K [--restore]``, ``status``, ``exec NS CMD...`` (NS: ``hub``, ``isl0``, ... or a full name); ``--prefix`` picks
another set of namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import heapq
import json
import math
import os
import random
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from comms.errors import ConfigError, LinkError

DEFAULT_PREFIX = "arch"
MAX_ISLANDS = 250
HUB_IFACE = "isl{k}"  # in the hub namespace, one per island
ISLAND_IFACE = "uplink"  # in each island namespace
PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9]{0,11}$")
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000

_RATE_UNITS = {
    "bit": 1,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "bps": 8,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
}  # tc's units: "bps" is bytes per second
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


# ------------------------------------------------------------------ pure parsing and naming


def parse_rate(text: str) -> float:
    """tc-style rate to bits per second: ``10mbit`` -> 1e7; a bare number is bits/s."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in {"", *_RATE_UNITS}:
        raise ConfigError(f"rate {text!r}: use a number and one of {sorted(_RATE_UNITS)}")
    rate = float(m.group(1)) * _RATE_UNITS.get(m.group(2), 1)
    if rate <= 0:
        raise ConfigError(f"rate {text!r} must be positive")
    return rate


def parse_delay(text: str) -> float:
    """tc-style time to seconds: ``50ms`` -> 0.05; a bare number is milliseconds (as in tc)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in {"", *_TIME_UNITS}:
        raise ConfigError(f"delay {text!r}: use a number and one of {sorted(_TIME_UNITS)}")
    return float(m.group(1)) * _TIME_UNITS.get(m.group(2), 1e-3)


def parse_loss(text: str) -> float:
    """Loss probability: ``0.1%`` -> 0.001; a bare number is a fraction in [0, 1]."""
    s = str(text).strip()
    try:
        loss = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError as e:
        raise ConfigError(f"loss {text!r}: use a percentage like 0.1% or a fraction") from e
    if not 0 <= loss <= 1:
        raise ConfigError(f"loss {text!r} must be between 0% and 100%")
    return loss


@dataclass(frozen=True)
class LinkConfig:
    islands: int
    rate_bps: float  # every link's rate, unless rates_bps gives one per island
    delay_s: float = 0.0  # every link's one-way delay, unless delays_s gives one per island
    loss: float = 0.0
    mtu: int = 1500
    backend: str = "veth"  # resolved: "veth" or "tun"
    prefix: str = DEFAULT_PREFIX
    jitter_s: float = 0.0  # each packet's delay is its link's delay +- up to jitter_s (uniform)
    rates_bps: tuple[float, ...] = ()  # island k's link: rates_bps[k]; empty: rate_bps for all
    delays_s: tuple[float, ...] = ()  # island k's link: delays_s[k]; empty: delay_s for all

    def __post_init__(self):
        if not PREFIX_PATTERN.match(self.prefix):
            raise ConfigError(f"prefix {self.prefix!r} must match {PREFIX_PATTERN.pattern}")
        if not 1 <= self.islands <= MAX_ISLANDS:
            raise ConfigError(f"islands must be in 1..{MAX_ISLANDS}, got {self.islands}")
        if self.backend not in ("veth", "tun"):
            raise ConfigError(f"backend must be veth or tun, got {self.backend!r}")
        for name in ("rates_bps", "delays_s"):  # read back from JSON as lists
            values = tuple(float(v) for v in getattr(self, name))
            object.__setattr__(self, name, values)
            if values and len(values) != self.islands:
                raise ConfigError(
                    f"{name}: give one value per island ({self.islands}), got {len(values)}"
                )
        if not all(math.isfinite(r) and r > 0 for r in (self.rate_bps, *self.rates_bps)):
            raise ConfigError(f"rates must be positive, got {self.rates_bps or self.rate_bps}")
        if not all(math.isfinite(d) and d >= 0 for d in (self.delay_s, *self.delays_s)):
            raise ConfigError(f"delays must be at least 0, got {self.delays_s or self.delay_s}")
        shortest = min(self.link_delay(k) for k in range(self.islands))
        if not 0 <= self.jitter_s <= shortest:
            raise ConfigError(
                f"jitter must be in [0, shortest link delay {shortest} s], got {self.jitter_s} s"
            )
        if not 576 <= self.mtu <= 9000:
            raise ConfigError(f"mtu must be in 576..9000, got {self.mtu}")

    def link_rate(self, k: int) -> float:
        """Island k's link rate, bits per second (both directions)."""
        return self.rates_bps[k] if self.rates_bps else self.rate_bps

    def link_delay(self, k: int) -> float:
        """Island k's link one-way delay, seconds (each direction)."""
        return self.delays_s[k] if self.delays_s else self.delay_s

    @property
    def longest_delay(self) -> float:
        return max(self.link_delay(k) for k in range(self.islands))

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def island(self, k: int) -> str:
        return f"{self.prefix}-isl{k}"

    @property
    def namespaces(self) -> list[str]:
        return [self.hub] + [self.island(k) for k in range(self.islands)]


def hub_address(k: int) -> str:
    """The hub's address on island k's link (what island k dials to reach the hub)."""
    return f"10.231.{k}.1"


def island_address(k: int) -> str:
    return f"10.231.{k}.2"


def tbf_args(cfg: LinkConfig, k: int = 0) -> list[str]:
    """tbf for island k's link: its rate; burst >= 4 packets or 4 ms of rate; queue >= 2x BDP +
    20 ms."""
    rate_bps, delay_s = cfg.link_rate(k), cfg.link_delay(k)
    rate_bytes = rate_bps / 8
    burst = max(4 * (cfg.mtu + 14), int(rate_bytes * 0.004))
    limit = max(64 * 1024, int(rate_bytes * (2 * delay_s + 0.02)))
    return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "limit", str(limit)]


def netem_args(cfg: LinkConfig, k: int = 0) -> list[str]:
    """netem for island k's link: its delay, the jitter and the loss."""
    delay_s = cfg.link_delay(k)
    in_flight = cfg.link_rate(k) / 8 * delay_s / cfg.mtu  # packets held by the delay line
    args = ["netem", "limit", str(max(1000, int(4 * in_flight)))]
    if delay_s > 0:
        args += ["delay", f"{delay_s * 1e3:.3f}ms"]
        if cfg.jitter_s > 0:
            args += [f"{cfg.jitter_s * 1e3:.3f}ms", "distribution", "uniform"]
    if cfg.loss > 0:
        args += ["loss", f"{cfg.loss * 100:.6f}%"]
    return args


def state_dir(prefix: str) -> Path:
    root = os.environ.get("ARCHIPELAGO_NETNS_STATE", "/run/archipelago-netns")
    return Path(root) / prefix


def our_namespaces(prefix: str, existing: list[str]) -> list[str]:
    """The namespaces among ``existing`` that belong to ``prefix`` (never anything else)."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(hub|isl\d+)$")
    return [ns for ns in existing if pattern.match(ns)]


# ------------------------------------------------------------------ ip / tc shell


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LinkError(f"`{' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def require_tools() -> None:
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} not found; install the iproute2 package")
    if os.geteuid() != 0:
        raise ConfigError("network namespaces need root (or CAP_NET_ADMIN and CAP_SYS_ADMIN)")


def list_namespaces() -> list[str]:
    out = _run("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def kernel_has_netem() -> bool:
    """Probe sch_netem in a throwaway namespace (some kernels are built without it)."""
    probe = f"archprobe{os.getpid()}"
    _run("ip", "netns", "add", probe)
    try:
        proc = _run("tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", check=False)
        return proc.returncode == 0
    finally:
        _run("ip", "netns", "del", probe, check=False)


def resolve_backend(requested: str, delay_s: float, loss: float) -> str:
    if requested in ("veth", "tun"):
        return requested
    if requested != "auto":
        raise ConfigError(f"backend must be auto, veth or tun, got {requested!r}")
    if (delay_s == 0 and loss == 0) or kernel_has_netem():
        return "veth"
    return "tun"


def _make_link(cfg: LinkConfig, k: int) -> None:
    hub, isl, hub_if = cfg.hub, cfg.island(k), HUB_IFACE.format(k=k)
    if cfg.backend == "veth":
        _run(
            "ip",
            "-n",
            hub,
            "link",
            "add",
            hub_if,
            "type",
            "veth",
            "peer",
            "name",
            ISLAND_IFACE,
            "netns",
            isl,
        )
        _run("ip", "-n", hub, "addr", "add", f"{hub_address(k)}/30", "dev", hub_if)
        _run("ip", "-n", isl, "addr", "add", f"{island_address(k)}/30", "dev", ISLAND_IFACE)
    else:
        _run("ip", "-n", hub, "tuntap", "add", "dev", hub_if, "mode", "tun")
        _run("ip", "-n", isl, "tuntap", "add", "dev", ISLAND_IFACE, "mode", "tun")
        _run(
            "ip", "-n", hub, "addr", "add", hub_address(k), "peer", island_address(k), "dev", hub_if
        )
        _run(
            "ip",
            "-n",
            isl,
            "addr",
            "add",
            island_address(k),
            "peer",
            hub_address(k),
            "dev",
            ISLAND_IFACE,
        )
    for ns, dev in ((hub, hub_if), (isl, ISLAND_IFACE)):
        _run("ip", "-n", ns, "link", "set", dev, "mtu", str(cfg.mtu), "up")
        _shape(cfg, ns, dev, k)
    _run("ip", "-n", isl, "route", "add", "10.231.0.0/16", "via", hub_address(k))


def _shape(cfg: LinkConfig, ns: str, dev: str, k: int) -> None:
    tc = ["tc", "-n", ns, "qdisc", "add", "dev", dev]
    if cfg.backend == "veth" and (cfg.link_delay(k) > 0 or cfg.loss > 0):
        try:
            _run(*tc, "root", "handle", "1:", *netem_args(cfg, k))
        except LinkError as e:
            raise LinkError(
                f"{e}\nThis kernel may lack sch_netem: use --backend tun (or auto)"
            ) from e
        _run(*tc, "parent", "1:1", "handle", "10:", *tbf_args(cfg, k))
    else:
        _run(*tc, "root", "handle", "1:", *tbf_args(cfg, k))


def per_island(
    value: str | float | Sequence[str | float], islands: int, parse, what: str
) -> tuple[float, tuple[float, ...]]:
    """One value for every link, or one per island (a sequence, or text ``a,b,c``): returns
    ``(common value, per-island values or ())``. A count that is not ``islands`` or a value
    ``parse`` refuses is a ConfigError naming the island."""
    if isinstance(value, str) and "," in value:
        value = value.split(",")
    if isinstance(value, str | int | float):
        return (parse(value) if isinstance(value, str) else float(value)), ()
    values = list(value)
    if len(values) != islands:
        raise ConfigError(f"{what}s: give one per island ({islands}), got {len(values)}")
    parsed = []
    for k, v in enumerate(values):
        try:
            parsed.append(parse(v) if isinstance(v, str) else float(v))
        except ConfigError as e:
            raise ConfigError(f"island {k}'s {what}: {e}") from e
    return max(parsed), tuple(parsed)


def up(
    islands: int,
    rate: str | float | Sequence[str | float],
    delay: str | float | Sequence[str | float] = 0.0,
    loss: str | float = 0.0,
    *,
    prefix: str = DEFAULT_PREFIX,
    backend: str = "auto",
    mtu: int = 1500,
    ready_timeout: float = 10.0,
    jitter: str | float = 0.0,
) -> LinkConfig:
    """Create the namespaces and shaped links (tearing down any earlier set with this prefix).
    ``rate`` and ``delay`` are one value for every link or a sequence of one per island
    (``["100mbit", "10mbit", ...]``)."""
    rate_bps, rates_bps = per_island(rate, islands, parse_rate, "rate")
    delay_s, delays_s = per_island(delay, islands, parse_delay, "delay")
    loss_p = parse_loss(loss) if isinstance(loss, str) else float(loss)
    jitter_s = parse_delay(jitter) if isinstance(jitter, str) else float(jitter)
    cfg = LinkConfig(islands, rate_bps, delay_s, loss_p, mtu, "veth", prefix, jitter_s,
                     rates_bps, delays_s)  # fmt: skip  # validates before probing the kernel
    require_tools()
    resolved = resolve_backend(backend, cfg.longest_delay, loss_p)
    cfg = LinkConfig(**{**asdict(cfg), "backend": resolved})
    down(prefix)
    try:
        for ns in cfg.namespaces:
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "netns", "exec", cfg.hub, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for k in range(islands):
            _make_link(cfg, k)
        state = state_dir(prefix)
        state.mkdir(parents=True, exist_ok=True)
        (state / "config.json").write_text(json.dumps(asdict(cfg)))
        if cfg.backend == "tun":
            _start_forwarder(state, ready_timeout)
    except BaseException:
        down(prefix)
        raise
    return cfg


def down(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Stop the forwarder and delete this prefix's namespaces; returns the names deleted."""
    state = state_dir(prefix)
    _stop_forwarder(state)
    removed = []
    for ns in our_namespaces(prefix, list_namespaces()):
        _run("ip", "netns", "del", ns, check=False)
        removed.append(ns)
    shutil.rmtree(state, ignore_errors=True)
    return removed


def cut(k: int, prefix: str = DEFAULT_PREFIX, restore: bool = False) -> None:
    """Cut island k's link (every packet both ways is lost) or, with ``restore``, mend it.
    Connections are not reset: it is a link that goes silent, as a cable pulled. ``veth``: the
    hub end goes down (and comes back up); ``tun``: the forwarder drops the link's packets
    (it reads the set of cut links from ``cut.json`` in the state directory)."""
    state = state_dir(prefix)
    cfg = LinkConfig(**json.loads((state / "config.json").read_text()))
    if not 0 <= k < cfg.islands:
        raise ConfigError(f"island link {k} is not in 0..{cfg.islands - 1}")
    if cfg.backend == "veth":
        dev = HUB_IFACE.format(k=k)
        _run("ip", "-n", cfg.hub, "link", "set", dev, "up" if restore else "down")
        if restore:  # routes through a link that went down are gone: put the island's back
            _run("ip", "-n", cfg.island(k), "route", "replace", "10.231.0.0/16", "via",
                 hub_address(k))  # fmt: skip
        return
    path = state / "cut.json"
    links = set(json.loads(path.read_text())) if path.exists() else set()
    links = links - {k} if restore else links | {k}
    tmp = path.with_name("cut.json.tmp")
    tmp.write_text(json.dumps(sorted(links)))
    os.replace(tmp, path)


def status(prefix: str = DEFAULT_PREFIX) -> dict:
    state = state_dir(prefix)
    config_path = state / "config.json"
    namespaces = our_namespaces(prefix, list_namespaces())
    report: dict = {
        "prefix": prefix,
        "namespaces": namespaces,
        "config": json.loads(config_path.read_text()) if config_path.exists() else None,
        "forwarder_pid": _forwarder_pid(state),
        "links": {},
    }
    for ns in namespaces:
        addrs = _run("ip", "-n", ns, "-br", "addr", "show", check=False).stdout.strip()
        qdiscs = _run("tc", "-n", ns, "qdisc", "show", check=False).stdout.strip()
        report["links"][ns] = {"addresses": addrs.splitlines(), "qdiscs": qdiscs.splitlines()}
    return report


def exec_argv(namespace: str, argv: list[str], prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The command line that runs ``argv`` inside one of this prefix's namespaces."""
    full = namespace if namespace.startswith(f"{prefix}-") else f"{prefix}-{namespace}"
    if not our_namespaces(prefix, [full]):
        raise ConfigError(f"{namespace!r} is not one of {prefix}'s namespaces (hub, isl0, ...)")
    if not argv:
        raise ConfigError("exec needs a command to run")
    return ["ip", "netns", "exec", full, *argv]


# ------------------------------------------------------------------ the tun forwarder


def _start_forwarder(state: Path, timeout: float) -> None:
    with open(state / "forwarder.log", "wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen(
            [sys.executable, "-m", "comms.netns", "_forward", str(state)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
    (state / "forwarder.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while not (state / "forwarder.ready").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = (state / "forwarder.log").read_text(errors="replace")[-2000:]
            raise LinkError(f"link forwarder did not start; its log:\n{tail}")
        time.sleep(0.02)


def _forwarder_pid(state: Path) -> int | None:
    try:
        pid = int((state / "forwarder.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    # Only a live forwarder of this very state dir; a recycled pid is left alone.
    return pid if b"_forward" in cmdline and str(state).encode() in cmdline else None


def _stop_forwarder(state: Path, timeout: float = 3.0) -> None:
    pid = _forwarder_pid(state)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _forwarder_pid(state) is not None:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.02)


def _open_tun(namespace: str, dev: str) -> int:
    """Attach to the persistent TUN device ``dev`` inside ``namespace``."""
    libc = ctypes.CDLL(None, use_errno=True)
    ns_fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(ns_fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
        return fd
    finally:
        os.close(ns_fd)


def forward(state: Path) -> None:
    """Relay packets between each link's two TUN ends, holding each for the delay and dropping
    it with the loss probability. Single-threaded: one selector, one heap of due packets."""
    cfg = LinkConfig(**json.loads((state / "config.json").read_text()))
    sel = selectors.DefaultSelector()
    link_of: dict[int, int] = {}  # fd -> island link k
    for k in range(cfg.islands):
        island_fd = _open_tun(cfg.island(k), ISLAND_IFACE)
        hub_fd = _open_tun(cfg.hub, HUB_IFACE.format(k=k))
        sel.register(island_fd, selectors.EVENT_READ, hub_fd)
        sel.register(hub_fd, selectors.EVENT_READ, island_fd)
        link_of[island_fd] = link_of[hub_fd] = k
    cut_file, cut_links, cut_checked = state / "cut.json", set(), 0.0
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    rng = random.Random()
    due: list[tuple[float, int, int, bytes]] = []  # (release time, sequence, out fd, packet)
    sequence = 0
    (state / "forwarder.ready").write_text("ready")
    while not stopping:
        if time.monotonic() - cut_checked > 0.1:  # links cut by ``cut()``
            cut_checked = time.monotonic()
            with contextlib.suppress(OSError, ValueError):
                cut_links = set(json.loads(cut_file.read_text())) if cut_file.exists() else set()
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else 0.1
        for key, _ in sel.select(min(timeout, 0.1)):
            for _ in range(256):  # bounded, so one busy link cannot starve the others
                try:
                    packet = os.read(key.fd, 65536)
                except BlockingIOError:
                    break
                if link_of[key.fd] in cut_links or (cfg.loss and rng.random() < cfg.loss):
                    continue
                delay = cfg.link_delay(link_of[key.fd])
                if cfg.jitter_s:  # uniform, as netem's "distribution uniform"; may reorder
                    delay = max(0.0, delay + rng.uniform(-cfg.jitter_s, cfg.jitter_s))
                sequence += 1
                heapq.heappush(due, (time.monotonic() + delay, sequence, key.data, packet))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, out_fd, packet = heapq.heappop(due)
            # A write the receiving stack refuses is a dropped packet, as on a real link.
            with contextlib.suppress(OSError):
                os.write(out_fd, packet)


# ------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netns_link", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default=DEFAULT_PREFIX)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="create N shaped island links to a hub")
    p_up.add_argument("islands", type=int)
    rates = p_up.add_mutually_exclusive_group(required=True)
    rates.add_argument("--rate", help="every link's rate, e.g. 10mbit")
    rates.add_argument("--rates", help="one rate per island, e.g. 100mbit,10mbit,10mbit,2mbit")
    delays = p_up.add_mutually_exclusive_group()
    delays.add_argument("--delay", default="0ms", help="one-way, every link, e.g. 50ms")
    delays.add_argument("--delays", help="one-way, one per island, e.g. 0ms,50ms,50ms,50ms")
    p_up.add_argument("--loss", default="0%", help="per direction, e.g. 0.1%%")
    p_up.add_argument("--jitter", default="0ms", help="+- this on each packet's delay, e.g. 10ms")
    p_up.add_argument("--mtu", type=int, default=1500)
    p_up.add_argument("--backend", default="auto", choices=["auto", "veth", "tun"])
    sub.add_parser("down", help="remove this prefix's namespaces")
    p_cut = sub.add_parser("cut", help="cut island k's link (--restore: mend it)")
    p_cut.add_argument("link", type=int)
    p_cut.add_argument("--restore", action="store_true")
    sub.add_parser("status", help="print namespaces, addresses and qdiscs as JSON")
    p_exec = sub.add_parser("exec", help="run a command inside a namespace")
    p_exec.add_argument("namespace")
    p_exec.add_argument("argv", nargs=argparse.REMAINDER)
    p_fwd = sub.add_parser("_forward")  # internal: the tun backend's forwarder
    p_fwd.add_argument("state")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            cfg = up(
                args.islands,
                args.rates.split(",") if args.rates else args.rate,
                args.delays.split(",") if args.delays else args.delay,
                args.loss,
                prefix=args.prefix,
                backend=args.backend,
                mtu=args.mtu,
                jitter=args.jitter,
            )
            print(
                f"{cfg.islands} island link(s) up ({cfg.backend} backend); hub namespace "
                f"{cfg.hub}; island k is 10.231.k.2, the hub on its link 10.231.k.1"
            )
            for k in range(cfg.islands):
                print(f"  isl{k}: {cfg.link_rate(k) / 1e6:g} Mbit/s, "
                      f"{cfg.link_delay(k) * 1e3:g} ms one way")  # fmt: skip
        elif args.command == "down":
            print("removed:", " ".join(down(args.prefix)) or "nothing")
        elif args.command == "cut":
            cut(args.link, args.prefix, restore=args.restore)
        elif args.command == "status":
            print(json.dumps(status(args.prefix), indent=2))
        elif args.command == "exec":
            cmd = exec_argv(args.namespace, args.argv, args.prefix)
            os.execvp(cmd[0], cmd)
        elif args.command == "_forward":
            forward(Path(args.state))
    except (ConfigError, LinkError) as e:
        print(f"netns_link: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
