"""`tradeoff bench quant`: the accuracy cost of each weight format against fp32, on 20 chat prompts.

For each prompt the fp32 model's greedy reply (64 tokens) is the reference sequence. Every format then
scores that same sequence in one forward pass (teacher forcing), and we report the max |logit - fp32 logit|
and how often its argmax equals fp32's (greedy-token agreement) over all reply positions.
"""

from __future__ import annotations

import argparse

import torch

from bench.report import table, write_json
from engine.kv_cache import StaticKVCache
from engine.loader import LoadedModel, load
from engine.model import Transformer
from engine.quant import quantize

# name -> (activation/weight dtype, quantization)
FORMATS = {"fp32": (torch.float32, "none"), "bf16": (torch.bfloat16, "none"), "int8": (torch.bfloat16, "int8"),
           "int4": (torch.bfloat16, "int4")}
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


def build(loaded: LoadedModel, fmt: str) -> Transformer:
    dtype, quant = FORMATS[fmt]
    model = Transformer(loaded.config, dtype=dtype)
    model.load_canonical(loaded.weights)
    return quantize(model, quant)


def score(model: Transformer, ids: list[int]) -> torch.Tensor:
    cache = StaticKVCache(model.cfg, len(ids), model.dtype)
    return model.logits(model(torch.tensor(ids), cache.extend(ids), cache))


def greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    cache = StaticKVCache(model.cfg, len(prompt) + n, model.dtype)
    ids = list(prompt)
    logits = model.logits(model(torch.tensor(ids), cache.extend(ids), cache))[-1]
    for _ in range(n - 1):
        ids.append(int(logits.argmax()))
        logits = model.logits(model(torch.tensor(ids[-1:]), cache.extend(ids[-1:]), cache))[-1]
    return ids + [int(logits.argmax())]


def run(model_spec: str, formats: list[str], prompts: list[str], reply_tokens: int) -> list[dict]:
    loaded = load(model_spec)
    ref_model = build(loaded, "fp32")
    sequences = []
    for p in prompts:
        prompt = loaded.tokenizer.encode_chat([{"role": "user", "content": p}])
        sequences.append((len(prompt), greedy(ref_model, prompt, reply_tokens)))
    reference = [score(ref_model, ids)[n - 1 : -1] for n, ids in sequences]
    rows = []
    for fmt in formats:
        model = ref_model if fmt == "fp32" else build(loaded, fmt)
        max_err, agree, total = 0.0, 0, 0
        for (n, ids), ref in zip(sequences, reference):
            logits = score(model, ids)[n - 1 : -1]
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
    p.add_argument("--formats", default="fp32,bf16,int8,int4")
    p.add_argument("--reply-tokens", type=int, default=64)
    p.add_argument("--json", default="bench/out/quant.json")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    rows = run(args.model, args.formats.split(","), PROMPTS, args.reply_tokens)
    print(table(rows, COLUMNS))
    print(f"JSON: {write_json(args.json, 'quant', rows)}")
    return 0
