"""The planner panel's numbers: a level's row starts after its warm-up and holds only its own requests, the book
keeps one sweep per profile in the form the planner reads, the target line's parsing, and the panel's lines."""

import json
import math

import pytest

from engine.metrics import RequestMetrics
from engine.stats import SLO
from serve.planner import PlanError, Target, read_sweep, row_problem
from serve.profiles import PROFILES
from tui.planning import LevelBook, LevelReading, PlanProcess, measure, measured_text, parse_target, plan_lines, plan_panel


def request(arrival: float, first: float, last: float, tokens: int = 5) -> RequestMetrics:
    m = RequestMetrics(arrival=arrival, user_class="synthetic", prompt_tokens=40)
    step = (last - first) / (tokens - 1)
    for i in range(tokens):
        m.record(first + i * step, 1, "batched")
    m.finish_reason = "length"
    return m


def test_a_levels_row_starts_after_each_users_first_reply_and_counts_only_what_finished_in_it():
    # two users from t=100: their first replies (ending at 101 and 102) are warm-up; three more finish after them
    warm = [request(100.0, 100.2, 101.0), request(100.0, 100.3, 102.0)]
    measured = [request(101.0, 101.1, 103.0), request(102.0, 102.5, 104.0), request(103.0, 103.2, 105.0)]
    running = request(104.0, 104.1, 110.0)
    running.finish_reason = None  # still streaming at t=106
    reading = LevelReading(100.0, warm + measured + [running], steps=[(2, 0, 0.05), (1, 30, 0.08)])
    slo = SLO(ttft_s=0.4, tbt_s=0.6, percentile=50)
    row = measure(reading, "batched", 2, slo, wanted=20, now=106.0, preemptions=0)
    assert row_problem(row) is None
    assert row["requests"] == 3 and row["capped"]  # 3 of the 20 wanted
    assert sorted(s["ttft_s"] for s in row["samples"]) == pytest.approx([0.1, 0.2, 0.5])
    assert row["steps"] == [[2, 0, 0.05], [1, 30, 0.08]] and row["step_ms"] == pytest.approx(65.0)
    assert row["duration_s"] == pytest.approx(4.0)
    # while the warm-up lasts, and without synthetic users, there is no row
    assert measure(reading, "batched", 2, slo, 20, now=102.5) is None
    assert measure(LevelReading(100.0, [], None), "batched", 0, slo, 20, now=106.0) is None


def test_the_book_keeps_a_sweep_per_profile_that_the_planner_reads(tmp_path):
    book = LevelBook()
    latency = {"mode": "latency", "concurrency": 1, "capped": False}
    book.record("chat", {**latency, "n": 1}, drafter="ngram")
    book.record("chat", {**latency, "n": 2}, drafter="ngram")  # measured again: replaced
    book.record("chat", {"mode": "batched", "concurrency": 4, "capped": True})
    assert book.sweep("voice", "m", {}, None) is None
    sweep = book.sweep("chat", "smollm2-135m", {"max_batch_size": 8, "token_budget": 64}, "openai://x/v1")
    assert [(r["mode"], r["concurrency"]) for r in sweep["rows"]] == [("batched", 4), ("latency", 1)]
    assert sweep["rows"][1]["n"] == 2 and sweep["latency"] == {"drafter": "ngram"}
    assert measured_text("chat", book, ("batched", 8, 37, 100)) == (
        "measured: batched N=4 (capped); latency N=1; measuring batched N=8: 37/100 requests")


def test_the_target_line():
    assert parse_target("500", 2.5) == (500, 2.5)
    assert parse_target(" 2,000  $0.10 ", None) == (2000, 0.10)
    assert parse_target("40", None) == (40, None)
    for bad, message in [("", "give users"), ("many", "give users"), ("5 1 2", "give users"), ("0", "users to plan for"),
                         ("-3", "users to plan for"), ("5 0", "price per replica-hour"), ("5 -1", "price per replica-hour"),
                         ("5 nan", "price per replica-hour")]:
        with pytest.raises(PlanError, match=message):
            parse_target(bad, 2.5)


RECORDED = "tests/serve/data/sweep_smollm2_xeon.json"


def test_the_panel_plans_in_a_process_of_its_own_as_it_would_here():
    sweep = read_sweep(RECORDED)
    batch, target = PROFILES["batch"], Target(users=500, price_per_hour=0.0832)
    here = plan_panel(sweep, batch, target, priced=True)
    there = PlanProcess(sweep, batch, target, priced=True).result()
    assert there == here
    # no SLO: every level is feasible; the batched configuration's replicas for 500 users at its best throughput
    assert there.feasible == {(r["mode"], r["concurrency"]) for r in sweep["rows"]}
    (batched,) = [r for r in there.rows if r.mode == "batched"]
    assert batched.replicas == math.ceil(round(500 * 1.2 / batched.users_per_replica, 9))
    lines = plan_lines(there, batch)
    assert lines[-1].startswith("profile batch, 500 users: batched") and len(lines) == len(there.rows) + 1


def test_a_sweep_the_planner_refuses_comes_back_as_its_error(tmp_path):
    sweep = json.loads(open(RECORDED).read())
    sweep["rows"][0]["samples"] = []  # a level that finished no request
    with pytest.raises(PlanError, match="finished no request"):
        PlanProcess(sweep, PROFILES["chat"], Target(users=5), priced=False).result()
