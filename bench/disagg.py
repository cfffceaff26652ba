"""`tradeoff bench disagg`: the two remedies for prefill interference side by side, on the same cores and traffic.

Eight users decode steadily while long prompts arrive as a Poisson stream. In turn, on one machine, in one run:
aggregated (batched mode) with chunked prefill off, aggregated with chunked prefill on at each token budget, and
disaggregated (a prefill worker and a decode worker, one thread each by default). Each configuration first runs
the users alone (its own baseline), then the same users under the same stream of long prompts (one seed for
all). The table gives the decoding users' TBT p50/p99 under the stream and its ratio to that configuration's
baseline (the figure of merit: the TBT spike), the long prompts' TTFT and its parts (queue, prefill, hand-off),
total output tokens/s under the stream, and the hand-off's milliseconds and megabytes per request.

With `--backend URL`, the same users and stream go to that OpenAI-compatible server instead (a real
disaggregated deployment: vLLM with a KV connector, SGLang's PD split, Dynamo), timed here from its streams with the
same definitions; its baseline is the users alone on it. `bench sweep --backend` gives its throughput/latency curve.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from bench.interference import decoding_users, gaps, wait_for
from bench.report import table, write_json
from engine.backend import Backend, Controls
from engine.engine import Engine, Request
from engine.loader import LoadedModel, load
from engine.metrics import percentile
from engine.sampling import SamplingParams
from engine.scheduler import BatchPolicy
from serve.cli import add_backend_args, int_pair, remote_from
from serve.loadgen import PromptSet


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def arrivals(rate_per_s: float, duration_s: float, lengths: tuple[int, int], seed: int) -> list[tuple[float, int]]:
    """The long prompts: (seconds after the stream starts, prompt tokens), Poisson at `rate_per_s`."""
    rng = random.Random(seed)
    out, t = [], rng.expovariate(rate_per_s)
    while t < duration_s:
        out.append((t, rng.randint(*lengths)))
        t += rng.expovariate(rate_per_s)
    return out


def local(loaded: LoadedModel, config: dict, users: int, max_waiting: int) -> Engine:
    policy = BatchPolicy(max_batch_size=users + 4, token_budget=config["token_budget"],
                         chunked_prefill=config["chunked_prefill"])
    return Engine(loaded, mode=config["mode"], policy=policy, max_waiting=max_waiting, disagg_threads=config["threads"])


def measure(engine: Backend, config: dict, users: int, stream: list[tuple[float, int]], baseline_s: float,
            duration_s: float, seed: int) -> dict:
    prompts = PromptSet(engine.tokenizer)
    rng = random.Random(seed)
    try:
        decoding = decoding_users(engine, users, prompts, rng, max_tokens=100_000)
        base_start = time.monotonic()
        time.sleep(baseline_s)
        start = base_end = time.monotonic()
        longs = []
        for at, n in stream:
            time.sleep(max(0.0, start + at - time.monotonic()))
            longs.append(engine.submit(Request(prompt_ids=prompts.prompt_ids(n, rng),
                                               sampling=SamplingParams(max_tokens=8, ignore_eos=True))))
        wait_for(lambda: all(s.metrics.finish_reason is not None for s in longs))
        end = max(time.monotonic(), start + duration_s)
        time.sleep(max(0.0, start + duration_s - time.monotonic()))
        for s in decoding:
            s.cancel()
        wait_for(lambda: all(s.metrics.finish_reason is not None for s in decoding))
    finally:
        engine.close()
    base = gaps(decoding, base_start, base_end)
    hit = gaps(decoding, start, end)
    tokens = sum(n for s in decoding + longs for t, n, _ in s.metrics.emissions if start <= t <= end)
    long_metrics = [s.metrics for s in longs]
    first_decode = [m.emissions[1][0] - m.emissions[0][0] for m in long_metrics if len(m.emissions) > 1]
    handoff_ms = [1e3 * m.handoff_s for m in long_metrics if m.handoff_s is not None]
    return {
        **config, "users": users,
        "long_prompts": len(longs), "long_prompt_tokens_mean": mean([m.prompt_tokens for m in long_metrics]),
        "base_tbt_p50_s": percentile(base, 50), "base_tbt_p99_s": percentile(base, 99), "base_gaps": len(base),
        "tbt_p50_s": percentile(hit, 50), "tbt_p99_s": percentile(hit, 99), "tbt_max_s": max(hit), "gaps": len(hit),
        "p99_ratio": percentile(hit, 99) / percentile(base, 99), "p50_ratio": percentile(hit, 50) / percentile(base, 50),
        "long_ttft_p50_s": percentile([m.ttft for m in long_metrics], 50),
        "long_ttft_p90_s": percentile([m.ttft for m in long_metrics], 90),
        "long_queue_s": mean([m.queue_time for m in long_metrics]),
        "long_prefill_s": mean([m.prefill_s for m in long_metrics if m.prefill_s is not None]),
        "long_first_decode_s": mean(first_decode),
        "handoff_ms": mean(handoff_ms),
        "handoff_mb": mean([m.handoff_bytes / 1e6 for m in long_metrics if m.handoff_s is not None]),
        "output_tok_s": tokens / (end - start),
    }


COLUMNS = [
    ("name", "config", ""), ("base_tbt_p50_s", "base TBT p50", ".3f"), ("base_tbt_p99_s", "base p99", ".3f"),
    ("tbt_p50_s", "TBT p50", ".3f"), ("tbt_p99_s", "TBT p99", ".3f"), ("p99_ratio", "p99 ratio", ".2f"),
    ("p50_ratio", "p50 ratio", ".2f"), ("long_ttft_p50_s", "long TTFT p50", ".2f"), ("long_ttft_p90_s", "p90", ".2f"),
    ("long_queue_s", "queue", ".2f"), ("long_prefill_s", "prefill", ".2f"), ("handoff_ms", "hand-off ms", ".1f"),
    ("handoff_mb", "MB", ".1f"), ("output_tok_s", "output tok/s", ".0f"),
]


def configs(budgets: list[int], threads: tuple[int, int]) -> list[dict]:
    out = [{"name": "aggregated, chunked off", "mode": "batched", "chunked_prefill": False, "token_budget": max(budgets),
            "threads": threads}]
    out += [{"name": f"aggregated, chunked {b}", "mode": "batched", "chunked_prefill": True, "token_budget": b,
             "threads": threads} for b in budgets]
    out.append({"name": f"disaggregated {threads[0]}+{threads[1]}", "mode": "disaggregated", "chunked_prefill": True,
                "token_budget": max(budgets), "threads": threads})
    return out


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--users", type=int, default=8, help="users decoding steadily (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int_pair, default=(1000, 2000),
                   metavar="MIN,MAX", help="the long prompts' lengths, uniform (default: 1000,2000)")
    p.add_argument("--rate", type=float, default=0.25, help="long prompts per second, Poisson (default: %(default)s)")
    p.add_argument("--duration-s", type=float, default=30.0, help="seconds of the long-prompt stream per configuration")
    p.add_argument("--baseline-s", type=float, default=4.0, help="seconds of users alone first, per configuration")
    p.add_argument("--token-budgets", default="32,64", help="chunked prefill's budgets to try (default: %(default)s)")
    p.add_argument("--disagg-threads", type=int_pair, default=(1, 1),
                   metavar="PREFILL,DECODE", help="the workers' threads (default: 1,1)")
    p.add_argument("--only", default=None, help="run only the configurations whose name contains this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench/out/disagg.json", help="(default: %(default)s)")
    add_backend_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    budgets = [int(b) for b in args.token_budgets.split(",")]
    stream = arrivals(args.rate, args.duration_s, args.prompt_tokens, args.seed)
    max_waiting = args.users + len(stream) + 2
    print(f"{len(stream)} long prompts of {args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens over "
          f"{args.duration_s:.0f} s, {args.users} users decoding; torch threads {torch.get_num_threads()}", flush=True)
    if args.backend:
        remote = remote_from(args, max_waiting=max_waiting)
        if not remote.tradeoff:  # admit every user and prompt at once; a tradeoff server runs in the mode it is in
            remote.control(Controls(mode="batched", max_batch_size=args.users + 4))
        runs = [({"name": args.backend, "mode": remote.snapshot().state.mode}, lambda: remote)]
    else:
        loaded = load(args.model)
        runs = [(c, lambda c=c: local(loaded, c, args.users, max_waiting)) for c in configs(budgets, args.disagg_threads)
                if not args.only or args.only in c["name"]]
    rows = []
    for config, make in runs:
        print(f"  {config['name']} ...", flush=True)
        rows.append(measure(make(), config, args.users, stream, args.baseline_s, args.duration_s, args.seed))
    print(table(rows, COLUMNS))
    print(f"JSON: {write_json(args.json, 'disagg', rows, stream=stream)}")
    return 0
