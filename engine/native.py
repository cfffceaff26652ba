"""The native batch-1 step for an engine Transformer: its weights handed to tradeoff_kernels.native, a step in one C call.

`build(model)` reads the norms, RoPE tables, biases and int4 codes of an `engine.model.Transformer` (after
`engine.quant.quantize(model, "int4")`, whose Int4Linear layers keep their exact codes, or with full weights,
which are quantized here the same way) and returns a `NativeModel`, or None and the reason it cannot run natively.
The head is int8 (tradeoff_kernels.native.quantize_q8), built from the model's own `lm_head` rather than the int4 copy
`quantize` makes of it: from fp32 weights it is the GGUF's Q8_0 embedding exactly. A trained draft
(`engine.draft.Draft`) runs too: the kernel's head is its subset head, and the logits come back full-vocabulary.
`NativeModel.forward` is latency mode's step on a StaticKVCache: embedding lookup in torch, then the kernel;
`NativeModel.head` gives a dense prefill's last rows the same head.

Imports engine.model, engine.quant, engine.draft, engine.kv_cache and tradeoff_kernels.native; never voice or tui.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.draft import Draft
from engine.kv_cache import StaticKVCache
from engine.model import Linear, Transformer
from engine.quant import INT4_GROUP, Int4Linear, int4_quantize
from tradeoff_kernels import native
from tradeoff_kernels.native import NativeDecoder, NativeLayer, NativeWeights, PackedQ4, pack_q4, quantize_q8


class NativeModel:
    def __init__(self, model: Transformer, decoder: NativeDecoder):
        self.embed = model.embed  # the model's own tensor (rows are looked up, then cast to fp32)
        self.decoder = decoder
        self.vocab_size = model.cfg.vocab_size
        # a draft's head covers these tokens only (its rows, in order); None: the head is the whole vocabulary
        self.vocab_ids: Tensor | None = model.vocab_ids if isinstance(model, Draft) else None

    def forward(self, ids: list[int], cache: StaticKVCache, logit_rows: int) -> Tensor:
        """Run `ids` after the cached sequence (reserving their positions as `cache.extend` does); return the fp32
        logits [logit_rows, vocab] of the last `logit_rows` of them (-inf outside a draft's subset, as Draft.logits)."""
        x = F.embedding(torch.tensor(ids), self.embed).float()
        start = cache.record(ids)
        return self._full_vocab(self.decoder.forward(x, start, cache.k, cache.v, logit_rows))

    def head(self, hidden: Tensor) -> Tensor:
        """The int8 head's fp32 logits of final hidden states [T, dim] computed elsewhere (a dense prefill): the
        checkpoint's Q8_0 head, as every native step's, rather than the dense model's own quantized copy."""
        return self._full_vocab(self.decoder.head(hidden.float().contiguous()))

    def _full_vocab(self, logits: Tensor) -> Tensor:
        if self.vocab_ids is None:
            return logits
        return logits.new_full((logits.shape[0], self.vocab_size), float("-inf")).index_copy_(-1, self.vocab_ids, logits)


def build(model: Transformer, n_threads: int | None = None) -> tuple[NativeModel | None, str]:
    """(a NativeModel, "") or (None, why `model` cannot run on the native step). A head whose weights are not fp32
    (bf16, fp16) is quantized from them all the same, and the NativeModel comes with a note saying it is not exact."""
    cfg = model.cfg
    if type(model) not in (Transformer, Draft):
        return None, f"{type(model).__name__} maps its logits differently; the native step runs plain Transformers and drafts"
    if model.device.type != "cpu":
        return None, f"the model is on {model.device}; the native step runs on the CPU"
    if model.dtype != torch.float32:
        return None, f"activations (and KV cache) are {model.dtype}; the native step keeps them in float32"
    for name, k in (("dim", cfg.dim), ("n_heads * head_dim", cfg.q_size), ("ffn_dim", cfg.ffn_dim)):
        if k % INT4_GROUP:
            return None, f"{name} = {k} is not a multiple of the int4 group ({INT4_GROUP})"
    if cfg.n_heads % cfg.n_kv_heads or cfg.head_dim % 2:
        return None, f"{cfg.n_heads} heads over {cfg.n_kv_heads} kv heads, head_dim {cfg.head_dim}: not supported"
    if not native.available():
        return None, f"native kernel unavailable: {native.why_unavailable()}"
    try:
        layers = [NativeLayer(attn_norm=b.attn_norm, qkv=codes(b.qkv), qkv_bias=b.qkv.bias, o=codes(b.o), ffn_norm=b.ffn_norm,
                              gate_up=codes(b.gate_up), down=codes(b.down)) for b in model.layers]
    except TypeError as e:
        return None, str(e)
    weights = NativeWeights(layers=layers, norm=model.norm, rope_cos=model.rope_cos, rope_sin=model.rope_sin,
                            head=quantize_q8(model.lm_head), n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, eps=cfg.norm_eps)
    note = "" if model.lm_head.dtype == torch.float32 else (
        f"the int8 head is quantized from {model.lm_head.dtype} weights, so it is not the checkpoint's head exactly "
        "(load fp32 weights for that)")
    return NativeModel(model, NativeDecoder(weights, n_threads)), note


def codes(layer: torch.nn.Module) -> PackedQ4:
    """A projection's int4 codes: kept by Int4Linear, or quantized from a full-precision Linear."""
    if isinstance(layer, Int4Linear) and layer.group == INT4_GROUP:
        return layer.q4
    if isinstance(layer, Linear):
        return pack_q4(*int4_quantize(layer.weight))
    raise TypeError(f"{type(layer).__name__} weights cannot run on the native int4 step (int4 with groups of {INT4_GROUP}"
                    " or full weights can)")
