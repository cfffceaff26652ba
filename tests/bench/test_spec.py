"""`tradeoff bench spec`'s step-cost table: the native step timed at each row count latency mode can verify, on the
default model, and no table where latency mode does not run the native step. Times are only checked to exist."""

from bench.spec import step_cost
from engine.setup import resolve
from engine.speculative import AdaptiveK


def test_step_cost_times_a_plain_step_and_every_verify_length(default_model):
    rows = step_cost(default_model, None, context=20, repeats=2)
    if resolve(default_model).decode != "native":  # no C compiler here: torch's int4 kernel runs, and there is no table
        assert rows is None
        return
    assert [r["rows"] for r in rows] == list(range(1, AdaptiveK.k_max + 2))
    assert all(r["ms"] > 0 for r in rows) and rows[0]["vs_one_row"] == 1.0


def test_no_step_cost_where_latency_mode_runs_torch_kernels(default_model):
    assert resolve(default_model, "int8").decode == "int8"
    assert step_cost(default_model, "int8", context=20, repeats=2) is None
