"""Child processes of the federation launcher: started, watched and stopped cleanly.

Each child runs in its own process group (so a terminal's Ctrl+C reaches only the launcher,
which then stops the children in order) with ``PR_SET_PDEATHSIG`` set in ``preexec_fn``:
when the launcher dies, even by ``kill -9``, the kernel signals every child. Services get
SIGTERM and stop as on Ctrl+C; the launcher gives islands SIGKILL instead, because their
aggregators die at the same moment (an island on SIGTERM would spend its 30 s close timeout
trying to push its last round to a leaf that is gone) and an island is built to survive
``kill -9`` (it resumes from its last snapshot). PDEATHSIG fires when the *thread* that forked
the child exits, so children must be started from the launcher's main thread.

``Supervisor.stop_all`` stops islands first, then the router, then leaves, then the root:
SIGTERM, a grace period, then SIGKILL of the child's whole process group (which also reaches
anything it started, such as hivemind's DHT daemon). ``OUT/processes.json`` lists every
child's pid as it starts, for tests and for a user cleaning up by hand.

gRPC and ``preexec_fn``. A child started with ``preexec_fn`` is forked (not spawned), so
gRPC's fork handlers run in it; with gRPC's fork support on, they restart its poller thread in
the child, whose epoll descriptor ``close_fds`` has already closed, and the child aborts before
its ``exec`` (``epoll_wait error: Bad file descriptor``, exit -6; grpc/grpc#43055). Measured
here: 27 of 200 such children of a process with a busy gRPC channel died so, none with fork
support off. No child uses its launcher's gRPC, so importing this module turns gRPC's fork
support off (``GRPC_ENABLE_FORK_SUPPORT=false``, unless set): gRPC reads it at its own import,
so a launcher imports this module before anything that imports grpc (tests: ``conftest.py``).

Concurrency: one reader thread per child copies its stdout into its log and a queue;
everything else runs in the caller's thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # before grpc's import: see above


class FederationError(Exception):
    """A phase could not go on; the message says what failed and which log to read."""


_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_launcher(launcher_pid: int, death_signal: int):
    """preexec_fn: signal this child when the launcher's main thread dies (even by kill -9)."""

    def preexec() -> None:
        _LIBC.prctl(PR_SET_PDEATHSIG, death_signal)
        if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
            os._exit(1)

    return preexec


class Child:
    """One started process: its stdout lines (also copied into its log), its exit."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, env: dict[str, str], cwd: Path,
        death_signal: int = signal.SIGTERM,
    ):  # fmt: skip
        self.name, self.argv, self.log_path = name, argv, log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log, env=env,
            cwd=cwd, process_group=0, preexec_fn=_die_with_launcher(os.getpid(), death_signal),
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.ready_at = 0.0  # time.monotonic() when wait_line found its line
        threading.Thread(target=self._read, name=f"read-{name}", daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.stdout.append(line)
            self.lines.put(line)
            with contextlib.suppress(ValueError):
                self._log.write(raw)
                self._log.flush()
        self.lines.put(None)

    def wait_line(self, needle: str, timeout: float) -> str:
        """The first stdout line containing ``needle``; FederationError if it never comes."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise FederationError(
                    f"{self.name} exited ({self.proc.wait()}) before it was ready; "
                    f"see {self.log_path}:\n{tail(self.log_path)}"
                )
            if needle in line:
                self.ready_at = time.monotonic()
                return line
        raise FederationError(f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}")

    def finish(self, timeout: float) -> int:
        """Wait for a normal exit; FederationError on a nonzero status."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired as e:
            raise FederationError(f"{self.name} still running after {timeout:.0f} s") from e
        if rc != 0:
            raise FederationError(
                f"{self.name} exited with {rc}; see {self.log_path}:\n{tail(self.log_path)}"
            )
        return rc

    def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL of its whole process group after ``grace`` seconds."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} ignored SIGTERM for {grace:.0f} s: killed", flush=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything it left behind in its group
        self.proc.wait()
        self._log.close()

    def json_summary(self) -> dict[str, Any]:
        for line in reversed(self.stdout):
            if line.startswith("{"):
                return json.loads(line)
        return {}


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Supervisor:
    """Starts children, records their pids in ``processes.json``, stops them in order."""

    def __init__(self, out: Path, cwd: Path, netns_prefix: str = ""):
        self.out, self.cwd, self.netns_prefix = out, cwd, netns_prefix
        self.children: list[Child] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")])}  # fmt: skip

    def start(
        self, name: str, module: str, *args: str, namespace: str = "",
        death_signal: int = signal.SIGTERM,
    ) -> Child:  # fmt: skip
        argv = [sys.executable, "-m", module, *args]
        if namespace:
            from comms import netns

            argv = netns.exec_argv(namespace, argv, prefix=self.netns_prefix)
        log = self.out / "logs" / f"{name}.log"
        child = Child(name, argv, log, self.env, self.cwd, death_signal)
        self.children.append(child)
        record = [{"name": c.name, "pid": c.proc.pid, "argv": c.argv} for c in self.children]
        (self.out / "processes.json").write_text(json.dumps(record, indent=1))
        return child

    def run(self, name: str, module: str, *args: str, timeout: float) -> Child:
        child = self.start(name, module, *args)
        child.finish(timeout)
        return child

    def stop_all(self, grace: float = 20.0) -> None:
        order = {"island": 0, "expert": 0, "monolith": 0, "router": 1, "leaf": 2, "root": 3}
        for child in sorted(self.children, key=lambda c: order.get(c.name.rstrip("0123456789"), 1)):
            child.stop(grace)
