"""`tradeoff bench decode`: batch-1 prefill and decode speed (no speculation) per weight format, TTFT, TBT,
and achieved memory bandwidth; on CUDA, with and without CUDA graphs.

On a CPU the first row is the engine's own choice for this machine (engine/setup.py: measured once and cached),
then one row per decode format (the native int4 kernel, torch's int4 kernel, int8, bf16, fp32 weights), each with
the chosen prefill path where it can use it; the JSON names the CPU each row came from.

Achieved bandwidth = bytes of weights read per decode step x decode steps/s. It is printed next to the
machine's measured read bandwidth (a large tensor sum), the ceiling a memory-bound decode can reach, and as
MBU (memory-bandwidth utilisation): achieved bandwidth over the measured device-to-device copy bandwidth.
On CUDA each format runs eagerly and from CUDA graphs in the same run, and graph rows show their speedup.
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
from engine.quant import W4A16_BYTES
from engine.sampling import SamplingParams
from engine.setup import resolve

# decode format -> (bytes per layer weight, bytes per head weight) a decode step reads.
# native: Q4_1 groups (half a byte, fp32 d and m per 32) and a Q8_0 head (a byte, an fp32 scale per 32);
# torch int4: half a byte plus a bf16 scale and zero per 32, and an int8 head (engine/quant.py); int8: one byte plus
# a scale per row (negligible); w4a16 (int4 on CUDA): half a byte plus an fp16 scale and zero per 32, a dense head.
BYTES = {"native": (0.5 + 8 / 32, 1 + 4 / 32), "int4": (0.5 + 4 / 32, 1.0), "int8": (1.0, 1.0),
         "bf16": (2.0, 2.0), "fp32": (4.0, 4.0), "w4a16": (W4A16_BYTES, 2.0)}
CPU_FORMATS = ("native", "int4", "int8", "bf16", "fp32")
# on CUDA, with and without graphs: row name -> (dtype, quant, BYTES key)
CUDA_FORMATS = {"bf16": (torch.bfloat16, "none", "bf16"), "fp32": (torch.float32, "none", "fp32"),
                "int4": (torch.bfloat16, "int4", "w4a16")}


def weight_bytes(cfg, fmt: str) -> float:
    """Bytes of weights one decode step reads."""
    return cfg.weight_bytes(*BYTES[fmt])
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


def copy_bandwidth(device: torch.device, mib: int = 512, repeats: int = 7) -> float:
    """Median bytes/s (read + write) of copying a large tensor on the device, the denominator of MBU. On CUDA it is
    timed with CUDA events, so only the copy is measured."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first-touch page faults on a CPU, lazy initialisation on a GPU
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times)


def measure(engine: Engine, max_tokens: int, runs: int) -> dict:
    """Median prefill and decode speed, TTFT and TBT of one engine over `runs` cold-cache runs."""
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
    return {"prompt_tokens": m.prompt_tokens, "output_tokens": max_tokens, "runs": runs,
            "prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "ttft_ms": statistics.median(ttfts) * 1000,
            "tbt_p50_ms": percentile(itls, 50) * 1000, "tbt_p99_ms": percentile(itls, 99) * 1000}


def engines(loaded, formats: list[str], device: torch.device, graph_settings: tuple[bool, ...]):
    """(row name, format, CUDA graphs, engine keyword arguments) of each row to measure."""
    if device.type == "cuda":
        return [(f, CUDA_FORMATS[f][2], graphs, {"dtype": CUDA_FORMATS[f][0], "quant": CUDA_FORMATS[f][1],
                                                  "cuda_path": "graphs" if graphs else "eager"})
                for f in formats for graphs in graph_settings]
    chosen = resolve(loaded)
    rows = [("chosen", chosen.decode, False, {"setup": chosen})]
    return rows + [(f, f, False, {"setup": chosen.with_decode(f)}) for f in formats if f != chosen.decode]


def run(model: str, formats: list[str], runs: int, max_tokens: int, device: str | None,
        graph_settings: tuple[bool, ...]) -> tuple[list[dict], float]:
    """One row per weight format (and CUDA-graph setting on CUDA; on a CPU, the engine's own choice first)."""
    loaded = load(model)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    bandwidth = copy_bw = None
    eager: dict[str, float] = {}
    for name, fmt, graphs, kwargs in engines(loaded, formats, dev, graph_settings):
        step_bytes = weight_bytes(loaded.config, fmt)
        engine = Engine(loaded, device=str(dev), spec="off", **kwargs)
        if bandwidth is None:
            bandwidth, copy_bw = read_bandwidth(engine.device), copy_bandwidth(engine.device)
        try:
            row = measure(engine, max_tokens, runs)
        finally:
            engine.close()
        tok_s = row["decode_tok_s"]
        rows.append({
            "model": loaded.name, "weights": name, "setup": engine.setup_summary(), "device": str(engine.device),
            "graphs": ("on" if graphs else "off") if engine.device.type == "cuda" else "n/a",
            **row, "weight_mb_per_token": step_bytes / 1e6,
            "achieved_gb_s": step_bytes * tok_s / 1e9, "read_bandwidth_gb_s": bandwidth / 1e9,
            "copy_bandwidth_gb_s": copy_bw / 1e9, "mbu_pct": 100 * step_bytes * tok_s / copy_bw,
            "vs_eager": tok_s / eager[fmt] if graphs and fmt in eager else None,
        })
        if not graphs:
            eager[fmt] = tok_s
    return rows, bandwidth


COLUMNS = [
    ("weights", "weights", ""), ("graphs", "CUDA graphs", ""),
    ("prompt_tokens", "prompt", "d"),
    ("prefill_tok_s", "prefill tok/s", ".0f"),
    ("decode_tok_s", "decode tok/s", ".1f"), ("ttft_ms", "TTFT ms", ".1f"), ("tbt_p50_ms", "TBT p50 ms", ".1f"),
    ("tbt_p99_ms", "TBT p99 ms", ".1f"), ("weight_mb_per_token", "MB/token", ".0f"),
    ("achieved_gb_s", "achieved GB/s", ".1f"), ("read_bandwidth_gb_s", "machine GB/s", ".1f"),
    ("mbu_pct", "MBU %", ".0f"), ("vs_eager", "vs eager", ".2f"),
]
GRAPH_SETTINGS = {"on": (True,), "off": (False,), "both": (False, True)}


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None)
    p.add_argument("--weights", default=None,
                   help=f"decode formats to compare in one run (default: {','.join(CPU_FORMATS)} on a CPU, "
                        f"{','.join(CUDA_FORMATS)} on CUDA)")
    p.add_argument("--runs", type=int, default=5, help="runs per format; figures are medians (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per run (default: %(default)s)")
    p.add_argument("--cuda-graphs", choices=sorted(GRAPH_SETTINGS), default=None,
                   help="latency mode's CUDA graphs over the fused Triton kernels (on) or plain eager ops (off), or both "
                        "(default: both on CUDA, off elsewhere, where they do not apply)")
    p.add_argument("--json", default="bench/out/decode.json", help="where to write the JSON (default: %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    graphs = GRAPH_SETTINGS[args.cuda_graphs or ("both" if cuda else "off")]
    formats = args.weights.split(",") if args.weights else list(CUDA_FORMATS if cuda else CPU_FORMATS)
    rows, _ = run(args.model, formats, args.runs, args.max_tokens, args.device, graphs)
    print(table(rows, COLUMNS))
    if not cuda:
        print(f"chosen on this CPU: {rows[0]['setup']}")
    print(f"JSON: {write_json(args.json, 'decode', rows)}")
    return 0
