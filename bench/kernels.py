"""`tradeoff bench kernels`: each Triton kernel against its PyTorch equivalent on a GPU.

Times are medians of triton.testing.do_bench (which flushes L2 before every run, so reads come from HBM).
GB/s is the bytes a kernel must move (its inputs and outputs, once) over its median time, and "% copy" puts
that next to this GPU's measured device-to-device copy bandwidth. Each case also checks the Triton result
against the PyTorch one. `--dry-run` uses tiny shapes and skips timing: on a machine without CUDA it runs
the kernels under the Triton interpreter, so the whole harness can be checked on a CPU.

Runnable without the engine's dependencies as `python -m bench.kernels` (the GPU check script does that).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.report import table, write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Case:
    kernel: str
    shape: str
    bytes: int  # moved once, at minimum
    triton: Callable[[], object]
    torch_name: str
    torch: Callable[[], object]
    in_place: tuple[Tensor, Tensor] | None = None  # what the Triton and the torch call write, for in-place kernels
    int4mm: Callable[[], Tensor] | None = None  # torch's own int4 GEMM, for the W4A16 rows


def nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def torch_int4mm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group: int) -> Callable[[], Tensor] | str:
    """torch's CUDA int4 GEMM on the same bytes, for timing only (its nibble order and zero point differ from
    ours, so its result is not compared). Returns the reason when this torch build cannot run it."""
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(qweight, 8)
        scale_zero = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm(xb, packed, group, scale_zero)
        return lambda: torch.ops.aten._weight_int4pack_mm(xb, packed, group, scale_zero)
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def build_cases(device: torch.device, dtype: torch.dtype, tiny: bool) -> tuple[list[Case], list[str]]:
    """The decode-path shapes of a 7B-class model (tiny ones for a dry run), and notes on anything left out."""
    from tradeoff_kernels import (
        kv_write_triton,
        paged_attention_triton,
        reference,
        rms_norm_triton,
        rotary_triton,
        swiglu_triton,
        w4a16_triton,
    )

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    dim, ffn, n_heads, n_kv, head_dim = (64, 96, 4, 2, 64) if tiny else (4096, 11008, 32, 8, 128)
    cases, notes = [], []
    for rows in (1, 16):
        x, res, w = r(rows, dim), r(rows, dim), r(dim)
        cases.append(Case("rms_norm+residual", f"{rows}x{dim}", nbytes(x, res, w) + 2 * nbytes(x),
                          partial(rms_norm_triton.rms_norm, x, w, 1e-5, res),
                          "add+F.rms_norm", lambda x=x, res=res, w=w: F.rms_norm(x + res, (x.shape[-1],), w, 1e-5)))
    for rows in (1, 16):
        gate_up = r(rows, 2 * ffn)
        g, u = gate_up.chunk(2, dim=-1)
        cases.append(Case("swiglu", f"{rows}x{ffn}", nbytes(gate_up) + nbytes(g),
                          partial(swiglu_triton.swiglu, g, u), "F.silu*up", lambda g=g, u=u: F.silu(g) * u))
    for rows in (1, 16):
        q, k = r(rows, n_heads, head_dim), r(rows, n_kv, head_dim)
        cos, sin = r(4096, head_dim // 2).float(), r(4096, head_dim // 2).float()
        pos = torch.arange(rows, device=device) + 100
        q_t, q_r = q.clone(), q.clone()
        cases.append(Case("rotary (in place)", f"T={rows} {n_heads}+{n_kv}x{head_dim}", 2 * nbytes(q, k),
                          partial(rotary_triton.rotary_embedding, q_t, k.clone(), pos, cos, sin),
                          "reference", partial(reference.rotary_embedding, q_r, k.clone(), pos, cos, sin), in_place=(q_t, q_r)))
    for rows in (1, 16):
        k, v, block_size, blocks = r(rows, n_kv, head_dim), r(rows, n_kv, head_dim), 16, 64
        k_cache, v_cache = r(blocks, block_size, n_kv, head_dim), r(blocks, block_size, n_kv, head_dim)
        k_cache_r = k_cache.clone()
        slots = torch.randperm(blocks * block_size, device=device)[:rows]
        cases.append(Case("kv cache write", f"T={rows} {n_kv}x{head_dim}", 2 * nbytes(k, v),
                          partial(kv_write_triton.write_kv_cache, k, v, k_cache, v_cache, slots), "index_put",
                          partial(reference.write_kv_cache, k, v, k_cache_r, v_cache.clone(), slots),
                          in_place=(k_cache, k_cache_r)))

    # (batch, context, new tokens, query heads, KV heads, head dim)
    attention = [(1, 100, 1, 4, 2, 64), (2, 77, 3, 6, 2, 64)] if tiny else [
        (1, 4096, 1, n_heads, n_kv, head_dim), (1, 4096, 5, n_heads, n_kv, head_dim), (1, 4096, 1, 9, 3, 64),
        (16, 1024, 1, n_heads, n_kv, head_dim)]
    for B, ctx, n_new, hq, hk, d in attention:
        block_size = 16
        per_seq = -(-ctx // block_size)
        k_cache, v_cache = r(B * per_seq, block_size, hk, d), r(B * per_seq, block_size, hk, d)
        table = torch.randperm(B * per_seq, device=device, dtype=torch.int32).view(B, per_seq)
        lens = torch.full((B,), ctx, device=device, dtype=torch.int32)
        q = r(B, n_new, hq, d)
        # the dense equivalent: each sequence's keys contiguous [B, Hkv, ctx, D], as a static cache holds them
        k_dense = k_cache[table.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
        v_dense = v_cache[table.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
        mask = torch.ones(n_new, ctx, dtype=torch.bool, device=device).tril(ctx - n_new)
        cases.append(Case("paged decode attention", f"B={B} ctx={ctx} new={n_new} {hq}/{hk}x{d}",
                          nbytes(k_dense, v_dense, q) + nbytes(q),
                          partial(paged_attention_triton.paged_decode_attention, q, k_cache, v_cache, table, lens),
                          "SDPA (dense KV)",
                          lambda q=q, k=k_dense, v=v_dense, m=mask: F.scaled_dot_product_attention(
                              q.transpose(1, 2), k, v, attn_mask=m, enable_gqa=True).transpose(1, 2)))

    # (rows, N, K, group)
    gemms = [(1, 64, 128, 32), (4, 72, 96, 32)] if tiny else [
        (1, 4096, 4096, 128), (1, 4096, 4096, 32), (1, 11008, 4096, 128), (1, 4096, 11008, 128), (16, 4096, 4096, 128)]
    for M, N, K, group in gemms:
        q, scales, zeros = reference.quantize_w4(r(N, K), group)
        qweight = reference.pack_w4(q)
        dense = reference.dequantize_w4(qweight, scales, zeros, group).to(dtype)
        x = r(M, K)
        int4 = torch_int4mm(x, qweight, scales, zeros, group) if device.type == "cuda" else "needs CUDA"
        if isinstance(int4, str):
            notes.append(f"torch int4 mm {M}x{N}x{K}: not run ({int4})")
            int4 = None
        cases.append(Case(f"w4a16 linear g{group}", f"{M}x{N}x{K}", nbytes(qweight, scales, zeros, x) + M * N * x.element_size(),
                          partial(w4a16_triton.w4a16_linear, x, qweight, scales, zeros, group),
                          f"F.linear {str(dtype).removeprefix('torch.')}", partial(F.linear, x, dense), int4mm=int4))
    return cases, notes


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), the practical ceiling for a memory-bound kernel."""
    import triton.testing

    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes(src) / (triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") / 1e3)


def run(cases: list[Case], timed: bool, bandwidth: float | None, on_row: Callable[[list[dict]], None]) -> list[dict]:
    import triton.testing

    def median_us(fn: Callable[[], Tensor]) -> float:
        return triton.testing.do_bench(fn, return_mode="median") * 1e3

    rows = []
    for c in cases:
        got, want = c.triton(), c.torch()
        got, want = c.in_place if c.in_place else (got[0] if isinstance(got, tuple) else got, want)
        got, want = got.float(), want.float()
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
        row = {"kernel": c.kernel, "shape": c.shape, "torch_op": c.torch_name, "max_rel_err": err, "ok": err < 2e-2}
        if timed:
            t_triton, t_torch = median_us(c.triton), median_us(c.torch)
            row |= {"triton_us": t_triton, "torch_us": t_torch, "speedup": t_torch / t_triton,
                    "gb_s": c.bytes / t_triton / 1e3, "pct_copy_bw": 100 * c.bytes / (t_triton * 1e-6) / bandwidth,
                    "int4mm_us": median_us(c.int4mm) if c.int4mm else None}
        rows.append(row)
        on_row(rows)
    return rows


COLUMNS = [("kernel", "kernel", ""), ("shape", "shape", ""), ("triton_us", "triton us", ".1f"), ("torch_op", "vs", ""),
           ("torch_us", "torch us", ".1f"), ("speedup", "speedup", ".2f"), ("int4mm_us", "int4mm us", ".1f"),
           ("gb_s", "GB/s", ".0f"), ("pct_copy_bw", "% copy", ".0f"), ("max_rel_err", "max rel err", ".1e"), ("ok", "ok", "")]


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="activation dtype (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes, no timing; without CUDA it runs under the Triton interpreter")
    p.add_argument("--json", default="bench/out/kernels.json", help="where to write the JSON (default: %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("bench kernels: needs a CUDA GPU (--dry-run checks the harness on a CPU)", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before build_cases imports (and so defines) the kernels
        if dtype == torch.bfloat16:
            print("bench kernels: the Triton interpreter mishandles bf16; the dry run uses fp32")
            dtype = torch.float32
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    cases, notes = build_cases(device, dtype, tiny=args.dry_run)
    timed = not args.dry_run
    bandwidth = copy_bandwidth(device) if timed else None
    if not timed:
        print(f"bench kernels: dry run on {device.type}: correctness of {len(cases)} cases only, timing skipped")
    extra = {"dtype": str(dtype).removeprefix("torch."), "device": str(device), "dry_run": args.dry_run,
             "copy_bandwidth_gb_s": bandwidth and bandwidth / 1e9, "notes": notes}
    rows = run(cases, timed, bandwidth, lambda rows: write_json(args.json, "kernels", rows, **extra))  # saved as it goes
    for note in notes:
        print(note)
    if bandwidth:
        print(f"device-to-device copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    print(table(rows, COLUMNS))
    print(f"JSON: {args.json}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.kernels")
    configure(parser)
    sys.exit(main(parser.parse_args()))
