"""`tradeoff bench ...`: the benchmark subcommands."""

from __future__ import annotations

import argparse

from bench import dashboard_keys, decode, distill_draft, interference, kernels, quant, spec, sweep, voice


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: print a table and write JSON",
                       description="Benchmarks. Each prints a table and writes JSON; figures are medians.")
    benches = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    decode.add_parser(benches)
    quant.add_parser(benches)
    spec.add_parser(benches)
    kernels.add_parser(benches)
    distill_draft.add_parser(benches)
    sweep.add_parser(benches)
    interference.add_parser(benches)
    dashboard_keys.add_parser(benches)
    voice.add_parser(benches)
