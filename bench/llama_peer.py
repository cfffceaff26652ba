"""llama.cpp as the peer, at its best: this file runs as a script in a process of its own, under the environment
llama.cpp would have on its own (not tradeoff's OMP_WAIT_POLICY, not next to torch's OpenMP runtime), with the
same thread count and the same GGUF. It imports only llama_cpp and the standard library, so any Python that has
llama-cpp-python can run it (`tradeoff bench spec --peer-python PATH`).

Reads one JSON object on stdin: {"gguf", "threads", "max_tokens", "prompts": [...], "system", "first_turn",
"follow_up"}; writes one JSON object on stdout: decode tok/s per prompt (greedy, streamed, the first chunk's
gap left out as TTFT), and the TTFT of the follow-up turn after a cached system prompt and first turn.
"""

import json
import statistics
import sys
import time


def decode_rate(llm, messages: list[dict], max_tokens: int) -> tuple[float | None, float]:
    """(decode tok/s after the first token, TTFT in seconds) of one greedy streamed chat completion."""
    start = time.perf_counter()
    times = []
    for chunk in llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            times.append(time.perf_counter())
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 else None
    return rate, (times[0] - start) if times else float("nan")


def main() -> None:
    job = json.load(sys.stdin)
    from llama_cpp import Llama, __version__

    llm = Llama(model_path=job["gguf"], n_threads=job["threads"], n_threads_batch=job["threads"], n_ctx=4096,
                verbose=False)
    decode_rate(llm, [{"role": "user", "content": "Hello"}], 8)  # warm-up
    rates = []
    for prompt in job["prompts"]:
        llm.reset()  # a cold prompt every time, as the engine's runs (clear_cache)
        rate, _ = decode_rate(llm, [{"role": "user", "content": prompt}], job["max_tokens"])
        rates.append(rate)
    ttfts = []
    for _ in range(3):  # the follow-up turn reuses the cached system prompt and first turn (llama.cpp's prefix match)
        llm.reset()
        history = [{"role": "system", "content": job["system"]}, {"role": "user", "content": job["first_turn"]}]
        first = llm.create_chat_completion(history, max_tokens=40, temperature=0.0)["choices"][0]["message"]["content"]
        history += [{"role": "assistant", "content": first}, {"role": "user", "content": job["follow_up"]}]
        ttfts.append(decode_rate(llm, history, 8)[1])
    json.dump({"version": __version__, "rates": rates, "follow_up_ttft_s": statistics.median(ttfts)}, sys.stdout)


if __name__ == "__main__":
    main()
