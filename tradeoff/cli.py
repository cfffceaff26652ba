"""The `tradeoff` command: one entry point over every package's subcommands.

Each command lives in its package's cli module; only the module of the command being run is imported (its
parser is filled in then), so a command pays for no other package and `tradeoff --help` for none at all.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (the module whose `configure(name, parser, argv)` fills in its parser, the line `--help` shows)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("voice.cli", "run the server: realtime voice (WebSocket) and the OpenAI HTTP API on one port"),
    "talk": ("voice.cli", "talk to a voice server: microphone, a WAV file, or the simulated caller"),
    "chat": ("serve.cli", "a streamed conversation in the terminal, with TTFT/TBT per turn"),
    "generate": ("serve.cli", "stream one reply to a prompt"),
    "fetch": ("voice.cli", "download the default models into the user cache (make setup runs this)"),
    "setup": ("serve.cli", "how the engine runs the model on this CPU, as measured (make setup measures it once)"),
    "bench": ("bench.cli", "benchmarks: print a table and write JSON"),
    "plan": ("bench.plan", "where to operate and what it costs: replicas, $/month and $ per 1M tokens, from a sweep"),
    "distill": ("engine.distill", "train the default model's draft by self-distillation (about an hour on 2 cores)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tradeoff",
        description="See the LLM serving trade-off: batch-1 latency vs batched throughput, measured live. "
                    "With no command, opens the dashboard.",
    )
    chosen = next((i for i, a in enumerate(argv) if a in COMMANDS), None)
    if chosen is None:  # `tradeoff [options]`: the dashboard's options (Textual itself loads when it starts)
        from tui import launch

        launch.add_args(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help)
        if chosen is not None and argv[chosen] == name:
            importlib.import_module(module).configure(name, p, argv[chosen + 1:])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        if args.command is None:
            from tui import launch

            return launch.main(args)
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"tradeoff: error: {e}", file=sys.stderr)
        return 2


def is_user_error(e: Exception) -> bool:
    """A bad model path, an unreachable backend, a refused request or a bad value: a message, not a traceback.
    (Only modules that are loaded can have raised their errors, so none is imported for the check.)"""
    kinds: list[type] = [ValueError]
    if "engine" in sys.modules:
        from engine import ModelLoadError, OverloadedError

        kinds += [ModelLoadError, OverloadedError]
    if "serve.remote" in sys.modules:
        from serve.remote import RemoteError

        kinds.append(RemoteError)
    return isinstance(e, tuple(kinds))
