"""The planner on sweeps whose answer is computed here by hand, its errors, and its model against a recorded sweep."""

import copy
import json
import math
import re
from pathlib import Path

import pytest

from engine.stats import SLO
from serve.loadgen import Lengths, Workload
from serve.planner import (
    HOURS_PER_MONTH,
    PlanError,
    Target,
    answer,
    check_model,
    configurations,
    max_rate,
    plan,
    read_sweep,
    replicas_for,
)
from serve.profiles import Profile
from tradeoff.cli import main

RECORDED = Path(__file__).parent / "data" / "sweep_smollm2_xeon.json"


def level(n: int, ttft: float, tpot: float, e2e: float, tok_s: float, mode: str = "batched") -> dict:
    """A level of 100 requests whose TTFTs spread evenly over [ttft, 2 ttft): p50 ~1.5 ttft, p99 ~2 ttft."""
    samples = [{"prompt_tokens": 100, "output_tokens": 50, "ttft_s": ttft * (1 + i / 100), "tpot_s": tpot,
                "e2e_s": e2e, "queue_s": 0.0} for i in range(100)]
    return {"mode": mode, "concurrency": n, "req_s": tok_s / 50, "output_tok_s": tok_s, "capped": False,
            "samples": samples}


def sweep(rows: list[dict]) -> dict:
    return {"benchmark": "sweep", "machine": {}, "model": "smollm2-135m", "backend": "openai://elsewhere/v1",
            "policy": {"max_batch_size": 32, "token_budget": 64, "chunked_prefill": True},
            "workload": {"prompt_tokens": {"mean": 100}, "output_tokens": {"mean": 50}}, "rows": rows}


LEVELS = [level(1, 0.10, 0.03, 1.6, 30), level(4, 0.20, 0.04, 2.0, 100), level(8, 0.30, 0.06, 3.0, 140),
          level(16, 0.50, 0.09, 4.6, 180)]


def profile(think_s: float = 0.0, q: float = 99) -> Profile:
    return Profile("t", "test", Workload(Lengths(100), Lengths(50), think_s), SLO(ttft_s=0.5, tbt_s=0.08, percentile=q))


def test_the_largest_level_meeting_the_slo_sets_replicas_and_costs():
    target = Target(users=500, price_per_hour=2.5, headroom=0.2)
    (row,) = plan(sweep(LEVELS), profile(), target)
    assert row.best_level == 4  # p99 TTFT: 0.198, 0.396, 0.594 (> 0.5), ...
    assert row.users_per_replica == 4 and row.replicas == math.ceil(500 * 1.2 / 4) == 150
    assert row.cost_per_hour == pytest.approx(150 * 2.5) and row.cost_per_month == pytest.approx(150 * 2.5 * HOURS_PER_MONTH)
    assert row.cost_per_mtok_at_slo == pytest.approx(2.5 / (100 * 3600) * 1e6)
    assert row.cost_per_mtok_max == pytest.approx(2.5 / (180 * 3600) * 1e6)
    assert row.rate_per_replica is None  # no step times in a sweep taken through --backend
    assert row.limit.startswith("at N=8: p99 TTFT 594 ms > 500")


def test_think_time_and_the_percentile_change_the_answer():
    target = Target(users=500, price_per_hour=2.5)
    (thinking,) = plan(sweep(LEVELS), profile(think_s=10.0), target)
    assert thinking.users_per_replica == math.floor(4 * (2.0 + 10.0) / 2.0) == 24  # N (R + Z) / R
    assert thinking.replicas == math.ceil(600 / 24)
    (median,) = plan(sweep(LEVELS), profile(q=50), target)
    assert median.best_level == 8  # p50 TTFT 0.45 s and TPOT 60 ms meet it; N=16's TPOT 90 ms does not


def test_the_answer_names_the_cheapest_and_prices_the_others():
    rows = LEVELS + [level(1, 0.05, 0.01, 0.6, 95, mode="latency")]
    target = Target(users=10, price_per_hour=1.0, headroom=0.0)
    ranked = plan(sweep(rows), profile(), target)
    assert [r.mode for r in ranked] == ["batched", "latency"]  # 3 replicas of 4 users vs 10 of 1
    assert [r.replicas for r in ranked] == [3, 10]
    line = answer(ranked, profile(), target)
    assert line.startswith("profile t, 10 users: batched (max batch 32, budget 64), 3 replicas, $2,190/month")
    assert "latency (batch 1, speculation off) costs 3.3x" in line


def test_nothing_meets_the_slo():
    rows = [level(1, 0.6, 0.03, 2.0, 30)]
    ranked = plan(sweep(rows), profile(), Target(users=5, price_per_hour=1.0))
    assert ranked[0].replicas is None and ranked[0].best_level is None
    assert answer(ranked, profile(), Target(users=5, price_per_hour=1.0)) == (
        "profile t, 5 users: no plan; batched (max batch 32, budget 64) meets the SLO at no measured level")


def test_a_rate_needs_step_times_and_the_answer_says_so():
    target = Target(rate=3.0, price_per_hour=1.0)
    (row,) = plan(sweep(LEVELS), profile(), target)  # a --backend sweep: levels meet the SLO, but no model
    assert row.best_level == 4 and row.replicas is None and "plan it with --users" in row.unmet
    assert answer([row], profile(), target).startswith("profile t, 3 requests/s: no plan; batched (max batch 32, "
                                                        "budget 64) has no rate: the sweep has no step times")


def test_a_rate_past_the_replicas_capacity_is_never_planned_however_loose_the_slo():
    """Past its capacity a queue grows without end; a finite simulation's percentiles would still pass a loose
    enough SLO. Batch 1, each request 0.1 s of TTFT plus 49 tokens at 20 ms: 1.08 s, so at most 1 / 1.08 req/s."""
    latency = {**level(1, 0.10, 0.02, 1.08, 45, mode="latency"), "req_s": 0.9}
    for s in latency["samples"]:
        s["ttft_s"], s["cached_tokens"] = 0.10, 0
    local = {**sweep([latency]), "backend": None}
    loose = SLO(ttft_s=1000.0, tbt_s=1.0, percentile=50)
    (config,) = configurations(local, loose, "test")
    capacity = 1 / (0.10 + 49 * 0.02)
    # within the noise of 1,500 simulated Poisson arrivals (~3%) of the capacity, and never past it by more
    assert 0.8 * capacity <= max_rate(config, local, loose) <= 1.05 * capacity


def test_replicas_are_not_inflated_by_rounding():
    assert replicas_for(50, 11, 0.1) == 5  # 50 x 1.1 is 55.000000000000007 in floating point
    assert replicas_for(56, 11, 0.0) == 6 and replicas_for(500, 4, 0.2) == 150


@pytest.mark.parametrize("kwargs, message", [
    ({"users": 0}, "--users must be in"), ({"users": -3}, "--users must be in"), ({"users": 10**12}, "--users must be in"),
    ({"rate": 0.0}, "--rate must be"), ({"rate": float("nan")}, "--rate must be"), ({"rate": -1.0}, "--rate must be"),
    ({"users": 5, "price_per_hour": 0.0}, "--price-per-hour"), ({"users": 5, "price_per_hour": 1e9}, "--price-per-hour"),
    ({"users": 5, "headroom": -0.1}, "--headroom"), ({}, "either --users or --rate"),
    ({"users": 5, "rate": 1.0}, "either --users or --rate"),
])
def test_bad_targets(kwargs, message):
    with pytest.raises(PlanError, match=message):
        Target(**{"price_per_hour": 1.0, **kwargs})


def test_bad_sweep_files(tmp_path):
    with pytest.raises(PlanError, match="cannot read the sweep .*missing.json"):
        read_sweep(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="bad.json is not JSON"):
        read_sweep(tmp_path / "bad.json")
    (tmp_path / "decode.json").write_text(json.dumps({"benchmark": "decode", "rows": []}))
    with pytest.raises(PlanError, match="decode.json is not a sweep"):
        read_sweep(tmp_path / "decode.json")
    old = copy.deepcopy(sweep(LEVELS))
    for r in old["rows"]:
        del r["samples"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(PlanError, match="no per-request samples"):
        read_sweep(tmp_path / "old.json")
    for i, (mutate, why) in enumerate([
            (lambda r: r.pop("req_s"), "row 0 (batched N=1) has no number req_s"),
            (lambda r: r.update(output_tok_s=None), "has no number output_tok_s"),
            (lambda r: r.update(mode="turbo"), "has mode 'turbo'"),
            (lambda r: r.update(samples={"a": 1}), "samples that are not a list"),
            (lambda r: r["samples"][3].pop("prompt_tokens"), "sample 3 lacks integer prompt/output tokens"),
            (lambda r: r["samples"][0].update(ttft_s=None), "sample 0 lacks"),
            (lambda r: r.update(steps=[[1, 0, None]]), "steps that are not"),
    ]):
        broken = copy.deepcopy(sweep(LEVELS))
        mutate(broken["rows"][0])
        (tmp_path / f"broken{i}.json").write_text(json.dumps(broken))
        with pytest.raises(PlanError, match=re.escape(why)):
            read_sweep(tmp_path / f"broken{i}.json")
    odd_policy = copy.deepcopy(sweep(LEVELS))
    odd_policy["policy"]["token_budget"] = -3
    with pytest.raises(PlanError, match="not one the engine runs"):
        plan(odd_policy, profile(), Target(users=5, price_per_hour=1.0))
    (tmp_path / "ok.json").write_text(json.dumps(sweep(LEVELS)))
    with pytest.raises(PlanError, match="measured model 'smollm2-135m', not 'qwen'"):
        read_sweep(tmp_path / "ok.json", model="qwen")
    assert read_sweep(tmp_path / "ok.json", model="smollm2-135m")["rows"]


def test_the_model_reproduces_the_recorded_sweep():
    """Fitted to the steps of a sweep recorded on this project's CPU (bench sweep, default model, batched mode), the
    discrete-event model replays each level's N users within 15% of the measured p50 TTFT and TPOT."""
    data = read_sweep(RECORDED)
    slo = SLO()
    (batched,) = [c for c in configurations(data, slo, "recorded") if c.mode == "batched"]
    checks = check_model(batched, data, slo)
    assert [c.concurrency for c in checks] == [r["concurrency"] for r in data["rows"] if r["mode"] == "batched"]
    assert all(abs(c.ttft_p50_error) <= 0.15 and abs(c.tpot_p50_error) <= 0.15 for c in checks), checks


def test_tradeoff_plan_on_the_recorded_sweep(tmp_path, capsys):
    out, relaxed = tmp_path / "plan.json", tmp_path / "relaxed.toml"
    relaxed.write_text('think_time_s = 5.0\nprompt_tokens = {mean = 128}\noutput_tokens = {mean = 32}\n'
                       'slo = {ttft_s = 1.0, tbt_s = 0.15, percentile = 99}\n')  # one both modes meet on this CPU
    assert main(["plan", "--sweep", str(RECORDED), "--profile", str(relaxed), "--users", "500", "--price-per-hour",
                 "2.5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {r["mode"] for r in rows} == {"batched", "latency"}
    assert all(r["rate_per_replica"] for r in rows)  # step times recorded: the model answers for Poisson arrivals
    cheapest = rows[0]
    assert f"{cheapest['configuration']}, {cheapest['replicas']} replicas" in printed.splitlines()[-2]
    assert main(["plan", "--sweep", str(tmp_path / "none.json"), "--users", "5", "--price-per-hour", "1"]) == 2
    assert "none.json" in capsys.readouterr().err
