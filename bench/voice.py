"""`tradeoff bench voice`: the realtime voice loop measured end to end with the simulated caller.

Three parts:
1. ASR on the built-in question set (espeak speech over a 30 dB noise floor): word error rate and the
   time to a final transcript, for each backend: Whisper in windows that fit the audio (the default) and in
   fixed 10 s windows, and pocketsphinx. pocketsphinx is fed in real time, as in a session, and
   timed from the end of the audio; Whisper decodes each utterance at once (its whole cost comes after
   the first silent chunk).
2. The live loop: the engine, VAD, ASR and TTS in a server on loopback (in this process, as the dashboard
   runs it), and the simulated caller asking questions in real time and barging in on every n-th reply.
   Per turn: the server's critical-path breakdown (endpointing, ASR, queue, LLM TTFT, first clause, TTS first
   chunk, send), the client's own end-to-end time, transport (their difference), and barge-in stop
   latency (from the first frame of the caller's new speech to the moment the reply stopped playing).
   Every n-th question has a mid-sentence pause of 0.5-0.7 s (voice/caller.py's PAUSED_QUESTIONS): a turn the
   server commits before the caller has finished is a cut-off.
3. The same loop once per turn detection (`--turn-detection`: server_vad at a silence, semantic_vad at an
   eagerness), side by side: E2E p50/p90, cut-offs, WER, and what decided the turns.

Or, with `--callers 1,2,4,8`, voice under load instead: that many simulated callers at once, each its own session
speaking in real time, level after level, in each engine mode (`--modes`), optionally beside synthetic text users
(`--text-users`). Per level: client E2E p50/p90/p99, voice goodput (the share of the turns asked that met the voice
SLO, 500 ms from the end of speech to the first reply audio; a turn never answered is a miss), and the breakdown's
queue (the time a reply's request waited for the engine: latency mode serves one request at a time, so its callers
queue behind each other), ASR (one Whisper decode at a time for all sessions) and LLM TTFT.

The server runs on an event loop and thread of its own, the callers on the benchmark's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np

from bench.report import table, write_json
from engine import Backend, Controls, Engine
from engine.backend import MODES
from engine.metrics import percentile
from serve.background import BackgroundLoop
from serve.loadgen import LoadGenerator
from voice.asr import WINDOW_S, SphinxASR, WhisperASR
from voice.audio import ASR_RATE, WIRE_RATE, resample
from voice.caller import PAUSED_QUESTIONS, QUESTIONS, STAGGER_S, Turn, call, mixed_questions, spoken_question, spoken_text
from voice.metrics import STAGES as TIMED_STAGES
from voice.metrics import VOICE_SLO_MS, goodput
from voice.protocol import EAGERNESS, SessionConfig, TurnDetection, describe_turn_detection
from voice.server import VoiceServer, make_services
from voice.session import Services
from voice.tts import EspeakTTS
from voice.wer import wer

TARGETS = {"e2e_median_ms": 300, "e2e_p90_ms": 450, "barge_in_ms": 100, "wer": 0.15, "cut_off_rate": 0.1}
TURN_DETECTIONS = ("server_vad:300", "server_vad:500", "semantic_vad:high:audio", "semantic_vad:high", "semantic_vad:medium",
                   "semantic_vad:low")
AUDIO_ONLY = ":audio"  # semantic_vad judged by Smart Turn alone, without the LLM's reading of the transcript
STAGES = tuple(name for name, _ in TIMED_STAGES)


def asr_comparison(tts: EspeakTTS) -> list[dict]:
    clips = [resample(spoken_question(tts, q, seed=i), WIRE_RATE, ASR_RATE) for i, q in enumerate(QUESTIONS)]
    rows = []
    for name, whisper in (("whisper (windows fit the audio)", WhisperASR()),
                          (f"whisper ({WINDOW_S} s windows)", WhisperASR(min_window_s=WINDOW_S))):
        results = [whisper.transcribe_array(c) for c in clips]
        rows.append(_asr_row(name, [r.text for r in results], [r.compute_s for r in results]))
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


TURN_TIMEOUT_S = 60.0  # a caller gives up on a reply after this (an overloaded engine may queue it that long)


@contextmanager
def serving(services: Services) -> Iterator[str]:
    """A voice server on loopback with `services`, on an event loop and thread of its own (so what the callers do on
    theirs, the benchmark's, delays nothing the server does); yields its URL."""
    bg = BackgroundLoop("voice-server")
    server = VoiceServer(services, port=0)
    try:
        bg.run(server.start())
        yield server.url
    finally:
        bg.run(server.close())
        bg.stop()


def voice_services(engine: Backend, tts: EspeakTTS, max_tokens: int, first_words: int,
                   turn_detection: TurnDetection, text_turn: bool = True) -> Services:
    defaults = replace(SessionConfig(), turn_detection=turn_detection)
    services = make_services(engine, tts, asr="whisper", defaults=defaults, max_output_tokens=max_tokens,
                             first_words=first_words, text_turn=text_turn)
    if services.defaults.turn_detection != turn_detection:
        name = describe_turn_detection(turn_detection.to_dict())
        raise RuntimeError(f"the server could not run {name}: {services.turn_model_error}")
    return services


def live_loop(url: str, question_sets: list[tuple[str, ...]], barge_in_every: int) -> list[list[Turn]]:
    """One simulated caller per question set, all at once (each its own session, speaking in real time), against the
    server at `url`; each caller's answered turns."""
    tts = EspeakTTS()  # the callers' voice (a worker process apart from the server's)

    def report(k: int) -> Callable[[Turn], None]:
        who = f"caller {k}: " if len(question_sets) > 1 else ""
        return lambda t: print(f"  {who}turn: {t.question!r} -> E2E {_fmt(t.e2e_ms)} ms" + (" CUT OFF" if t.cut_off else ""),
                               flush=True)

    async def together() -> list[list[Turn]]:
        return await asyncio.gather(*(call(url, qs, delay_s=k * STAGGER_S, on_turn=report(k), tts=tts, seed=k,
                                           barge_in_every=barge_in_every, turn_timeout_s=TURN_TIMEOUT_S)
                                      for k, qs in enumerate(question_sets)))

    try:
        return asyncio.run(together())
    finally:
        tts.close()


def parse_turn_detection(spec: str) -> tuple[TurnDetection, bool]:
    """server_vad:MS or semantic_vad:EAGERNESS[:audio] -> (the turn detection, whether the LLM judges transcripts)."""
    audio_only = spec.endswith(AUDIO_ONLY) and spec.startswith("semantic_vad:")
    kind, _, value = spec.removesuffix(AUDIO_ONLY if audio_only else "").partition(":")
    if kind == "server_vad" and value.isdigit():
        return TurnDetection(silence_duration_ms=int(value)), True
    if kind == "semantic_vad" and value in EAGERNESS:
        return TurnDetection(type="semantic_vad", eagerness=value), not audio_only
    raise ValueError(f"--turn-detection: {spec!r} is not server_vad:MS or semantic_vad:{'|'.join(EAGERNESS)}[:audio]")


def describe(td: TurnDetection, text_turn: bool) -> str:
    name = describe_turn_detection(td.to_dict())
    return name + (", Smart Turn alone" if td.semantic and not text_turn else "")


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
             "p99_ms": percentile(v, 99), "max_ms": max(v) if v else None} for name, v in columns.items()]
    heard = [t for t in turns if t.transcript is not None]
    paused = [t for t in turns if t.question in PAUSED_QUESTIONS]
    decided = [t.response.metrics["turn"] for t in answered]
    judged = [d["model_ms"] for d in decided if d["model_ms"] is not None]
    read = [d["text_model_ms"] for d in decided if d.get("text_model_ms") is not None]
    summary = {
        "turns": len(turns), "answered": len(answered),
        "paused_turns": len(paused), "cut_offs": sum(t.cut_off for t in paused),
        "cut_offs_unpaused": sum(t.cut_off for t in turns if t not in paused),
        "ended_by": {reason: sum(d["reason"] == reason for d in decided) for reason in {d["reason"] for d in decided}},
        "turn_model_ms_p50": percentile(judged, 50), "turn_model_ms_p90": percentile(judged, 90),
        "text_model_ms_p50": percentile(read, 50), "text_model_ms_p90": percentile(read, 90),
        "drafted": sum(bool(t.response.metrics.get("drafted")) for t in answered),
        "barge_in_attempts": sum(t.barge_in for t in turns), "barge_ins_measured": len(barge),
        "live_wer": wer([spoken_text(t.question) for t in heard], [t.transcript for t in heard]) if heard else None,
        "e2e_median_ms": percentile(columns["client E2E"], 50), "e2e_p90_ms": percentile(columns["client E2E"], 90),
        "barge_in_median_ms": percentile(barge, 50), "barge_in_p90_ms": percentile(barge, 90),
        "tbt_p50_ms": percentile([t.response.metrics["tbt_ms"]["p50"] for t in answered
                                  if t.response.metrics["tbt_ms"]["p50"] is not None], 50),
    }
    return rows, summary


def per_turn(turns: list[Turn]) -> list[dict]:
    return [{"question": t.question, "transcript": t.transcript, "reply": t.response.transcript,
             "status": t.response.status, "barge_in": t.barge_in, "barge_in_stop_ms": t.barge_in_stop_ms,
             "cut_off": t.cut_off, "client_e2e_ms": t.e2e_ms, "server": t.response.metrics} for t in turns]


def load_row(mode: str, callers: int, answered: list[Turn], asked: int) -> dict:
    """One load level: `answered` of the `asked` turns of `callers` callers at once. Goodput counts a turn never
    answered (its caller gave up) as a miss."""
    rows, summary = summarize(answered)
    stage = {r["measure"]: r for r in rows}
    e2e = [t.e2e_ms for t in answered] + [None] * (asked - len(answered))
    return {"mode": mode, "callers": callers, "asked": asked, "answered": len(answered),
            "e2e_p50_ms": stage["client E2E"]["median_ms"], "e2e_p90_ms": stage["client E2E"]["p90_ms"],
            "e2e_p99_ms": stage["client E2E"]["p99_ms"], "goodput": goodput(e2e),
            "queue_p50_ms": stage["queue"]["median_ms"], "queue_p90_ms": stage["queue"]["p90_ms"],
            "asr_p50_ms": stage["asr"]["median_ms"], "llm_ttft_p50_ms": stage["llm_ttft"]["median_ms"],
            "first_clause_p50_ms": stage["first_clause"]["median_ms"],
            "tbt_p50_ms": summary["tbt_p50_ms"], "barge_in_p50_ms": summary["barge_in_median_ms"],
            "cut_offs": summary["cut_offs"] + summary["cut_offs_unpaused"]}


LOAD_COLUMNS = [("mode", "mode", ""), ("callers", "callers", "d"), ("answered", "answered", "d"), ("asked", "of", "d"),
                ("e2e_p50_ms", "E2E p50", ".0f"), ("e2e_p90_ms", "p90", ".0f"), ("e2e_p99_ms", "p99", ".0f"),
                ("goodput", f"goodput (<= {VOICE_SLO_MS:.0f} ms)", ".0%"), ("queue_p50_ms", "queue p50", ".0f"),
                ("queue_p90_ms", "queue p90", ".0f"), ("asr_p50_ms", "ASR p50", ".0f"),
                ("llm_ttft_p50_ms", "LLM TTFT p50", ".0f"), ("first_clause_p50_ms", "first clause p50", ".0f"),
                ("tbt_p50_ms", "TBT p50", ".1f"),
                ("barge_in_p50_ms", "barge-in p50", ".0f"), ("cut_offs", "cut-offs", "d")]


def counts(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8] (each >= 1)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected counts >= 1 separated by commas, such as 1,2,4,8; got {text!r}")
    return values


def modes(text: str) -> list[str]:
    values = text.split(",")
    if unknown := [m for m in values if m not in MODES]:
        raise argparse.ArgumentTypeError(f"unknown mode {unknown[0]!r}; expected some of {', '.join(MODES)}")
    return values


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--turns", type=int, default=24, help="questions the caller asks (default: %(default)s)")
    p.add_argument("--barge-in-every", type=int, default=4, help="interrupt every n-th reply (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=40, help="most tokens per reply (default: %(default)s)")
    p.add_argument("--first-words", type=int, default=3, help="first clause cut after this many words (default: %(default)s)")
    p.add_argument("--turn-detection", default=None,
                   help="turn detections to run the loop with, side by side: server_vad:SILENCE_MS, "
                        "semantic_vad:EAGERNESS, semantic_vad:EAGERNESS:audio (Smart Turn alone, no LLM reading of the "
                        f"transcript) (default: {','.join(TURN_DETECTIONS)}; with --callers one of them, "
                        "default the server's own, server_vad:300)")
    p.add_argument("--paused-every", type=int, default=None,
                   help="every n-th question has a 0.5-0.7 s mid-sentence pause (0 = none; default: 3, with --callers 0)")
    p.add_argument("--skip-asr-comparison", action="store_true", help="only the live loop")
    g = p.add_argument_group("voice under load (instead of the side-by-side run)")
    g.add_argument("--callers", type=counts, default=None, metavar="N,N,...",
                   help="run this many simulated callers at once (each its own session, in real time), one level after "
                        "another, e.g. 1,2,4,8: E2E p50/p90/p99, voice goodput, queue time per level")
    g.add_argument("--modes", type=modes, default=["latency", "batched"], metavar="MODE,...",
                   help="the engine modes to run each level in (default: latency,batched)")
    g.add_argument("--caller-turns", type=int, default=6, help="questions each caller asks (default: %(default)s)")
    g.add_argument("--text-users", type=int, default=0,
                   help="synthetic text users (closed loop, chat lengths) beside the callers (default: %(default)s)")
    p.add_argument("--json", default=None, help="where to write the JSON (default: bench/out/voice.json, with --callers "
                                                "bench/out/voice_load.json)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    return under_load(args) if args.callers else side_by_side(args)


def side_by_side(args: argparse.Namespace) -> int:
    tts = EspeakTTS()
    load = os.getloadavg()
    asr_rows = []
    if not args.skip_asr_comparison:
        print("ASR on the question set (espeak + 30 dB noise floor) ...", flush=True)
        asr_rows = asr_comparison(tts)
        print(table(asr_rows, [("asr", "ASR", ""), ("utterances", "utterances", "d"), ("wer", "WER", ".1%"),
                               ("final_ms_p50", "final p50 ms", ".0f"), ("final_ms_p90", "final p90 ms", ".0f")]))
    configs = [parse_turn_detection(spec) for spec in (args.turn_detection or ",".join(TURN_DETECTIONS)).split(",")]
    questions = mixed_questions(args.turns, 3 if args.paused_every is None else args.paused_every)
    engine = Engine(args.model)
    runs = []
    for td, text_turn in configs:
        name = describe(td, text_turn)
        print(f"\nLive loop, {name}: {args.turns} turns ({sum(q in PAUSED_QUESTIONS for q in questions)} with a "
              f"mid-sentence pause), barge-in every {args.barge_in_every}, engine {engine.name} "
              f"({engine.snapshot().state.mode} mode), Whisper + espeak ...", flush=True)
        with serving(voice_services(engine, tts, args.max_tokens, args.first_words, td, text_turn)) as url:
            turns = live_loop(url, [questions], args.barge_in_every)[0]
        rows, summary = summarize(turns)
        print(table(rows, [("measure", "per turn", ""), ("n", "n", "d"), ("median_ms", "median ms", ".0f"),
                           ("p90_ms", "p90 ms", ".0f"), ("max_ms", "max ms", ".0f")]))
        runs.append({"turn_detection": name, "breakdown": rows, "summary": summary, "turns": per_turn(turns)})
    engine.close()
    tts.close()
    comparison = [{"turn_detection": r["turn_detection"], "answered": f"{r['summary']['answered']}/{r['summary']['turns']}",
                   "e2e_p50_ms": r["summary"]["e2e_median_ms"], "e2e_p90_ms": r["summary"]["e2e_p90_ms"],
                   "endpointing_p50_ms": next(b["median_ms"] for b in r["breakdown"] if b["measure"] == "endpointing"),
                   "cut_offs": f"{r['summary']['cut_offs']}/{r['summary']['paused_turns']}",
                   "wer": r["summary"]["live_wer"], "barge_in_p50_ms": r["summary"]["barge_in_median_ms"],
                   "turn_model_ms_p50": r["summary"]["turn_model_ms_p50"],
                   "text_model_ms_p50": r["summary"]["text_model_ms_p50"],
                   "ended_by": ", ".join(f"{k} {v}" for k, v in sorted(r["summary"]["ended_by"].items()))} for r in runs]
    print()
    print(table(comparison, [("turn_detection", "turn detection", ""), ("answered", "answered", ""),
                             ("e2e_p50_ms", "E2E p50 ms", ".0f"), ("e2e_p90_ms", "E2E p90 ms", ".0f"),
                             ("endpointing_p50_ms", "endpointing p50", ".0f"), ("cut_offs", "cut-offs", ""),
                             ("wer", "WER", ".1%"), ("barge_in_p50_ms", "barge-in p50", ".0f"),
                             ("turn_model_ms_p50", "Smart Turn ms", ".0f"), ("text_model_ms_p50", "LLM judge ms", ".0f"),
                             ("ended_by", "turns ended by", "")]))
    print(f"load average at start {load[0]:.1f}; targets: E2E median <= {TARGETS['e2e_median_ms']} ms, "
          f"p90 <= {TARGETS['e2e_p90_ms']} ms, cut-offs <= 1 in 10, barge-in <= {TARGETS['barge_in_ms']} ms, WER <= 15%"
          + (f"; WER (whisper, question set) {asr_rows[0]['wer']:.1%}" if asr_rows else ""))
    path = write_json(args.json or "bench/out/voice.json", "voice", comparison, runs=runs, asr=asr_rows,
                      settings=vars(args) | {"func": None}, load_average=load, targets=TARGETS)
    print(f"JSON: {path}")
    return 0


def under_load(args: argparse.Namespace) -> int:
    """`--callers`: each level of callers at once, in each mode, against one server."""
    specs = args.turn_detection.split(",") if args.turn_detection else []
    if len(specs) > 1:
        raise SystemExit("--callers runs one turn detection: give --turn-detection one value")
    td, text_turn = parse_turn_detection(specs[0]) if specs else (SessionConfig().turn_detection, True)
    paused_every = 0 if args.paused_every is None else args.paused_every
    load = os.getloadavg()
    tts = EspeakTTS()  # the server's voice
    engine = Engine(args.model)
    rows, runs = [], []
    try:
        with serving(voice_services(engine, tts, args.max_tokens, args.first_words, td, text_turn)) as url:
            for mode in args.modes:
                engine.control(Controls(mode=mode))
                for n in args.callers:
                    sets = [mixed_questions(args.caller_turns, paused_every, offset=k * args.caller_turns) for k in range(n)]
                    print(f"\n{mode} mode, {n} caller{'s' if n > 1 else ''} at once, {args.caller_turns} turns each"
                          + (f", {args.text_users} synthetic text users beside them" if args.text_users else "")
                          + f", {describe(td, text_turn)} ...", flush=True)
                    text = LoadGenerator(engine) if args.text_users else None
                    if text is not None:
                        text.start(args.text_users)
                    try:
                        turns = live_loop(url, sets, args.barge_in_every)
                    finally:
                        if text is not None:
                            text.stop()
                    answered = [t for caller in turns for t in caller]
                    row = load_row(mode, n, answered, n * args.caller_turns)
                    if text is not None:
                        row["text_requests"] = len(text.completed)
                        row["text_ttft_p50_ms"] = percentile([m.ttft * 1000 for m in text.completed], 50)
                    print(table([row], LOAD_COLUMNS))
                    rows.append(row)
                    runs.append({"mode": mode, "callers": n, "turns": [per_turn(caller) for caller in turns]})
    finally:
        engine.close()
        tts.close()
    print()
    print(table(rows, LOAD_COLUMNS + ([("text_requests", "text requests", "d"), ("text_ttft_p50_ms", "text TTFT p50", ".0f")]
                                      if args.text_users else [])))
    print(f"load average at start {load[0]:.1f}; goodput: the share of the turns asked whose client E2E (end of speech "
          f"-> first reply audio) was <= {VOICE_SLO_MS:.0f} ms; queue: the critical-path time a reply's request waited "
          "for the engine")
    path = write_json(args.json or "bench/out/voice_load.json", "voice_load", rows, runs=runs,
                      settings=vars(args) | {"func": None}, turn_detection=td.to_dict(), load_average=load,
                      slo_ms=VOICE_SLO_MS)
    print(f"JSON: {path}")
    return 0
