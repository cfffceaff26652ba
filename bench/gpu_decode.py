"""`python -m bench.gpu_decode`: the batch-1 GPU engine on model *shapes* with random weights.

The GPU machine cannot receive the default model (its GGUF is 98 MB; the working tree that travels is 64 MiB), so
this times the shapes of SmolLM2-135M (the default model) and Llama-3.2-1B with random weights, through the engine's
own modules (engine/model.py, engine/cuda_graph.py, engine/quant.py), which import with torch alone. In one run:

1. correctness (when `graphs` is among the paths): a tiny random model on the device, fused Triton path, against the
   plain path on the CPU in fp32, over a prefill, decode steps and a k + 1 = 4 verification (full and int4 weights);
2. latency mode's decode step per shape, weight format (bf16; int4 = the Triton W4A16 kernel) and path: `eager`
   (plain ops), `graphs` (fused Triton kernels replayed from our CUDA graphs: the engine's default on CUDA),
   `compile` and `max-autotune` (plain ops through torch.compile, gpt-fast's way). tok/s, and MBU: the bytes a step
   must read (weights and KV) per second over the measured device-to-device copy bandwidth;
3. the cost of verification: a step of 4 and of 8 rows against 1 row (graphs): speculation gains where a drafter's
   tokens per target forward beat that ratio;
4. batched mode's decode-only step at 1-64 sequences (graphs over the paged cache): step time, total and per-user tok/s.

Each row is written to the JSON as soon as it is measured, so a run cut short by its time limit keeps what it
measured. `--dry-run`: a tiny shape on the CPU with the kernels under Triton's interpreter and a few steps, no
compile: the plumbing only, no figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

import tradeoff_kernels
from bench.report import table, write_json
from engine.cuda_graph import BatchedDecodeGraphs, DecodeGraphs
from engine.kv_cache import PagedKVCache, StaticKVCache
from engine.model import ModelConfig, Transformer
from engine.quant import W4A16_BYTES, quantize

SHAPES = {
    "smollm2-135m": ModelConfig(arch="llama", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                head_dim=64, ffn_dim=1536, rope_theta=1e5, norm_eps=1e-5, max_seq_len=2048,
                                tie_embeddings=True, qkv_bias=False),
    "llama-3.2-1b": ModelConfig(arch="llama", vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                                head_dim=64, ffn_dim=8192, rope_theta=5e5, norm_eps=1e-5, max_seq_len=2048,
                                tie_embeddings=True, qkv_bias=False),
}
TINY = ModelConfig(arch="llama", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                   rope_theta=1e4, norm_eps=1e-5, max_seq_len=256, tie_embeddings=True, qkv_bias=False)
PATHS = ("eager", "graphs", "compile", "max-autotune")
COMPILE_MODES = {"compile": "reduce-overhead", "max-autotune": "max-autotune"}
CONTEXT = 128  # tokens in the cache when decode steps are timed


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, fused: bool, weights: str,
                 seed: int = 0) -> Transformer:
    """Random weights (std 0.02, norms 1) in the engine's model; fused: the Triton kernels (imported on this first
    call, after main has set TRITON_INTERPRET on a CPU); weights: bf16 | int4."""
    model = Transformer(cfg, dtype=dtype, device=device, kernels=tradeoff_kernels.triton_kernels() if fused else None)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.ones_like(p) if p.dim() == 1 else (torch.randn(p.shape, generator=g) * 0.02).to(p))
    return quantize(model, "int4") if weights == "int4" else model


def step_bytes(cfg: ModelConfig, weights: str, context: int, act_bytes: int = 2) -> float:
    """What one batch-1 decode step must read: its weights (the head dense, as the W4A16 path keeps it) and the KV."""
    kv = 2 * cfg.n_layers * context * cfg.kv_size * act_bytes
    return cfg.weight_bytes(W4A16_BYTES if weights == "int4" else act_bytes, act_bytes) + kv


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def latency_steps(model: Transformer, path: str, rows: int = 1) -> Callable[[], None]:
    """A prefilled cache and a call that runs one decode step of `rows` tokens and reads its tokens back (as the
    engine does), then rolls the cache back so every step sees the same context."""
    cfg = model.cfg
    cache = StaticKVCache(cfg, cfg.max_seq_len, model.dtype, model.device)
    prompt = torch.randint(0, cfg.vocab_size, (CONTEXT,), generator=torch.Generator().manual_seed(1)).tolist()
    model(torch.tensor(prompt, device=model.device), cache.extend(prompt), cache)
    ids = prompt[:rows]
    if path == "eager":
        def step() -> None:
            hidden = model(torch.tensor(ids, device=model.device), cache.extend(ids), cache)
            model.logits(hidden).argmax(dim=-1).tolist()
            cache.truncate(CONTEXT)
        return step
    graphs = DecodeGraphs(model, cache, max_rows=rows, capture=model.device.type == "cuda",
                          compile_mode=COMPILE_MODES.get(path))

    def replay() -> None:
        graphs.run(ids)[1].tolist()
        cache.truncate(CONTEXT)
    return replay


def median_seconds(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):  # captures and compiles happen here
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def check_correctness(device: torch.device, dtype: torch.dtype) -> list[dict]:
    """The fused path on `device` against the plain path on the CPU in fp32: worst error over the logits of a prefill,
    two decode steps and a 4-row verification, relative to the reference's RMS, and greedy agreement."""
    rows = []
    for weights in ("bf16", "int4"):
        ref = random_model(TINY, torch.float32, torch.device("cpu"), fused=False, weights="bf16", seed=2)
        fused = random_model(TINY, dtype, device, fused=True, weights=weights, seed=2)
        if weights == "int4":  # the reference holds the very weights the int4 codes stand for
            with torch.no_grad():
                for rb, fb in zip(ref.layers, fused.layers):
                    for name in ("qkv", "o", "gate_up", "down"):
                        q = getattr(fb, name)
                        getattr(rb, name).weight.copy_(tradeoff_kernels.dequantize_w4(q.qweight, q.scales, q.zeros, 32).cpu())
                        q.dense.copy_(getattr(rb, name).weight)  # and the dense prompt path the same values
        want, got = script_logits(ref), script_logits(fused)
        err = max(((g.float().cpu() - w).abs().max() / w.pow(2).mean().sqrt()).item() for g, w in zip(got, want))
        agree = statistics.mean((g.float().cpu().argmax(-1) == w.argmax(-1)).float().mean().item() for g, w in zip(got, want))
        rows.append({"check": f"tiny model, fused {weights} on {device.type} vs plain fp32 on the CPU", "shape": "tiny",
                     "weights": weights, "path": "graphs",
                     "max_err_vs_rms": err, "greedy_agreement": agree,
                     "ok": err < (1e-3 if dtype == torch.float32 else 0.1) and agree >= 0.9})
    return rows


def script_logits(model: Transformer) -> list[torch.Tensor]:
    """Logits of a 21-token prefill, then decode steps and a 4-row verification through DecodeGraphs (not captured)."""
    cache = StaticKVCache(model.cfg, model.cfg.max_seq_len, model.dtype, model.device)
    prompt = torch.randint(0, model.cfg.vocab_size, (21,), generator=torch.Generator().manual_seed(5)).tolist()
    out = [model.logits(model(torch.tensor(prompt, device=model.device), cache.extend(prompt), cache))]
    graphs = DecodeGraphs(model, cache, max_rows=4, capture=False)
    for ids in ([7], [3, 9, 11, 2], [5]):
        out.append(graphs.run(ids)[0])
    return out


def batched_step(model: Transformer, batch: int, context: int) -> Callable[[], None]:
    """One decode-only step of `batch` sequences of `context` tokens over the paged cache, from graphs on CUDA."""
    block = 16
    blocks_each = -(-context // block)
    cache = PagedKVCache(model.cfg, batch * blocks_each + 1, block, model.dtype, model.device)
    graphs = BatchedDecodeGraphs(model, cache, batch, context, capture=model.device.type == "cuda")
    tables = [list(range(1 + i * blocks_each, 1 + (i + 1) * blocks_each)) for i in range(batch)]
    tokens = [i % model.cfg.vocab_size for i in range(batch)]
    return lambda: graphs.run(tokens, [context] * batch, tables)[1].tolist()


def run(args: argparse.Namespace, emit: Callable[[list[dict]], None]) -> list[dict]:
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter mishandles bf16
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        emit(rows)
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    paths = [p for p in args.paths.split(",") if not (args.dry_run and p in COMPILE_MODES)]
    if "graphs" in paths:  # the fused path is what the correctness check is about
        for row in check_correctness(device, torch.float32 if not cuda else dtype):
            add({"kind": "correctness", **row})
    copy_bw = None
    if cuda:
        from bench.kernels import copy_bandwidth  # noqa: PLC0415  (imports triton.testing)

        copy_bw = copy_bandwidth(device)
        add({"kind": "copy bandwidth", "gb_s": copy_bw / 1e9})
    shapes = {"tiny": TINY} if args.dry_run else {name: SHAPES[name] for name in args.shapes.split(",")}
    warmup, steps = (1, 2) if args.dry_run else (3, args.steps)
    for name, cfg in shapes.items():
        for weights in args.weights.split(","):
            eager = None
            for path in paths:
                row = {"kind": "decode", "shape": name, "weights": weights, "path": path}
                try:
                    model = random_model(cfg, dtype, device, fused=path == "graphs", weights=weights)
                    seconds = median_seconds(latency_steps(model, path), device, warmup, steps)
                except Exception as e:  # a path that fails here (a compile error) is reported, the others still run
                    add({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"})
                    continue
                row |= {"step_ms": seconds * 1000, "tok_s": 1 / seconds}
                if copy_bw:
                    row["mbu_pct"] = 100 * step_bytes(cfg, weights, CONTEXT) / seconds / copy_bw
                eager = row["tok_s"] if path == "eager" else eager
                if eager and path != "eager":
                    row["vs_eager"] = row["tok_s"] / eager
                add(row)
                if path == "graphs" and weights == args.weights.split(",")[0]:
                    for n in (4, 8):  # the price of verifying drafts
                        verify = median_seconds(latency_steps(model, path, rows=n), device, warmup, steps)
                        add({"kind": "verify cost", "shape": name, "weights": weights, "path": path, "rows": n,
                             "step_ms": verify * 1000, "vs_one_row": verify / seconds})
        model = random_model(cfg, dtype, device, fused=True, weights="bf16")
        for batch in ((1, 2) if args.dry_run else (1, 4, 16, 64)):
            seconds = median_seconds(batched_step(model, batch, 256 if cuda else 32), device, warmup, steps)
            add({"kind": "batched decode", "shape": name, "weights": "bf16", "path": "graphs", "batch": batch,
                 "step_ms": seconds * 1000, "tok_s": batch / seconds, "tok_s_per_user": 1 / seconds})
    return rows


COLUMNS = [("kind", "kind", ""), ("shape", "shape", ""), ("weights", "weights", ""), ("path", "path", ""),
           ("rows", "rows", "d"), ("batch", "batch", "d"), ("step_ms", "step ms", ".3f"), ("tok_s", "tok/s", ".0f"),
           ("tok_s_per_user", "tok/s/user", ".0f"), ("mbu_pct", "MBU %", ".0f"), ("vs_eager", "vs eager", ".2f"),
           ("vs_one_row", "vs 1 row", ".2f"), ("max_err_vs_rms", "err/RMS", ".1e"), ("greedy_agreement", "greedy", ".3f"),
           ("gb_s", "GB/s", ".0f"), ("error", "error", "")]


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--shapes", default=",".join(SHAPES), help="model shapes to time (default: %(default)s)")
    p.add_argument("--weights", default="bf16,int4", help="weight formats (default: %(default)s)")
    p.add_argument("--paths", default=",".join(PATHS), help="decode paths, in the order run (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="timed steps per row; figures are medians (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="a tiny shape on the CPU under Triton's interpreter: plumbing")
    p.add_argument("--json", default="bench/out/gpu_decode.json", help="where to write the JSON (default: %(default)s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_decode")
    configure(p)
    args = p.parse_args(argv)
    if args.dry_run or not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernel is defined
    emit = partial(write_json, args.json, "gpu_decode", dry_run=args.dry_run)
    rows = run(args, emit)
    print(table(rows, [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]))
    print(f"JSON: {emit(rows)}")
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
