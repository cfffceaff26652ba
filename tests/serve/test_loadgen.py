"""Synthetic users: length distributions, prompt sizes, a closed loop that starts, resizes and stops, overload."""

import random

import pytest

from engine import Engine
from engine.scheduler import BatchPolicy
from serve.loadgen import QUESTIONS, Lengths, LoadGenerator, PromptSet, Workload
from tests.conftest import wait_until


def test_lengths_follow_their_distribution_within_bounds():
    rng = random.Random(0)
    draws = [Lengths(100, 30, 50, 160).sample(rng) for _ in range(4000)]
    assert min(draws) == 50 and max(draws) == 160  # clipped at both ends
    assert 95 < sum(draws) / len(draws) < 105
    assert {Lengths(64).sample(rng) for _ in range(10)} == {64}
    with pytest.raises(ValueError, match="lo <= mean <= hi"):
        Lengths(10, 1, 20, 30)


def test_prompts_come_close_to_the_requested_length(default_model):
    prompts = PromptSet(default_model.tokenizer)
    rng = random.Random(0)
    longest_sentence = max(prompts.sentence_tokens)
    for target in (60, 128, 300, 1000):
        for _ in range(5):
            n = len(prompts.prompt_ids(target, rng))
            assert target - longest_sentence - 4 <= n <= target + 4  # token merges at the joins move it by a few
    shortest = prompts.prompt_ids(5, rng)  # below a bare question: the question alone
    assert any(f"user\n{q}\n" in default_model.tokenizer.decode(shortest) for q in QUESTIONS)


@pytest.fixture(scope="module")
def tiny_engine(tiny_loaded):
    engine = Engine(tiny_loaded, mode="batched", quant="none", spec="off",
                    policy=BatchPolicy(max_batch_size=8, token_budget=64))
    yield engine
    engine.close()


def in_flight(lg: LoadGenerator) -> int:
    return sum(m.finish_reason is None for m in lg.submitted)


def test_closed_loop_keeps_n_users_busy_and_resizes_live(tiny_engine):
    workload = Workload(Lengths(40, 10, 20, 60), Lengths(20, 5, 10, 30), think_time_s=0.0)
    lg = LoadGenerator(tiny_engine, workload, seed=1)
    lg.start(3)
    try:
        seen = []
        wait_until(lambda: seen.append(in_flight(lg)) or len(lg.completed) >= 12)
        assert max(seen) == 3
        lg.resize(1)  # the two users that leave cancel their requests
        wait_until(lambda: in_flight(lg) <= 1)
        n_submitted, seen = len(lg.submitted), []
        wait_until(lambda: seen.append(in_flight(lg)) or len(lg.submitted) >= n_submitted + 4)
        assert max(seen) == 1  # the one user left goes on, one request at a time
        lg.resize(4)
        wait_until(lambda: in_flight(lg) == 4)
    finally:
        lg.stop()
    wait_until(lambda: in_flight(lg) == 0)  # stop cancels whatever was in flight
    assert all(m.user_class == "synthetic" for m in lg.submitted)
    for m in lg.completed:
        assert m.finish_reason == "length" and 10 <= m.output_tokens <= 30 and 20 - 8 <= m.prompt_tokens <= 60 + 4
    assert tiny_engine.snapshot().stats.synthetic.finished >= 12
    assert lg.users == 4


def test_overload_is_counted_and_the_users_keep_going(tiny_loaded):
    engine = Engine(tiny_loaded, quant="none", spec="off", max_waiting=2)  # latency mode: one at a time
    lg = LoadGenerator(engine, Workload(Lengths(30), Lengths(30), think_time_s=0.0), seed=3)
    lg.start(6)
    try:
        wait_until(lambda: lg.rejected > 0 and len(lg.completed) >= 6)
    finally:
        lg.stop()
        engine.close()
    assert lg.failed == 0
    with pytest.raises(RuntimeError, match="not running"):
        lg.resize(2)


def test_open_loop_arrivals_stop_after_their_count_and_stop_cancels_the_rest(tiny_engine):
    workload = Workload(Lengths(40, 10, 20, 60), Lengths(20, 5, 10, 30), think_time_s=0.0)
    lg = LoadGenerator(tiny_engine, workload, seed=2)
    lg.start_rate(500.0, requests=25)
    try:
        with pytest.raises(RuntimeError, match="open-loop rate"):
            lg.resize(3)
        wait_until(lambda: len(lg.completed) + lg.rejected + lg.failed >= 25 and in_flight(lg) == 0)
        assert len(lg.submitted) == 25 and lg.failed == 0  # no 26th: the arrivals stopped at their count
    finally:
        lg.stop()
    endless = LoadGenerator(tiny_engine, Workload(Lengths(40), Lengths(200), think_time_s=0.0), seed=3)
    endless.start_rate(200.0)
    try:
        wait_until(lambda: in_flight(endless) >= 2)  # arrivals do not wait for replies
    finally:
        endless.stop()
    wait_until(lambda: in_flight(endless) == 0)  # stop cancels whatever was in flight
    assert endless.rate is None and any(m.finish_reason == "cancelled" for m in endless.submitted)
