"""The `tradeoff` command as a user runs it."""

import json
import subprocess
import sys


def tradeoff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands():
    out = tradeoff("--help")
    assert out.returncode == 0
    for cmd in ("generate", "chat", "fetch", "bench"):
        assert cmd in out.stdout


def test_generate_json():
    out = tradeoff("generate", "What is the capital of France?", "--max-tokens", "20", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "Paris" in result["text"]
    assert result["metrics"]["output_tokens"] == len(result["token_ids"])
    assert result["metrics"]["ttft_s"] > 0


def test_bad_model_path_exits_with_a_clear_message(tmp_path):
    out = tradeoff("generate", "hi", "--model", str(tmp_path / "missing.gguf"))
    assert out.returncode == 2
    assert "missing.gguf" in out.stderr and "expected" in out.stderr
