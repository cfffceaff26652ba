"""`tradeoff plan`: where to operate and what it costs, from a measured sweep (serve/planner.py does the planning).

  tradeoff plan --sweep bench/out/sweep.json --profile chat --users 500 --price-per-hour 2.50
  tradeoff plan --measure --profile code --rate 40 --price-per-hour 0.10      # runs `bench sweep` first
  tradeoff plan --sweep vllm-sweep.json --profile chat --users 2000 --price-per-hour 4   # a sweep taken with --backend

Per configuration in the sweep (batched mode at its policy, latency mode with its drafter): the largest measured
level meeting the profile's SLO at its percentile, the users one replica serves with the profile's think time, the
Poisson rate it serves (a discrete-event model of the engine built from the sweep's step times, checked against
the measured levels: the table's last columns), replicas for the target with headroom, cost per hour and month,
and cost per 1M output tokens at the SLO and at the highest measured throughput. Prices are yours: the unit is
printed with every figure.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from bench.report import table, write_json
from serve.planner import PlanRow, Target, answer, plan, read_sweep
from serve.profiles import PROFILES, load_profile

COLUMNS = [
    ("configuration", "configuration", ""), ("best_level", "N at SLO", "d"), ("users_per_replica", "users/replica", "d"),
    ("rate_per_replica", "req/s/replica", ".2f"), ("tok_s_per_replica", "tok/s/replica", ".1f"),
    ("replicas", "replicas", "d"), ("cost_per_month", "/month", ",.0f"), ("cost_per_mtok_at_slo", "/1M tok at SLO", ".2f"),
    ("cost_per_mtok_max", "/1M tok max", ".2f"), ("model_ttft_error", "model TTFT", "+.0%"),
    ("model_tpot_error", "model TPOT", "+.0%"),
]


def configure(name: str, p: argparse.ArgumentParser, argv: list[str]) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "profiles: " + "; ".join(f"{n}: {pr.description}" for n, pr in PROFILES.items())
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--sweep", help="a sweep's JSON (tradeoff bench sweep --json)")
    src.add_argument("--measure", action="store_true", help="run `tradeoff bench sweep` with this profile first")
    p.add_argument("--profile", default="chat",
                   help="chat, code, rag, voice, batch, or a .toml/.json file (default: %(default)s)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--users", type=int, help="concurrent users to serve (closed loop, with the profile's think time)")
    who.add_argument("--rate", type=float, help="Poisson requests/s to serve")
    p.add_argument("--price-per-hour", type=float, required=True, help="what one replica (a GPU, a CPU box) costs per hour")
    p.add_argument("--unit", default="$", help="the price's currency, printed with every cost (default: %(default)s)")
    p.add_argument("--headroom", type=float, default=0.2,
                   help="spare capacity on top of the target (default: %(default)s = 20%%)")
    p.add_argument("--model", default=None, help="refuse a sweep of another model; with --measure, the model to sweep")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="with --measure: the levels (default: %(default)s)")
    p.add_argument("--level-s", type=float, default=120.0, help="with --measure: time cap per level (default: %(default)s)")
    p.add_argument("--json", default="bench/out/plan.json", help="(default: %(default)s)")
    p.set_defaults(func=main)


def describe_machine(m: dict) -> str:
    cpu = m.get("cpu") or {}
    where = m.get("gpu") or f"{cpu.get('model', 'an unnamed CPU')} ({cpu.get('cores', '?')} cores)"
    return f"{where}, {m.get('time', 'at an unrecorded time')}"


def flat(row: PlanRow) -> dict:
    """A row for the table and the JSON: the model's worst error at the measured levels beside the plan."""
    d = asdict(row)
    ttft = [c.ttft_p50_error for c in row.checks]
    tpot = [c.tpot_p50_error for c in row.checks if c.tpot_p50_error is not None]
    d["model_ttft_error"] = max(ttft, key=abs) if ttft else None
    d["model_tpot_error"] = max(tpot, key=abs) if tpot else None
    return d


def main(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    target = Target(users=args.users, rate=args.rate, price_per_hour=args.price_per_hour, unit=args.unit,
                    headroom=args.headroom)
    path = args.sweep
    if args.measure:
        from bench import sweep

        parser = argparse.ArgumentParser()
        sweep.configure(parser)
        path = "bench/out/sweep.json"
        sweep.main(parser.parse_args(["--profile", args.profile, "--concurrency", args.concurrency, "--level-s",
                                      str(args.level_s), "--json", path, *(["--model", args.model] if args.model else [])]))
    data = read_sweep(path, args.model)
    rows = plan(data, profile, target, where=str(path))
    slo = profile.slo
    print(f"profile {profile.name}: {profile.description}")
    print("SLO: " + (f"p{slo.percentile:g} TTFT <= {slo.ttft_s * 1000:.0f} ms, TPOT <= {slo.tbt_s * 1000:.0f} ms"
                     + (f", E2E <= {slo.e2e_s:.1f} s" if slo.e2e_s else "") if slo else "none (throughput decides)")
          + f"; think time {profile.workload.think_time_s:g} s; price {target.unit}{target.price_per_hour:g}/hour per replica"
          + f"; headroom {target.headroom:.0%}")
    w = data.get("workload") or {}
    print(f"sweep: {path}, model {data.get('model') or '?'}, prompts ~{w.get('prompt_tokens', {}).get('mean', '?')} tokens, "
          f"replies ~{w.get('output_tokens', {}).get('mean', '?')}, measured on {describe_machine(data.get('machine') or {})}")
    mine = profile.workload
    measured = (w.get("prompt_tokens", {}).get("mean"), w.get("output_tokens", {}).get("mean"))
    if None not in measured and measured != (mine.prompt_tokens.mean, mine.output_tokens.mean):
        print(f"note: profile {profile.name}'s traffic is ~{mine.prompt_tokens.mean}-token prompts and "
              f"~{mine.output_tokens.mean}-token replies; this plan is for the sweep's lengths, judged by the profile's "
              f"SLO (sweep with --profile {args.profile} for its own)")
    flats = [flat(r) for r in rows]
    print()
    print(table(flats, [(k, h if k in ("configuration", "best_level", "users_per_replica", "rate_per_replica",
                                       "tok_s_per_replica", "replicas", "model_ttft_error", "model_tpot_error")
                         else target.unit + h, f) for k, h, f in COLUMNS]))
    for r in rows:
        print(f"  {r.configuration}: {r.limit}")
    capped = [f"N={row['concurrency']}" for row in data["rows"] if row.get("capped")]
    if capped:
        print(f"note: levels {', '.join(capped)} hit the time cap before enough requests for the percentile")
    print()
    print(answer(rows, profile, target))
    print(f"JSON: {write_json(args.json, 'plan', flats, sweep=str(path), profile=profile.name, target=asdict(target))}")
    return 0


