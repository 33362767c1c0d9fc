"""``aggregator``: the aggregator service's command line.

``aggregator serve CONFIG.toml`` runs a leaf, mid or root until SIGINT or SIGTERM. Once it
serves it prints one line a launcher can wait for::

    aggregator NAME (ROLE) serving on HOST:PORT http HOST:PORT dht MULTIADDR,...

``aggregator tls init DIR --daemon root=HOST,... --daemon leaf0=HOST,... --island island0``
writes a federation's TLS material (``comms.tls.init_federation``): a CA and one certificate
and key per daemon, and prints the ``[tls]`` section of each daemon's config.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from aggregator.config import AggregatorConfig
from comms.config import load_config
from comms.errors import CommsError, ConfigError
from comms.logs import add_log_arguments, bind, setup_from_args


async def _serve(config: AggregatorConfig) -> int:
    from aggregator.service import AggregatorService
    from comms.identity import Identity

    bind(aggregator=config.name, role=config.role)  # on every line this process logs
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
        http = getattr(service, "http_url", "-")
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
    try:
        config = load_config(AggregatorConfig, args.config)
        return asyncio.run(_serve(config))
    except ConfigError as e:
        print(f"aggregator: {e}", file=sys.stderr)
        return 2
    except CommsError as e:
        print(f"aggregator: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a state directory that cannot be made or written, a full disk
        logging.getLogger("aggregator").debug("stopped by an OS error", exc_info=True)
        print(
            f"aggregator: {type(e).__name__}: {e} (check the paths in {args.config}: "
            "state_dir, key, roster; and the free space where they lie; --log-level debug "
            "shows where it happened)",
            file=sys.stderr,
        )
        return 1


def _daemon_spec(text: str) -> tuple[str, list[str]]:
    name, sep, hosts = text.partition("=")
    if not sep or not name or not hosts:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST[,HOST...], got {text!r}")
    return name, [h.strip() for h in hosts.split(",") if h.strip()]


def tls_init(args: argparse.Namespace) -> int:
    from comms.tls import (
        CA_CERT_FILE,
        CA_KEY_FILE,
        init_federation,
        material_paths,
        tls_section,
    )

    daemons = dict(args.daemon)
    for name in args.island:
        if name in daemons:
            print(f"aggregator tls init: {name} named twice", file=sys.stderr)
            return 2
        daemons[name] = [name]  # a client certificate: its name is the island's
    if len(daemons) != len(args.daemon) + len(args.island):
        print("aggregator tls init: a --daemon name is repeated", file=sys.stderr)
        return 2
    try:
        made_ca = init_federation(
            args.dir, daemons, ca_name=args.ca_name, days=args.days, force=args.force
        )
    except ConfigError as e:
        print(f"aggregator tls init: {e}", file=sys.stderr)
        return 2
    out = Path(args.dir)
    ca = out / CA_CERT_FILE
    print(f"{'wrote a new CA' if made_ca else 'signed with the existing CA'} {ca} "
          f"(its key {out / CA_KEY_FILE}, mode 0600: keep it off the daemons) and "
          f"{len(daemons)} certificate(s)")  # fmt: skip
    for name, hosts in daemons.items():
        kind = "island" if name in args.island else "daemon"
        cert, key = material_paths(out, name)
        print(f"\n# {name} ({kind}; valid for {', '.join(hosts)}): copy {cert}, {key} "
              f"(mode 0600) and {ca}, and put in its config:")  # fmt: skip
        print(tls_section(args.dir, name, mutual=not args.no_mutual), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aggregator",
        description="Archipelago aggregator: merges island updates in a tree and applies the "
        "outer step.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run an aggregator (leaf, mid or root) from a TOML config")
    p.add_argument("config", help="path to the aggregator's TOML config")
    p.set_defaults(func=serve)
    tls = sub.add_parser("tls", help="TLS material for a federation").add_subparsers(
        dest="tls_command", required=True
    )
    p = tls.add_parser(
        "init",
        help="write a CA and a certificate and key per daemon; print each [tls] section",
        description="Write DIR/ca.pem and DIR/ca-key.pem (kept if present: a federation grows) "
        "and DIR/NAME.pem, DIR/NAME-key.pem per daemon (keys mode 0600); existing pairs are "
        "refused without --force. Each certificate serves and authenticates as a client.",
    )
    p.add_argument("dir", help="output directory")
    p.add_argument("--daemon", action="append", type=_daemon_spec, default=[],
                   metavar="NAME=HOST[,HOST...]",
                   help="an aggregator (or any daemon) and the names and IP addresses it is "
                   "dialled by; repeat for each")  # fmt: skip
    p.add_argument("--island", action="append", default=[], metavar="NAME",
                   help="an island (a client certificate named NAME); repeat for each")  # fmt: skip
    p.add_argument("--ca-name", default="Archipelago federation CA", help="the CA's common name")
    p.add_argument("--days", type=int, default=365, help="validity of each certificate")
    p.add_argument("--force", action="store_true", help="replace existing certificates")
    p.add_argument("--no-mutual", action="store_true",
                   help="print mutual = false (servers do not require client certificates)")  # fmt: skip
    p.set_defaults(func=tls_init)
    for command in (*sub.choices.values(), *tls.choices.values()):
        add_log_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_from_args(args)
    return args.func(args)
