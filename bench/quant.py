"""`tradeoff bench quant`: the accuracy cost of each decode format against fp32, on 20 chat prompts.

For each prompt the fp32 model's greedy reply (64 tokens) is the reference sequence. Every format then scores
that same sequence (teacher forcing) through its own decode path, in verify-sized chunks of a few rows, as
latency mode runs it (one pass over the whole sequence would take the dense prefill path instead and measure
the wrong weights), and we report the max |logit - fp32 logit| and how often its argmax equals fp32's
(greedy-token agreement) over all reply positions. The engine's setup chooser (engine/setup.py) applies the
same test, on one reply, before it picks a format.
"""

from __future__ import annotations

import argparse

import torch

from bench.report import table, write_json
from engine import setup
from engine.kv_cache import StaticKVCache
from engine.loader import load
from engine.model import Transformer

PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in simple terms.", "Write a haiku about autumn.",
    "Give three tips for learning a language.", "What causes the seasons on Earth?", "How do vaccines work?",
    "Summarise the plot of Cinderella.", "Write a Python function that checks for a palindrome.",
    "What is the difference between weather and climate?", "Describe the water cycle.",
    "Why is the sky blue?", "List five healthy breakfast ideas.", "What does a CPU do?",
    "Rewrite this sentence formally: gonna grab food, brb.", "How many legs does a spider have?",
    "What is machine learning?", "Translate 'thank you very much' into Spanish.", "Tell me a joke about computers.",
    "What are prime numbers?", "How do I make a cup of tea?",
]


def greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    cache = StaticKVCache(model.cfg, len(prompt) + n, model.dtype)
    step = setup.torch_step(model)
    ids = list(prompt)
    logits = step(ids, cache, 1)
    for _ in range(n - 1):
        ids.append(int(logits[-1].argmax()))
        logits = step(ids[-1:], cache, 1)
    return ids + [int(logits[-1].argmax())]


def run(model_spec: str, formats: list[str], prompts: list[str], reply_tokens: int) -> list[dict]:
    loaded = load(model_spec)
    models: dict[str, Transformer] = {}
    reference = setup.dense_model(loaded, "fp32", models)
    sequences = []
    for p in prompts:
        prompt = loaded.tokenizer.encode_chat([{"role": "user", "content": p}])
        ids = greedy(reference, prompt, reply_tokens)
        sequences.append((len(prompt), ids, setup.decode_logits(setup.torch_step(reference), reference, ids, len(prompt))))
    rows = []
    for fmt in formats:
        model, step = setup.decode_candidate(loaded, fmt, models, torch.get_num_threads())
        if step is None:
            rows.append({"format": fmt, "note": "cannot run here (the native kernel did not build)"})
            continue
        max_err, agree, total = 0.0, 0, 0
        for n, ids, ref in sequences:
            logits = setup.decode_logits(step, model, ids, n)
            max_err = max(max_err, (logits - ref).abs().max().item())
            agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            total += len(ref)
        rows.append({"format": fmt, "prompts": len(prompts), "positions": total, "max_logit_error": max_err,
                     "greedy_agreement": agree / total})
    return rows


COLUMNS = [("format", "weights", ""), ("prompts", "prompts", "d"), ("positions", "positions", "d"),
           ("max_logit_error", "max |logit err|", ".3f"), ("greedy_agreement", "greedy agreement", ".3f")]


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--formats", default=",".join(setup.DECODES), help="decode formats (default: %(default)s)")
    p.add_argument("--reply-tokens", type=int, default=64)
    p.add_argument("--json", default="bench/out/quant.json")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    rows = run(args.model, args.formats.split(","), PROMPTS, args.reply_tokens)
    print(table(rows, COLUMNS))
    print(f"JSON: {write_json(args.json, 'quant', rows)}")
    return 0
