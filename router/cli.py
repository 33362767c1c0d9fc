"""``router``: partitioning, router training, evaluation and the inference server."""

from __future__ import annotations

import argparse
import sys


def _not_yet(name: str):
    def run(args: argparse.Namespace) -> int:
        print(f"router {name}: not implemented yet (lands with the experts/router issue)", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="router",
        description="Archipelago router: partition data, train the router, serve the ensemble.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [
        ("partition", "cluster the training data into K partitions"),
        ("train", "train the router on the partition labels"),
        ("eval", "evaluate experts, ensembles and the monolith on held-out data"),
        ("serve", "serve the ensemble over HTTP"),
    ]:
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="path to a TOML config")
        p.set_defaults(func=_not_yet(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
