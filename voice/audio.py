"""PCM helpers: the wire format (pcm16 mono, base64), a streaming polyphase resampler, and a noise floor.

Audio inside voice/ is float32 in [-1, 1]. The wire and WAV files carry 16-bit little-endian PCM.
"""

from __future__ import annotations

import base64
import binascii
from math import gcd

import numpy as np

WIRE_RATE = 24_000  # OpenAI Realtime pcm16: 24 kHz mono
ASR_RATE = 16_000  # VAD and ASR models run at 16 kHz


def pcm16_to_float(data: bytes) -> np.ndarray:
    if len(data) % 2:
        raise ValueError(f"pcm16 audio must have an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(audio: np.ndarray) -> bytes:
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2").tobytes()


def b64_to_pcm16(text: str) -> bytes:
    """Strict base64 decode: raises ValueError on anything that is not base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"audio is not valid base64: {e}") from None


def pcm16_to_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Resampler:
    """Streaming rational resampler (up L, down M) with a Kaiser-windowed sinc low-pass.

    Output sample n comes from input position n*M/L: with phase p = n*M mod L and base i = n*M div L,
    y[n] = sum_k h[p + k*L] * x[i - k]. The last `taps - 1` input samples are kept between calls, so
    feeding a signal in pieces gives the same output as feeding it at once.
    """

    def __init__(self, src_rate: int, dst_rate: int, taps: int = 32):
        g = gcd(src_rate, dst_rate)
        self.up, self.down = dst_rate // g, src_rate // g
        self.taps = taps
        n = self.up * taps
        cutoff = 0.5 / max(self.up, self.down) * 0.92  # cycles per upsampled sample, a little below Nyquist
        t = np.arange(n) - (n - 1) / 2
        h = 2 * cutoff * np.sinc(2 * cutoff * t) * np.kaiser(n, 8.0) * self.up
        self.phases = h.reshape(taps, self.up).T.astype(np.float32).copy()  # [L, taps]: phases[p, k] = h[p + k*L]
        self.history = np.zeros(taps - 1, dtype=np.float32)
        self.start = -(taps - 1)  # input index of history[0]
        self.next_out = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        full = np.concatenate([self.history, np.asarray(x, dtype=np.float32)])
        end = self.start + len(full)  # one past the last input index we hold
        n_end = (end * self.up + self.down - 1) // self.down  # outputs whose base index i < end
        n = np.arange(self.next_out, n_end)
        pos = n * self.down
        base, phase = pos // self.up - self.start, pos % self.up
        window = full[base[:, None] - np.arange(self.taps)[None, :]]
        y = np.einsum("nk,nk->n", window, self.phases[phase])
        self.next_out = n_end
        keep = self.taps - 1
        self.history = full[len(full) - keep:]
        self.start = end - keep
        return y.astype(np.float32)


def resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    return audio if src_rate == dst_rate else Resampler(src_rate, dst_rate)(audio)


def with_noise_floor(audio: np.ndarray, snr_db: float = 30.0, seed: int | None = 0) -> np.ndarray:
    """Add white noise `snr_db` below the speech level (RMS of the non-silent part).

    Synthetic speech has long runs of exact zeros that real microphones never produce; ASR models
    misbehave on them (FACTS.md), so test speech always gets a floor.
    """
    rng = np.random.default_rng(seed)
    voiced = audio[np.abs(audio) > 1e-3]
    level = float(np.sqrt(np.mean(voiced**2))) if len(voiced) else 0.1
    noise = rng.standard_normal(len(audio)).astype(np.float32) * level * 10 ** (-snr_db / 20)
    return (audio + noise).astype(np.float32)


def frame_energies(audio: np.ndarray, rate: int) -> np.ndarray:
    """Mean square of each whole 10 ms frame of `audio` from its start (a partial last frame is left out)."""
    frame = rate // 100
    return np.square(audio[: len(audio) // frame * frame].reshape(-1, frame)).mean(axis=1)


def trim_to_voice(audio: np.ndarray, rate: int = WIRE_RATE, margin_db: float = 10.0) -> np.ndarray:
    """Cut leading and trailing silence: keep from the first to the last 10 ms frame that is `margin_db`
    above the recording's floor (its quietest tenth), so "end of speech" means the end of the voice."""
    frame = rate // 100
    if len(audio) < frame:
        return audio
    rms = np.sqrt(frame_energies(audio, rate))
    floor = np.percentile(rms, 10)
    voiced = np.flatnonzero(rms > max(floor * 10 ** (margin_db / 20), 1e-4))
    return audio[voiced[0] * frame: (voiced[-1] + 1) * frame] if len(voiced) else audio[:0]
