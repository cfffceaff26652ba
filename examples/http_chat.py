"""Chat with `tradeoff serve` over its OpenAI HTTP API (same port as the voice WebSocket), streamed, with the
time to first token and the time between chunks measured here, at the client.

    python examples/http_chat.py "What is the capital of France?"
    python examples/http_chat.py --base-url http://gpu-node:8765/v1 --api-key "$TOKEN" "Hello!"

Any OpenAI-compatible server works the same way (vLLM, SGLang, llama.cpp's server): only --base-url changes.
"""

import argparse
import statistics
import time

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="the user message")
    p.add_argument("--base-url", default="http://127.0.0.1:8765/v1", help="the server's /v1 (default: %(default)s)")
    p.add_argument("--api-key", default="unused", help="the server's --token, if it has one")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    sent = time.monotonic()
    arrivals, usage = [], None
    print("bot> ", end="", flush=True)
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": args.prompt}],
                                                max_tokens=args.max_tokens, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    tbt = f"{statistics.median(gaps) * 1000:.0f} ms" if gaps else "-"
    print(f"model {model} | TTFT {(arrivals[0] - sent) * 1000:.0f} ms | TBT p50 {tbt} | "
          f"{usage.prompt_tokens} prompt + {usage.completion_tokens} output tokens")


if __name__ == "__main__":
    main()
