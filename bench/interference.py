"""`tradeoff bench interference`: what a long prompt arriving does to users already decoding, in batched mode.

N users decode steadily. One long prompt arrives; their TBT from its arrival until its first token is the
interference window, and their TBT for a few seconds before it and as long again after it is the baseline
(so both see the same share of a busy machine's noise). Without chunked prefill, the
whole prompt runs in one step and every decoding user waits for it; with chunked prefill, it is cut to the
token budget and shares many steps with the decodes. Chunked off and on (at each given budget) are measured
in one run; the ratio of p99 TBT (interference / baseline) is the figure of merit, and the long prompt's
TTFT is its price: a smaller budget disturbs the decoding users less and makes the long prompt wait longer.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from bench.report import table, write_json
from engine.backend import Backend
from engine.engine import Engine, Request
from engine.loader import LoadedModel, load
from engine.metrics import percentile
from engine.sampling import SamplingParams
from engine.scheduler import BatchPolicy
from engine.sequence import Stream
from serve.loadgen import PromptSet


def gaps(streams: list, since: float, until: float) -> list[float]:
    """Every user's gaps between token emissions whose later emission falls in [since, until]."""
    out = []
    for s in streams:
        times = [e[0] for e in s.metrics.emissions]
        out += [b - a for a, b in zip(times, times[1:]) if since <= b <= until]
    return out


def wait_for(condition, poll_s: float = 0.01) -> None:
    while not condition():
        time.sleep(poll_s)


def decoding_users(engine: Backend, users: int, prompts: PromptSet, rng: random.Random, max_tokens: int) -> list[Stream]:
    """`users` streams of 64-token prompts that decode steadily; returns once every one is past its prefill."""
    steady = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    streams = [engine.submit(Request(prompt_ids=prompts.prompt_ids(64, rng), sampling=steady)) for _ in range(users)]
    wait_for(lambda: all(s.metrics.output_tokens >= 3 for s in streams))
    return streams


def measure(loaded: LoadedModel, policy: BatchPolicy, users: int, long_tokens: int, baseline_s: float, seed: int) -> dict:
    engine = Engine(loaded, mode="batched", policy=policy, max_waiting=users + 2)
    prompts = PromptSet(engine.tokenizer)
    rng = random.Random(seed)
    try:
        streams = decoding_users(engine, users, prompts, rng, max_tokens=2000)
        base_start = time.monotonic()
        time.sleep(baseline_s)
        base_end = time.monotonic()
        long_ids = prompts.prompt_ids(long_tokens, rng)
        long = engine.submit(Request(prompt_ids=long_ids, sampling=SamplingParams(max_tokens=1, ignore_eos=True)))
        wait_for(lambda: long.metrics.output_tokens >= 1)
        arrival, first = long.metrics.arrival, long.metrics.emissions[0][0]
        time.sleep(0.2 + first - arrival)
        after_end = time.monotonic()
        for s in streams:
            s.cancel()
    finally:
        engine.close()
    # the step that ran the long prompt's last chunk ends at `first`; gaps ending after it are undisturbed
    base = gaps(streams, base_start, base_end) + gaps(streams, first + 1e-6, after_end)
    hit = gaps(streams, arrival, first)
    return {
        "chunked_prefill": policy.chunked_prefill, "token_budget": policy.token_budget, "users": users,
        "long_prompt_tokens": len(long_ids), "long_ttft_s": first - arrival,
        "base_tbt_p50_s": percentile(base, 50), "base_tbt_p99_s": percentile(base, 99), "base_gaps": len(base),
        "tbt_p50_s": percentile(hit, 50), "tbt_p99_s": percentile(hit, 99), "tbt_max_s": max(hit), "gaps": len(hit),
        "p99_ratio": percentile(hit, 99) / percentile(base, 99), "p50_ratio": percentile(hit, 50) / percentile(base, 50),
    }


COLUMNS = [
    ("chunked_prefill", "chunked", ""), ("token_budget", "budget", "d"), ("users", "users", "d"),
    ("base_tbt_p50_s", "base TBT p50", ".3f"), ("base_tbt_p99_s", "base p99", ".3f"), ("tbt_p50_s", "with prompt p50", ".3f"),
    ("tbt_p99_s", "p99", ".3f"), ("tbt_max_s", "max", ".3f"), ("p99_ratio", "p99 ratio", ".2f"),
    ("p50_ratio", "p50 ratio", ".2f"),
    ("long_prompt_tokens", "prompt", "d"), ("long_ttft_s", "its TTFT s", ".2f"),
]


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--users", type=int, default=8, help="users decoding when the prompt arrives (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=1000, help="length of the long prompt (default: %(default)s)")
    p.add_argument("--baseline-s", type=float, default=3.0, help="seconds of undisturbed decoding measured first")
    p.add_argument("--token-budgets", default=None,
                   help="comma-separated tokens per batched step to try with chunking on (default: the engine's)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default="bench/out/interference.json", help="(default: %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args.model)
    budgets = [int(b) for b in args.token_budgets.split(",")] if args.token_budgets else [BatchPolicy().token_budget]
    runs = [(False, budgets[0])] + [(True, b) for b in budgets]
    rows = [measure(loaded, BatchPolicy(max_batch_size=args.users + 1, token_budget=b, chunked_prefill=on), args.users,
                    args.prompt_tokens, args.baseline_s, seed=0) for on, b in runs]
    print(table(rows, COLUMNS))
    print(f"JSON: {write_json(args.json, 'interference', rows)}")
    return 0
