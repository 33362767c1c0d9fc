"""The processes of ``scripts/bench_quality.py``: real shaped links (:class:`ShapedNet`), one
worker process per rank (:func:`run_workers`) and a real ``aggregator serve`` root
(:class:`Federation`)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
WORKER = SCRIPTS / "quality_methods.py"
MODEL_ID = "global"


class ShapedNet:
    """Real shaped links for timed runs: ``comms.netns`` namespaces, one per worker, each
    joined to a hub namespace (where the root aggregator runs) by its own link, shaped to its
    rate and delay in both directions (tbf for the rate; the delay by netem, or by the TUN
    forwarder on kernels without netem). Worker-to-worker traffic (DDP's ring, hivemind's
    all-reduce) crosses two links, through the hub."""

    PREFIX = "qbench"

    def __init__(self, world: int, name: str, links: list[tuple[float, float]]):
        """``links[k]``: worker k's (bits per second, one-way delay s)."""
        from comms import netns

        self.netns, self.name = netns, name
        rates, delays = [r for r, _ in links], [d for _, d in links]
        self.config = netns.up(world, rates, delays, prefix=self.PREFIX)
        self.island_iface = netns.ISLAND_IFACE
        self.hub_address, self.island_address = netns.hub_address, netns.island_address

    def island_argv(self, rank: int, argv: list[str]) -> list[str]:
        return self.netns.exec_argv(f"isl{rank}", argv, prefix=self.PREFIX)

    def hub_argv(self, argv: list[str]) -> list[str]:
        return self.netns.exec_argv("hub", argv, prefix=self.PREFIX)

    def close(self) -> None:
        self.netns.down(self.PREFIX)

    @staticmethod
    def available() -> str | None:
        """None when shaped links can be made here, else why not."""
        from comms import netns
        from comms.errors import ConfigError

        try:
            netns.require_tools()  # ip and tc installed, running as root
        except ConfigError as err:
            return str(err)
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM the process's group (it leads its own session), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
            if sig == signal.SIGTERM:  # the leader is gone; its children may not be
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            return


def run_workers(
    specs: list[dict[str, Any]], run_dir: Path, timeout_s: float, net: ShapedNet | None = None
) -> list[dict]:
    """Start one worker process per spec, wait for every ``result-RANK.json``, then stop
    them all (hivemind workers linger in shutdown). Raises RuntimeError with a log tail."""
    procs = []
    try:
        for spec in specs:
            path = run_dir / f"spec-{spec['rank']}.json"
            path.write_text(json.dumps(spec))
            log = open(run_dir / f"worker-{spec['rank']}.log", "wb")
            argv = [sys.executable, str(WORKER), str(path)]
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if net is not None:  # each worker behind its own shaped link
                argv = net.island_argv(spec["rank"], argv)
                env["GLOO_SOCKET_IFNAME"] = net.island_iface
            procs.append(subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                env=env,
            ))  # fmt: skip
            log.close()
        deadline = time.monotonic() + timeout_s
        results = [run_dir / f"result-{s['rank']}.json" for s in specs]
        while not all(p.exists() for p in results):
            for spec, proc, res in zip(specs, procs, results, strict=True):
                if proc.poll() is not None and not res.exists():
                    tail = (run_dir / f"worker-{spec['rank']}.log").read_text()[-1500:]
                    raise RuntimeError(f"worker {spec['rank']} exited {proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers did not finish within {timeout_s:.0f} s")
            time.sleep(0.2)
        for proc in procs:  # give clean exits a moment, then stop the rest
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2.0)
        return [json.loads(p.read_text()) for p in results]
    finally:
        for proc in procs:
            stop_process(proc)


class Federation:
    """Keys, a roster, theta_0 and a real ``aggregator serve`` root, in ``run_dir``."""

    def __init__(self, run_dir: Path, workload_cfg: dict, seed: int, world: int,
                 publish_codec: str, deadline_s: float, outer: tuple[str, dict],
                 net: ShapedNet | None = None, buffer_k: int | None = None,
                 fragments: int = 1, ef_decay: float | None = None):  # fmt: skip
        """``buffer_k``: the root's merge.buffer_k (None: ``world``, one version per round of
        every island). ``fragments`` > 1: the root serves one model line per fragment
        (``<MODEL_ID>.f<p>``, ``fragment = [p, fragments]`` of the same init file), as an
        island with ``[sync] fragments`` needs (``comms.fragments``). ``ef_decay``: the
        root's ``[[models]] ef_decay`` (None: its default)."""
        from safetensors.numpy import save_file

        from aggregator.config import AggregatorConfig, MergeConfig, ModelConfig
        from comms.config import save_config
        from comms.fragments import fragment_model_id
        from comms.identity import Identity, Roster
        from island.pseudo import params_to_numpy
        from island.workloads import get_workload

        self.run_dir = run_dir
        roster = Roster()
        self.keys = []
        for rank in range(world):
            ident, path = Identity.generate(), run_dir / f"island{rank}.pem"
            ident.save(path)
            roster.add(ident.public_key, "island", f"island{rank}")
            self.keys.append(str(path))
        root = Identity.generate()
        root.save(run_dir / "root.pem")
        roster.add(root.public_key, "aggregator", "root")
        self.roster = str(run_dir / "roster.json")
        roster.save(self.roster)
        # theta_0 on the CPU: build_model draws on the CPU and moves, so the bits are the workers'
        model = get_workload("bytelm", **{**workload_cfg, "device": "cpu"}).build_model(seed)
        save_file(params_to_numpy(model), str(run_dir / "init.safetensors"))
        if fragments > 1:
            self.model_ids = [fragment_model_id(MODEL_ID, p) for p in range(fragments)]
            cuts = [[p, fragments] for p in range(fragments)]
        else:
            self.model_ids, cuts = [MODEL_ID], [[]]
        config = AggregatorConfig(
            name="root", role="root", key=str(run_dir / "root.pem"), roster=self.roster,
            state_dir=str(run_dir / "root-state"), http="",
            listen="0.0.0.0:0" if net else "127.0.0.1:0",
            merge=MergeConfig(buffer_k=buffer_k or world, deadline_s=deadline_s),
            models=[ModelConfig(model_id, init=str(run_dir / "init.safetensors"),
                                outer=outer[0], outer_params=dict(outer[1]), codec=publish_codec,
                                fragment=fragment,
                                **({} if ef_decay is None else {"ef_decay": ef_decay}))
                    for model_id, fragment in zip(self.model_ids, cuts, strict=True)],
        )  # fmt: skip
        save_config(config, run_dir / "root.toml")
        log = open(run_dir / "root.log", "wb")
        argv = [sys.executable, "-m", "aggregator", "serve", str(run_dir / "root.toml"),
                "--log-level", "warning"]  # fmt: skip
        self.proc = subprocess.Popen(
            net.hub_argv(argv) if net else argv,
            stdout=subprocess.PIPE, stderr=log, cwd=REPO, start_new_session=True,
        )  # fmt: skip
        log.close()
        line = self.proc.stdout.readline().decode()
        if "serving on" not in line:
            stop_process(self.proc)
            tail = (run_dir / "root.log").read_text()[-1500:]
            raise RuntimeError(f"aggregator did not start: {line!r}\n{tail}")
        self.address = line.split("serving on ")[1].split()[0]
        port = self.address.rsplit(":", 1)[1]
        # the address each island dials: the hub's end of its own link, or loopback
        self.addresses = [net.hub_address(r) + f":{port}" if net else self.address
                          for r in range(world)]  # fmt: skip

    def close(self) -> None:
        stop_process(self.proc)
        self.proc.stdout.close()

    @functools.cached_property
    def stored_versions(self) -> list[dict[int, dict[str, Any]]]:
        """The root's stored versions (read once, after :meth:`close`), per model line in
        ``model_ids`` order: version -> its envelope's meta."""
        from comms.envelope import Envelope

        lines = []
        for model_id in self.model_ids:
            folder = self.run_dir / "root-state" / "store" / model_id / "versions"
            metas = {}
            for path in folder.glob("*.env"):
                env = Envelope.from_bytes(path.read_bytes(), max_bytes=1 << 40)
                metas[int(env.header.sequence)] = env.header.meta
            lines.append(metas)
        return lines

    def version_contributors(self) -> list[dict[int, list[tuple[str, int]]]]:
        """Per model line in ``model_ids`` order: version -> the island updates it merged, as
        (peer id, the island's push sequence) pairs (each version's meta ``contributors``)."""
        return [{v: [(str(s), int(q)) for s, q in meta.get("contributors", [])]
                 for v, meta in line.items()} for line in self.stored_versions]  # fmt: skip

    def versions_staleness(self) -> dict[str, Any]:
        """How many versions the root published and how stale their updates were (each
        version's meta ``max_staleness``: the stalest island update it merged, in versions);
        with fragments summed over the fragment lines, and each line's count under
        ``versions_per_line``."""
        stale = [int(meta["max_staleness"]) for line in self.stored_versions
                 for meta in line.values()]  # fmt: skip
        out = {"versions": len(stale), "max_staleness": max(stale, default=None),
               "versions_by_max_staleness": {str(s): stale.count(s) for s in sorted(set(stale))}}  # fmt: skip
        if len(self.model_ids) > 1:
            out["versions_per_line"] = {
                model_id: len(line)
                for model_id, line in zip(self.model_ids, self.stored_versions, strict=True)
            }
        return out
