"""No p2pd process and no hivemind socket of ours outlives a DHT node, however it ends.

hivemind's DHT node runs in a process forked from the caller's, which starts ``p2pd``; p2pd
listens on ``/tmp/hivemind-p2pd-<id>.sock``. Counted here, by process tree (other programs on
the machine may run DHT nodes of their own at the same time): after a clean shutdown, after
SIGTERM or SIGKILL of the process that started the node, after SIGTERM of the node process,
and around real ``aggregator serve`` and ``island run`` processes that use discovery. A node
process killed with SIGKILL itself leaves its socket file; the next start removes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from comms.config import save_config
from comms.discovery import Discovery, p2pd_children, remove_stale_sockets
from comms.identity import Identity

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parent.parent
MARK = "ARCHIPELAGO_SOCKET_TEST"

HOLDER = """
import os, sys, time
from comms.discovery import Discovery
from comms.identity import Identity
d = Discovery.start(Identity.generate(), timeout=30)
print("pids", os.getpid(), d.dht.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def marked(mark: str) -> list[tuple[int, str | None]]:
    """``(pid, p2pd socket or None)`` of every live process whose environment holds ``mark``
    (the test's processes, their DHT node processes and p2pd inherit it)."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or not alive(int(entry.name)):
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        listen = next((a for a in argv if a.startswith(b"-listen=/unix")), b"")
        found.append((int(entry.name), listen[len(b"-listen=/unix") :].decode() or None))
    return found


def parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = parent_of(pid)
    return False


def wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Holder:
    """A process that starts a DHT node and keeps it; its processes carry a fresh mark."""

    def __init__(self):
        self.mark = uuid.uuid4().hex
        env = {**os.environ, MARK: self.mark, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, text=True)  # fmt: skip
        words = self.proc.stdout.readline().split()
        assert words[:1] == ["pids"], f"the holder did not start: {words}"
        self.main, self.node = int(words[1]), int(words[2])
        (self.p2pd, self.socket), *_ = p2pd_children(self.node)
        assert self.socket and os.path.exists(self.socket)

    def counts(self) -> tuple[int, int]:
        """(processes of ours alive, socket files of ours present). The processes: the starter,
        its node process, p2pd (and torch's shared-memory manager, torch being imported)."""
        return len(marked(self.mark)), int(os.path.exists(self.socket))

    def close(self) -> None:
        for pid, _ in marked(self.mark):  # only what this holder started
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        if os.path.exists(self.socket):
            os.unlink(self.socket)


@pytest.fixture
def holder():
    h = Holder()
    yield h
    h.close()


def test_a_dht_start_and_shutdown_leave_no_p2pd_and_no_socket():
    d = Discovery.start(Identity.generate(), timeout=30)
    try:
        (p2pd, sock), *rest = p2pd_children(d.dht.pid)
        assert not rest and os.path.exists(sock) and alive(p2pd)
        d.announce("model", "m", {"version": 1}, ttl=30)
    finally:
        d.shutdown()
    client_socket = sock.replace("/hivemind-p2pd-", "/hivemind-p2pclient-")
    assert not alive(p2pd) and not alive(d.dht.pid)
    assert [os.path.exists(s) for s in (sock, client_socket)] == [False, False]
    d.shutdown()  # idempotent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_starter_takes_its_dht_node_p2pd_and_socket_along(holder, sig):
    """Before: the node process and p2pd lived on, orphaned, and the socket stayed."""
    ours = {pid for pid, _ in marked(holder.mark)}
    assert {holder.main, holder.node, holder.p2pd} <= ours and holder.counts()[1] == 1
    os.kill(holder.main, sig)
    holder.proc.wait(10)
    assert wait_for(lambda: holder.counts() == (0, 0), 10), holder.counts()


def test_sigterm_to_the_node_process_stops_p2pd_and_removes_its_socket(holder):
    """Before: p2pd died with its node process and left the socket file behind."""
    os.kill(holder.node, signal.SIGTERM)
    assert wait_for(lambda: not alive(holder.p2pd) and not os.path.exists(holder.socket), 10)
    # The node process removes the socket first and exits after: on a loaded machine its own
    # teardown (an interpreter with torch imported) can take a moment longer.
    assert wait_for(lambda: not alive(holder.node), 10) and alive(holder.main)


def test_the_socket_of_a_p2pd_killed_outright_is_removed_at_the_next_start(holder):
    """SIGKILL of the node process itself: nothing of ours runs to clean up; p2pd exits and
    its socket file stays until a later start finds nothing listening on it. A socket that is
    listened on, or too young to judge, is kept."""
    os.kill(holder.node, signal.SIGKILL)
    assert wait_for(lambda: not alive(holder.p2pd), 10)
    assert alive(holder.main) and holder.counts()[1] == 1  # the starter, the stale socket
    assert holder.socket not in remove_stale_sockets()  # younger than the minimum age
    live = Discovery.start(Identity.generate(), timeout=30)
    try:
        (_, live_socket), *_ = p2pd_children(live.dht.pid)
        removed = remove_stale_sockets(min_age_s=0.0)
        assert holder.socket in removed and not os.path.exists(holder.socket)
        assert live_socket not in removed and os.path.exists(live_socket)
        live.announce("model", "m", {"version": 1}, ttl=30)  # the live node still works
    finally:
        live.shutdown()
    assert holder.counts()[1] == 0


def test_aggregator_and_island_processes_using_discovery_leave_nothing_behind(tmp_path):
    """A root ``aggregator serve`` with a DHT and an ``island run`` that finds its leaf there:
    processes and sockets of theirs, counted while they run and after they end (the island on
    its own, the root on SIGTERM)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_island_daemon import _federation

    from aggregator.config import AggregatorConfig
    from comms.config import load_config

    islands = _federation(tmp_path, 1, steps=4, every=2)
    root_cfg = load_config(AggregatorConfig, tmp_path / "root.toml")
    root_cfg.dht = True
    save_config(root_cfg, tmp_path / "root.toml")
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "root.log", "ab") as log:
        root = subprocess.Popen([sys.executable, "-m", "aggregator", "serve",
                                 str(tmp_path / "root.toml")], stdout=subprocess.PIPE,
                                stderr=log, env=env, text=True)  # fmt: skip
    try:
        line = root.stdout.readline()
        assert " dht /ip4/" in line, f"the root did not start with a DHT: {line!r}"
        running = marked(mark)  # the root, its node process, p2pd (and torch's shm manager)
        root_sockets = {s for _, s in running if s}
        assert len(running) >= 3 and len(root_sockets) == 1
        island = islands[0]
        island.dht_peers = line.split(" dht ")[1].strip().split(",")
        save_config(island, tmp_path / "island.toml")
        island_sockets: set[str] = set()
        with open(tmp_path / "island.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "island", "run",
                                     str(tmp_path / "island.toml")], stdout=subprocess.DEVNULL,
                                    stderr=log, env=env)  # fmt: skip
            while proc.poll() is None:  # note the island's p2pd while it looks the leaf up
                island_sockets |= {s for _, s in marked(mark) if s} - root_sockets
                time.sleep(0.05)
        assert proc.returncode == 0, (tmp_path / "island.log").read_text()[-3000:]
        assert "chose aggregator root" in (tmp_path / "island.log").read_text()
        assert len(island_sockets) == 1, island_sockets
        left = [
            pid
            for pid, _ in marked(mark)
            if not descends(pid, root.pid)
            and not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"torch_shm")
        ]
        # (torch's shared-memory manager leaves when its last client has: checked below)
        assert left == [], [Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in left]
        assert {s for _, s in marked(mark) if s} == root_sockets  # the island's p2pd is gone
        assert not [s for s in island_sockets if os.path.exists(s)]  # ... and its socket
    finally:
        root.send_signal(signal.SIGTERM)
        root.wait(30)
    assert wait_for(lambda: not marked(mark), 10), marked(mark)
    assert not [s for s in root_sockets if os.path.exists(s)]
