"""`tradeoff bench voice`: the realtime voice loop measured end to end with the simulated caller.

Two parts:
1. ASR on the built-in question set (espeak speech over a 30 dB noise floor): word error rate and the
   time to a final transcript, for each backend. pocketsphinx is fed in real time, as in a session, and
   timed from the end of the audio; Whisper decodes each utterance at once (its whole cost comes after
   the first silent chunk).
2. The live loop: the engine, VAD, ASR and TTS in a server on loopback (in this process, as the dashboard
   runs it), and the simulated caller asking questions in real time and barging in on every n-th reply.
   Per turn: the server's critical-path breakdown (endpointing, ASR, LLM TTFT, first clause, TTS first
   chunk, send), the client's own end-to-end time, transport (their difference), and barge-in stop
   latency (from the first frame of the caller's new speech to the moment the reply stopped playing).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import numpy as np

from bench.report import table, write_json
from engine import Engine
from engine.metrics import percentile
from voice.asr import SphinxASR, WhisperASR
from voice.audio import ASR_RATE, WIRE_RATE, resample
from voice.caller import QUESTIONS, SimulatedCaller, Turn, spoken_question
from voice.client import RealtimeClient
from voice.server import VoiceServer, make_services
from voice.tts import EspeakTTS
from voice.wer import wer

TARGETS = {"e2e_median_ms": 600, "e2e_p90_ms": 800, "barge_in_ms": 100, "wer": 0.20}
STAGES = ("endpointing", "asr", "llm_ttft", "first_clause", "tts", "send")


def asr_comparison(tts: EspeakTTS, whisper: WhisperASR) -> list[dict]:
    clips = [resample(spoken_question(tts, q, seed=i), WIRE_RATE, ASR_RATE) for i, q in enumerate(QUESTIONS)]
    rows = []
    results = [whisper.transcribe_array(c) for c in clips]
    rows.append(_asr_row("whisper", [r.text for r in results], [r.compute_s for r in results]))
    texts, times = asyncio.run(_sphinx_real_time(clips))
    rows.append(_asr_row("pocketsphinx", texts, times))
    return rows


async def _sphinx_real_time(clips: list[np.ndarray]) -> tuple[list[str], list[float]]:
    rec = SphinxASR().open()
    await rec.transcribe()  # wait for the worker to start
    texts, times = [], []
    try:
        for clip in clips:
            step = ASR_RATE // 50
            start = time.monotonic()
            for k, i in enumerate(range(0, len(clip), step)):
                rec.feed(clip[i:i + step])
                await asyncio.sleep(max(0.0, start + (k + 1) / 50 - time.monotonic()))
            t = time.monotonic()
            texts.append((await rec.transcribe()).text)
            times.append(time.monotonic() - t)
            rec.reset()
    finally:
        rec.close()
    return texts, times


def _asr_row(name: str, hyps: list[str], seconds: list[float]) -> dict:
    return {"asr": name, "utterances": len(hyps), "wer": wer(list(QUESTIONS), hyps),
            "final_ms_p50": statistics.median(seconds) * 1000, "final_ms_p90": percentile(seconds, 90) * 1000,
            "hypotheses": hyps}


async def live_loop(engine: Engine, tts: EspeakTTS, turns: int, barge_in_every: int, max_tokens: int,
                    first_words: int, silence_ms: int) -> list[Turn]:
    from dataclasses import replace

    from voice.protocol import SessionConfig, TurnDetection

    defaults = replace(SessionConfig(), turn_detection=TurnDetection(silence_duration_ms=silence_ms))
    services = make_services(engine, tts, asr="whisper", defaults=defaults, max_output_tokens=max_tokens,
                             first_words=first_words)
    async with VoiceServer(services, port=0) as server, RealtimeClient(server.url) as client:
        caller = SimulatedCaller(client, turns=turns, barge_in_every=barge_in_every)
        return await caller.run(lambda t: print(f"  turn: {t.question!r} -> E2E {_fmt(t.e2e_ms)} ms", flush=True))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def summarize(turns: list[Turn]) -> tuple[list[dict], dict]:
    answered = [t for t in turns if t.e2e_ms is not None and t.response.metrics and t.response.metrics["breakdown_ms"]]
    columns: dict[str, list[float]] = {s: [t.response.metrics["breakdown_ms"][s] for t in answered] for s in STAGES}
    columns["server E2E"] = [t.response.metrics["e2e_ms"] for t in answered]
    columns["transport"] = [t.e2e_ms - t.response.metrics["e2e_ms"] for t in answered]
    columns["client E2E"] = [t.e2e_ms for t in answered]
    barge = [t.barge_in_stop_ms for t in turns if t.barge_in_stop_ms is not None]
    columns["barge-in stop"] = barge
    rows = [{"measure": name, "n": len(v), "median_ms": percentile(v, 50), "p90_ms": percentile(v, 90),
             "max_ms": max(v) if v else None} for name, v in columns.items()]
    heard = [t for t in turns if t.transcript is not None]
    summary = {
        "turns": len(turns), "answered": len(answered),
        "drafted": sum(bool(t.response.metrics.get("drafted")) for t in answered),
        "barge_in_attempts": sum(t.barge_in for t in turns), "barge_ins_measured": len(barge),
        "live_wer": wer([t.question for t in heard], [t.transcript for t in heard]) if heard else None,
        "e2e_median_ms": percentile(columns["client E2E"], 50), "e2e_p90_ms": percentile(columns["client E2E"], 90),
        "barge_in_median_ms": percentile(barge, 50), "barge_in_p90_ms": percentile(barge, 90),
        "tbt_p50_ms": percentile([t.response.metrics["tbt_ms"]["p50"] for t in answered
                                  if t.response.metrics["tbt_ms"]["p50"] is not None], 50),
    }
    return rows, summary


def per_turn(turns: list[Turn]) -> list[dict]:
    return [{"question": t.question, "transcript": t.transcript, "reply": t.response.transcript,
             "status": t.response.status, "barge_in": t.barge_in, "barge_in_stop_ms": t.barge_in_stop_ms,
             "client_e2e_ms": t.e2e_ms, "server": t.response.metrics} for t in turns]


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--turns", type=int, default=24, help="questions the caller asks (default: %(default)s)")
    p.add_argument("--barge-in-every", type=int, default=4, help="interrupt every n-th reply (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=40, help="most tokens per reply (default: %(default)s)")
    p.add_argument("--first-words", type=int, default=3, help="first clause cut after this many words (default: %(default)s)")
    p.add_argument("--silence-ms", type=int, default=300, help="VAD silence that ends a turn (default: %(default)s)")
    p.add_argument("--skip-asr-comparison", action="store_true", help="only the live loop")
    p.add_argument("--json", default="bench/out/voice.json", help="where to write the JSON (default: %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    tts = EspeakTTS()
    load = os.getloadavg()
    asr_rows = []
    if not args.skip_asr_comparison:
        print("ASR on the question set (espeak + 30 dB noise floor) ...", flush=True)
        asr_rows = asr_comparison(tts, WhisperASR())
        print(table(asr_rows, [("asr", "ASR", ""), ("utterances", "utterances", "d"), ("wer", "WER", ".1%"),
                               ("final_ms_p50", "final p50 ms", ".0f"), ("final_ms_p90", "final p90 ms", ".0f")]))
    engine = Engine(args.model)
    print(f"\nLive loop: {args.turns} turns, barge-in every {args.barge_in_every}, engine {engine.name} "
          f"({engine.snapshot().state.mode} mode), Whisper + espeak ...", flush=True)
    turns = asyncio.run(live_loop(engine, tts, args.turns, args.barge_in_every, args.max_tokens, args.first_words,
                                  args.silence_ms))
    engine.close()
    rows, summary = summarize(turns)
    print()
    print(table(rows, [("measure", "per turn", ""), ("n", "n", "d"), ("median_ms", "median ms", ".0f"),
                       ("p90_ms", "p90 ms", ".0f"), ("max_ms", "max ms", ".0f")]))
    s = summary
    print(f"\nturns {s['answered']}/{s['turns']} answered, {s['drafted']} drafted during the end-of-turn wait; "
          f"barge-ins measured {s['barge_ins_measured']}/{s['barge_in_attempts']}; live WER {s['live_wer']:.1%}; "
          f"TBT p50 {_fmt(s['tbt_p50_ms'])} ms; load average at start {load[0]:.1f}")
    print(f"targets: E2E median {_fmt(s['e2e_median_ms'])} <= {TARGETS['e2e_median_ms']}, "
          f"p90 {_fmt(s['e2e_p90_ms'])} <= {TARGETS['e2e_p90_ms']}; "
          f"barge-in median {_fmt(s['barge_in_median_ms'])} (p90 {_fmt(s['barge_in_p90_ms'])}) <= {TARGETS['barge_in_ms']}; "
          + (f"WER (whisper, question set) {asr_rows[0]['wer']:.1%} < {TARGETS['wer']:.0%}" if asr_rows else ""))
    path = write_json(args.json, "voice", rows, summary=summary, asr=asr_rows, turns=per_turn(turns),
                      settings=vars(args) | {"func": None}, load_average=load, targets=TARGETS)
    print(f"JSON: {path}")
    return 0
