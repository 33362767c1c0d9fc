"""The launcher's children start even while the launcher uses gRPC.

A child started with ``preexec_fn`` is forked, and gRPC's fork support (on by default) restarts
its poller thread in the child after ``close_fds`` closed the poller's epoll descriptor: the
child aborts before its ``exec`` (grpc/grpc#43055). ``federation_procs`` turns the support off
at import; a fresh interpreter that imports it before grpc, with a gRPC channel busy on another
thread, must start every child.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

LAUNCHER = textwrap.dedent(
    """
    import os, sys, threading
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import federation_procs  # before grpc, as every launcher does
    import grpc
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def busy():  # another thread in gRPC whenever a child forks
        while True:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.01)
            except grpc.FutureTimeoutError:
                pass

    threading.Thread(target=busy, daemon=True).start()
    out = Path(sys.argv[2])
    codes = []
    for i in range(int(sys.argv[3])):
        child = federation_procs.Child(f"c{i}", ["/bin/true"], out / f"c{i}.log",
                                       dict(os.environ), out)
        codes.append(child.proc.wait())
    print(os.environ.get("GRPC_ENABLE_FORK_SUPPORT"), sum(c != 0 for c in codes), codes)
    """
)


def test_children_start_while_the_launcher_is_busy_in_grpc(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(SCRIPTS), str(tmp_path), "150"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    setting, failed, codes = proc.stdout.split(" ", 2)
    assert setting == "false"
    assert failed == "0", f"children that died before exec: {codes}"
