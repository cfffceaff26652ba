"""`tradeoff bench decode`: batch-1 prefill and decode speed (no speculation) per weight format, TTFT, TBT,
and achieved memory bandwidth.

Achieved bandwidth = bytes of weights read per decode step x decode steps/s. It is printed next to the
machine's measured read bandwidth (a large tensor sum), the ceiling a memory-bound decode can reach.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.report import table, write_json
from engine.engine import Engine, Request
from engine.loader import load
from engine.metrics import percentile
from engine.sampling import SamplingParams

# weight format -> (weight dtype, quantization, bytes per layer weight, bytes per head weight).
# int4: half a byte plus a bf16 scale and zero per 32 weights; int8: one byte plus a scale per row (negligible).
FORMATS = {
    "fp32": (torch.float32, "none", 4.0, 4.0),
    "bf16": (torch.bfloat16, "none", 2.0, 2.0),
    "int8": (torch.bfloat16, "int8", 1.0, 1.0),
    "int4": (torch.bfloat16, "int4", 0.5 + 4 / 32, 0.5 + 4 / 32),
}


def weight_bytes(cfg, fmt: str) -> float:
    """Bytes of weights one decode step reads."""
    _, _, layer_b, head_b = FORMATS[fmt]
    head = cfg.vocab_size * cfg.dim
    return (cfg.weight_bytes(1.0) - head) * layer_b + head * head_b
PROMPT = ("Summarise the following in two sentences. The Industrial Revolution began in Britain in the late 18th "
          "century, when new machines, steam power and factories changed how goods were made. It spread to Europe "
          "and North America, raised output and living standards over time, and also brought crowded cities, "
          "child labour and pollution.")


def read_bandwidth(device: torch.device, mib: int = 512, repeats: int = 7) -> float:
    """Median bytes/s of reading a large buffer once (sum), the practical ceiling for weight streaming."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        x.sum().item()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times)


def run(model: str, formats: list[str], runs: int, max_tokens: int, device: str | None) -> tuple[list[dict], float]:
    loaded = load(model)
    rows = []
    bandwidth = None
    for name in formats:
        dtype, quant, _, _ = FORMATS[name]
        engine = Engine(loaded, device=device, dtype=dtype, quant=quant, spec="off")
        if bandwidth is None:
            bandwidth = read_bandwidth(engine.device)
        req = Request(messages=[{"role": "user", "content": PROMPT}],
                      sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        engine.generate(Request(prompt_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=4)))  # warm-up
        prefill, decode, ttfts, itls = [], [], [], []
        for _ in range(runs):
            engine.clear_cache()  # measure a cold prefill every run
            m = engine.generate(req).metrics
            ttfts.append(m.ttft)
            prefill.append(m.prompt_tokens / m.ttft)
            decode.append(1 / m.tpot)
            itls += m.itls
        engine.close()
        tok_s = statistics.median(decode)
        step_bytes = weight_bytes(loaded.config, name)
        rows.append({
            "model": loaded.name, "weights": name, "activations": str(engine.model.dtype).removeprefix("torch."),
            "device": str(engine.device), "prompt_tokens": m.prompt_tokens,
            "output_tokens": max_tokens, "runs": runs,
            "prefill_tok_s": statistics.median(prefill), "decode_tok_s": tok_s,
            "ttft_ms": statistics.median(ttfts) * 1000,
            "tbt_p50_ms": percentile(itls, 50) * 1000, "tbt_p99_ms": percentile(itls, 99) * 1000,
            "weight_mb_per_token": step_bytes / 1e6,
            "achieved_gb_s": step_bytes * tok_s / 1e9, "read_bandwidth_gb_s": bandwidth / 1e9,
        })
    return rows, bandwidth


COLUMNS = [
    ("weights", "weights", ""), ("activations", "activations", ""), ("prompt_tokens", "prompt", "d"),
    ("prefill_tok_s", "prefill tok/s", ".0f"),
    ("decode_tok_s", "decode tok/s", ".1f"), ("ttft_ms", "TTFT ms", ".1f"), ("tbt_p50_ms", "TBT p50 ms", ".1f"),
    ("tbt_p99_ms", "TBT p99 ms", ".1f"), ("weight_mb_per_token", "MB/token", ".0f"),
    ("achieved_gb_s", "achieved GB/s", ".1f"), ("read_bandwidth_gb_s", "machine GB/s", ".1f"),
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decode", help="batch-1 prefill/decode speed, TTFT, TBT and achieved bandwidth",
                       description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None)
    p.add_argument("--weights", default="int4,int8,bf16,fp32",
                   help="weight formats to compare in one run (default: %(default)s)")
    p.add_argument("--runs", type=int, default=5, help="runs per format; figures are medians (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per run (default: %(default)s)")
    p.add_argument("--json", default="bench/out/decode.json", help="where to write the JSON (default: %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    rows, _ = run(args.model, args.weights.split(","), args.runs, args.max_tokens, args.device)
    print(table(rows, COLUMNS))
    print(f"JSON: {write_json(args.json, 'decode', rows)}")
    return 0
