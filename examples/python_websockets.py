"""Talk to `tradeoff serve` with nothing but the `websockets` package: the raw OpenAI Realtime protocol.

It streams a WAV file (pcm16, 24 kHz, mono) to the server in real time, as a microphone would, then keeps
sending silence: the server's VAD notices the end of speech, answers, and this script saves the reply audio
as a WAV file and prints what was heard and said, with the server's latency breakdown.

    python examples/python_websockets.py --wav question.wav --out reply.wav
"""

import argparse
import asyncio
import base64
import json
import sys
import time
import wave

from websockets.asyncio.client import connect

RATE = 24_000  # the protocol's audio: pcm16, 24 kHz, mono, base64 in JSON events
FRAME_BYTES = RATE * 20 // 1000 * 2  # 20 ms per append, as a microphone delivers it


def read_wav(path: str) -> bytes:
    with wave.open(path, "rb") as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (RATE, 1, 2):
            sys.exit(f"{path}: need 16-bit mono 24 kHz audio, got {w.getsampwidth() * 8}-bit, "
                     f"{w.getnchannels()} channel(s), {w.getframerate()} Hz")
        return w.readframes(w.getnframes())


def write_wav(path: str, pcm: bytes) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm)


async def stream_microphone(ws, pcm: bytes, done: asyncio.Event) -> None:
    """Send the file frame by frame at real-time pace, then silence until the reply is complete."""
    start = time.monotonic()
    frames = [pcm[i: i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]
    k = 0
    while not done.is_set():
        frame = frames[k] if k < len(frames) else bytes(FRAME_BYTES)
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(frame).decode()}))
        k += 1
        await asyncio.sleep(max(0.0, start + k * 0.02 - time.monotonic()))


async def main(args: argparse.Namespace) -> int:
    pcm = read_wav(args.wav)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    async with connect(args.url, additional_headers=headers, max_size=None, compression=None) as ws:
        first = json.loads(await ws.recv())
        assert first["type"] == "session.created", first
        # Optional: a system prompt. Audio formats and server VAD are already the defaults.
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "instructions": "You are a helpful voice assistant. Answer in one short sentence."}}))

        done = asyncio.Event()
        mic = asyncio.create_task(stream_microphone(ws, pcm, done))
        reply, status = bytearray(), None
        try:
            async for message in ws:
                event = json.loads(message)
                kind = event["type"]
                if kind == "response.output_audio.delta":
                    reply += base64.b64decode(event["delta"])
                elif kind == "conversation.item.input_audio_transcription.completed":
                    print(f"you>  {event['transcript']}")
                elif kind == "response.output_audio_transcript.done":
                    print(f"bot>  {event['transcript']}")
                elif kind == "tradeoff.metrics" and event["breakdown_ms"]:  # our extension: where the time went
                    parts = " + ".join(f"{k} {v:.0f}" for k, v in event["breakdown_ms"].items())
                    print(f"      server E2E {event['e2e_ms']:.0f} ms = {parts}")
                elif kind == "error":
                    print(f"error: {event['error']['message']}", file=sys.stderr)
                elif kind == "response.done":
                    status = event["response"]["status"]
                    break
        finally:
            done.set()
            await mic
    write_wav(args.out, bytes(reply))
    print(f"reply ({len(reply) / 2 / RATE:.1f} s of audio, {status}) written to {args.out}")
    return 0 if status == "completed" and reply else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765/v1/realtime", help="server URL (default: %(default)s)")
    parser.add_argument("--token", default=None, help="bearer token, if the server was started with --token")
    parser.add_argument("--wav", default="question.wav", help="speech to send: 16-bit mono 24 kHz (default: %(default)s)")
    parser.add_argument("--out", default="reply.wav", help="where to save the reply audio (default: %(default)s)")
    sys.exit(asyncio.run(main(parser.parse_args())))
