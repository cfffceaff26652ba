"""A measured load level, as `tradeoff bench sweep` writes it and `tradeoff plan` reads it: one row of a sweep.

The sweep and the dashboard's auto-sweep both measure levels (N users at one setting) and hand them to the planner
in this one form: the level's totals, its TTFT/TBT/E2E summary, every request's lengths and latencies, and, from an
engine in the same process, every batched step's (decode rows, prefill tokens, seconds). A level has measured
enough once `min_requests` requests have completed.
"""

from __future__ import annotations

import math

from engine.metrics import RequestMetrics
from engine.stats import SLO, summarize


def min_requests(slo: SLO | None) -> int:
    """Completed requests a level needs before its percentile means something: 1 / (1 - q) for the SLO's
    percentile q (100 for p99: the p99 is then more than a maximum), and at least 20."""
    q = (slo.percentile if slo else 50) / 100
    return max(20, math.ceil(1 / (1 - q) - 1e-9))


def percentile_ci(values: list[float], q: float, z: float = 1.96) -> tuple[float, float] | None:
    """A distribution-free 95% interval for the q-th percentile: the order statistics at ranks n*p -+ z*sqrt(n*p*(1-p))
    (the binomial's normal approximation). None when the upper rank falls past the largest value: too few samples."""
    n, p = len(values), q / 100
    if n == 0:
        return None
    half = z * math.sqrt(n * p * (1 - p))
    lo, hi = math.floor(n * p - half), math.ceil(n * p + half)
    if hi >= n:
        return None
    ordered = sorted(values)
    return ordered[max(lo, 0)], ordered[hi]


def completed(requests: list[RequestMetrics], start: float, end: float) -> list[RequestMetrics]:
    """The requests that ran to their end (stop or length) within [start, end]."""
    return [m for m in requests if m.finish_reason in ("stop", "length") and m.emissions
            and start <= m.emissions[-1][0] <= end]


def level_row(mode: str, concurrency: int, requests: list[RequestMetrics], start: float, end: float, slo: SLO,
              wanted: int, steps: list[tuple[int, int, float]] | None = None, preemptions: int | None = None,
              rejected: int = 0) -> dict:
    """The sweep row of a level measured over [start, end]: `requests` are those its users sent (summarized over the
    interval, as the engine's rolling window does); `wanted` is how many completions it aimed for (fewer: capped)."""
    s = summarize(requests, start, end, slo)
    measured = completed(requests, start, end)
    row = {
        "mode": mode, "concurrency": concurrency, "requests": s.finished, "duration_s": end - start,
        "capped": s.finished < wanted, "req_s": s.req_s, "output_tok_s": s.output_tok_s,
        "tok_s_per_user": s.tok_s_per_user, "goodput_req_s": s.goodput_req_s, "slo_attained": s.slo_attained,
        "rejected": rejected, "preemptions": preemptions,
    }
    for name in ("ttft", "tbt", "e2e"):
        for stat in ("mean", "p50", "p99"):
            row[f"{name}_{stat}_s"] = getattr(getattr(s, f"{name}_s"), stat)
    ci = percentile_ci([m.ttft for m in measured], slo.percentile)
    row[f"ttft_p{slo.percentile:g}_ci_s"] = list(ci) if ci else None
    # every request measured, so that any percentile can be recomputed and a model checked against them
    row["samples"] = [{"prompt_tokens": m.prompt_tokens, "cached_tokens": m.cached_tokens,
                       "output_tokens": m.output_tokens, "ttft_s": m.ttft,
                       "tpot_s": m.tpot, "e2e_s": m.e2e, "queue_s": m.queue_time} for m in measured]
    if steps:
        row["steps"] = [list(x) for x in steps]  # (decode rows, prefill tokens, seconds) per step
        row["step_ms"] = sum(x[2] for x in steps) / len(steps) * 1000
    return row
