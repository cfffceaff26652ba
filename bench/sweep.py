"""`tradeoff bench sweep`: the throughput/latency trade-off, one row per load level (closed-loop concurrency).

At each level, N synthetic users (serve/loadgen.py) send requests back to back, with the lengths of a workload
profile (serve/profiles.py; default chat) and judged by its SLO. The first N completions are a warm-up; the row is
measured from then until enough requests have completed for the SLO's percentile (100 for p99), or until the
level's time cap, which the row reports (capped): requests/s, output tokens/s in total and per user (mean of
1/TPOT), TTFT, TBT and E2E (mean, p50, p99; a distribution-free 95% interval for the profile's percentile of
TTFT, where there are enough requests for one: ~560 for a p99, so none at the default 100), goodput
against the SLO, mean running batch size, preemptions, and where batched mode's step time went (scheduler =
schedule + prepare inputs + bookkeeping after the step). Each row keeps every request's TTFT/TPOT/E2E and, in
batched mode, every step's decode rows, prefill tokens and seconds: `tradeoff plan` reads them. The plot draws tokens/s per user
against total tokens/s, with the SLO's per-user rate as a line, the knee of the curve marked, and
latency mode's point at concurrency 1.

With --backend openai://HOST:PORT/v1 the same levels run against that server (vLLM, SGLang, another tradeoff...)
and every number is measured here, from the streams; its latency point is a tradeoff server's latency mode, or
for other servers one request in flight at a time (serve/remote.py).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench.report import table, write_json
from engine import Backend, Controls, Engine
from engine.backend import MODES
from engine.batched import PHASES
from engine.loader import load
from engine.scheduler import BatchPolicy
from engine.stats import SLO
from serve.cli import add_backend_args, remote_from
from serve.levels import level_row, min_requests
from serve.loadgen import Lengths, LoadGenerator, Workload
from serve.profiles import load_profile

SCHEDULER_PHASES = ("schedule", "prepare", "update")


def preemptions(engine: Backend) -> int | None:
    kv = engine.snapshot().state.kv
    return kv.preemptions if kv is not None else None


def run_level(engine: Backend, concurrency: int, workload: Workload, slo: SLO, wanted: int, cap_s: float,
              seed: int) -> dict:
    """One level: N users back to back; each user's first reply is warm-up; then measured until `wanted` requests
    have completed or `cap_s` seconds have passed since the level began (the row says which)."""
    engine.clear_cache()  # no prefix hits carried over from the previous level
    lg = LoadGenerator(engine, workload, seed=seed)
    lg.start(concurrency)
    try:
        deadline = time.monotonic() + cap_s  # the warm-up and the measurement together
        wait_for(lambda: len(lg.completed) >= concurrency or time.monotonic() > deadline)
        warm = len(lg.completed)
        start = time.monotonic()
        mode = engine.snapshot().state.mode
        # where batched mode's step time goes: only an engine in this process can say
        profile = engine.record_steps() if isinstance(engine, Engine) and mode == "batched" else None
        preempted = preemptions(engine)
        wait_for(lambda: len(lg.completed) - warm >= wanted or time.monotonic() > deadline)
        end = time.monotonic()
        if preempted is not None:
            preempted = preemptions(engine) - preempted
    finally:
        lg.stop()
    row = level_row(mode, concurrency, lg.submitted, start, end, slo, wanted,
                    steps=profile.samples if profile is not None else None, preemptions=preempted, rejected=lg.rejected)
    if profile is not None and profile.steps:
        total = sum(profile.seconds.values())
        row["batch_mean"] = profile.sequences / profile.steps
        row["tokens_per_step"] = profile.tokens / profile.steps
        row["phase_ms"] = {p: profile.seconds[p] / profile.steps * 1000 for p in PHASES}
        row["scheduler_pct"] = 100 * sum(profile.seconds[p] for p in SCHEDULER_PHASES) / total
    return row


def spread(mean: int) -> Lengths:
    """Lengths around `mean` (stdev a quarter of it), so closed-loop users drift apart instead of moving in waves."""
    return Lengths(mean, mean / 4, max(1, mean // 4), 4 * mean)


def progress(row: dict) -> str:
    return (f"{row['mode']} N={row['concurrency']}: {row['output_tok_s']:.1f} tok/s, {row['tok_s_per_user']:.1f} tok/s/user, "
            f"TTFT p50 {row['ttft_p50_s']:.2f} s, TBT p50 {row['tbt_p50_s'] * 1000:.0f} ms")


def wait_for(condition, poll_s: float = 0.05) -> None:
    while not condition():
        time.sleep(poll_s)


def knee(rows: list[dict]) -> dict | None:
    """The point farthest from the chord between the curve's ends, in coordinates scaled to [0, 1] (Kneedle)."""
    if len(rows) < 3:
        return None
    xs = [r["output_tok_s"] for r in rows]
    ys = [r["tok_s_per_user"] for r in rows]

    def scale(v: list[float]) -> list[float]:
        lo, hi = min(v), max(v)
        return [(x - lo) / ((hi - lo) or 1) for x in v]

    sx, sy = scale(xs), scale(ys)
    (x0, y0), (x1, y1) = (sx[0], sy[0]), (sx[-1], sy[-1])
    norm = ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5 or 1
    distance = [abs((y1 - y0) * x - (x1 - x0) * y + x1 * y0 - y1 * x0) / norm for x, y in zip(sx, sy)]
    return rows[max(range(len(rows)), key=distance.__getitem__)]


def plot(rows: list[dict], latency_row: dict | None, slo: SLO, knee_row: dict | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    xs = [r["output_tok_s"] for r in rows]
    ys = [r["tok_s_per_user"] for r in rows]
    ax.plot(xs, ys, "o-", color="tab:blue", label=f"{rows[0]['mode']} mode (closed loop, N users)")
    for r in rows:
        ax.annotate(f"N={r['concurrency']}", (r["output_tok_s"], r["tok_s_per_user"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    if latency_row is not None:
        ax.plot([latency_row["output_tok_s"]], [latency_row["tok_s_per_user"]], "*", ms=16, color="tab:red",
                label="latency mode, N=1 (batch 1 + speculation)")
    ax.axhline(1 / slo.tbt_s, ls="--", color="gray",
               label=f"TBT SLO {slo.tbt_s * 1000:.0f} ms = {1 / slo.tbt_s:.1f} tok/s per user")
    if knee_row is not None:
        ax.plot([knee_row["output_tok_s"]], [knee_row["tok_s_per_user"]], "o", ms=18, mfc="none", mew=2, color="tab:orange",
                label=f"knee (N={knee_row['concurrency']})")
    ax.set_xlabel("total output tokens/s (system throughput)")
    ax.set_ylabel("output tokens/s per user (1 / TPOT)")
    ax.set_title("The serving trade-off: throughput vs per-user speed")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


COLUMNS = [
    ("mode", "mode", ""), ("concurrency", "N", "d"), ("req_s", "req/s", ".2f"), ("output_tok_s", "tok/s", ".1f"),
    ("tok_s_per_user", "tok/s/user", ".1f"), ("ttft_mean_s", "TTFT mean", ".2f"), ("ttft_p50_s", "p50", ".2f"),
    ("ttft_p99_s", "p99", ".2f"), ("tbt_mean_s", "TBT mean", ".3f"), ("tbt_p50_s", "p50", ".3f"), ("tbt_p99_s", "p99", ".3f"),
    ("e2e_mean_s", "E2E mean", ".1f"), ("e2e_p50_s", "p50", ".1f"), ("e2e_p99_s", "p99", ".1f"),
    ("goodput_req_s", "goodput", ".2f"), ("batch_mean", "batch", ".1f"), ("preemptions", "preempt", "d"),
    ("scheduler_pct", "sched %", ".1f"),
]


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", default="smollm2-135m", help="model to run (with --backend: whose tokenizer sizes prompts)")
    p.add_argument("--device", default=None)
    add_backend_args(p)
    p.add_argument("--mode", choices=MODES, default="batched",
                   help="the mode swept (default: %(default)s; batched mode's sweep ends with one latency-mode level)")
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64", help="comma-separated user counts (default: %(default)s)")
    p.add_argument("--profile", default="chat",
                   help="workload profile: its lengths and SLO (chat, code, rag, voice, batch, or a .toml/.json file; "
                        "default: %(default)s). Users go back to back: `tradeoff plan` adds the profile's think time")
    p.add_argument("--min-requests", type=int, default=None,
                   help="completed requests per level after warm-up (default: enough for the SLO's percentile, "
                        "100 for p99)")
    p.add_argument("--level-s", type=float, default=300.0,
                   help="time cap per level; a level that hits it says so (capped) (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="mean prompt length instead of the profile's; "
                   "stdev is a quarter")
    p.add_argument("--output-tokens", type=int, default=None, help="mean output length instead of the profile's; "
                   "stdev is a quarter")
    p.add_argument("--max-batch-size", type=int, default=None, help="batched mode's cap (default: the engine's)")
    p.add_argument("--token-budget", type=int, default=None, help="tokens per batched step (default: the engine's)")
    p.add_argument("--no-latency-point", action="store_true", help="skip latency mode's point at concurrency 1")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default="bench/out/sweep.json", help="(default: %(default)s)")
    p.add_argument("--plot", default="bench/out/sweep.png", help="(default: %(default)s; empty: no plot)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    profile = load_profile(args.profile)
    workload = replace(profile.workload, think_time_s=0.0)
    if args.prompt_tokens:
        workload = replace(workload, prompt_tokens=spread(args.prompt_tokens))
    if args.output_tokens:
        workload = replace(workload, output_tokens=spread(args.output_tokens))
    slo = profile.slo or SLO()  # batch has no target; its rows still report against the default one
    wanted = args.min_requests or min_requests(profile.slo)
    defaults = BatchPolicy()
    budget = args.token_budget or defaults.token_budget
    policy = BatchPolicy(max_batch_size=args.max_batch_size or min(defaults.max_batch_size, budget - 1), token_budget=budget)
    # every request of a level waits in the engine at most once: the queue bound must not refuse the sweep's own users
    max_waiting = max(levels) + 1
    if args.backend:  # the same levels through the remote's stream, measured here (serve/remote.py)
        engine = remote_from(args, policy=policy, max_waiting=max_waiting)
        engine.control(Controls(mode=args.mode, max_batch_size=policy.max_batch_size))
        print(engine.describe(), flush=True)
    else:
        loaded = load(args.model)
        engine = Engine(loaded, device=args.device, mode=args.mode, policy=policy, max_waiting=max_waiting)
    if engine.max_seq_len:
        fitted, note = replace(profile, workload=workload).fitted(engine.max_seq_len)
        workload = fitted.workload
        if note:
            print(note, flush=True)
    batched_dtype = getattr(engine, "batched_dtype", None)
    rows = []
    for i, c in enumerate(levels):
        rows.append(run_level(engine, c, workload, slo, wanted, args.level_s, seed=i))
        print(progress(rows[-1]), flush=True)
    latency_row, latency_settings = None, None
    if args.mode == "batched" and not args.no_latency_point:
        if args.backend:
            engine.control(Controls(mode="latency"))
        else:
            engine.close()
            engine = Engine(loaded, device=args.device, mode="latency")
        latency_row = run_level(engine, 1, workload, slo, wanted, args.level_s, seed=0)
        spec = engine.snapshot().state.speculation
        latency_settings = {"drafter": spec.drafter if spec else None}
        print(progress(latency_row), flush=True)
    engine.close()
    knee_row = knee(rows)
    all_rows = rows + ([latency_row] if latency_row else [])
    print()
    print(table(all_rows, COLUMNS))
    if knee_row is not None:
        print(f"knee: N={knee_row['concurrency']} ({knee_row['output_tok_s']:.0f} tok/s total, "
              f"{knee_row['tok_s_per_user']:.1f} tok/s per user)")
    settings = {"model": args.model, "profile": profile.name, "policy": asdict(policy), "workload": asdict(workload),
                "slo": asdict(slo), "min_requests": wanted, "batched_dtype": str(batched_dtype),
                "latency": latency_settings, "backend": args.backend,
                "knee_concurrency": knee_row["concurrency"] if knee_row else None}
    print(f"JSON: {write_json(args.json, 'sweep', all_rows, **settings)}")
    if args.plot:  # bench/gpu.sh passes "": the GPU machine may have no matplotlib
        plot(rows, latency_row, slo, knee_row, args.plot)
        print(f"plot: {args.plot}")
    return 0
