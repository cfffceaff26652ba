"""`tradeoff bench plan-check`: does the planner's rate hold? Real Poisson load at 0.8x and 1.2x the highest rate the
model predicts one replica serves within the SLO (serve/planner.py, from a sweep): the SLO should hold at the first
and fail at the second.

Per configuration in the sweep that has a model (batched mode at the sweep's policy, latency mode), per factor: the
rate, the model's percentiles at that rate, and the measured ones (the profile's percentile of TTFT and TPOT over
`--requests` requests after a warm-up of a tenth as many), and whether the SLO held. Run the sweep on this machine
just before (`tradeoff bench sweep`): a VM's speed drifts, so each configuration first runs one user as the sweep
did and prints how far its time per token moved (over 15%: re-sweep). The engine is built with the sweep's policy.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

from bench.report import table, write_json
from bench.sweep import run_level, wait_for
from engine import Engine
from engine.loader import load
from engine.metrics import percentile
from engine.scheduler import BatchPolicy
from engine.stats import SLO
from serve.loadgen import LoadGenerator, Workload
from serve.planner import configurations, max_rate, read_sweep, workload_of
from serve.profiles import load_profile
from serve.queueing import Percentiles, Traffic, percentiles, simulate


def measure(engine: Engine, workload: Workload, rate: float, requests: int, cap_s: float, seed: int) -> dict:
    """Poisson arrivals at `rate`: a warm-up of a tenth as many, then `requests` more; every one of them runs to
    its end (or `cap_s` passes), so the slowest are not left out. The measured requests' TTFT/TPOT/E2E."""
    engine.clear_cache()  # each run starts from the same cache as the last
    warm = max(1, requests // 10)
    lg = LoadGenerator(engine, workload, seed=seed)
    lg.start_rate(rate, requests=warm + requests)
    deadline = time.monotonic() + cap_s
    try:
        wait_for(lambda: len(lg.completed) + lg.rejected + lg.failed >= warm + requests or time.monotonic() > deadline)
    finally:
        lg.stop()
    done = [m for m in lg.submitted[warm:] if m.finish_reason in ("stop", "length")]
    return {"ttfts": [m.ttft for m in done], "tpots": [m.tpot for m in done if m.tpot is not None],
            "e2es": [m.e2e for m in done], "finished": len(done), "rejected": lg.rejected,
            "capped": len(done) < requests}


def speed_drift(engine: Engine, sweep: dict, mode: str, workload: Workload, slo: SLO) -> float:
    """One user back to back, as the sweep's first level of `mode`: its TPOT p50 now / then - 1. A VM's speed drifts
    (a neighbour, the clock): a check against a sweep taken at another speed would test the machine, not the model."""
    then = next(r for r in sorted(sweep["rows"], key=lambda r: r["concurrency"]) if r["mode"] == mode)
    now = run_level(engine, 1, workload, slo, 20, 120.0, seed=99)
    tpot = lambda row: percentile([x["tpot_s"] for x in row["samples"] if x["tpot_s"] is not None], 50)  # noqa: E731
    return tpot(now) / tpot(then) - 1


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


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
        prompts, outputs = workload_of(data, config.mode)  # what the model ran: tokens prefilled
        sent, _ = workload_of(data, config.mode, prefilled=False)  # what the real load sends: whole prompts
        engine = Engine(loaded, mode=config.mode, policy=policy, max_waiting=10_000)
        try:
            drift = speed_drift(engine, data, config.mode, Workload(sent, outputs, think_time_s=0.0), slo)
            print(f"{config.name}: one user's TPOT p50 is {drift:+.0%} against the sweep's"
                  + ("; the machine runs at another speed than when the sweep was taken: re-sweep" if abs(drift) > 0.15
                     else ""), flush=True)
            for i, f in enumerate(float(x) for x in args.factors.split(",")):
                rate = f * predicted
                sim = percentiles(simulate(config.model, Traffic(prompts, outputs, rate=rate), requests=1500), q)
                got = measure(engine, Workload(sent, outputs, think_time_s=0.0), rate, args.requests, args.run_s, seed=i)
                ttft, tpot, e2e = (percentile(got[k], q) for k in ("ttfts", "tpots", "e2es"))
                held = ttft is not None and Percentiles(ttft, tpot, e2e, 0.0).meet(slo)
                rows.append({"configuration": config.name, "factor": f, "rate": rate, "speed_drift": drift,
                             "model_ttft_s": sim.ttft_s,
                             "ttft_s": ttft, "model_tpot_s": sim.tpot_s, "tpot_s": tpot, "slo_held": held,
                             "finished": got["finished"], "capped": got["capped"], "rejected": got["rejected"]})
                print(f"{config.name} at {f:g}x = {rate:.2f} req/s: p{q:g} TTFT {fmt(ttft, '.3f')} s (model "
                      f"{sim.ttft_s:.3f}), TPOT {fmt(tpot, '.4f')} s, SLO {'held' if held else 'missed'}", flush=True)
        finally:
            engine.close()
    columns = [("configuration", "configuration", ""), ("factor", "x", ".1f"), ("rate", "req/s", ".2f"),
               ("speed_drift", "drift", "+.0%"),
               ("model_ttft_s", f"model p{q:g} TTFT", ".3f"), ("ttft_s", "measured", ".3f"),
               ("model_tpot_s", f"model p{q:g} TPOT", ".4f"), ("tpot_s", "measured", ".4f"),
               ("slo_held", "SLO held", ""), ("finished", "requests", "d"), ("capped", "capped", "")]
    print()
    print(table(rows, columns))
    print(f"JSON: {write_json(args.json, 'plan_check', rows, sweep=args.sweep, profile=profile.name, slo=asdict(slo))}")
    return 0

