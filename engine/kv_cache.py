"""KV caches. `StaticKVCache`: one preallocated sequence for batch-1 latency mode.

The cache owns both the storage and the attention over it (`attend`), so the model never sees the
layout. `length` is the number of valid positions; rolling it back (`truncate`) is how speculative
decoding discards rejected tokens and how a cancelled request leaves the cache reusable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.model import ModelConfig


class StaticKVCache:
    def __init__(self, cfg: ModelConfig, max_seq_len: int, dtype: torch.dtype, device: str | torch.device = "cpu"):
        shape = (cfg.n_layers, 1, cfg.n_kv_heads, max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len
        self.length = 0  # valid positions before the current forward
        self._start = 0  # where the current forward's tokens are written

    def begin(self, n_new: int) -> Tensor:
        """Reserve room for `n_new` tokens and return their positions."""
        if self.length + n_new > self.max_seq_len:
            raise ValueError(f"KV cache full: {self.length} + {n_new} tokens > {self.max_seq_len}")
        self._start = self.length
        self.length += n_new
        return torch.arange(self._start, self.length, device=self.k.device)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on."""
        self.length = min(self.length, length)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        T = q.shape[0]
        start, end = self._start, self._start + T
        self.k[layer, 0, :, start:end] = k.transpose(0, 1)
        self.v[layer, 0, :, start:end] = v.transpose(0, 1)
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        mask = None
        if T > 1:  # query i sits at position start + i and sees keys 0..start + i
            mask = torch.ones(T, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys, values, attn_mask=mask, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(T, -1)
