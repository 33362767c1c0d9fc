"""``aggregator``: the aggregator service's command line.

``aggregator serve CONFIG.toml`` runs a leaf, mid or root until SIGINT or SIGTERM. Once it
serves it prints one line a launcher can wait for::

    aggregator NAME (ROLE) serving on HOST:PORT http HOST:PORT dht MULTIADDR,...
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from aggregator.config import AggregatorConfig
from comms.config import load_config
from comms.errors import CommsError, ConfigError


async def _serve(config: AggregatorConfig) -> int:
    from aggregator.service import AggregatorService
    from comms.identity import Identity

    identity = Identity.load_or_create(config.key) if config.key else Identity.generate()
    discovery = None
    if config.dht or config.dht_peers:
        from comms.discovery import Discovery

        # hivemind's DHT runs in a child process: start it before gRPC starts its threads.
        discovery = Discovery.start(
            identity, initial_peers=config.dht_peers, host=config.dht_listen
        )
    service = AggregatorService(config, identity=identity, discovery=discovery)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        address = await service.start()
        dht = ",".join(discovery.bootstrap_addresses()) if discovery else "-"
        http = getattr(service, "http_address", "-")
        print(
            f"aggregator {config.name} ({config.role}) serving on {address} http {http} dht {dht}",
            flush=True,
        )
        await stop.wait()
    finally:
        await service.stop()
        if discovery is not None:
            discovery.shutdown()
    return 0


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(AggregatorConfig, args.config)
        return asyncio.run(_serve(config))
    except ConfigError as e:
        print(f"aggregator: {e}", file=sys.stderr)
        return 2
    except CommsError as e:
        print(f"aggregator: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aggregator",
        description="Archipelago aggregator: merges island updates in a tree and applies the "
        "outer step.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run an aggregator (leaf, mid or root) from a TOML config")
    p.add_argument("config", help="path to the aggregator's TOML config")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
