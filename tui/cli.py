"""The `tradeoff` command: one entry point that wires every package's subcommands together."""

from __future__ import annotations

import argparse
import sys

import bench.cli
import engine.cli
import voice.cli
from engine.engine import ContextLengthError, OverloadedError
from engine.loader import ModelLoadError
from engine.remote import RemoteError
from tui import launch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tradeoff",
        description="See the LLM serving trade-off: batch-1 latency vs batched throughput, measured live.",
    )
    launch.add_args(parser)  # `tradeoff` with no command opens the dashboard
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    engine.cli.add_parsers(sub)
    voice.cli.add_parsers(sub)
    bench.cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if not getattr(args, "func", None):
            return launch.main(args)
        return args.func(args)
    except (ModelLoadError, RemoteError, ContextLengthError, OverloadedError, ValueError) as e:
        print(f"tradeoff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
