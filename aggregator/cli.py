"""``aggregator``: the aggregator service's command line."""

from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    print(
        "aggregator serve: not implemented yet (lands with the aggregator issue)", file=sys.stderr
    )
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aggregator",
        description="Archipelago aggregator: merges island updates in a tree and applies the outer step.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run an aggregator (leaf, mid or root) from a TOML config")
    p.add_argument("config", help="path to the aggregator's TOML config")
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
