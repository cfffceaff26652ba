"""The example clients in examples/ run as separate processes against a live in-process server: each exits 0,
prints what the server heard and answered, and (where it saves one) writes a WAV holding the reply audio."""

import asyncio
import sys
import wave
from pathlib import Path

import pytest
import soundfile

from tests.voice.conftest import closest
from voice.audio import WIRE_RATE
from voice.caller import QUESTIONS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
QUESTION = "What is the capital of France?"


async def run_example(name: str, *args: str, timeout: float = 60) -> str:
    """Run examples/NAME with ARGS while this test's event loop keeps serving; return its stdout."""
    proc = await asyncio.create_subprocess_exec(sys.executable, str(EXAMPLES / name), *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\nstdout:\n{out.decode()}\nstderr:\n{err.decode()}"
    return out.decode()


def said(stdout: str, who: str) -> list[str]:
    return [line.split(">", 1)[1].strip() for line in stdout.splitlines() if line.startswith(who + ">")]


def reply_seconds(path: Path) -> float:
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (WIRE_RATE, 1, 2)
        return w.getnframes() / WIRE_RATE


@pytest.fixture
def question_wav(tmp_path, say) -> Path:
    path = tmp_path / "question.wav"
    soundfile.write(path, say(QUESTION), WIRE_RATE, subtype="PCM_16")
    return path


@pytest.mark.parametrize("example", ["python_websockets.py", "python_openai_sdk.py"])
async def test_audio_example_gets_a_spoken_reply(example, server, question_wav, tmp_path):
    out = tmp_path / "reply.wav"
    stdout = await run_example(example, "--url", server.url, "--wav", str(question_wav), "--out", str(out))
    (heard,) = said(stdout, "you")
    assert closest(heard, QUESTIONS) == QUESTION, stdout
    (answer,) = said(stdout, "bot")
    assert answer, stdout
    assert reply_seconds(out) > 0.3


async def test_text_only_example_holds_a_typed_conversation(server, tmp_path):
    out = tmp_path / "replies.wav"
    stdout = await run_example("text_only.py", "--url", server.url, "--say", "Hello!", "--say", QUESTION,
                               "--out", str(out))
    assert said(stdout, "you") == ["Hello!", QUESTION]
    answers = said(stdout, "bot")
    assert len(answers) == 2 and all(a.split("[")[0].strip() for a in answers), stdout
    assert reply_seconds(out) > 0.6


def test_examples_reject_a_wav_in_the_wrong_format(tmp_path):
    import subprocess

    bad = tmp_path / "16k.wav"
    soundfile.write(bad, [0.0] * 1600, 16000, subtype="PCM_16")
    for example in ("python_websockets.py", "python_openai_sdk.py"):
        result = subprocess.run([sys.executable, str(EXAMPLES / example), "--url", "ws://127.0.0.1:9/v1/realtime",
                                 "--wav", str(bad)], capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and "24 kHz" in result.stderr, (example, result.stderr)


async def test_http_example_streams_a_reply_and_its_timing(server):
    stdout = await run_example("http_chat.py", "--base-url", server.http_url, "--max-tokens", "8", QUESTION)
    (answer,) = said(stdout, "bot")
    assert answer, stdout
    assert "TTFT" in stdout and "output tokens" in stdout, stdout
