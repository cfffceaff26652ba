"""`tradeoff bench spec`: speculative decoding per drafter against no speculation, in one run.

Fixed chat prompts, greedy: questions (prompt lookup can't help), summaries of a given text and rewrites
(it can). Per drafter: acceptance rate, mean accepted length, tokens per target forward, draft time share,
decode tok/s (median over prompts) and the speedup over `off` measured in the same run. Also the TTFT of a
~30-token user turn after a cached system prompt and first turn. Where a Python with llama-cpp-python is found
(this one, or --peer-python), llama.cpp runs the same GGUF greedily in the same run, in a process of its own
under its default environment and the same thread count (bench/llama_peer.py), and the table shows our ratio
to it. Target MBU: the target's weight bytes per forward x target forwards/s over the device's measured copy
bandwidth (the draft's reads left out).

Where latency mode runs the native step (a CPU), the benchmark also times that step with T rows (a plain decode step,
T = 1, or the verify of T - 1 drafts) at 120 cached tokens: what a verify costs in plain steps is what decides
whether speculation can pay on this CPU (k drafts accepted at rate a emit (1 - a^(k+1)) / (1 - a) tokens a step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.decode import copy_bandwidth, weight_bytes
from bench.report import table, write_json
from engine.engine import Engine, Request
from engine.kv_cache import StaticKVCache
from engine.loader import LoadedModel, load
from engine.metrics import SpecStats
from engine.native import build as build_native
from engine.registry import DEFAULT_MODEL, resolve
from engine.sampling import SamplingParams
from engine.setup import NATIVE_PREFILL_ROWS, latency_model
from engine.setup import resolve as resolve_setup
from engine.speculative import AdaptiveK

TEXT = ("Honeybees live in colonies of up to sixty thousand workers, one queen and a few hundred drones. Workers "
        "collect nectar and pollen, build wax comb, cool the hive by fanning their wings and defend the entrance. "
        "The queen lays up to two thousand eggs a day. In winter the colony clusters together and shivers to keep warm.")
PROMPTS = [
    ("question", "What is the capital of Japan, and what is it famous for?"),
    ("question", "Give me three tips for staying focused while studying."),
    ("question", "Explain how a rainbow forms."),
    ("question", "Write a short poem about a lighthouse."),
    ("summary", f"Summarise this text in two sentences: {TEXT}"),
    ("summary", f"What does the text say about winter? {TEXT}"),
    ("rewrite", f"Rewrite this text in simpler words: {TEXT}"),
    ("rewrite", f"Repeat this text, fixing nothing: {TEXT}"),
]
SYSTEM = "You are a friendly voice assistant. Answer in one or two short sentences, in plain spoken English."
FIRST_TURN = "Name three cities in Italy."
FOLLOW_UP = "Thanks. Could you now tell me, in a few words, which of those places you would recommend for a first visit?"


def decode_tok_s(m) -> float | None:
    return (m.output_tokens - 1) / (m.e2e - m.ttft) if m.output_tokens > 1 and m.e2e > m.ttft else None


def follow_up_ttft(engine: Engine) -> float:
    """TTFT of a ~30-token user turn whose system prompt and first turn are already in the cache."""
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": FIRST_TURN}]
    first = engine.generate(Request(messages=history, sampling=SamplingParams(max_tokens=40)))
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": FOLLOW_UP}]
    return engine.generate(Request(messages=history, sampling=SamplingParams(max_tokens=8))).metrics.ttft


def run_engine(loaded, spec: str, max_tokens: int, quant: str | None, copy_bw: float) -> dict:
    engine = Engine(loaded, spec=spec, quant=quant)
    try:
        engine.generate(Request(prompt="Hello", sampling=SamplingParams(max_tokens=8)))  # warm-up
        totals, rates, kinds = SpecStats(), [], {}
        for kind, prompt in PROMPTS:
            engine.clear_cache()
            m = engine.generate(Request(messages=[{"role": "user", "content": prompt}],
                                        sampling=SamplingParams(max_tokens=max_tokens))).metrics
            totals.merge(m.spec)
            if (r := decode_tok_s(m)) is not None:
                rates.append(r)
                kinds.setdefault(kind, []).append(r)
        ttft = statistics.median(follow_up_ttft(engine) for _ in range(3))
        fmt = (engine.setup.decode if engine.setup is not None else "w4a16" if engine.quant == "int4"
               else {torch.float32: "fp32"}.get(engine.dtype, "bf16"))
        tok_s, summary = statistics.median(rates), totals.summary()
        forwards_s = tok_s / summary["tokens_per_target_forward"]
        return {"drafter": spec, "quant": engine.setup_summary(), "decode_tok_s": tok_s,
                **{f"tok_s_{k}": statistics.median(v) for k, v in kinds.items()},
                **summary, "follow_up_ttft_ms": ttft * 1000,
                "target_mbu_pct": 100 * forwards_s * weight_bytes(loaded.config, fmt) / copy_bw}
    finally:
        engine.close()


STEP_CONTEXT = 120  # cached tokens before the timed step: a short conversation


def step_cost(loaded: LoadedModel, quant: str | None, context: int = STEP_CONTEXT, repeats: int = 20) -> list[dict] | None:
    """The native step of T = 1 .. k_max + 1 rows after `context` cached tokens: median ms of `repeats` and the ratio
    to T = 1. None where latency mode does not run the native step (a GPU, another --quant, no C compiler)."""
    if torch.cuda.is_available():
        return None
    setup = resolve_setup(loaded, quant)
    if setup.decode != "native":
        return None
    model = latency_model(loaded, setup)
    native, _ = build_native(model, setup.threads)
    if native is None:
        return None
    rows = AdaptiveK.k_max + 1  # a plain step and a verify of each draft length latency mode tries
    cache = StaticKVCache(model.cfg, context + rows, model.dtype, model.device)
    ids = [100 + i % 1000 for i in range(context + rows)]
    for i in range(0, context, NATIVE_PREFILL_ROWS):  # the cached context, in prompt chunks as latency mode runs them
        native.forward(ids[i:min(i + NATIVE_PREFILL_ROWS, context)], cache, 0)
    ms = {}
    for t in range(1, rows + 1):
        times = []
        for _ in range(repeats):
            cache.truncate(context)
            start = time.perf_counter()
            native.forward(ids[context:context + t], cache, t)
            times.append(time.perf_counter() - start)
        ms[t] = statistics.median(times) * 1000
    return [{"rows": t, "ms": v, "vs_one_row": v / ms[1]} for t, v in ms.items()]


STEP_COLUMNS = [("rows", "rows (1 + drafts)", "d"), ("ms", "native step ms", ".2f"), ("vs_one_row", "x a plain step", ".2f")]

PEER = Path(__file__).with_name("llama_peer.py")


def peer_python(given: str | None) -> str | None:
    """The Python that runs llama.cpp: --peer-python, else this one if it has llama-cpp-python; None if neither."""
    if given:
        return given
    found = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    return sys.executable if found else None


def run_llama_cpp(python: str, gguf: str, max_tokens: int, threads: int) -> dict:
    """llama.cpp on the same GGUF and prompts, in its own process with the environment it would have on its own."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # tradeoff's setting, not llama.cpp's
    job = {"gguf": gguf, "threads": threads, "max_tokens": max_tokens, "prompts": [p for _, p in PROMPTS],
           "system": SYSTEM, "first_turn": FIRST_TURN, "follow_up": FOLLOW_UP}
    out = subprocess.run([python, str(PEER)], input=json.dumps(job), capture_output=True, text=True, env=env,
                         timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp peer ({python}) failed: {out.stderr.strip()[-2000:]}")
    result = json.loads(out.stdout)
    kinds: dict[str, list[float]] = {}
    for (kind, _), rate in zip(PROMPTS, result["rates"]):
        if rate is not None:
            kinds.setdefault(kind, []).append(rate)
    return {"drafter": "llama.cpp", "quant": f"gguf (llama-cpp-python {result['version']}, own process)",
            "decode_tok_s": statistics.median(r for r in result["rates"] if r is not None),
            **{f"tok_s_{k}": statistics.median(v) for k, v in kinds.items()},
            "follow_up_ttft_ms": result["follow_up_ttft_s"] * 1000}


COLUMNS = [
    ("drafter", "drafter", ""), ("quant", "weights", ""), ("decode_tok_s", "tok/s", ".1f"), ("speedup", "vs off", ".2f"),
    ("vs_llama_cpp", "vs llama.cpp", ".2f"), ("tok_s_question", "questions", ".1f"), ("tok_s_summary", "summaries", ".1f"),
    ("tok_s_rewrite", "rewrites", ".1f"), ("acceptance_rate", "accept", ".2f"),
    ("mean_accepted_length", "accepted/step", ".2f"), ("tokens_per_target_forward", "tok/forward", ".2f"),
    ("draft_time_share", "draft share", ".2f"), ("follow_up_ttft_ms", "TTFT 30-tok turn ms", ".0f"),
    ("target_mbu_pct", "target MBU %", ".0f"),
]


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--drafters", default="off,ngram,draft,auto")
    p.add_argument("--quant", default=None, help="weight format (default: the engine's default for the device)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--peer-python", default=None, metavar="PYTHON",
                   help="a Python with llama-cpp-python to measure llama.cpp with (default: this one, if it has it)")
    p.add_argument("--json", default="bench/out/spec.json")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    loaded = load(args.model)
    copy_bw = copy_bandwidth(torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # the engines' device
    rows = [run_engine(loaded, spec, args.max_tokens, args.quant, copy_bw) for spec in args.drafters.split(",")]
    python = peer_python(args.peer_python)
    ref = None
    if python is not None:
        ref = run_llama_cpp(python, str(resolve(args.model)), args.max_tokens, torch.get_num_threads())
        rows.append(ref)
    base = next((r["decode_tok_s"] for r in rows if r["drafter"] == "off"), None)
    for r in rows:
        r["speedup"] = r["decode_tok_s"] / base if base else None
        r["vs_llama_cpp"] = r["decode_tok_s"] / ref["decode_tok_s"] if ref else None
    print(table(rows, COLUMNS))
    if ref is None:
        print("llama.cpp: not measured (pip install '.[bench]', or give --peer-python, to compare in the same run)")
    steps = step_cost(loaded, args.quant)
    if steps is not None:
        print(f"\nwhat a verify step costs here (the native step at {STEP_CONTEXT} cached tokens):\n{table(steps, STEP_COLUMNS)}")
    print(f"JSON: {write_json(args.json, 'spec', rows, step_cost=steps)}")
    return 0
