"""Rolling-window aggregation: which samples fall in the window, per-class percentiles, throughput and goodput."""

import time
from dataclasses import asdict

import numpy as np
import pytest

from engine.metrics import RequestMetrics
from engine.snapshot import Distribution
from engine.stats import SLO, RollingStats


def request(t0: float, arrival: float, emissions: list[tuple[float, int]], user_class: str, finish: str | None):
    m = RequestMetrics(arrival=t0 + arrival, user_class=user_class, finish_reason=finish)
    m.emissions = [(t0 + t, n, "batched") for t, n in emissions]
    return m


@pytest.fixture
def stats_and_t0():
    stats = RollingStats(window_s=10, slo=SLO(ttft_s=0.5, tbt_s=0.08))
    t0 = time.monotonic()
    # seconds after t0; the snapshot is taken at t0 + 100, so the window is [90, 100]
    stats.track(request(t0, 50, [(51, 1), (52, 1)], "user", "stop"))  # long gone
    stats.track(request(t0, 91, [(91.1, 1), (91.2, 1), (91.4, 1)], "user", "length"))  # TPOT 0.15: misses the TBT SLO
    stats.track(request(t0, 92, [(92.3, 1), (92.35, 1), (92.4, 1)], "user", "stop"))  # meets both SLOs
    stats.track(request(t0, 85, [(89, 1), (90.5, 1), (91, 1)], "synthetic", "stop"))  # first token before the window
    stats.track(request(t0, 95, [(95.2, 2)], "synthetic", None))  # in flight; one step emitted two tokens
    return stats, t0


def close(value, expected):
    """Equal up to float rounding: times are t0 + offsets with t0 = time.monotonic(), whose magnitude (the machine's
    uptime) sets the rounding of every difference, and a rate (1 / TPOT) magnifies it."""
    if isinstance(value, Distribution):
        value = asdict(value)
    return value == pytest.approx(expected, rel=1e-9, abs=1e-9)


def dist(values):
    return {"mean": np.mean(values), "p50": np.percentile(values, 50), "p90": np.percentile(values, 90),
            "p99": np.percentile(values, 99)}


def test_samples_are_taken_by_when_they_were_observed(stats_and_t0):
    stats, t0 = stats_and_t0
    snap = stats.window(now=t0 + 100)
    assert snap.window_s == 10
    user, synthetic, everyone = snap.user, snap.synthetic, snap.all

    assert close(user.ttft_s, dist([0.1, 0.3]))
    assert close(user.tbt_s, dist([0.1, 0.2, 0.05, 0.05]))
    assert close(user.e2e_s, dist([0.4, 0.4]))
    assert close(user.tpot_s, dist([0.15, 0.05]))
    assert close(user.output_tok_s, 6 / 10) and user.finished == 2
    assert close(user.goodput_req_s, 1 / 10) and user.slo_attained == 0.5
    assert close(user.tok_s_per_user, (1 / 0.15 + 1 / 0.05) / 2)

    assert close(synthetic.ttft_s, dist([0.2]))  # the request whose first token left before the window: no TTFT
    assert close(synthetic.tbt_s, dist([1.5, 0.5]))  # a gap counts when its later token is in the window
    assert close(synthetic.e2e_s, dist([6.0]))
    assert close(synthetic.output_tok_s, 4 / 10)  # 89.0 is outside; the two-token step counts two
    assert synthetic.finished == 1 and synthetic.in_flight == 1 and synthetic.goodput_req_s == 0

    assert close(everyone.ttft_s, dist([0.1, 0.3, 0.2]))
    assert close(everyone.output_tok_s, 1.0) and everyone.finished == 3


def test_a_judgment_counts_in_its_own_class_only(stats_and_t0):
    stats, t0 = stats_and_t0
    stats.track(request(t0, 93, [(93.05, 1)], "judge", "length"))  # the voice loop's one-token turn judgment
    snap = stats.window(now=t0 + 100)
    assert snap.judge.finished == 1 and close(snap.judge.ttft_s, dist([0.05]))
    assert snap.user.finished == 2 and close(snap.user.ttft_s, dist([0.1, 0.3]))
    assert snap.all.finished == 3 and close(snap.all.ttft_s, dist([0.1, 0.3, 0.2]))  # `all` is the replies


def test_old_requests_leave_the_window_but_running_ones_stay(stats_and_t0):
    stats, t0 = stats_and_t0
    everyone = stats.window(now=t0 + 200).all
    assert everyone.finished == 0 and everyone.in_flight == 1 and everyone.output_tok_s == 0
    assert everyone.ttft_s == Distribution(None, None, None, None)
    assert len(stats._requests) == 1  # finished requests outside the window were dropped


def test_steps_give_the_mean_running_batch_size():
    stats = RollingStats(window_s=10)
    t0 = time.monotonic()
    for i, batch in enumerate([4, 4, 8, 16]):
        stats.record_step(t0 + 1 + i, batch)
    snap = stats.window(now=t0 + 5)
    assert snap.batch_size_mean == 8 and snap.steps_per_s == pytest.approx(4 / 5, rel=1e-3)  # a 5 s old window
    stats.record_step(t0 + 20, 2)  # the four older steps leave the window
    snap = stats.window(now=t0 + 20)
    assert snap.batch_size_mean == 2 and close(snap.steps_per_s, 1 / 10)
