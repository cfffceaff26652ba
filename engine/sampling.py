"""Sampling parameters and the distribution they define: temperature, top-k, top-p, a per-request seed.

The token choice itself (greedy, sampling, speculative verification) is `engine.speculative.choose_tokens`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import Tensor

# A temperature below this is greedy. Sampling there already takes the top token unless two logits tie within about
# 1e-3, and dividing logits by a far tinier one (1e-300, 5e-324) overflows float32 to inf and NaN; vLLM draws the
# line at the same place (its _SAMPLING_EPS).
MIN_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # as OpenAI's top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 (or anything below MIN_TEMPERATURE) = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # keep going past stop tokens (benchmarks want a fixed output length)
    stop: tuple[str, ...] = ()  # end the output before the first of these strings (which is not emitted)
    # vLLM's min_tokens: no stop token can be chosen, and no stop string ends the output, before this many tokens
    min_tokens: int = 0
    # vLLM's logprobs: with each output token, the log-probabilities of the model's this-many most likely tokens at
    # its position (the model's own distribution, before temperature or top-k/top-p)
    logprobs: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:  # NaN too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what a torch generator takes
            raise ValueError("seed must be a 64-bit integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens = {self.max_tokens}], got {self.min_tokens}")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator()
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution sampling draws from: logits [..., V] -> probs [..., V] after temperature, top-k, top-p."""
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already cover top_p
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        # the most likely token always stays: a top_p that rounds to 0 in float32 (1e-300) would otherwise drop them all
        drop[..., 0] = False
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def forbid(logits: Tensor, token_ids: Collection[int], rows: int) -> Tensor:
    """A copy of `logits` [n, V] in which `token_ids` cannot be chosen (greedy or sampled) in the first `rows` rows."""
    out = logits.clone()
    out[:rows, torch.tensor(sorted(token_ids), device=out.device)] = float("-inf")
    return out


def top_logprobs(logits: Tensor, k: int) -> tuple[dict[int, float], ...]:
    """Per row of `logits` [n, V]: the k most likely token ids -> their log-probabilities under the model."""
    values, ids = torch.topk(torch.log_softmax(logits.float(), dim=-1), k, dim=-1)
    return tuple(dict(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist()))
