"""Voice activity detection: Silero VAD v5 (the weights in the `silero-vad` wheel) as a streaming state machine.

The model runs in numpy: its TorchScript version, run through torch's OpenMP thread pool, took ~100 ms per
32 ms chunk on this 2-core machine under load (threads spinning at barriers) against ~0.2 ms with one
thread, and torch's thread count is process-wide, shared with the engine. The numpy forward pass matches
the TorchScript model (tests/voice/test_speech.py).

The state machine follows OpenAI's `server_vad` parameters: `threshold` (speech probability that starts
speech) and `silence_duration_ms` (silence that ends a turn). Between the first silent chunk (`pause`)
and the end-of-turn decision (`end`) the caller can already transcribe, so little ASR work remains when
the decision comes. Silero notices a pause ~110 ms after the voice stops (p50 on the caller's questions); the
audio's energy tells sooner: FADE_MS of audio near the noise floor measured before the speech pauses it at once,
and louder audio before Silero agrees resumes it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from voice.audio import ASR_RATE, frame_energies

CHUNK = 512  # samples per model call at 16 kHz (32 ms): the size Silero v5 is trained on
CONTEXT = 64  # samples of the previous chunk the model sees in front of each chunk
NEG_MARGIN = 0.15  # speech stops below threshold - margin (Silero's own hysteresis)
SHARPEN_AFTER = 2 * CHUNK  # silence needed to measure the noise floor that sharpens the end of speech
FRAME = ASR_RATE // 100  # 10 ms: the energy's resolution
# A pause by energy: FADE_MS of frames within FADE_MARGIN_DB of the floor. On the caller's 32 questions (espeak-ng,
# some with a pause inside) over a 30 dB floor this came 61 ms after the voice's end (p50, max 73; Silero's own
# pause 110, max 170), with ~0.1 false pauses per question inside the speech; over a 20 dB floor 53 ms and ~0.3
# (bench/RESULTS.md). A false one costs a transcription that is thrown away when the voice comes back.
FADE_MS = 60
FADE = FADE_MS * ASR_RATE // 1000  # in samples
FADE_MARGIN_DB = 6.0


def silero_data() -> Path:
    # Found without importing the package: `import silero_vad` calls torch.set_num_threads(1) for the process.
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


JIT_NAMES = {  # our name -> the name in the TorchScript model (the package's default, `load_silero_vad()`)
    "stft": "_model.stft.forward_basis_buffer",
    **{f"conv{i + 1}.{p}": f"_model.encoder.{i}.reparam_conv.{p}" for i in range(4) for p in ("weight", "bias")},
    **{f"lstm.{p}": f"_model.decoder.rnn.{p}" for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
    "final.weight": "_model.decoder.decoder.2.weight", "final.bias": "_model.decoder.decoder.2.bias",
}


@lru_cache(maxsize=1)
def silero_weights() -> dict[str, np.ndarray]:
    """The 16 kHz weights of the TorchScript model in the wheel, as numpy arrays (read once per process)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # torch deprecates TorchScript loading; the wheel ships it (and ONNX)
        warnings.simplefilter("ignore", DeprecationWarning)
        state = torch.jit.load(str(silero_data() / "silero_vad.jit"), map_location="cpu").state_dict()
    return {ours: state[theirs].numpy().astype(np.float32) for ours, theirs in JIT_NAMES.items()}


def _conv1d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int = 1, pad: int = 0) -> np.ndarray:
    """x [C, T], w [O, C, K] -> [O, T_out], as torch.nn.functional.conv1d."""
    k = w.shape[2]
    x = np.pad(x, ((0, 0), (pad, pad)))
    cols = np.lib.stride_tricks.sliding_window_view(x, k, axis=1)[:, ::stride]  # [C, T_out, K]
    out = w.reshape(len(w), -1) @ cols.transpose(0, 2, 1).reshape(-1, cols.shape[1])  # [O, C*K] @ [C*K, T_out]
    return out if b is None else out + b[:, None]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class SileroModel:
    """One stream's Silero v5 (16 kHz): 64 samples of context + 512 new ones -> speech probability."""

    def __init__(self):
        self.w = silero_weights()
        self.reset_states()

    def reset_states(self) -> None:
        self.context = np.zeros(CONTEXT, np.float32)
        self.h = np.zeros(128, np.float32)
        self.c = np.zeros(128, np.float32)

    def __call__(self, chunk: np.ndarray) -> float:
        w = self.w
        x = np.concatenate([self.context, chunk])
        self.context = chunk[-CONTEXT:]
        x = np.pad(x, (0, 64), mode="reflect")[None]  # [1, 640]
        spec = _conv1d(x, w["stft"], None, stride=128)  # [258, 4]: real and imaginary parts
        x = np.sqrt(spec[:129] ** 2 + spec[129:] ** 2)
        x = np.maximum(_conv1d(x, w["conv1.weight"], w["conv1.bias"], 1, 1), 0)
        x = np.maximum(_conv1d(x, w["conv2.weight"], w["conv2.bias"], 2, 1), 0)
        x = np.maximum(_conv1d(x, w["conv3.weight"], w["conv3.bias"], 2, 1), 0)
        x = np.maximum(_conv1d(x, w["conv4.weight"], w["conv4.bias"], 1, 1), 0)[:, 0]  # [128]
        gates = w["lstm.weight_ih"] @ x + w["lstm.bias_ih"] + w["lstm.weight_hh"] @ self.h + w["lstm.bias_hh"]
        i, f, g, o = np.split(gates, 4)
        self.c = _sigmoid(f) * self.c + _sigmoid(i) * np.tanh(g)
        self.h = _sigmoid(o) * np.tanh(self.c)
        out = w["final.weight"][0, :, 0] @ np.maximum(self.h, 0) + w["final.bias"][0]
        return float(_sigmoid(out))


@dataclass(frozen=True)
class VadEvent:
    kind: str  # "start" | "pause" | "resume" | "end"
    sample: int  # 16 kHz sample index: where speech starts (start, resume) or where it last was (pause, end)


class SileroVAD:
    def __init__(self, threshold: float = 0.5, silence_duration_ms: int = 300):
        self.model = SileroModel()
        self.threshold = threshold
        self.silence_samples = silence_duration_ms * ASR_RATE // 1000
        self.pending = np.zeros(0, np.float32)
        self.samples = 0  # samples consumed by the model so far
        self.speaking = False
        self.pause_at: int | None = None  # first silent sample of the current pause
        self.speech_end = 0  # where speech ended: the last speech chunk's end, sharpened once a pause is measurable
        self.sharpened = False
        self.recent = np.zeros(0, np.float32)  # the last second of audio, ending at `samples`
        self.tail = np.zeros(0, np.float32)  # the last FADE_MS of audio fed, ending at `samples + len(pending)`
        self.quiet: float | None = None  # frame energy below which audio is the floor (None: not measured)
        self.faded = False  # the current pause was found by energy, and Silero has not yet agreed

    def configure(self, threshold: float, silence_duration_ms: int) -> None:
        self.threshold = threshold
        self.silence_samples = silence_duration_ms * ASR_RATE // 1000

    def reset(self) -> None:
        """Forget the current speech (the sample count goes on: it indexes the session's audio)."""
        self.model.reset_states()
        self.samples += len(self.pending)
        self.recent = np.zeros(0, np.float32)
        self.pending = np.zeros(0, np.float32)
        self.tail = np.zeros(0, np.float32)
        self.speaking = False
        self.pause_at = None
        self.quiet, self.faded = None, False

    def process(self, audio: np.ndarray) -> list[VadEvent]:
        """Feed 16 kHz audio; return the events it caused, in order."""
        audio = audio.astype(np.float32)
        self.pending = np.concatenate([self.pending, audio])
        self.tail = np.concatenate([self.tail, audio])[-FADE:]
        events = []
        while len(self.pending) >= CHUNK:
            chunk, self.pending = self.pending[:CHUNK], self.pending[CHUNK:]
            prob = self.model(chunk)
            at = self.samples
            self.samples += CHUNK
            self.recent = np.concatenate([self.recent, chunk])[-ASR_RATE:]
            if prob >= self.threshold:
                self.speech_end = self.samples
                if not self.speaking:
                    self.speaking = True
                    self.quiet = self._floor()
                    events.append(VadEvent("start", at))
                elif self.pause_at is not None and not self.faded:  # a faded pause resumes on energy, not on the lag
                    self.pause_at = None
                    events.append(VadEvent("resume", at))
            elif self.speaking and prob < self.threshold - NEG_MARGIN:
                if self.pause_at is None:
                    self.pause_at, self.sharpened = at, False
                    events.append(VadEvent("pause", self.speech_end))
                self.faded = False
                if not self.sharpened and self.samples - self.speech_end >= SHARPEN_AFTER:
                    # The silence is measured from where the voice really stopped, not from where Silero
                    # noticed (60-120 ms later).
                    offset = self.samples - len(self.recent)
                    self.speech_end = offset + sharpen_end(self.recent, self.speech_end - offset)
                    self.sharpened = True
                if self.samples - self.speech_end >= self.silence_samples:
                    events.append(VadEvent("end", self.speech_end))
                    self.speaking = False
                    self.pause_at = None
        return events + self._fade(audio)

    def _floor(self) -> float | None:
        """At speech start: the frame energy below which audio counts as the floor, from the quietest tenth of the
        second before it (None when less than a quarter second has been heard)."""
        energies = frame_energies(self.recent, ASR_RATE)
        if len(energies) < 25:
            return None
        return max(float(np.percentile(energies, 10)), 1e-10) * 10 ** (FADE_MARGIN_DB / 10)

    def _fade(self, audio: np.ndarray) -> list[VadEvent]:
        """The energy's pauses and resumes, for the audio just fed: speech that fell to the floor for FADE_MS pauses;
        a pause found so, and not yet Silero's too, resumes at the first louder frame."""
        if not self.speaking or self.quiet is None:
            return []
        fed = self.samples + len(self.pending)
        if self.pause_at is None:
            if len(self.tail) == FADE and (frame_energies(self.tail, ASR_RATE) < self.quiet).all():
                self.pause_at, self.sharpened, self.faded = fed - len(self.tail), False, True
                return [VadEvent("pause", self.pause_at)]
        elif self.faded and (loud := np.flatnonzero(frame_energies(audio, ASR_RATE) >= self.quiet)).size:
            self.pause_at, self.faded = None, False
            return [VadEvent("resume", fed - len(audio) + int(loud[0]) * FRAME)]
        return []


def sharpen_end(audio: np.ndarray, end: int, max_back_ms: int = 200, margin_db: float = 10.0) -> int:
    """Move the VAD's end of speech (an index into `audio`, which continues with the silence that ended
    the turn) back to the end of the last 10 ms frame more than `margin_db` above that silence.

    Silero flags a chunk as silent only some 60-120 ms after the voice stops; energy against the
    measured noise floor finds the real end to within a frame."""
    tail = audio[end:]
    if len(tail) < 4 * FRAME or end <= 0:
        return end
    floor = np.median(frame_energies(tail, ASR_RATE))
    start = max(0, end - max_back_ms * ASR_RATE // 1000)
    loud = np.flatnonzero(frame_energies(audio[start:end], ASR_RATE) > floor * 10 ** (margin_db / 10))
    return start + int(loud[-1] + 1) * FRAME if len(loud) else end
