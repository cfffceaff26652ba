"""One Llama-family transformer (Llama, Mistral, Qwen2, SmolLM) for inference.

Weights use the Hugging Face layout (Q/K rows in rotate-half order); the GGUF loader un-permutes
llama.cpp's interleaved rows into it, so there is exactly one RoPE layout. Tokens are a flat 1-D
sequence with explicit positions, and attention is delegated to a KV-cache object, so the same
module serves batch-1 decode, prefill and speculative verification.

Two ways through a layer, the same maths: plain PyTorch ops, shaped for a CPU (RoPE as one batched matmul,
since per-op overhead dominates there), and, when the model is given `kernels` (the Triton kernels on CUDA),
the fused path: RMSNorm fused with the residual add, rotary applied in place on the q/k views of the fused QKV
output, and SwiGLU in one kernel, as vLLM and gpt-fast's kernels do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tradeoff_kernels import Kernels

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float
    norm_eps: float
    max_seq_len: int
    tie_embeddings: bool
    qkv_bias: bool
    # Llama 3.x "llama3" rope scaling: (factor, low_freq_factor, high_freq_factor, original_max_pos).
    rope_scaling: tuple[float, float, float, int] | None = None

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def weight_bytes(self, bytes_per_param: float, head_bytes_per_param: float | None = None) -> float:
        """Bytes of weights read per decode step (embedding row lookups excluded, head included); the head at
        `head_bytes_per_param` where it is stored in another format than the layers."""
        per_layer = self.dim * (self.q_size + 2 * self.kv_size) + self.q_size * self.dim + 3 * self.dim * self.ffn_dim
        head = bytes_per_param if head_bytes_per_param is None else head_bytes_per_param
        return self.n_layers * per_layer * bytes_per_param + self.vocab_size * self.dim * head


class Attention(Protocol):
    """What the model needs from a KV cache: store k/v for the new tokens, attend over the past."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: [T, n_heads, D], k/v: [T, n_kv_heads, D] (already rotated) -> [T, n_heads * D]."""
        ...


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    if cfg.rope_scaling is not None:
        factor, low_ff, high_ff, orig_max = cfg.rope_scaling
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = orig_max / low_ff, orig_max / high_ff
        smooth = (orig_max / wavelen - low_ff) / (high_ff - low_ff)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where((wavelen <= low_wavelen) & (wavelen >= high_wavelen), mid, scaled)
    return inv_freq


class Transformer(nn.Module):
    """Decoder-only transformer. Fused QKV and gate/up projections: fewer, larger GEMVs per layer."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 act_dtype: torch.dtype | None = None, kernels: Kernels | None = None):
        """dtype: the weights'. act_dtype: the residual stream's, norms' and KV cache's (default: dtype).
        kernels: run the fused path with these ops (default: plain PyTorch ops).

        On a CPU without native bf16, bf16 weights with fp32 activations is the fast mix: the matmuls read
        half the bytes, and the norms, RoPE and attention run in fp32 kernels instead of upcasting inside each op.
        """
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels
        act_dtype = act_dtype or dtype
        kw = {"dtype": dtype, "device": device}
        act_kw = {"dtype": act_dtype, "device": device}
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.dim, **kw), requires_grad=False)
        self.layers = nn.ModuleList(Block(cfg, kw, act_kw) for _ in range(cfg.n_layers))
        self.norm = nn.Parameter(torch.ones(cfg.dim, **act_kw), requires_grad=False)
        self.lm_head = (self.embed if cfg.tie_embeddings
                        else nn.Parameter(torch.empty(cfg.vocab_size, cfg.dim, **kw), requires_grad=False))
        self.head_q: nn.Module | None = None  # a quantized copy of the head, set by engine.quant
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), rope_inv_freq(cfg))
        angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: both halves share a frequency
        self.register_buffer("rope_cos", angles.cos().to(**act_kw), persistent=False)
        self.register_buffer("rope_sin", angles.sin().to(**act_kw), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations and of the KV cache."""
        return self.norm.dtype

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def forward(self, tokens: Tensor, positions: Tensor, cache: Attention) -> Tensor:
        """tokens, positions: [T] -> final hidden states [T, dim] (call `logits` on the rows you need)."""
        x = F.embedding(tokens, self.embed).to(self.dtype)
        if self.kernels is not None:
            return self._forward_fused(x, positions, cache, self.kernels)
        rope = rotation_matrices(self.rope_cos[positions], self.rope_sin[positions])
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache, i)
        return F.rms_norm(x, (self.cfg.dim,), self.norm, self.cfg.norm_eps)

    def _forward_fused(self, x: Tensor, positions: Tensor, cache: Attention, ops: Kernels) -> Tensor:
        """The fused path: each norm also adds the previous sublayer's output into the residual stream."""
        eps = self.cfg.norm_eps
        residual = x
        h = ops.rms_norm(x, self.layers[0].attn_norm, eps)
        for i, layer in enumerate(self.layers):
            h, residual = layer.forward_fused(h, residual, positions, self.rope_cos, self.rope_sin, cache, i, ops)
            if i + 1 < len(self.layers):
                h, residual = ops.rms_norm(h, self.layers[i + 1].attn_norm, eps, residual)
        return ops.rms_norm(h, self.norm, eps, residual)[0]

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:
        if self.head_q is not None:
            return self.head_q(hidden).float()
        return F.linear(hidden.to(self.lm_head.dtype), self.lm_head).float()

    def load_canonical(self, weights: dict[str, Tensor]) -> None:
        """Copy weights named in the canonical (Hugging Face) scheme into the fused parameters."""
        cfg = self.cfg

        def take(name: str) -> Tensor:
            if name not in weights:
                raise KeyError(f"missing weight {name!r}")
            return weights[name]

        with torch.no_grad():
            self.embed.copy_(take("model.embed_tokens.weight"))
            self.norm.copy_(take("model.norm.weight"))
            if not cfg.tie_embeddings:
                self.lm_head.copy_(take("lm_head.weight"))
            for i, blk in enumerate(self.layers):
                p = f"model.layers.{i}."
                blk.attn_norm.copy_(take(p + "input_layernorm.weight"))
                blk.ffn_norm.copy_(take(p + "post_attention_layernorm.weight"))
                blk.qkv.weight.copy_(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]))
                if cfg.qkv_bias:
                    blk.qkv.bias.copy_(torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
                blk.o.weight.copy_(take(p + "self_attn.o_proj.weight"))
                blk.gate_up.weight.copy_(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]))
                blk.down.weight.copy_(take(p + "mlp.down_proj.weight"))


def rotation_matrices(cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE as one [D, D] matrix per position: rows @ R == x * cos + rotate_half(x) * sin.

    Built once per forward and shared by every layer, so each layer rotates q and k in one batched matmul
    instead of half a dozen elementwise ops (per-op overhead dominates batch-1 decode on a CPU).
    """
    T, D = cos.shape
    half = D // 2
    lo = torch.arange(half, device=cos.device)
    diag = torch.arange(D, device=cos.device)  # on the device: a CUDA graph cannot capture a copy from the host
    R = torch.zeros(T, D, D, dtype=cos.dtype, device=cos.device)
    R[:, diag, diag] = cos
    R[:, lo + half, lo] = -sin[:, :half]  # out[j] (j < half) takes -x[j + half] * sin[j]
    R[:, lo, lo + half] = sin[:, half:]  # out[j + half] takes x[j] * sin[j + half]
    return R


class Linear(nn.Module):
    """y = x W^T (+ b). Weight-only quantized variants in engine/quant.py replace it with the same call."""

    def __init__(self, in_features: int, out_features: int, bias: bool, kw: dict):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kw: dict, act_kw: dict):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = nn.Parameter(torch.ones(cfg.dim, **act_kw), requires_grad=False)
        self.qkv = Linear(cfg.dim, cfg.q_size + 2 * cfg.kv_size, cfg.qkv_bias, kw)
        self.o = Linear(cfg.q_size, cfg.dim, False, kw)
        self.ffn_norm = nn.Parameter(torch.ones(cfg.dim, **act_kw), requires_grad=False)
        self.gate_up = Linear(cfg.dim, 2 * cfg.ffn_dim, False, kw)
        self.down = Linear(cfg.ffn_dim, cfg.dim, False, kw)

    def forward(self, x: Tensor, rope: Tensor, cache: Attention, layer: int) -> Tensor:
        cfg = self.cfg
        T = x.shape[0]
        qkv = self.qkv(F.rms_norm(x, (cfg.dim,), self.attn_norm, cfg.norm_eps)).to(x.dtype)
        # q and k heads are rotated together: [T, H + KV, D] @ [T, D, D]
        qk = torch.matmul(qkv[:, : cfg.q_size + cfg.kv_size].view(T, cfg.n_heads + cfg.n_kv_heads, cfg.head_dim), rope)
        q, k = qk.split([cfg.n_heads, cfg.n_kv_heads], dim=1)
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(T, cfg.n_kv_heads, cfg.head_dim)
        x = x + self.o(cache.attend(layer, q, k, v))
        gate, up = self.gate_up(F.rms_norm(x, (cfg.dim,), self.ffn_norm, cfg.norm_eps)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)

    def forward_fused(self, h: Tensor, residual: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, cache: Attention,
                      layer: int, ops: Kernels) -> tuple[Tensor, Tensor]:
        """h: this layer's normed input; residual: the stream before it -> (the MLP's output, the stream before it):
        the next norm adds the two."""
        cfg = self.cfg
        T = h.shape[0]
        qkv = self.qkv(h).to(h.dtype)
        q = qkv[:, : cfg.q_size].view(T, cfg.n_heads, cfg.head_dim)
        k = qkv[:, cfg.q_size : cfg.q_size + cfg.kv_size].view(T, cfg.n_kv_heads, cfg.head_dim)
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(T, cfg.n_kv_heads, cfg.head_dim)
        ops.rotary_embedding(q, k, positions, cos, sin)
        h, residual = ops.rms_norm(self.o(cache.attend(layer, q, k, v)).to(h.dtype), self.ffn_norm, cfg.norm_eps, residual)
        gate, up = self.gate_up(h).to(h.dtype).chunk(2, dim=-1)
        return self.down(ops.swiglu(gate, up)).to(h.dtype), residual
