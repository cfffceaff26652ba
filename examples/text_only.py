"""A typed conversation with `tradeoff serve`, for when there is no microphone: text in, text and audio out.

Each line you type becomes a user message (`conversation.item.create`) followed by `response.create`.
The reply's words stream in as `response.output_audio_transcript.delta`; its audio is appended to --out.
Use --say to script the conversation instead of typing (repeat it for several turns).

    python examples/text_only.py                                  # type; an empty line or Ctrl-D ends
    python examples/text_only.py --say "Hi there." --say "What is the capital of France?"
"""

import argparse
import asyncio
import base64
import json
import sys
import wave

from websockets.asyncio.client import connect

RATE = 24_000


async def ask(ws, text: str) -> tuple[str, bytes]:
    """One turn: send the text, print the reply as it streams, return (status, reply audio)."""
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    await ws.send(json.dumps({"type": "response.create"}))  # audio out (the session default); ["text"] skips the TTS
    audio = bytearray()
    print("bot>  ", end="", flush=True)
    async for message in ws:
        event = json.loads(message)
        if event["type"] == "response.output_audio_transcript.delta":
            print(event["delta"], end="", flush=True)
        elif event["type"] == "response.output_audio.delta":
            audio += base64.b64decode(event["delta"])
        elif event["type"] == "error":
            print(f"\nerror: {event['error']['message']}", file=sys.stderr)
        elif event["type"] == "response.done":
            print(f"   [{len(audio) / 2 / RATE:.1f} s of audio]")
            return event["response"]["status"], bytes(audio)
    raise ConnectionError("the server closed the connection")


async def main(args: argparse.Namespace) -> int:
    lines = iter(args.say) if args.say else iter(lambda: input("you>  ").strip(), "")
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    audio, ok = bytearray(), True
    async with connect(args.url, additional_headers=headers, max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        # Typed turns need no VAD; switching it off also keeps background noise from starting turns.
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "audio": {"input": {"turn_detection": None}}}}))
        try:
            for text in lines:
                if args.say:
                    print(f"you>  {text}")
                status, reply = await ask(ws, text)
                ok = ok and status == "completed" and bool(reply)
                audio += reply
        except EOFError:
            pass
    if args.out:
        with wave.open(args.out, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            w.writeframes(bytes(audio))
        print(f"replies' audio written to {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765/v1/realtime", help="server URL (default: %(default)s)")
    parser.add_argument("--token", default=None, help="bearer token, if the server was started with --token")
    parser.add_argument("--say", action="append", default=[], metavar="TEXT", help="a user turn (repeatable)")
    parser.add_argument("--out", default="text_only_replies.wav", help="WAV for the replies' audio (default: %(default)s)")
    sys.exit(asyncio.run(main(parser.parse_args())))
