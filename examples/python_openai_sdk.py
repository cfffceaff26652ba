"""Talk to `tradeoff serve` through the official `openai` SDK's realtime client (`pip install openai`).

The SDK only needs `websocket_base_url` pointed at the server. This one turns the server's VAD off and
commits the turn itself (push-to-talk style), so the WAV file can be sent as fast as the socket takes it.
The reply audio is saved as a WAV file.

    python examples/python_openai_sdk.py --wav question.wav --out reply.wav
"""

import argparse
import asyncio
import base64
import sys
import wave

from openai import AsyncOpenAI

RATE = 24_000  # pcm16, 24 kHz, mono


def read_wav(path: str) -> bytes:
    with wave.open(path, "rb") as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (RATE, 1, 2):
            sys.exit(f"{path}: need 16-bit mono 24 kHz audio")
        return w.readframes(w.getnframes())


async def main(args: argparse.Namespace) -> int:
    pcm = read_wav(args.wav)
    # ws://HOST:PORT/v1/realtime -> the SDK's base URL is ws://HOST:PORT/v1 (it appends /realtime?model=...).
    base = args.url.rsplit("/realtime", 1)[0]
    # The SDK always sends its api_key as a bearer token; a loopback server without --token ignores it.
    client = AsyncOpenAI(api_key=args.token or "unused", websocket_base_url=base)
    async with client.realtime.connect(model="tradeoff") as conn:
        await conn.session.update(session={"type": "realtime", "instructions": "Answer in one short sentence.",
                                           "audio": {"input": {"turn_detection": None}}})  # we commit turns ourselves
        for i in range(0, len(pcm), 9600):  # 200 ms per append
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i: i + 9600]).decode())
        await conn.input_audio_buffer.commit()
        await conn.response.create()

        reply, status = bytearray(), None
        async for event in conn:
            if event.type == "conversation.item.input_audio_transcription.completed":
                print(f"you>  {event.transcript}")
            elif event.type == "response.output_audio.delta":
                reply += base64.b64decode(event.delta)
            elif event.type == "response.output_audio_transcript.done":
                print(f"bot>  {event.transcript}")
            elif event.type == "error":
                print(f"error: {event.error.message}", file=sys.stderr)
            elif event.type == "response.done":
                status = event.response.status
                print(f"      usage: {event.response.usage.input_tokens} tokens in, "
                      f"{event.response.usage.output_tokens} out")
                break
    with wave.open(args.out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(bytes(reply))
    print(f"reply ({len(reply) / 2 / RATE:.1f} s of audio, {status}) written to {args.out}")
    return 0 if status == "completed" and reply else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765/v1/realtime", help="server URL (default: %(default)s)")
    parser.add_argument("--token", default=None, help="bearer token, if the server was started with --token")
    parser.add_argument("--wav", default="question.wav", help="speech to send: 16-bit mono 24 kHz (default: %(default)s)")
    parser.add_argument("--out", default="reply.wav", help="where to save the reply audio (default: %(default)s)")
    sys.exit(asyncio.run(main(parser.parse_args())))
