"""The Piper backend against the `piper` command-line contract (text on stdin, raw 16-bit PCM at the voice's
rate on stdout), played by a stand-in executable: Piper itself is not installed here."""

import json
import os

import numpy as np
import pytest

from voice.audio import WIRE_RATE
from voice.tts import PiperTTS, make_tts

FAKE_PIPER = """#!{python}
import sys, numpy as np
args = sys.argv[1:]
assert args[args.index("--model") + 1].endswith("voice.onnx") and "--output-raw" in args
scale = float(args[args.index("--length_scale") + 1])
text = sys.stdin.read()
n = int(16000 * 0.1 * len(text.split()) * scale)  # 100 ms per word at 16 kHz
sys.stdout.buffer.write((np.sin(np.arange(n) / 3) * 16000).astype("<i2").tobytes())
"""


@pytest.fixture
def piper_voice(tmp_path, monkeypatch):
    import sys

    exe = tmp_path / "bin" / "piper"
    exe.parent.mkdir()
    exe.write_text(FAKE_PIPER.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    model = tmp_path / "voice.onnx"
    model.write_bytes(b"onnx")
    (tmp_path / "voice.onnx.json").write_text(json.dumps({"audio": {"sample_rate": 16000}}))
    return model


def test_piper_output_is_read_at_the_voices_rate_and_resampled(piper_voice):
    tts = make_tts("piper", str(piper_voice))
    audio = tts.synthesize("one two three four", "alloy")
    assert len(audio) == pytest.approx(0.4 * WIRE_RATE, abs=40)  # 4 words x 100 ms, now at 24 kHz
    assert np.abs(audio).max() == pytest.approx(16000 / 32768, rel=0.05)
    faster = tts.synthesize("one two three four", "alloy", speed=2.0)
    assert len(faster) == pytest.approx(len(audio) / 2, abs=40)


def test_piper_needs_its_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="voice.onnx.json"):
        PiperTTS(tmp_path / "voice.onnx")
    with pytest.raises(ValueError, match="piper-model"):
        make_tts("piper", None)
