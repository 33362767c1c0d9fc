"""``island``: the per-node daemon's command line."""

from __future__ import annotations

import argparse
import sys


def _not_yet(name: str):
    def run(args: argparse.Namespace) -> int:
        print(f"island {name}: not implemented yet (lands with the island issue)", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="island",
        description="Archipelago island daemon: trains locally and syncs over a slow link.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the island daemon from a TOML config")
    p.add_argument("config", help="path to the island's TOML config")
    p.set_defaults(func=_not_yet("run"))
    p = sub.add_parser("keygen", help="generate an Ed25519 identity key file")
    p.add_argument("path", help="where to write the private key (PEM)")
    p.set_defaults(func=_not_yet("keygen"))
    p = sub.add_parser("status", help="print the status of a running island")
    p.add_argument("url", help="the island's status URL, e.g. http://127.0.0.1:8470")
    p.set_defaults(func=_not_yet("status"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
