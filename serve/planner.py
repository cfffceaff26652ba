"""From a measured sweep to a decision: per configuration, what one replica sustains at a profile's SLO, the replicas
a target needs, and what that costs.

Input: the JSON of `tradeoff bench sweep` (local, or taken with --backend), whose rows keep every request's
TTFT/TPOT/E2E and, for an engine in the sweep's own process, every batched step's time. For each configuration in
it (batched mode at its policy; latency mode with its drafter):

- the largest measured level (N users back to back) whose percentiles meet the SLO;
- users per replica, thinking the profile's think time between requests, and requests/s per replica (Poisson
  arrivals): the most at which the discrete-event model of the engine (serve/queueing.py, fitted to the sweep's
  step times and checked against its levels) meets the SLO. Users who think collide, so they queue more than the
  same load back to back. A sweep without step times (one taken with --backend) has no model: its users per
  replica are the best level's N x (R + Z) / R (R: its mean E2E, Z: the think time; the interactive response-time
  law, which ignores that queueing, so it is optimistic), and no rate;
- replicas = ceil(target x (1 + headroom) / per replica); $/hour, $/month (730 h) and $ per 1M output tokens at
  the SLO's operating point and at the configuration's highest measured throughput (no SLO);
- what limits it past that point, read from the measured level that fails: which percentile, queueing, the step
  time's growth with the batch, preemptions.

Prices are the caller's (`price_per_hour`, in its unit); nothing here is invented.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from engine.metrics import percentile
from engine.scheduler import BatchPolicy
from engine.stats import SLO
from serve.loadgen import Measured
from serve.profiles import Profile
from serve.queueing import (
    EngineModel,
    Percentiles,
    SimRequest,
    StepModel,
    Traffic,
    highest,
    keeps_up,
    percentiles,
    simulate,
)

HOURS_PER_MONTH = 730
MAX_USERS = 10**9
MAX_RATE = 10**7  # requests/s
MAX_PRICE = 10**6  # per hour


class PlanError(ValueError):
    """A sweep or a target the planner cannot use; the message says which and why."""


@dataclass(frozen=True)
class Level:
    """A measured load level, judged at the SLO's percentile from its raw samples."""

    concurrency: int
    requests: int
    capped: bool
    output_tok_s: float
    req_s: float
    at: Percentiles  # the SLO's percentile of TTFT, TPOT and E2E (output_tok_s: the level's total)
    e2e_mean_s: float
    queue_share: float | None  # of the mean TTFT, the mean wait for a slot
    step_ms: float | None
    preemptions: int | None


@dataclass(frozen=True)
class Configuration:
    name: str
    mode: str
    levels: tuple[Level, ...]
    model: EngineModel | None  # None: no step times were measured (a sweep taken with --backend)


@dataclass(frozen=True)
class ModelCheck:
    """The model against measurement at one level: simulated / measured - 1, for the p50 and p99 of TTFT and TPOT."""

    concurrency: int
    ttft_p50_error: float
    tpot_p50_error: float | None
    ttft_p99_error: float
    tpot_p99_error: float | None


@dataclass(frozen=True)
class PlanRow:
    configuration: str
    mode: str
    best_level: int | None  # the largest measured concurrency meeting the SLO (None: none does)
    users_per_replica: int | None
    rate_per_replica: float | None  # Poisson requests/s at the SLO (model)
    tok_s_per_replica: float | None  # output tokens/s at that operating point
    replicas: int | None
    cost_per_hour: float | None
    cost_per_month: float | None
    cost_per_mtok_at_slo: float | None
    cost_per_mtok_max: float | None  # at the highest measured throughput, no SLO (None: it measured none)
    max_tok_s: float
    limit: str
    unmet: str | None = None  # why there is no replica count (None: there is one)
    checks: tuple[ModelCheck, ...] = ()


@dataclass(frozen=True)
class Target:
    """Whom to serve: concurrent users (closed loop, with the profile's think time) or a Poisson request rate."""

    users: int | None = None
    rate: float | None = None
    price_per_hour: float = 1.0
    unit: str = "$"
    headroom: float = 0.2

    def __post_init__(self) -> None:
        if (self.users is None) == (self.rate is None):
            raise PlanError("give a target: either --users or --rate")
        if self.users is not None and not 1 <= self.users <= MAX_USERS:
            raise PlanError(f"--users must be in [1, {MAX_USERS:,}], got {self.users}")
        if self.rate is not None and not (math.isfinite(self.rate) and 0 < self.rate <= MAX_RATE):
            raise PlanError(f"--rate must be a request rate in (0, {MAX_RATE:,}] per second, got {self.rate}")
        if not (math.isfinite(self.price_per_hour) and 0 < self.price_per_hour <= MAX_PRICE):
            raise PlanError(f"--price-per-hour must be in (0, {MAX_PRICE:,}], got {self.price_per_hour}")
        if not (math.isfinite(self.headroom) and 0 <= self.headroom <= 10):
            raise PlanError(f"--headroom must be in [0, 10] (0.2 = 20%), got {self.headroom}")


def read_sweep(path: str | Path, model: str | None = None) -> dict:
    """A sweep's JSON, checked: it exists, parses, is a sweep with raw samples, and (if `model` is given) measured
    that model."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise PlanError(f"cannot read the sweep {path}: {e.strerror or e} (make one with `tradeoff bench sweep`)") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"{path} is not JSON ({e}); expected the output of `tradeoff bench sweep`") from None
    if not isinstance(data, dict) or data.get("benchmark") != "sweep" or not isinstance(data.get("rows"), list):
        raise PlanError(f"{path} is not a sweep: expected the JSON that `tradeoff bench sweep` writes")
    if not data["rows"] or any(not isinstance(r, dict) or "samples" not in r for r in data["rows"]):
        raise PlanError(f"{path} has no per-request samples (an older or empty sweep): run `tradeoff bench sweep` again")
    if model is not None and data.get("model") not in (None, model):
        raise PlanError(f"{path} measured model {data['model']!r}, not {model!r}")
    for i, row in enumerate(data["rows"]):
        if (why := row_problem(row)) is not None:
            raise PlanError(f"{path}: row {i} ({row.get('mode')} N={row.get('concurrency')}) {why}")
    return data


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def row_problem(row: dict) -> str | None:
    """What a sweep row lacks that the planner reads (None: nothing)."""
    if row.get("mode") not in ("batched", "latency"):
        return f"has mode {row.get('mode')!r}, not batched or latency"
    if not isinstance(row.get("concurrency"), int) or row["concurrency"] < 1:
        return "has no positive integer concurrency"
    for key in ("req_s", "output_tok_s"):
        if not _number(row.get(key)):
            return f"has no number {key}"
    samples = row["samples"]
    if not isinstance(samples, list) or not all(isinstance(x, dict) for x in samples):
        return "has samples that are not a list of requests"
    for j, x in enumerate(samples):
        if not all(isinstance(x.get(k), int) for k in ("prompt_tokens", "output_tokens")) or not all(
                _number(x.get(k)) for k in ("ttft_s", "e2e_s")) or not all(
                x.get(k) is None or _number(x[k]) for k in ("tpot_s", "queue_s", "cached_tokens")):
            return f"sample {j} lacks integer prompt/output tokens or numeric TTFT/E2E: {x}"
    steps = row.get("steps", [])
    if not isinstance(steps, list) or not all(
            isinstance(t, list) and len(t) == 3 and all(_number(v) for v in t) for t in steps):
        return "has steps that are not (decode rows, prefill tokens, seconds) triples"
    return None


def level_from(row: dict, slo: SLO, where: str) -> Level:
    samples = row["samples"]
    if not samples:
        raise PlanError(f"{where}: level N={row.get('concurrency')} finished no request")
    q = slo.percentile

    def values(key: str) -> list[float]:
        return [s[key] for s in samples if s.get(key) is not None]

    ttft, tpot, e2e = values("ttft_s"), values("tpot_s"), values("e2e_s")
    if not ttft or not e2e:
        raise PlanError(f"{where}: level N={row.get('concurrency')} lacks TTFT or E2E samples, which the SLO needs")
    queue = values("queue_s")
    mean_ttft = sum(ttft) / len(ttft)
    return Level(
        concurrency=int(row["concurrency"]), requests=len(samples), capped=bool(row.get("capped")),
        output_tok_s=float(row["output_tok_s"]), req_s=float(row["req_s"]),
        at=Percentiles(percentile(ttft, q), percentile(tpot, q) if tpot else None, percentile(e2e, q),
                       float(row["output_tok_s"])),
        e2e_mean_s=sum(e2e) / len(e2e),
        queue_share=(sum(queue) / len(queue)) / mean_ttft if queue and mean_ttft > 0 else None,
        step_ms=row.get("step_ms"), preemptions=row.get("preemptions"),
    )


def configurations(sweep: dict, slo: SLO, where: str) -> list[Configuration]:
    """Batched mode at the sweep's policy (its levels; a step model if steps were measured) and latency mode."""
    configs = []
    policy = sweep.get("policy") or {}
    for mode in ("batched", "latency"):
        rows = sorted((r for r in sweep["rows"] if r.get("mode") == mode), key=lambda r: r["concurrency"])
        if not rows:
            continue
        levels = tuple(level_from(r, slo, where) for r in rows)
        if mode == "batched":
            steps = [tuple(s) for r in rows for s in r.get("steps", [])]
            try:
                BatchPolicy(**policy)
            except (TypeError, ValueError) as e:
                raise PlanError(f"{where}: the sweep's batched policy {policy} is not one the engine runs: {e}") from None
            budget, batch = policy.get("token_budget"), policy.get("max_batch_size")
            chunked = policy.get("chunked_prefill", True)
            name = f"batched (max batch {batch}, budget {budget}{'' if chunked else ', unchunked'})"
            try:
                model = EngineModel(StepModel.fit(steps), batch, budget, chunked) if batch and budget else None
            except ValueError:  # no steps (a sweep through --backend), or too few to fit
                model = None
        else:
            drafter = (sweep.get("latency") or {}).get("drafter")
            name = f"latency (batch 1, speculation {drafter or 'off'})"
            # its model from requests that ran one at a time (at N > 1 their TTFT holds waits behind others)
            s = rows[0]["samples"] if rows[0]["concurrency"] == 1 else []
            tpots = [x["tpot_s"] for x in s if x.get("tpot_s") is not None]
            model = None
            if tpots and not sweep.get("backend"):
                prefilled = [x["prompt_tokens"] - (x.get("cached_tokens") or 0) for x in s]
                step = StepModel.batch_one(prefilled, [x["ttft_s"] for x in s], sum(tpots) / len(tpots))
                model = EngineModel(step, 1, None)
        configs.append(Configuration(name, mode, levels, model))
    return configs


def workload_of(sweep: dict, mode: str | None = None, prefilled: bool = True) -> tuple[Measured, Measured]:
    """The lengths the sweep's requests had (of `mode`'s rows, or all): prompt tokens, less what the prefix cache
    held where the sweep recorded it (`prefilled`, what the model runs; else the prompts as sent), and tokens out."""
    samples = [s for r in sweep["rows"] if mode in (None, r.get("mode")) for s in r["samples"]]
    cached = [(s.get("cached_tokens") or 0) if prefilled else 0 for s in samples]
    return (Measured(tuple(s["prompt_tokens"] - c for s, c in zip(samples, cached))),
            Measured(tuple(s["output_tokens"] for s in samples)))


def replay(config: Configuration, sweep: dict, requests: int, **traffic: float) -> list[SimRequest]:
    """The configuration's model run on the sweep's own lengths, with this traffic (rate=, or users= and
    think_time_s=)."""
    prompts, outputs = workload_of(sweep, config.mode)
    return simulate(config.model, Traffic(prompts, outputs, **traffic), requests=requests)


def check_model(config: Configuration, sweep: dict, slo: SLO, requests: int = 600) -> tuple[ModelCheck, ...]:
    """The model replaying each measured level (N users back to back) against what was measured."""
    if config.model is None:
        return ()
    checks = []
    for row in sorted((r for r in sweep["rows"] if r.get("mode") == config.mode), key=lambda r: r["concurrency"]):
        done = replay(config, sweep, requests, users=int(row["concurrency"]))
        ttfts = [s["ttft_s"] for s in row["samples"]]
        tpots = [s["tpot_s"] for s in row["samples"] if s.get("tpot_s") is not None]
        errors = []
        for q in (50, 99):
            sim = percentiles(done, q)
            tpot = percentile(tpots, q) if tpots else None
            errors += [sim.ttft_s / percentile(ttfts, q) - 1, sim.tpot_s / tpot - 1 if tpot and sim.tpot_s else None]
        checks.append(ModelCheck(int(row["concurrency"]), *errors))
    return tuple(checks)


def max_rate(config: Configuration, sweep: dict, slo: SLO, requests: int = 1500) -> float | None:
    """The highest Poisson rate (requests/s) one replica serves within the SLO, by the model."""
    if config.model is None:
        return None

    def meets(rate: float) -> bool:
        done = replay(config, sweep, requests, rate=rate)
        # and it keeps up: past its capacity the queue grows without end, and a finite run's percentiles (bounded by
        # its length) could still pass a loose SLO
        return percentiles(done, slo.percentile).meet(slo) and keeps_up(done)

    return highest(meets, max(level.req_s for level in config.levels))


def users_replay(config: Configuration, sweep: dict, users: int, think_s: float) -> list[SimRequest]:
    """The model serving `users` who think `think_s` on average between requests (enough requests for each)."""
    return replay(config, sweep, max(1500, 20 * users), users=users, think_time_s=think_s)


def max_users(config: Configuration, sweep: dict, slo: SLO, think_s: float) -> int | None:
    """The most closed-loop users, thinking `think_s` on average between requests, one replica serves within the
    SLO, by the model (users who think collide: more queueing than the same load back to back)."""
    if config.model is None:
        return None

    def meets(users: int) -> bool:
        return percentiles(users_replay(config, sweep, users, think_s), slo.percentile).meet(slo)

    return highest(meets, max(level.concurrency for level in config.levels), integer=True)


def limit_of(config: Configuration, best: Level | None, slo: SLO | None) -> str:
    """What stops the configuration past its best level, from the first measured level that fails."""
    if slo is None:
        return "no latency target: throughput decides"
    failing = next((lv for lv in config.levels if not lv.at.meet(slo) and (best is None or lv.concurrency > best.concurrency)),
                   None)
    if failing is None:
        top = config.levels[-1]
        return (f"every measured level meets the SLO (up to N={top.concurrency}); measure higher levels to find the knee"
                if config.mode == "batched" else "batch 1: one request at a time; more users queue behind it")
    q = f"p{slo.percentile:g}"
    why = []
    if failing.at.ttft_s > slo.ttft_s:
        why.append(f"{q} TTFT {failing.at.ttft_s * 1000:.0f} ms > {slo.ttft_s * 1000:.0f}")
    if failing.at.tpot_s is not None and failing.at.tpot_s > slo.tbt_s:
        why.append(f"{q} TPOT {failing.at.tpot_s * 1000:.0f} ms > {slo.tbt_s * 1000:.0f}")
    if slo.e2e_s is not None and failing.at.e2e_s > slo.e2e_s:
        why.append(f"{q} E2E {failing.at.e2e_s:.2f} s > {slo.e2e_s:.2f}")
    cause = []
    if failing.preemptions:
        cause.append(f"KV cache full ({failing.preemptions} preemptions)")
    if failing.queue_share is not None and failing.queue_share > 0.5:
        cause.append(f"queueing ({failing.queue_share:.0%} of TTFT is the wait for a slot)")
    first = config.levels[0]
    if failing.step_ms and first.step_ms and failing.step_ms > 1.5 * first.step_ms:
        cause.append(f"step time grows with the batch ({first.step_ms:.0f} ms at N={first.concurrency}, "
                     f"{failing.step_ms:.0f} ms at N={failing.concurrency})")
    if config.mode == "latency":
        cause.append("batch 1: requests take turns")
    return f"at N={failing.concurrency}: {', '.join(why)}" + (f"; {'; '.join(cause)}" if cause else "")


def replicas_for(target: float, per_replica: float, headroom: float) -> int:
    """ceil(target x (1 + headroom) / per replica), rounded first so that 50 x 1.1 / 11 is 5, not 6."""
    return math.ceil(round(target * (1 + headroom) / per_replica, 9))


def plan(sweep: dict, profile: Profile, target: Target, where: str = "sweep", checks: bool = True) -> list[PlanRow]:
    """One row per configuration in `sweep`, cheapest first; with `checks`, each carries the model's replay of the
    measured levels against them (the dashboard, re-planning as levels fill in, skips it)."""
    slo = profile.slo
    judge = slo or SLO()
    think = profile.workload.think_time_s
    rows = []
    for config in configurations(sweep, judge, where):
        top = max(config.levels, key=lambda lv: lv.output_tok_s)
        max_tok_s = top.output_tok_s
        per_mtok_max = target.price_per_hour / (max_tok_s * 3600) * 1e6 if max_tok_s > 0 else None
        if slo is None:  # throughput decides: the replica runs at its highest measured throughput
            best = top
        else:
            meeting = [lv for lv in config.levels if lv.at.meet(slo)]
            best = max(meeting, key=lambda lv: lv.concurrency) if meeting else None
        if slo is not None and best is None:  # the model never overrules a measured miss
            users = rate = None
        elif slo is not None and config.model is not None:
            users, rate = max_users(config, sweep, slo, think), max_rate(config, sweep, slo)
        else:  # no model (or no SLO): the best measured level, its users thinking as the profile says
            users = math.floor(best.concurrency * (best.e2e_mean_s + think) / best.e2e_mean_s)
            rate = best.req_s if slo is None else None
        tok_s = replicas = unmet = None
        if best is None:
            unmet = "meets the SLO at no measured level"
        elif target.users is not None:
            if users:
                tok_s = (best.output_tok_s if config.model is None or slo is None
                         else percentiles(users_replay(config, sweep, users, think), 50).output_tok_s)
                replicas = replicas_for(target.users, users, target.headroom)
            else:
                unmet = "by the model, misses the SLO even with one user"
        elif rate:
            tok_s = rate * workload_of(sweep, config.mode)[1].mean
            replicas = replicas_for(target.rate, rate, target.headroom)
        else:
            unmet = ("has no rate: the sweep has no step times to model Poisson arrivals with (a sweep taken with "
                     "--backend); plan it with --users" if config.model is None else
                     "by the model, misses the SLO at any rate")
        per_hour = replicas * target.price_per_hour if replicas else None
        rows.append(PlanRow(
            configuration=config.name, mode=config.mode, best_level=best.concurrency if best else None,
            users_per_replica=users, rate_per_replica=rate, tok_s_per_replica=tok_s, replicas=replicas,
            cost_per_hour=per_hour, cost_per_month=per_hour * HOURS_PER_MONTH if per_hour else None,
            cost_per_mtok_at_slo=target.price_per_hour / (tok_s * 3600) * 1e6 if tok_s else None,
            cost_per_mtok_max=per_mtok_max, max_tok_s=max_tok_s, limit=limit_of(config, best, slo), unmet=unmet,
            checks=check_model(config, sweep, judge) if checks else (),
        ))
    return sorted(rows, key=lambda r: (r.cost_per_hour is None, r.cost_per_hour or 0, r.cost_per_mtok_max or math.inf))


def answer(rows: list[PlanRow], profile: Profile, target: Target) -> str:
    """The one-line decision: the cheapest configuration that meets the SLO, and what the others cost beside it."""
    who = f"{target.users:,} users" if target.users is not None else f"{target.rate:g} requests/s"
    meeting = [r for r in rows if r.replicas]
    if not meeting:
        return f"profile {profile.name}, {who}: no plan; " + "; ".join(f"{r.configuration} {r.unmet}" for r in rows)
    best = meeting[0]
    line = (f"profile {profile.name}, {who}: {best.configuration}, {best.replicas} replica{'s' * (best.replicas != 1)}, "
            f"{target.unit}{best.cost_per_month:,.0f}/month, {target.unit}{best.cost_per_mtok_at_slo:.2f} per 1M output tokens")
    others = [f"{r.configuration} costs {r.cost_per_hour / best.cost_per_hour:.1f}x" for r in meeting[1:]]
    missing = [f"{r.configuration} {r.unmet}" for r in rows if not r.replicas]
    return "; ".join([line, *others, *missing])
