"""`tradeoff bench peers` without its peers: the table's side-by-side columns and differences from a sweep row and
AIPerf's summary, AIPerf's export read in seconds, and the run over servers, where a server that exits at once (as
vLLM on a CPU without an instruction set it needs) is reported with the end of its log, one that is not installed
says so, one that fails or dies while measured keeps its rows so far, and the others are still measured. No vLLM, no
llama.cpp and no model: the servers are fake commands and a fake OpenAI server (tests/serve/fake_openai.py)."""

import os
import sys
import threading
from pathlib import Path

import pytest

from bench.peer import free_port
from bench.peers import Server, aiperf_summary, compare, difference, run_servers
from bench.report import table
from tests.serve.fake_openai import MODEL

ROOT = Path(__file__).resolve().parents[2]

SWEEP_ROW = {"server": "vLLM", "concurrency": 4, "req_s": 0.5, "output_tok_s": 32.0, "tok_s_per_user": 10.0,
             "ttft_p50_s": 0.200, "tbt_p50_s": 0.050}
# AIPerf 0.13's profile_export_aiperf.json: one object per metric, in its display unit
AIPERF_EXPORT = {"aiperf_version": "0.13.0", "request_count": {"unit": "requests", "avg": 8.0},
                 "time_to_first_token": {"unit": "ms", "avg": 230.0, "p50": 210.0},
                 "inter_chunk_latency": {"unit": "ms", "avg": 52.0, "p50": 51.0},
                 "inter_token_latency": {"unit": "ms", "avg": 53.0, "p50": 52.5},
                 "output_token_throughput": {"unit": "tokens/sec", "avg": 30.4},
                 "output_token_throughput_per_user": {"unit": "tokens/sec/user", "avg": 10.5},
                 "output_sequence_length": {"unit": "tokens", "avg": 63.0}}


def test_aiperf_summary_reads_times_in_seconds():
    s = aiperf_summary(AIPERF_EXPORT)
    assert s["version"] == "0.13.0" and s["requests"] == 8
    assert s["ttft_p50_s"] == pytest.approx(0.210) and s["icl_p50_s"] == pytest.approx(0.051)
    assert s["itl_p50_s"] == pytest.approx(0.0525)
    assert s["output_tok_s"] == 30.4 and s["tok_s_per_user"] == 10.5 and s["output_tokens_mean"] == 63


def test_a_metric_aiperf_did_not_export_is_none():
    assert aiperf_summary({"aiperf_version": "0.13.0"})["icl_p50_s"] is None


def test_side_by_side_with_the_difference_in_percent_of_tradeoffs():
    row = compare({**SWEEP_ROW, "aiperf": {**aiperf_summary(AIPERF_EXPORT), "cores": 0.8}})
    assert row["ttft"] == pytest.approx(200) and row["aiperf_ttft"] == pytest.approx(210)
    assert row["ttft_diff_pct"] == pytest.approx(5.0)
    assert row["tbt"] == pytest.approx(50) and row["aiperf_tbt"] == pytest.approx(51)
    assert row["tbt_diff_pct"] == pytest.approx(2.0)
    assert row["tok_s_diff_pct"] == pytest.approx(-5.0)
    assert row["per_user_diff_pct"] == pytest.approx(5.0)
    assert row["tok_per_req"] == pytest.approx(64) and row["aiperf_tok_per_req"] == 63
    assert row["aiperf_cores"] == 0.8


def test_without_aiperf_only_tradeoffs_columns_are_filled():
    from bench.peers import COLUMNS

    row = {**SWEEP_ROW, **compare(SWEEP_ROW)}
    assert row["ttft"] == pytest.approx(200) and row["tok_s"] == 32.0
    assert all(row[k] is None for k in ("aiperf_ttft", "ttft_diff_pct", "aiperf_tok_s", "aiperf_cores"))
    line = table([row], COLUMNS).splitlines()[-1]
    assert line.split()[:4] == ["vLLM", "4", "64", "-"]


def test_difference_of_nothing_is_none():
    assert difference(None, 1.0) is None and difference(1.0, None) is None and difference(0.0, 1.0) is None


def fake_openai(name: str, exit_after_s: float | None = None) -> Server:
    """The fake OpenAI server in a process of its own; `exit_after_s`: it then dies with status 4, as a crash."""
    port = free_port()
    script = ("import os, sys, threading, uvicorn; from tests.serve.fake_openai import FakeOpenAI; "
              f"{exit_after_s} is None or threading.Timer({exit_after_s}, os._exit, (4,)).start(); "
              "uvicorn.run(FakeOpenAI(None).app, host='127.0.0.1', port=int(sys.argv[1]), log_level='warning')")
    return Server(name, [sys.executable, "-c", script, str(port)], dict(os.environ, PYTHONPATH=str(ROOT)), port)


def test_a_server_that_cannot_run_is_reported_with_its_log_and_the_others_are_measured():
    crash = "import sys; print('this CPU lacks AVX-512', flush=True); sys.exit(3)"
    servers = [Server("exits", [sys.executable, "-c", crash], dict(os.environ), free_port()),
               Server("absent", [], {}, 0, missing="vLLM is not installed"),
               fake_openai("fails midway"), fake_openai("dies midway", exit_after_s=3), fake_openai("fine")]

    def measure(server, remote):
        yield {"server": server.name, "model": remote.name, "level": 1}
        if server.name == "fails midway":
            raise RuntimeError("the stream broke")
        if server.name == "dies midway":  # as the sweep's users, who retry a dead server forever
            threading.Event().wait()
        yield {"server": server.name, "model": remote.name, "level": 2}

    rows, failures = run_servers(servers, measure, timeout_s=60)
    assert [(r["server"], r["model"], r["level"]) for r in rows] == [
        ("fails midway", MODEL, 1), ("dies midway", MODEL, 1), ("fine", MODEL, 1), ("fine", MODEL, 2)]
    assert set(failures) == {"exits", "absent", "fails midway", "dies midway"}
    assert "exited with status 3" in failures["exits"] and "this CPU lacks AVX-512" in failures["exits"]
    assert failures["absent"] == "vLLM is not installed"
    assert "the stream broke" in failures["fails midway"]
    assert "exited with status 4 while measured" in failures["dies midway"]
