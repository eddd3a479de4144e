"""The `gcnet` command line. Each command lives in its own module, which exposes `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that add a subcommand; each sets `handler` (Namespace -> exit status) as a parser default.
COMMAND_MODULES: list[str] = [
    "gcnet.analysis.info",
    "gcnet.tour",
    "gcnet.engine.cli",
    "gcnet.analysis.cli",
    "gcnet.detection.cli",
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="gcnet", description="Global context blocks, models and tools.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gcnet` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
