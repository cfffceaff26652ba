"""The engine's discrete-event model against queueing theory and against exact step-by-step schedules."""

import math
import random

import pytest

from serve.loadgen import Lengths
from serve.queueing import EngineModel, Replica, SimRequest, StepModel, Traffic, highest, percentiles, simulate


@pytest.mark.parametrize("rho", [0.5, 0.7])
def test_batch_one_with_constant_service_is_md1(rho):
    """Poisson arrivals, one request at a time, every request served in D seconds (one prompt step, one token):
    the mean wait is Pollaczek-Khinchine's for M/D/1, rho D / (2 (1 - rho))."""
    d = 0.1
    model = EngineModel(StepModel(((1, 0.0),), prefill_s=d), max_batch_size=1, token_budget=None)
    done = simulate(model, Traffic(Lengths(10), Lengths(1), rate=rho / d), requests=100_000, seed=3)
    wait = sum(r.ttft for r in done) / len(done) - d
    assert wait == pytest.approx(rho * d / (2 * (1 - rho)), rel=0.04)


def test_batch_one_with_varied_lengths_is_mg1():
    """Service time proportional to the reply's length (the prompt's step and each decode step take the same time):
    M/G/1, whose mean wait is lambda E[S^2] / (2 (1 - rho)) by Pollaczek-Khinchine."""
    step = 0.01
    model = EngineModel(StepModel(((1, step),)), max_batch_size=1, token_budget=None)
    lengths = Lengths(20, 12.0, 1, 40)  # sampled, then the formula uses the very same draws' moments
    rate = 3.0
    done = simulate(model, Traffic(Lengths(10), lengths, rate=rate), requests=100_000, seed=5)
    services = [r.output_tokens * step for r in done]
    es, es2 = sum(services) / len(services), sum(s * s for s in services) / len(services)
    rho = rate * es
    wait = sum(r.ttft - step for r in done) / len(done)  # the first token ends the first step
    assert rho < 0.9 and wait == pytest.approx(rate * es2 / (2 * (1 - rho)), rel=0.06)


def test_a_prompt_in_chunks_then_decodes_beside_others():
    """Exact schedule: two users, budget 8, 20-token prompts, 3-token replies, 1 s per step whatever it holds."""
    model = EngineModel(StepModel(((1, 1.0),)), max_batch_size=4, token_budget=8)
    done = simulate(model, Traffic(Lengths(20), Lengths(3), users=2), requests=2, warmup=0.0)
    a, b = done
    # step 1: a 8 tokens; 2: a 8; 3: a 4 + b 4 (a's first token); 4: a decode + b 7; 5: a decode (done) + b 7 ...
    assert (a.ttft, a.e2e) == (3.0, 5.0)
    assert (b.ttft, b.e2e) == (6.0, 8.0) and b.tpot == 1.0


def test_unchunked_prompts_wait_for_a_step_of_their_own():
    model = EngineModel(StepModel(((1, 1.0),)), max_batch_size=4, token_budget=8, chunked_prefill=False)
    a, b = simulate(model, Traffic(Lengths(20), Lengths(2), users=2), requests=2, warmup=0.0)
    assert (a.ttft, b.ttft) == (1.0, 2.0)  # each prompt whole, one per step (the first overruns the budget alone)


def test_least_outstanding_balancing_beats_one_replica_at_the_same_load():
    model = EngineModel(StepModel(((1, 0.0),), prefill_s=0.1), max_batch_size=1, token_budget=None)
    one = simulate(model, Traffic(Lengths(10), Lengths(1), rate=8.0), requests=20_000)
    two = simulate(model, Traffic(Lengths(10), Lengths(1), rate=16.0), requests=20_000, replicas=2)
    mean = lambda xs: sum(r.ttft for r in xs) / len(xs)  # noqa: E731
    assert mean(two) < mean(one)  # pooling: M/D/2 waits less than M/D/1 at the same utilisation


def test_the_step_model_interpolates_decode_steps_between_measured_batch_sizes():
    m = StepModel(((1, 0.070), (4, 0.085), (16, 0.095)), prefill_s=0.004, mixed_s=0.020, per_prefill_token_s=0.0004)
    assert m.seconds(1, 0) == 0.070 and m.seconds(2, 0) == pytest.approx(0.075) and m.seconds(10, 0) == pytest.approx(0.090)
    assert m.seconds(32, 0) == pytest.approx(0.095 + 16 * 0.010 / 12)  # past the last: along the last two points
    assert m.seconds(0, 50) == pytest.approx(0.070 + 0.004 + 0.020)  # a prompt alone: one row's step, plus its part
    assert m.seconds(4, 50) == pytest.approx(0.085 + 0.020 + 0.020)  # beside decodes: the mixed part
    with pytest.raises(ValueError, match="ascending"):
        StepModel(((4, 0.1), (1, 0.05)))


def test_the_step_model_fit_recovers_a_known_engine():
    rng = random.Random(1)
    truth = StepModel(((1, 0.068), (2, 0.074), (4, 0.084), (8, 0.091)), prefill_s=0.006, mixed_s=0.019,
                      per_prefill_token_s=0.0004)
    shapes = [(rng.choice([1, 2, 4, 8]), 0) for _ in range(400)] + [(rng.choice([0, 3, 7]), rng.randrange(2, 64))
                                                                   for _ in range(200)]
    fit = StepModel.fit([(d, p, truth.seconds(d, p) * rng.uniform(0.97, 1.03)) for d, p in shapes])
    assert [d for d, _ in fit.decode] == [1, 2, 4, 8]
    assert all(got == pytest.approx(want, rel=0.02) for (_, got), (_, want) in zip(fit.decode, truth.decode))
    for got, want in ((fit.prefill_s, 0.006), (fit.mixed_s, 0.019), (fit.per_prefill_token_s, 0.0004)):
        assert got == pytest.approx(want, rel=0.25, abs=0.002)
    decode_only = StepModel.fit([(d, 0, 0.01 + 0.001 * d) for d in range(1, 9) for _ in range(3)])
    assert (decode_only.prefill_s, decode_only.mixed_s, decode_only.per_prefill_token_s) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="decode-only steps"):
        StepModel.fit([(1, 0, 0.01), (0, 30, 0.02)])


def test_batch_one_model_from_requests_measured_one_at_a_time():
    prompts = [50, 100, 150, 200]
    m = StepModel.batch_one(prompts, [0.02 + 0.0001 * p for p in prompts], tpot_s=0.011)
    assert m.seconds(0, 120) == pytest.approx(0.032) and m.seconds(1, 0) == pytest.approx(0.011)


def test_highest_finds_the_edge_of_a_monotone_condition():
    assert highest(lambda x: x <= 7.3, guess=1.0) == pytest.approx(7.3, abs=0.01)
    assert highest(lambda x: x <= 7.3, guess=100.0) == pytest.approx(7.3, abs=0.01)
    assert highest(lambda n: n <= 37, guess=4, integer=True) == 37
    assert highest(lambda n: False, guess=4, integer=True) is None


def test_percentiles_and_throughput_of_a_run():
    model = EngineModel(StepModel(((1, 0.05),)), max_batch_size=8, token_budget=64)
    done = simulate(model, Traffic(Lengths(16), Lengths(10), users=4), requests=400)
    p = percentiles(done, 99)
    # a reply ends with a step, and the user's next request joins the next step: its prompt and first token
    assert p.tpot_s == pytest.approx(0.05) and p.ttft_s == pytest.approx(0.05)
    assert math.isclose(p.e2e_s, 0.5)  # the prompt's step with the first token, 9 more steps
    assert p.output_tok_s == pytest.approx(4 / 0.05, rel=0.02)  # four users, a token each per step


def test_nothing_more_runs_once_an_unsplit_prompt_overran_the_budget():
    """As the engine's scheduler: a one-token prompt waits behind an unsplit prompt that took the whole budget."""
    replica = Replica(EngineModel(StepModel(((1, 1.0),)), max_batch_size=4, token_budget=8, chunked_prefill=False))
    long, short = SimRequest(0.0, 20, 2), SimRequest(0.0, 1, 2)
    replica.waiting.extend([long, short])
    replica.start_step(0.0)
    assert replica.batch == [(long, 20)] and list(replica.waiting) == [short]


def test_steps_replay_the_measured_jitter_in_order():
    """Each step's time is the model's times the next measured ratio (from a random point, cyclically), so slow
    spells come in runs as measured: here every step is twice, then three times, the model's second."""
    model = EngineModel(StepModel(((1, 1.0),), jitter=(2.0, 2.0, 3.0, 3.0)), max_batch_size=4, token_budget=8)
    (r,) = simulate(model, Traffic(Lengths(4), Lengths(4), users=1), requests=1, warmup=0.0, seed=0)
    assert r.e2e == pytest.approx(10.0)  # four consecutive steps, whatever the offset: 2+2+3+3 in some rotation
    fit = StepModel.fit([(1, 0, 0.1), (1, 0, 0.3), (2, 0, 0.2), (2, 0, 0.2), (1, 0, 0.2), (2, 0, 0.2)])
    assert fit.decode == ((1, pytest.approx(0.2)), (2, pytest.approx(0.2)))
    assert fit.jitter == pytest.approx((0.5, 1.5, 1.0, 1.0, 1.0, 1.0))  # measured / modelled, in the order run
