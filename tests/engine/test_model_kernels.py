"""The fused path (engine/model.py with `kernels`, the decode attention of engine/cuda_graph.py's KernelAttention, int4
as W4A16Linear): the Triton kernels themselves, forced onto CPU tensors under Triton's interpreter (tests/conftest.py),
run a whole tiny model and must give the plain PyTorch path's logits in prefill, decode and a k + 1 verification (in
fp16: no further from fp32 than plain fp16 ops), with full and int4 weights, and in batched mode's steps over the paged
cache. On a GPU, bench/gpu.sh checks the same path natively."""

import pytest
import torch

import tradeoff_kernels
from engine.cuda_graph import BatchedDecodeGraphs, DecodeGraphs, KernelAttention
from engine.kv_cache import StaticKVCache
from engine.model import Transformer
from engine.quant import W4A16Linear, quantize
from tests.engine.test_cuda_graph import run_batched_script

CACHE_LEN = 160
PROMPT_LEN = 37  # past the W4A16 kernel's 16 rows (so prefill takes the dense weights), not a multiple of anything
# (tokens to run, length to truncate back to afterwards or None): decode, a k + 1 = 4 verification with two drafts
# rejected, one of 3 rows (padded to 4), decode again
SCRIPT = [([5], None), ([3, 9, 11, 2], PROMPT_LEN + 3), ([8, 1, 4], None), ([7], None)]
TOLERANCE = 1e-4  # fp32: summation order, relative to the reference logits' RMS


def model_from(tiny_loaded, dtype: torch.dtype, ops: tradeoff_kernels.Kernels | None, weights=None) -> Transformer:
    model = Transformer(tiny_loaded.config, dtype=dtype, kernels=ops)
    model.load_canonical(weights or tiny_loaded.weights)
    return model


def on_int4_grid(tiny_loaded) -> dict[str, torch.Tensor]:
    """The tiny model's weights with every projection already int4 (quantized and dequantized once), so the dense
    weights of prompt chunks and the int4 codes of decode steps are the same model."""
    grid = dict(tiny_loaded.weights)
    for name, w in grid.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            q, scales, zeros = tradeoff_kernels.quantize_w4(w, 32)
            grid[name] = tradeoff_kernels.dequantize_w4(tradeoff_kernels.pack_w4(q), scales, zeros, 32)
    return grid


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and not got.isnan().any()
    torch.testing.assert_close(got.double(), want.double(), rtol=TOLERANCE, atol=TOLERANCE * want.pow(2).mean().sqrt().item())


def error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max, RMS) of the difference."""
    diff = got.double() - want.double()
    return diff.abs().max().item(), diff.pow(2).mean().sqrt().item()


def run(model: Transformer, prompt: list[int]) -> list[torch.Tensor]:
    """Prefill `prompt` eagerly, then run SCRIPT as the latency runner's decode steps do (DecodeGraphs, not captured)."""
    cache = StaticKVCache(model.cfg, CACHE_LEN, model.dtype)
    logits = [model.logits(model(torch.tensor(prompt), cache.extend(prompt), cache))]
    graphs = DecodeGraphs(model, cache, max_rows=4, capture=False)
    for ids, keep in SCRIPT:
        step_logits, best = graphs.run(ids)
        assert torch.equal(best, step_logits.argmax(dim=-1))
        logits.append(step_logits)
        if keep is not None:
            cache.truncate(keep)
    return logits


@pytest.fixture(scope="module")
def triton_ops() -> tradeoff_kernels.Kernels:
    return tradeoff_kernels.triton_kernels()


@pytest.fixture(scope="module")
def prompt(tiny_loaded) -> list[int]:
    return torch.randint(0, tiny_loaded.config.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(3)).tolist()


def test_the_triton_kernel_path_gives_the_plain_paths_logits(tiny_loaded, triton_ops, prompt):
    want = run(model_from(tiny_loaded, torch.float32, None), prompt)
    got = run(model_from(tiny_loaded, torch.float32, triton_ops), prompt)
    assert len(got) == len(want) == 1 + len(SCRIPT)
    for g, w in zip(got, want):
        assert_close(g, w)


def test_in_fp16_the_kernel_path_is_as_close_to_fp32_as_the_plain_fp16_path(tiny_loaded, triton_ops, prompt):
    """fp16 rounds every activation: the kernels' error against fp32 must stay that of plain fp16 ops (measured: within
    -40%..+5% of it, step by step), where a wrong element would be off by the size of a logit."""
    want = run(model_from(tiny_loaded, torch.float32, None), prompt)
    plain = run(model_from(tiny_loaded, torch.float16, None), prompt)
    fused = run(model_from(tiny_loaded, torch.float16, triton_ops), prompt)
    for f, p, w in zip(fused, plain, want):
        assert not f.isnan().any()
        (f_max, f_rms), (p_max, p_rms) = error(f, w), error(p, w)
        assert f_max <= 1.5 * p_max and f_rms <= 1.5 * p_rms, (f_max, p_max, f_rms, p_rms)


def test_batched_steps_on_the_kernel_path_give_the_plain_paths_logits(tiny_loaded, triton_ops):
    """Batched mode's model takes the same ops: prompt chunks and decode steps over the paged cache, eager and from
    the graph-safe step, against the plain path's."""
    plain, fused = model_from(tiny_loaded, torch.float32, None), model_from(tiny_loaded, torch.float32, triton_ops)
    want, _, _ = run_batched_script(plain, lambda cache: BatchedDecodeGraphs(plain, cache, 3, 32, capture=False))
    eager, static, _ = run_batched_script(fused, lambda cache: BatchedDecodeGraphs(fused, cache, 3, 32, capture=False))
    for w, e, g in zip(want, eager, static, strict=True):
        assert_close(e, w)
        assert_close(g, w)


def test_decode_steps_attend_through_the_kernels(tiny_loaded, triton_ops, prompt, monkeypatch):
    """The decode steps really take the kernel attention (not the plain one), and the plain path never calls a kernel."""
    calls = []
    for name in ("paged_decode_attention", "write_kv_cache", "rotary_embedding", "rms_norm", "swiglu"):  # the dispatchers the
        monkeypatch.setattr(tradeoff_kernels, name, lambda *a, name=name: calls.append(name))  # plain path could reach
    model = model_from(tiny_loaded, torch.float32, triton_ops)
    steps = {}
    original = KernelAttention.attend

    def counting(self, layer, q, k, v):
        steps[q.shape[0]] = steps.get(q.shape[0], 0) + 1
        return original(self, layer, q, k, v)

    monkeypatch.setattr(KernelAttention, "attend", counting)
    run(model, prompt)
    layers = tiny_loaded.config.n_layers
    assert steps == {1: 2 * layers, 4: 2 * layers}  # two decode steps, a verification and a padded one of 4 rows
    run(model_from(tiny_loaded, torch.float32, None), prompt)
    assert calls == []


def test_int4_on_the_kernel_path_runs_the_w4a16_kernel_on_the_same_codes(tiny_loaded, triton_ops, prompt):
    grid = on_int4_grid(tiny_loaded)
    want = run(model_from(tiny_loaded, torch.float32, None, grid), prompt)
    fused = quantize(model_from(tiny_loaded, torch.float32, triton_ops, grid), "int4")
    layers = [layer for block in fused.layers for layer in (block.qkv, block.o, block.gate_up, block.down)]
    assert all(isinstance(layer, W4A16Linear) and layer.w4a16 is triton_ops.w4a16_linear for layer in layers)
    assert fused.head_q is None  # the head stays dense on the W4A16 path
    for layer in layers:  # the codes stand for the very weights the dense prompt path uses
        torch.testing.assert_close(tradeoff_kernels.dequantize_w4(layer.qweight, layer.scales, layer.zeros, 32), layer.dense)
    for g, w in zip(run(fused, prompt), want):
        assert_close(g, w)
