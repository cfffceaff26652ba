"""The `tradeoff` command as a user runs it."""

import json
import subprocess
import sys


def tradeoff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tradeoff", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands():
    out = tradeoff("--help")
    assert out.returncode == 0
    for cmd in ("serve", "talk", "generate", "chat", "fetch", "bench", "distill"):
        assert cmd in out.stdout
    out = tradeoff("bench", "--help")
    assert out.returncode == 0 and all(b in out.stdout for b in ("decode", "spec", "sweep", "voice", "keys"))


def test_a_command_imports_only_what_it_needs():
    """`tradeoff generate` runs the engine: no dashboard, no voice loop, no benchmark is imported for it."""
    script = ("import sys; from tradeoff.cli import main; "
              "main(['generate', 'Hi', '--max-tokens', '2', '--spec', 'off', '--json']); "
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'textual', 'tui', 'voice', 'bench'}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]"


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
