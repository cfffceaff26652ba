"""`tradeoff bench plan-check`: does the planner's rate hold? Real Poisson load at 0.8x and 1.2x the highest rate the
model predicts one replica serves within the SLO (serve/planner.py, from a sweep): the SLO should hold at the first
and fail at the second.

Per configuration in the sweep that has a model (batched mode at the sweep's policy, latency mode), per factor: the
rate, the model's percentiles at that rate, and the measured ones (the profile's percentile of TTFT and TPOT over
`--requests` requests after a warm-up of a tenth as many), and whether the SLO held. Run the sweep on this machine
first (`tradeoff bench sweep`); the engine here is built with the sweep's policy and mode.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

from bench.report import table, write_json
from engine import Engine
from engine.loader import load
from engine.metrics import percentile
from engine.scheduler import BatchPolicy
from serve.loadgen import LoadGenerator, Workload
from serve.planner import configurations, max_rate, read_sweep, workload_of
from serve.profiles import load_profile
from serve.queueing import Traffic, percentiles, simulate


def measure(engine: Engine, workload: Workload, rate: float, requests: int, cap_s: float, seed: int) -> dict:
    """Poisson arrivals at `rate` until `requests` past the warm-up have finished (or `cap_s`): their TTFT/TPOT."""
    lg = LoadGenerator(engine, workload, seed=seed)
    warm = max(1, requests // 10)
    lg.start_rate(rate)
    start = time.monotonic()
    try:
        while len(lg.completed) < warm + requests and time.monotonic() - start < cap_s:
            time.sleep(0.05)
    finally:
        lg.stop()
    done = sorted(lg.completed, key=lambda m: m.arrival)[warm:]
    return {"ttfts": [m.ttft for m in done], "tpots": [m.tpot for m in done if m.tpot is not None],
            "finished": len(done), "rejected": lg.rejected, "capped": len(done) < requests}


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--sweep", default="bench/out/sweep.json",
                   help="a sweep of this engine on this machine (default: %(default)s)")
    p.add_argument("--profile", default="chat", help="whose SLO (its percentile) is checked (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--factors", default="0.8,1.2", help="multiples of the predicted rate (default: %(default)s)")
    p.add_argument("--requests", type=int, default=100, help="measured per run, after a tenth as many (default: %(default)s)")
    p.add_argument("--run-s", type=float, default=300.0, help="time cap per run, reported when hit (default: %(default)s)")
    p.add_argument("--modes", default="latency,batched", help="configurations to check (default: %(default)s)")
    p.add_argument("--json", default="bench/out/plan_check.json", help="(default: %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    data = read_sweep(args.sweep, args.model)
    profile = load_profile(args.profile)
    slo = profile.slo
    if slo is None:
        raise ValueError(f"profile {profile.name} has no SLO to check")
    prompts, outputs = workload_of(data)
    workload = Workload(prompts, outputs, think_time_s=0.0)
    loaded = load(args.model)
    policy = BatchPolicy(**data["policy"])
    modes = args.modes.split(",")
    q = slo.percentile
    rows = []
    for config in configurations(data, slo, args.sweep):
        if config.mode not in modes or config.model is None:
            continue
        predicted = max_rate(config, data, slo)
        if predicted is None:
            print(f"{config.name}: the model meets the SLO at no rate; nothing to check")
            continue
        engine = Engine(loaded, mode=config.mode, policy=policy, max_waiting=10_000)
        try:
            for i, f in enumerate(float(x) for x in args.factors.split(",")):
                rate = f * predicted
                sim = percentiles(simulate(config.model, Traffic(prompts, outputs, rate=rate), requests=1500), q)
                got = measure(engine, workload, rate, args.requests, args.run_s, seed=i)
                ttft, tpot = percentile(got["ttfts"], q), percentile(got["tpots"], q)
                held = ttft is not None and ttft <= slo.ttft_s and (tpot is None or tpot <= slo.tbt_s)
                rows.append({"configuration": config.name, "factor": f, "rate": rate, "model_ttft_s": sim.ttft_s,
                             "ttft_s": ttft, "model_tpot_s": sim.tpot_s, "tpot_s": tpot, "slo_held": held,
                             "finished": got["finished"], "capped": got["capped"], "rejected": got["rejected"]})
                print(f"{config.name} at {f:g}x = {rate:.2f} req/s: p{q:g} TTFT {ttft:.3f} s (model {sim.ttft_s:.3f}), "
                      f"TPOT {tpot if tpot is None else round(tpot, 4)} s, SLO {'held' if held else 'missed'}", flush=True)
        finally:
            engine.close()
    columns = [("configuration", "configuration", ""), ("factor", "x", ".1f"), ("rate", "req/s", ".2f"),
               ("model_ttft_s", f"model p{q:g} TTFT", ".3f"), ("ttft_s", "measured", ".3f"),
               ("model_tpot_s", f"model p{q:g} TPOT", ".4f"), ("tpot_s", "measured", ".4f"),
               ("slo_held", "SLO held", ""), ("finished", "requests", "d"), ("capped", "capped", "")]
    print()
    print(table(rows, columns))
    print(f"JSON: {write_json(args.json, 'plan_check', rows, sweep=args.sweep, profile=profile.name, slo=asdict(slo))}")
    return 0

