"""The chaos harness's supervision pieces: a daemon and its incarnations, and what it reads
from the system (pids carrying the run's marker, the socket files they hold, ports, namespaces).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from federation_procs import Child

from comms.logs import read_log

MODEL_ID = "global"
N_ISLANDS = 4  # the federation: a root, two leaves, four islands (island i on leaf i % 2)
LEAVES = ("leaf0", "leaf1")
RUN_ENV = "ARCHIPELAGO_CHAOS_RUN"  # marks every process of a run, to find any left behind
SOCKET_GLOB = "hivemind-*.sock"


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class Incarnation:
    start: float  # time.monotonic()
    wall_start: float
    fault: str = ""
    ready: float | None = None
    end: float | None = None
    rc: int | None = None
    killed: str = ""  # what the harness did to it: "kill", or "" (fault point or exit)
    first_progress: float | None = None  # island: first accepted push; root: first version
    first_ack: float | None = None  # island: first push answered accepted or replayed
    resumed_step: int = 0
    last_step: int = 0


def note_island_progress(run: Incarnation, acks: list[dict], now: float) -> None:
    """An island incarnation's first acknowledged push (accepted, or "replayed": the push
    resent after the restart was held already, so its work is in) and first accepted one,
    each noted once, at ``now``, from its ack records since the incarnation started."""
    for a in acks:
        if a["t"] < run.wall_start:
            continue
        if a.get("status") in ("accepted", "replayed") and run.first_ack is None:
            run.first_ack = now
        if a.get("status") == "accepted" and run.first_progress is None:
            run.first_progress = now
            return


def note_root_progress(run: Incarnation, published: list[int], now: float) -> None:
    """A root incarnation's first published version, noted once: polling on after it must not
    move it (a root has no acks, so the supervisor keeps polling it)."""
    if published and run.first_progress is None:
        run.first_progress = now


@dataclass
class Daemon:
    """One supervised daemon: a command, its config and state, its incarnations."""

    name: str
    role: str  # island, leaf, root
    argv: list[str]
    ready_line: str
    faults: list[str] = field(default_factory=list)
    child: Child | None = None
    runs: list[Incarnation] = field(default_factory=list)
    restart_at: float | None = None
    done: bool = False  # an island that finished its steps
    http: str = ""
    log_offset: int = 0

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.proc.poll() is None


def http_json(address: str, path: str, timeout: float = 5.0) -> dict:
    from comms.http import url_of

    with urllib.request.urlopen(url_of(address) + path, timeout=timeout) as r:
        return json.loads(r.read())


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def resumed_step(log_path: Path) -> int:
    """The step the island's newest run resumed from (its log), 0 for a fresh start."""
    step = 0
    with contextlib.suppress(OSError):
        for line in read_log(log_path.read_text(errors="replace")):
            text = line["message"]
            if ": resumed from " in text and " at step " in text:
                step = int(text.rsplit(" at step ", 1)[1].split()[0])
    return step


def find_processes(run_id: str) -> list[str]:
    """Processes whose environment carries this run's marker (its daemons and their p2pd)."""
    needle = f"{RUN_ENV}={run_id}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{pid} {cmd[:120]}")
        except OSError:
            continue
    return found


def lingering_processes(run_id: str, grace_s: float = 10.0, poll_s: float = 0.2) -> list[str]:
    """This run's processes still alive ``grace_s`` after the run stopped: a helper on its way
    out (torch's ``torch_shm_manager`` exits on its own once its last client is gone) is given
    that long, so only a process that stays is reported as left behind."""
    deadline = time.monotonic() + grace_s
    while (found := find_processes(run_id)) and time.monotonic() < deadline:
        time.sleep(poll_s)
    return found


def run_sockets(run_id: str) -> set[Path]:
    """The hivemind socket files (p2pd's and its clients') that this run's processes hold open:
    their fds' socket inodes looked up in /proc/net/unix."""
    needle = f"{RUN_ENV}={run_id}".encode()
    inodes: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if needle not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            parts = line.split()
            if (
                len(parts) >= 8
                and parts[6] in inodes
                and Path(parts[7]).match(f"/tmp/{SOCKET_GLOB}")
            ):
                found.add(Path(parts[7]))
    return found


def setns(target: str | int) -> None:
    import ctypes

    from comms.netns import CLONE_NEWNET

    fd = os.open(target, os.O_RDONLY) if isinstance(target, str) else target
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {target}")
    finally:
        if isinstance(target, str):
            os.close(fd)


def one_process(script: str, scenario: str, argv: list[str], reference: dict | None) -> dict:
    """Run one scenario as ``chaos.py --one``; its result (or why it failed)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, script, *argv, "--scenarios", scenario, "--one", str(result_path)]
        if reference:
            cmd += ["--reference-loss", repr(reference["loss"])]
        p = subprocess.run(cmd, cwd=Path(script).resolve().parents[1])
        if result_path.exists():
            return json.loads(result_path.read_text())
        return {"scenario": scenario, "passed": False, "problems": {"harness": [
            f"chaos.py --one {scenario} exited with {p.returncode}"]}}  # fmt: skip
