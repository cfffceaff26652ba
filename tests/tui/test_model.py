"""The dashboard's logic apart from the widgets: the users ladder, SLO grades, number formats, samples built
from the engine's real stats, history and acceptance rate, downsampling, the curve, voice turns, stacked bars."""

import statistics
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.metrics import RequestMetrics
from engine.snapshot import EngineState, KVCache, Snapshot, Speculation, Workers
from engine.stats import RollingStats
from serve.profiles import PROFILES
from tui.model import (
    BAD,
    GOOD,
    NONE,
    USER_LEVELS,
    WARN,
    History,
    Sample,
    TradeoffCurve,
    VoiceStats,
    VoiceTurn,
    downsample,
    format_ms,
    grade,
    next_added_callers,
    next_mode,
    stack,
    step_users,
)


def test_users_ladder_walks_powers_of_two_and_stops_at_the_ends():
    up = [0]
    while up[-1] != step_users(up[-1], 1):
        up.append(step_users(up[-1], 1))
    assert up == list(USER_LEVELS) == [0, 1, 2, 4, 8, 16, 32, 64]
    assert step_users(0, -1) == 0 and step_users(64, 1) == 64
    assert step_users(64, -1) == 32 and step_users(1, -1) == 0
    assert step_users(3, 1) == 4 and step_users(3, -1) == 2  # off the ladder (--users 3): to the neighbours


def test_grades_against_an_slo():
    assert grade(500, 500) == GOOD and grade(500.1, 500) == WARN
    assert grade(750, 500) == WARN and grade(751, 500) == BAD
    assert grade(None, 500) == NONE and grade(100, None) == NONE
    # a rate: higher is better
    assert grade(12.5, 12.5, higher_is_better=True) == GOOD
    assert grade(10, 12.5, higher_is_better=True) == WARN  # 12.5 / 10 = 1.25
    assert grade(8, 12.5, higher_is_better=True) == BAD  # 1.5625


def test_format_ms():
    assert format_ms(612.4) == ("612", "ms")
    assert format_ms(9999.4) == ("9999", "ms")
    assert format_ms(12345) == ("12.3", "s")
    assert format_ms(None) == ("-", "ms")


def metrics(arrival: float, emissions: list[tuple[float, int]], cls: str = "user", done: bool = True) -> RequestMetrics:
    m = RequestMetrics(arrival=arrival, user_class=cls)
    for t, n in emissions:
        m.record(t, n, "latency")
    m.finish_reason = "stop" if done else None
    return m


def engine_like_snapshot(stats: RollingStats, now: float, window_s: float | None, kv: KVCache | None = None) -> Snapshot:
    state = EngineState(mode="latency", running=1, waiting=2, max_batch_size=32, chunked_prefill=True, can_speculate=True,
                        speculation=Speculation("ngram", drafted=10, accepted=4), kv=kv)
    return Snapshot(stats.window(window_s, now=now), state)


def test_sample_from_the_engines_snapshots_and_window():
    stats = RollingStats(window_s=30)
    t0 = time.monotonic()  # the stats started just before: times below are seconds after t0

    def at(*times: float) -> list[tuple[float, int]]:
        return [(t0 + t, 1) for t in times]

    # one request before the change at t=10 and two after it; `a` emits two tokens in its last step
    old = metrics(t0 + 1.0, at(1.9, 2.0, 2.1))
    a = metrics(t0 + 11.0, at(11.2, 11.25) + [(t0 + 11.35, 2)])
    b = metrics(t0 + 12.0, at(12.4, 12.5), cls="synthetic", done=False)
    for m in (old, a, b):
        stats.track(m)
    now = t0 + 14.0
    level = engine_like_snapshot(stats, now, 4.0, KVCache(blocks_used=25, blocks_free=75, preemptions=3, prefix_cached_tokens=0))
    recent = engine_like_snapshot(stats, now, 5.0)
    s = Sample.from_snapshots(4.0, level, recent, users=1, level_age_s=4.0, profile="voice", slo=PROFILES["voice"].slo)
    assert s.window_s == pytest.approx(4.0)
    # TTFTs after the change: 200 and 400 ms (the 900 ms one before it is out); p50 interpolates
    assert s.ttft_p50_ms == pytest.approx(300.0)
    # gaps after the change: 50, 100 (a), 100 (b)
    assert s.tbt_p50_ms == pytest.approx(100.0)
    assert s.tok_s == pytest.approx(6 / 4.0)  # 4 tokens of a, 2 of b in 4 s
    assert s.tok_s_per_user == pytest.approx(1 / (0.15 / 3))  # only `a` finished: TPOT = 150 ms / 3
    assert s.finished == 1
    assert s.kv_used == pytest.approx(0.25) and s.preemptions == 3
    assert (s.drafter, s.drafted, s.accepted, s.running, s.waiting) == ("ngram", 10, 4, 1, 2)
    # graded by the profile's SLO, not the engine's
    assert (s.profile, s.slo_ttft_ms, s.slo_tbt_ms) == ("voice", pytest.approx(150.0), pytest.approx(80.0))
    assert s.slo_tok_s_per_user == pytest.approx(1000 / 80)
    unjudged = Sample.from_snapshots(4.0, level, recent, users=1, level_age_s=4.0, profile="batch", slo=None)
    assert unjudged.slo_ttft_ms is None and unjudged.slo_tok_s_per_user is None
    assert Sample.from_dict(s.to_dict()) == s
    # without a window the whole of the engine's counts, the old request too
    whole = Sample.from_snapshots(14.0, engine_like_snapshot(stats, now, None), recent, users=1, level_age_s=14.0)
    assert whole.ttft_p50_ms == pytest.approx(400.0)


def sample(t: float, **kw) -> Sample:
    base = dict(t=t, mode="latency", users=0, drafter="ngram", chunked_prefill=True, level_age_s=t, window_s=t,
                ttft_p50_ms=None, ttft_p99_ms=None, tbt_p50_ms=None, tbt_p99_ms=None, tok_s=0.0, tok_s_per_user=None,
                finished=0, recent_ttft_p50_ms=None, recent_tbt_p50_ms=None, recent_tbt_p99_ms=None, recent_tok_s=0.0,
                running=0, waiting=0, kv_used=None, preemptions=0, drafted=0, accepted=0, slo_ttft_ms=500.0,
                slo_tbt_ms=80.0)
    base.update(kw)
    return Sample(**base)


def test_history_keeps_its_span_skips_missing_values_and_computes_acceptance_over_recent_counters():
    h = History(span_s=10)
    for t in range(21):
        h.add(sample(float(t), recent_tok_s=float(t), recent_ttft_p50_ms=None if t % 2 else 100.0 + t,
                     drafted=10 * t, accepted=(4 if t < 10 else 8) * t))
    assert [t for t, _ in h.series["tok_s"]] == [float(t) for t in range(10, 21)]
    assert [t for t, _ in h.series["ttft_p50"]] == [10.0, 12.0, 14.0, 16.0, 18.0, 20.0]
    # over the last 5 s (t=15..20): drafted 50, accepted 8 * 20 - 8 * 15 = 40
    assert h.last("acceptance") == pytest.approx(80.0)
    assert h.last("kv_used") is None
    assert h.last("tok_s") == 20.0 and h.last("ttft_p50") == 120.0
    h.add(sample(30.0, drafted=200, accepted=160))  # no TTFT, and nothing drafted in the last 5 s
    assert h.last("ttft_p50") is None and h.last("acceptance") is None  # not the older values


def test_downsample_bins_by_time():
    points = [(0.5, 1.0), (1.5, 2.0), (1.6, 6.0), (9.9, 3.0), (-1.0, 100.0), (11.0, 100.0)]
    assert downsample(points, 5, end=10.0, span=10.0) == [(1.0, 3.0), (9.0, 3.0)]
    assert downsample(points, 5, end=10.0, span=10.0, how="max") == [(1.0, 6.0), (9.0, 3.0)]
    assert downsample(points, 0, end=10.0, span=10.0) == []
    many = [(i / 100, float(i)) for i in range(1000)]
    out = downsample(many, 40, end=10.0, span=10.0)
    assert len(out) == 40
    assert out[0][1] == pytest.approx(statistics.mean(range(25)))  # the first bin holds t in [0, 0.25)


def test_curve_takes_a_point_per_level_once_measured_and_the_latest_wins():
    curve = TradeoffCurve()
    curve.update(sample(2.0, level_age_s=2.0, tok_s=10.0, tok_s_per_user=20.0))  # too young
    curve.update(sample(9.0, level_age_s=9.0, tok_s=10.0, tok_s_per_user=None))  # nothing finished
    assert curve.points == {} and curve.current is None
    curve.update(sample(9.0, level_age_s=9.0, tok_s=10.0, tok_s_per_user=20.0))
    curve.update(sample(20.0, mode="batched", users=4, level_age_s=6.0, tok_s=30.0, tok_s_per_user=8.0))
    curve.update(sample(25.0, mode="batched", users=2, level_age_s=6.0, tok_s=22.0, tok_s_per_user=11.0))
    curve.update(sample(27.0, mode="batched", users=2, level_age_s=8.0, tok_s=24.0, tok_s_per_user=12.0))
    assert [(p.users, p.total_tok_s) for p in curve.of_mode("batched")] == [(2, 24.0), (4, 30.0)]
    assert [p.users for p in curve.of_mode("latency")] == [0]
    assert curve.current == curve.points[("batched", 2)]


METRICS_EVENT = {
    "type": "tradeoff.metrics", "breakdown_ms": {"endpointing": 310.0, "asr": 40.0, "llm_ttft": 90.0,
                                                  "first_clause": 60.0, "tts": 4.0, "send": 1.0},
    "e2e_ms": 505.0, "llm": {"ttft_ms": 120.0}, "tbt_ms": {"p50": 22.0},
}


def test_voice_turn_adds_transport_from_the_clients_measurement():
    turn = VoiceTurn.from_metrics(METRICS_EVENT, "hi", "hello", "completed", client_e2e_ms=512.5)
    assert [name for name, _ in turn.parts_ms] == ["endpointing", "asr", "llm_ttft", "first_clause", "tts", "send",
                                                    "transport"]
    assert dict(turn.parts_ms)["transport"] == pytest.approx(7.5)
    assert sum(ms for _, ms in turn.parts_ms) == pytest.approx(turn.e2e_ms) == pytest.approx(512.5)
    assert (turn.llm_ttft_ms, turn.tbt_p50_ms) == (120.0, 22.0)
    server_only = VoiceTurn.from_metrics(METRICS_EVENT, "hi", "hello", "completed")
    assert server_only.e2e_ms == 505.0 and "transport" not in dict(server_only.parts_ms)
    typed = VoiceTurn.from_metrics({"breakdown_ms": None, "e2e_ms": None, "llm": {"ttft_ms": 80.0}}, "", "ok",
                                   "completed", typed=True)
    assert typed.parts_ms == () and typed.e2e_ms is None and typed.llm_ttft_ms == 80.0


def test_voice_stats_last_and_median_over_spoken_turns():
    stats = VoiceStats()
    assert stats.last_e2e_ms is None and stats.p50_e2e_ms is None
    values = [700.0, 500.0, 900.0, 650.0]
    for v in values:
        stats.add(VoiceTurn("q", "a", "completed", (("endpointing", v),), v, 50.0, 20.0))
    stats.add(VoiceTurn("", "typed reply", "completed", (), None, 40.0, 20.0, typed=True))
    assert stats.last_e2e_ms == 650.0
    assert stats.p50_e2e_ms == statistics.median(values)
    assert stats.goodput == 0.25  # 500 of 700, 500, 900, 650 meets the 500 ms voice SLO; the typed turn is not counted


def test_a_turns_decision_names_the_judgments_that_made_it():
    def turn(reason, **turn_fields):
        event = {"breakdown_ms": {}, "e2e_ms": None, "turn": {"reason": reason, **turn_fields}}
        return VoiceTurn.from_metrics(event, "q", "a", "completed")

    both = {"probability": 0.91, "model_ms": 80.4, "text_probability": 0.02, "text_model_ms": 41.0}
    assert turn("semantic", text_probability=0.83, text_model_ms=45.2).decision() == "LLM 0.83 in 45 ms"
    assert turn("silence", **both).decision() == "silence (after LLM 0.02 in 41 ms, Smart Turn 0.91 in 80 ms)"
    assert turn("silence").decision() == "silence"
    assert VoiceTurn("", "typed", "completed", (), None, None, None, typed=True).decision() is None


def test_a_cycles_the_added_callers_one_three_seven_then_none():
    seen, n = [], 0
    for _ in range(5):
        n = next_added_callers(n)
        seen.append(n)
    assert seen == [1, 3, 7, 0, 1]
    assert next_added_callers(5) == 0  # a number off the ladder goes back to none


@given(st.lists(st.floats(0, 2000), min_size=1, max_size=8), st.integers(1, 200), st.floats(1, 5000))
def test_stacked_bar_cells_add_up_without_rounding_drift(parts_ms, width, scale_ms):
    parts = tuple((f"p{i}", ms) for i, ms in enumerate(parts_ms))
    cells = stack(parts, width, scale_ms)
    assert [name for name, _ in cells] == [name for name, _ in parts]
    assert all(n >= 0 for _, n in cells)
    assert sum(n for _, n in cells) == min(width, round(sum(parts_ms) / scale_ms * width))


def test_b_cycles_through_the_three_modes():
    assert [next_mode(m) for m in ("latency", "batched", "disaggregated")] == ["batched", "disaggregated", "latency"]
    assert next_mode("something a remote server reported") == "latency"


def test_in_disaggregated_mode_the_sample_shows_the_decode_workers_cache_and_the_hand_offs():
    stats = RollingStats(window_s=30)
    now = time.monotonic()
    batched_kv = KVCache(blocks_used=10, blocks_free=90, preemptions=0, prefix_cached_tokens=0)
    workers = Workers(prefill_kv=KVCache(1, 99, 0, 64), decode_kv=KVCache(40, 60, 2, 0), in_transit=1, handoffs=4,
                      handoff_bytes=8_000_000, handoff_s=0.012, restarts=0, prefill_threads=1, decode_threads=1)

    def sample(mode: str) -> Sample:
        state = EngineState(mode=mode, running=5, waiting=0, max_batch_size=32, chunked_prefill=True, can_speculate=True,
                            speculation=Speculation(None), kv=batched_kv, workers=workers, note="a note")
        snap = Snapshot(stats.window(None, now=now), state)
        return Sample.from_snapshots(1.0, snap, snap, users=8, level_age_s=1.0)

    s = sample("disaggregated")
    assert s.kv_used == pytest.approx(0.4) and s.preemptions == 2  # the decode worker's, not batched mode's
    assert (s.handoffs, s.handoff_ms, s.handoff_mb, s.engine_note) == (4, pytest.approx(3.0), pytest.approx(2.0), "a note")
    assert sample("batched").kv_used == pytest.approx(0.1)  # back in batched mode, its own cache
    assert Sample.from_dict(s.to_dict()) == s
