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
    caller = g.add_mutually_exclusive_group()
    caller.add_argument("--caller", dest="caller", action="store_true", default=None,
                        help="start the simulated caller (default: on when there is no microphone)")
    caller.add_argument("--no-caller", dest="caller", action="store_false", help="don't start the simulated caller")
    g.add_argument("--profile", default="chat",
                   help="workload profile: the synthetic users' lengths, the SLO the colours and the planner judge by "
                        "(chat, code, rag, voice, batch, or a .toml/.json file; `p` cycles them; default: %(default)s)")
    g.add_argument("--plan-users", type=int, default=500, help="the planner panel's target users (`t` changes it; "
                   "default: %(default)s)")
    g.add_argument("--price-per-hour", type=float, default=None,
                   help="price of one replica per hour, for the planner's costs (`t` changes it; default: none, "
                        "replicas only)")
    g.add_argument("--sweep-users", default="1,2,4,8,16",
                   help="the auto-sweep's (`r`) batched levels, after latency mode at 1 (default: %(default)s)")
    g.add_argument("--level-s", type=float, default=300.0,
                   help="the auto-sweep's time cap per level; a level that hits it counts as capped (default: %(default)s)")
    g.add_argument("--asr", default="whisper", choices=("whisper", "pocketsphinx"),
                   help="speech recognizer of the in-process voice server (default: %(default)s)")
    add_model_args(g)


def options_from(args: argparse.Namespace):
    from serve.profiles import load_profile
    from tui.controller import Options
    from tui.planning import parse_target

    if args.users < 0:
        raise ValueError(f"--users must be >= 0, got {args.users}")
    try:
        parse_target(f"{args.plan_users} {'' if args.price_per_hour is None else args.price_per_hour}", None)
    except ValueError as e:
        raise ValueError(f"--plan-users / --price-per-hour: {e}") from None
    try:
        sweep_users = tuple(int(n) for n in args.sweep_users.split(","))
    except ValueError:
        sweep_users = ()
    if not sweep_users or min(sweep_users) < 1:
        raise ValueError(f"--sweep-users must be comma-separated user counts >= 1, got {args.sweep_users!r}")
    if not args.level_s > 0:
        raise ValueError(f"--level-s must be > 0, got {args.level_s}")
    if args.connect and args.backend:
        raise ValueError("--connect attaches to a whole running server; --backend points this one's LLM elsewhere: "
                         "give one of them")
    return Options(model=args.model, device=args.device, quant=args.quant, dtype=args.dtype, cuda_path=args.cuda_path,
                   spec=args.spec, draft=args.draft,
                   asr=args.asr, mode=args.mode, disagg_threads=args.disagg_threads, users=args.users, caller=args.caller,
                   connect=args.connect, backend=args.backend, api_key_env=args.api_key_env,
                   backend_model=args.backend_model, profile=load_profile(args.profile), plan_users=args.plan_users,
                   price_per_hour=args.price_per_hour, sweep_users=sweep_users, level_s=args.level_s)


def main(args: argparse.Namespace) -> int:
    from tui.app import TradeoffApp

    TradeoffApp(options_from(args)).run()
    return 0
