"""Voice subcommands of `tradeoff`: serve (the realtime server) and talk (a client: microphone, WAV, or simulated)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from voice.audio import WIRE_RATE, resample
from voice.protocol import EAGERNESS, PATH


def configure(name: str, p: argparse.ArgumentParser, argv: list[str]) -> None:
    """Fill in the parser of `tradeoff NAME` (fetch, serve or talk)."""
    if name == "fetch":
        from serve import cli

        cli.configure(name, p, argv)  # the LLM's fetch, and then the voice loop's turn model (cmd_fetch)
        p.description += " With the default model, also the voice loop's turn model (semantic_vad's Smart Turn)."
        p.set_defaults(func=cmd_fetch)
        return
    (serve_parser if name == "serve" else talk_parser)(p)


def cmd_fetch(args: argparse.Namespace) -> int:
    from engine.registry import DEFAULT_MODEL
    from serve import cli
    from voice import smart_turn

    rc = cli.cmd_fetch(args)
    if args.model == DEFAULT_MODEL:
        print(f"turn model (semantic_vad): {smart_turn.fetch()}")
    return rc


def serve_parser(p: argparse.ArgumentParser) -> None:
    from serve.cli import add_model_args

    p.description = (f"Serve ws://HOST:PORT{PATH}: VAD -> ASR -> engine -> TTS with barge-in, speaking the OpenAI "
                     "Realtime API (GA events), so stock clients can talk to it; on the same port, the OpenAI HTTP "
                     "API (http://HOST:PORT/v1: chat/completions, completions, models), /health, Prometheus /metrics "
                     "and the browser client at /. With --backend, the model runs on another OpenAI-compatible server "
                     "and this one measures it.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; others need --token)")
    p.add_argument("--port", type=int, default=8765, help="port (default: %(default)s)")
    p.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on the WebSocket handshake and on /v1 HTTP calls")
    p.add_argument("--asr", default="whisper", choices=("whisper", "pocketsphinx"),
                   help="default speech recognizer (default: %(default)s; a session may pick the other)")
    p.add_argument("--tts", default="espeak", choices=("espeak", "piper"), help="speech synthesizer (default: %(default)s)")
    p.add_argument("--piper-model", default=None, help="Piper voice (.onnx with its .onnx.json) for --tts piper")
    p.add_argument("--max-tokens", type=int, default=200, help="most tokens per reply (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--turn-detection", default="server_vad", choices=("server_vad", "semantic_vad"),
                   help="sessions' default turn detection: server_vad (a silence of --silence-ms ends the turn) or "
                        "semantic_vad (Smart Turn judges each pause; see --eagerness) (default: %(default)s)")
    p.add_argument("--silence-ms", type=int, default=300, help="server_vad: silence that ends a turn (default: %(default)s)")
    p.add_argument("--eagerness", default="auto", choices=EAGERNESS,
                   help="semantic_vad: how readily a pause ends the turn; the longest wait is 8 / 4 / 2 s for low / "
                        "medium / high, auto = medium (default: %(default)s)")
    p.add_argument("--turn-model", default=None, metavar="PATH",
                   help="semantic_vad's Smart Turn v3 .onnx (default: smart-turn-v3.2-cpu from the pipecat-ai wheel, "
                        "fetched once)")
    p.add_argument("--lead-ms", type=float, default=100,
                   help="how far reply audio runs ahead of real time (default: %(default)s)")
    p.add_argument("--first-words", type=int, default=3,
                   help="cut a reply's first clause after this many words (default: %(default)s)")
    p.add_argument("--max-message-kb", type=int, default=1024, help="largest WebSocket message (default: %(default)s)")
    p.add_argument("--max-buffer-s", type=float, default=30, help="longest input audio per turn (default: %(default)s)")
    p.add_argument("--max-body-kb", type=int, default=4096,
                   help="largest HTTP request body; a larger one gets 413 (default: %(default)s)")
    p.add_argument("--max-asr-workers", type=int, default=8,
                   help="most pocketsphinx worker processes at once, one per session using it (~84 MB each; "
                        "default: %(default)s)")
    p.add_argument("--max-conversation-items", type=int, default=4096,
                   help="most items one session's conversation holds (default: %(default)s)")
    p.add_argument("--max-conversation-kb", type=int, default=1024,
                   help="most text one session's conversation holds (default: %(default)s)")
    add_model_args(p)
    p.set_defaults(func=cmd_serve)



def talk_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Talk to `tradeoff serve`. With a microphone and speaker it uses them; without (or with --wav) "
                     "it reads and writes WAV files; --simulate speaks built-in questions.")
    p.add_argument("--url", default=f"ws://127.0.0.1:8765{PATH}", help="server URL (default: %(default)s)")
    p.add_argument("--token", default=None, help="bearer token, if the server asks for one")
    p.add_argument("--wav", default=None, metavar="IN", help="speak this WAV file (any rate; mixed to mono)")
    p.add_argument("--out", default=None, metavar="OUT", help="write the conversation to this WAV (left: you, right: agent)")
    p.add_argument("--simulate", action="store_true", help="a simulated caller asks built-in questions and barges in")
    p.add_argument("--turns", type=int, default=6, help="questions the simulated caller asks (default: %(default)s)")
    p.add_argument("--barge-in-every", type=int, default=3, help="simulated caller interrupts every n-th reply (0 = never)")
    p.set_defaults(func=cmd_talk)


# ---- serve ----------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from voice.server import is_loopback

    if not is_loopback(args.host) and not args.token:
        raise ValueError(f"--host {args.host} exposes the server beyond this machine: pass --token as well")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return asyncio.run(serve(args))


async def serve(args: argparse.Namespace) -> int:
    """Listen at once (answering 503 while the model loads), then serve until Ctrl-C."""
    from dataclasses import replace

    from serve.cli import backend_from
    from voice.protocol import SessionConfig, TurnDetection
    from voice.server import VoiceServer, make_services
    from voice.tts import make_tts

    server = VoiceServer(None, args.host, args.port, args.token, max_message_bytes=args.max_message_kb * 1024,
                         max_body_bytes=args.max_body_kb * 1024)
    engine = None
    async with server:
        http = f"http://{args.host}:{server.port}"
        print(f"tradeoff serve: listening on {http} (loading; /health answers 503 until ready)", file=sys.stderr)
        try:
            engine = await asyncio.to_thread(backend_from, args)
            turns = TurnDetection(type=args.turn_detection, silence_duration_ms=args.silence_ms, eagerness=args.eagerness)
            defaults = replace(SessionConfig(), transcription_model=args.asr, temperature=args.temperature,
                               turn_detection=turns)
            tts = await asyncio.to_thread(make_tts, args.tts, args.piper_model)  # starts espeak's worker process
            services = await asyncio.to_thread(
                make_services, engine, tts, asr=args.asr, max_asr_workers=args.max_asr_workers, turn_model=args.turn_model,
                defaults=defaults,
                max_output_tokens=args.max_tokens, max_buffer_s=args.max_buffer_s, lead_ms=args.lead_ms,
                first_words=args.first_words, max_conversation_items=args.max_conversation_items,
                max_conversation_bytes=args.max_conversation_kb * 1024)
            server.attach(services)
            print(f"tradeoff serve: ready. {engine.describe()}; ASR {args.asr}, TTS {args.tts}\n"
                  f"  realtime voice  {server.url}\n  OpenAI API      {server.http_url}  (chat/completions, "
                  f"completions, models)\n  browser client  {http}/\n  metrics         {http}/metrics  "
                  "(Ctrl-C to stop)", file=sys.stderr)
            await server.serve_forever()
        finally:
            if engine is not None:
                engine.close()
    return 0


# ---- talk -----------------------------------------------------------------------------------------

def cmd_talk(args: argparse.Namespace) -> int:
    return asyncio.run(talk(args))


async def talk(args: argparse.Namespace) -> int:
    from voice.client import RealtimeClient
    from voice.sound import open_devices

    devices = None
    if not args.simulate:
        opened = open_devices(asyncio.get_running_loop())
        if isinstance(opened, str):
            print(f"tradeoff talk: {opened}; using WAV files instead.", file=sys.stderr)
            if args.wav is None:
                print("tradeoff talk: give --wav IN.wav (and --out OUT.wav), or --simulate", file=sys.stderr)
                return 2
            if args.out is None:
                args.out = "talk-out.wav"
                print(f"tradeoff talk: the reply goes to {args.out}", file=sys.stderr)
        else:
            devices = opened
    from websockets.exceptions import InvalidHandshake

    try:
        async with RealtimeClient(args.url, args.token, devices) as client:
            if args.simulate:
                await simulate(client, args.turns, args.barge_in_every)
            elif args.wav:
                await speak_wav(client, args.wav)
            else:
                await converse(client, devices)
            if args.out:
                print(f"conversation written to {client.save(args.out)}", file=sys.stderr)
    except (OSError, InvalidHandshake) as e:
        print(f"tradeoff talk: cannot talk to {args.url}: {e} (is `tradeoff serve` running?)", file=sys.stderr)
        return 2
    finally:
        if devices is not None:
            devices.close()
    return 0


def describe(turn_metrics: dict | None, client_e2e_ms: float | None) -> str:
    """'E2E 480 ms at the client | server 478 = endpointing 300 + asr 12 + ...'"""
    parts = [f"E2E {client_e2e_ms:.0f} ms at the client" if client_e2e_ms is not None else "E2E -"]
    if turn_metrics and turn_metrics.get("breakdown_ms"):
        b = turn_metrics["breakdown_ms"]
        parts.append(f"server {turn_metrics['e2e_ms']:.0f} = " + " + ".join(f"{k} {v:.0f}" for k, v in b.items())
                     + (" (drafted)" if turn_metrics.get("drafted") else ""))
    if turn_metrics and (tbt := turn_metrics.get("tbt_ms")) and tbt.get("p50") is not None:
        parts.append(f"TBT p50 {tbt['p50']:.0f} ms")
    return " | ".join(parts)


async def simulate(client, turns: int, barge_in_every: int) -> None:
    from voice.caller import SimulatedCaller

    def show(turn) -> None:
        reply = turn.response
        print(f"\nyou>   {turn.question}" + ("   [barging in]" if turn.barge_in else ""))
        print(f"heard> {turn.transcript}")
        print(f"bot>   {reply.transcript}" + ("" if reply.status == "completed" else f"   [{reply.status}]"))
        line = describe(reply.metrics, turn.e2e_ms)
        if turn.barge_in_stop_ms is not None:
            line += f" | barge-in: reply stopped {turn.barge_in_stop_ms:.0f} ms after speech start"
        print("       " + line, flush=True)

    await SimulatedCaller(client, turns=turns, barge_in_every=barge_in_every).run(show)


async def speak_wav(client, path: str) -> None:
    """Speak a WAV file in real time, then silence until the reply has played."""
    import soundfile

    from voice.caller import speak_once

    audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
    turn = await speak_once(client, resample(audio.mean(axis=1), rate, WIRE_RATE), path)
    print(f"you>  {turn.transcript}")
    if turn.response is None:
        print("tradeoff talk: no reply (was there speech in the file?)", file=sys.stderr)
        return
    print(f"bot>  {turn.response.transcript}")
    print("      " + describe(turn.response.metrics, turn.e2e_ms) + " (from where the voice in the file ends)", flush=True)


async def converse(client, devices) -> None:
    """Microphone in, speaker out, until Ctrl-C; print what each side said."""

    async def pump() -> None:
        while True:
            await client.send_audio(await devices.mic_blocks.get())

    sender = asyncio.create_task(pump())
    print("Listening. Speak; Ctrl-C to stop.", file=sys.stderr)
    try:
        while True:
            _, event = await client.next_event()
            if event["type"] == "client.closed":
                break
            print_conversation([(0.0, event)])
    finally:
        sender.cancel()


def print_conversation(log: list[tuple[float, dict]]) -> None:
    for _, event in log:
        if event["type"] == "conversation.item.input_audio_transcription.completed":
            print(f"you>  {event['transcript']}", flush=True)
        elif event["type"] == "response.output_audio_transcript.done":
            print(f"bot>  {event['transcript']}", flush=True)
        elif event["type"] == "error":
            print(f"error: {event['error']['message']}", file=sys.stderr, flush=True)
