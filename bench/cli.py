"""`tradeoff bench ...`: the benchmark subcommands. Only the benchmark being run is imported."""

from __future__ import annotations

import argparse
import importlib

# benchmark -> (its module, whose `configure(parser)` fills in its options; the line `--help` shows)
BENCHES: dict[str, tuple[str, str]] = {
    "decode": ("bench.decode", "batch-1 prefill/decode speed, TTFT, TBT and achieved bandwidth"),
    "quant": ("bench.quant", "accuracy of bf16/int8/int4 weights against fp32"),
    "spec": ("bench.spec", "speculative decoding per drafter vs no speculation, and llama.cpp in its own process"),
    "peer": ("bench.peer", "tradeoff serve vs llama.cpp's server: same GGUF, threads and traffic, timed by one client"),
    "peers": ("bench.peers", "batched mode vs vLLM and llama.cpp's server: one sweep each, timed by tradeoff and by AIPerf"),
    "kernels": ("bench.kernels", "time each Triton kernel against its PyTorch equivalent (GPU)"),
    "sweep": ("bench.sweep", "throughput vs latency: one row per concurrency level, JSON and a PNG"),
    "plan-check": ("bench.plan_check", "real Poisson load at 0.8x and 1.2x the planner's predicted rate: does the SLO hold?"),
    "interference": ("bench.interference", "batched mode: TBT of decoding users when a long prompt arrives, chunked off/on"),
    "disagg": ("bench.disagg", "chunked prefill vs disaggregated prefill/decode: decoding users' TBT under long prompts"),
    "keys": ("bench.dashboard_keys", "dashboard key latency at 160x60 while the engine is saturated"),
    "voice": ("bench.voice", "the voice loop end to end: E2E breakdown, barge-in, WER (simulated caller)"),
    "soak": ("bench.soak", "a `tradeoff serve` under mixed load and random disconnects for N minutes: RSS, fds, KV, errors"),
}


def configure(name: str, p: argparse.ArgumentParser, argv: list[str]) -> None:
    p.description = "Benchmarks. Each prints a table and writes JSON that names the machine; figures are medians."
    benches = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for bench, (module, help) in BENCHES.items():
        b = benches.add_parser(bench, help=help)
        if argv and argv[0] == bench:
            importlib.import_module(module).configure(b)
