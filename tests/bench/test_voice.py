"""`tradeoff bench voice --callers`: one load level's row from the callers' turns (goodput counts a turn never answered
as a miss; the queue and E2E columns are the medians and percentiles of what the turns carry), the goodput rule itself,
and the command line's counts and modes. No server: the turns are built as the simulated caller leaves them."""

import argparse

import pytest

from bench.voice import counts, load_row, modes
from voice.caller import Turn
from voice.client import Heard
from voice.metrics import STAGES, goodput


def answered_turn(client_e2e_ms: float, queue_ms: float, transport_ms: float = 5.0) -> Turn:
    """A turn whose server breakdown charges `queue_ms` to the queue, 300 ms to endpointing and the rest to the LLM."""
    server_e2e = client_e2e_ms - transport_ms
    parts = dict.fromkeys((name for name, _ in STAGES), 0.0)
    parts.update(endpointing=300.0, queue=queue_ms, first_clause=40.0, llm_ttft=server_e2e - 340.0 - queue_ms)
    metrics = {"breakdown_ms": parts, "e2e_ms": server_e2e, "turn": {"reason": "silence", "model_ms": None},
               "tbt_ms": {"p50": 12.0}, "drafted": False}
    reply = Heard("resp", created_at=10.1, first_audio_at=10.0 + client_e2e_ms / 1000, metrics=metrics)
    return Turn("What is the capital of France?", speech_start=8.0, speech_end=10.0, response=reply)


def test_goodput_is_the_share_of_turns_within_the_slo_and_an_unanswered_turn_is_a_miss():
    assert goodput([100.0, 500.0, 501.0, None]) == 0.5  # the SLO itself is met
    assert goodput([200.0, 300.0], slo_ms=250.0) == 0.5
    assert goodput([]) is None


def test_a_load_rows_goodput_counts_the_turns_never_answered_and_its_columns_come_from_the_turns():
    turns = [answered_turn(400.0, 0.0), answered_turn(600.0, 150.0), answered_turn(450.0, 20.0)]
    row = load_row("latency", 2, turns, asked=4)  # one turn of the four never got a reply
    assert (row["mode"], row["callers"], row["asked"], row["answered"]) == ("latency", 2, 4, 3)
    assert row["goodput"] == 0.5  # 400 and 450 of 400, 600, 450, and the missing one
    assert row["e2e_p50_ms"] == pytest.approx(450.0)
    assert row["queue_p50_ms"] == pytest.approx(20.0)
    assert row["queue_p90_ms"] == pytest.approx(20.0 + 0.8 * 130.0)  # numpy's linear interpolation
    assert row["llm_ttft_p50_ms"] == pytest.approx(450.0 - 5.0 - 340.0 - 20.0)
    assert row["first_clause_p50_ms"] == 40.0
    assert row["cut_offs"] == 0 and row["tbt_p50_ms"] == 12.0


def test_a_level_where_no_turn_was_answered_has_no_latencies_and_no_goodput():
    row = load_row("batched", 8, [], asked=48)
    assert row["answered"] == 0 and row["goodput"] == 0.0
    assert row["e2e_p50_ms"] is None and row["queue_p50_ms"] is None


def test_the_command_line_takes_counts_and_modes_and_refuses_others():
    assert counts("1,2,4,8") == [1, 2, 4, 8]
    assert modes("latency,disaggregated") == ["latency", "disaggregated"]
    for bad in ("0,2", "two", "", "1,,2"):
        with pytest.raises(argparse.ArgumentTypeError):
            counts(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown mode 'fast'"):
        modes("latency,fast")
