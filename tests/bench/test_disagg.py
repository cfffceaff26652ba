"""`tradeoff bench disagg` as a user runs it, shrunk to seconds: every configuration runs on the same Poisson stream,
the rows say what each measured (hand-offs only where there are any), and the JSON names the CPU. No figure is
asserted: speed is the benchmark's business, not a test's."""

import json
import subprocess
import sys
from pathlib import Path

from bench.disagg import arrivals

ROOT = Path(__file__).resolve().parents[2]


def test_the_stream_is_poisson_within_the_duration_and_the_same_for_one_seed():
    stream = arrivals(rate_per_s=2.0, duration_s=50.0, lengths=(1000, 2000), seed=3)
    assert stream == arrivals(2.0, 50.0, (1000, 2000), seed=3) != arrivals(2.0, 50.0, (1000, 2000), seed=4)
    times = [t for t, _ in stream]
    assert times == sorted(times) and 0 < times[0] and times[-1] < 50.0
    assert 60 < len(stream) < 140  # 100 expected; a Poisson count of mean 100 is almost surely in here
    assert all(1000 <= n <= 2000 for _, n in stream)


def test_every_configuration_runs_on_the_same_stream_and_reports_its_hand_offs(tmp_path):
    out = tmp_path / "disagg.json"
    cmd = [sys.executable, "-m", "tradeoff", "bench", "disagg", "--users", "2", "--prompt-tokens", "100,200", "--rate", "2",
           "--duration-s", "1.5", "--baseline-s", "0.5", "--token-budgets", "32", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["machine"]["cpu"]["model"] and report["machine"]["cpu"]["flags"]
    rows = report["rows"]
    assert [r["name"] for r in rows] == ["aggregated, chunked off", "aggregated, chunked 32", "disaggregated 1+1"]
    assert [r["mode"] for r in rows] == ["batched", "batched", "disaggregated"]
    assert all(r["long_prompts"] == len(report["stream"]) > 0 and r["gaps"] > 0 and r["base_gaps"] > 0 for r in rows)
    assert all(r["handoff_ms"] is None for r in rows[:2])
    assert rows[2]["handoff_ms"] > 0 and rows[2]["handoff_mb"] > 0 and rows[2]["long_prefill_s"] > 0
    assert "disaggregated 1+1" in done.stdout and "hand-off ms" in done.stdout  # the table
