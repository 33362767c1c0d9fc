"""``island``: the per-node daemon's command line.

``island run CONFIG.toml`` trains until its steps are done or SIGINT/SIGTERM; once training
starts it prints one line a launcher can wait for::

    island NAME training (MODE) status http://HOST:PORT

``torchrun --nproc-per-node N -m island run CONFIG.toml`` runs one island on N processes
(``island.distributed``); only rank 0 prints these lines.

``island plot RUN_DIR`` draws a run's plots from the JSON lines below RUN_DIR (``island.plots``).
Every command takes ``--log-level`` and ``--log-format`` (``comms.logs``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

from comms.logs import add_log_arguments, setup_from_args


def _run(args: argparse.Namespace) -> int:
    from comms.config import load_config
    from comms.errors import CommsError, ConfigError
    from island.config import IslandConfig

    try:
        config = load_config(IslandConfig, args.config)
        from island.daemon import Island

        island = Island(config)
    except (ConfigError, ValueError) as e:
        print(f"island: {e}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: island.stop())

    import threading

    def announce():
        island.ready.wait()
        status = island.http_url or "-"
        print(f"island {config.name} training ({config.mode}) status {status}", flush=True)

    leader = island.group.is_leader  # under torchrun only rank 0 prints (island.distributed)
    if leader:
        threading.Thread(target=announce, daemon=True).start()
    try:
        summary = island.run()
    except CommsError as e:
        print(f"island: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a state directory that cannot be made or written, a full disk
        logging.getLogger("island").debug("stopped by an OS error", exc_info=True)
        print(
            f"island: {type(e).__name__}: {e} (check the paths in {args.config} and the free "
            "space where they lie; --log-level debug shows where it happened)",
            file=sys.stderr,
        )
        return 1
    if leader:
        print(json.dumps({k: v for k, v in summary.items() if k != "sync"}), flush=True)
    else:
        logging.getLogger("island").info("rank %d done: %s", island.group.rank, summary)
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from comms.identity import Identity

    ident = Identity.load_or_create(args.path)
    print(json.dumps({"peer_id": ident.peer_id, "public_key": ident.public_key.hex()}))
    return 0


def _init(args: argparse.Namespace) -> int:
    from comms.config import load_config
    from comms.errors import ConfigError
    from island.config import IslandConfig
    from island.daemon import export_initial_parameters

    try:
        config = load_config(IslandConfig, args.config)
    except ConfigError as e:
        print(f"island: {e}", file=sys.stderr)
        return 2
    shapes = export_initial_parameters(config, args.out)
    n = sum(math.prod(s) for s in shapes.values())
    print(f"wrote {args.out}: {len(shapes)} tensors, {n} parameters")
    return 0


def _status(args: argparse.Namespace) -> int:
    from comms.errors import ConfigError
    from comms.http import http_token

    url = args.url.rstrip("/") + "/status"
    token = http_token(args.token or "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        context = None
        if args.ca:  # an island serving HTTPS with a certificate of the federation's CA
            from comms.tls import client_ssl_context, read_pem

            context = client_ssl_context(read_pem(args.ca))
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=10, context=context) as r:
            print(json.dumps(json.loads(r.read()), indent=2))
    except urllib.error.HTTPError as e:
        hint = " (give --token or ARCHIPELAGO_HTTP_TOKEN: the island's http_token)"
        print(f"island status: {url}: {e}{hint if e.code == 401 else ''}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError, ConfigError) as e:
        print(f"island status: cannot read {url}: {e}", file=sys.stderr)
        return 1
    return 0


def _plot(args: argparse.Namespace) -> int:
    from island.plots import TITLES, render_run

    out = args.out or str(Path(args.run_dir) / "plots")
    try:
        figures = render_run(args.run_dir, out, params=args.params)
    except (ValueError, OSError) as e:
        print(f"island plot: {e}", file=sys.stderr)
        return 2
    for key, path in figures["plots"].items():
        print(f"{TITLES[key]}: {path}")
    print(json.dumps(figures), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="island",
        description="Archipelago island daemon: trains locally and syncs over a slow link.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the island daemon from a TOML config")
    p.add_argument("config", help="path to the island's TOML config")
    p.set_defaults(func=_run)
    p = sub.add_parser("keygen", help="create (or show) an Ed25519 identity key file")
    p.add_argument("path", help="the private key file (PEM); created if missing")
    p.set_defaults(func=_keygen)
    p = sub.add_parser("init", help="write theta_0 of an island config (a root's models.init)")
    p.add_argument("config", help="an island TOML config (workload, workload_config, seed)")
    p.add_argument("--out", required=True, help="the safetensors file to write")
    p.set_defaults(func=_init)
    p = sub.add_parser("status", help="print the status of a running island")
    p.add_argument("url", help="the island's status URL, e.g. http://127.0.0.1:8470")
    p.add_argument(
        "--ca", help="the federation CA (PEM) that verifies an https:// URL's certificate"
    )
    p.add_argument(
        "--token", help="bearer token of a protected /status (default: $ARCHIPELAGO_HTTP_TOKEN)"
    )
    p.set_defaults(func=_status)
    p = sub.add_parser(
        "plot",
        help="draw a run's plots (validation loss, bytes, utilization, staleness) from its "
        "JSON-lines records",
    )
    p.add_argument("run_dir", help="a run directory: island round records, acks.jsonl, logs")
    p.add_argument("--out", help="where the PNG files go (default: RUN_DIR/plots)")
    p.add_argument(
        "--params", type=int,
        help="the model's parameter count, for the data-parallel comparison (default: read "
        "from an init.safetensors in the run directory, if any)",
    )  # fmt: skip
    p.set_defaults(func=_plot)
    for command in sub.choices.values():
        add_log_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_from_args(args)
    return args.func(args)
