"""`tradeoff` with no command: the dashboard's command-line options, and running it.

Textual is imported only when the dashboard starts, so the other subcommands start fast.
"""

from __future__ import annotations

import argparse

from serve.cli import add_model_args


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dashboard (`tradeoff` with no command)")
    g.add_argument("--connect", metavar="URL", default=None,
                   help="attach to a running `tradeoff serve` (ws://HOST:PORT): its voice loop, its engine's numbers "
                        "and controls; synthetic users are sent from here")
    g.add_argument("--users", type=int, default=0, help="synthetic users at start (default: %(default)s)")
    g.add_argument("--batched", action="store_true", help="start in batched mode (default: latency mode)")
    caller = g.add_mutually_exclusive_group()
    caller.add_argument("--caller", dest="caller", action="store_true", default=None,
                        help="start the simulated caller (default: on when there is no microphone)")
    caller.add_argument("--no-caller", dest="caller", action="store_false", help="don't start the simulated caller")
    g.add_argument("--asr", default="whisper", choices=("whisper", "pocketsphinx"),
                   help="speech recognizer of the in-process voice server (default: %(default)s)")
    add_model_args(g)


def options_from(args: argparse.Namespace):
    from tui.controller import Options

    if args.users < 0:
        raise ValueError(f"--users must be >= 0, got {args.users}")
    if args.connect and args.backend:
        raise ValueError("--connect attaches to a whole running server; --backend points this one's LLM elsewhere: "
                         "give one of them")
    return Options(model=args.model, device=args.device, quant=args.quant, dtype=args.dtype, spec=args.spec, draft=args.draft,
                   asr=args.asr, mode="batched" if args.batched else "latency", users=args.users, caller=args.caller,
                   connect=args.connect, backend=args.backend, api_key_env=args.api_key_env,
                   backend_model=args.backend_model)


def main(args: argparse.Namespace) -> int:
    from tui.app import TradeoffApp

    TradeoffApp(options_from(args)).run()
    return 0
