"""Speculative decoding: drafters propose tokens, the target verifies k+1 positions in one forward pass.

Lossless by construction. Greedy accepts a draft token only if it is the target's argmax. Sampling
uses the Leviathan et al. / Chen et al. rule: accept draft token x with probability min(1, p(x)/q(x)),
otherwise resample from norm(max(0, p - q)) and stop; if every draft is accepted, a bonus token comes
from the target's last distribution. Either way one step emits between 1 and k+1 tokens.

Drafters share one small interface: `propose(ids, k, params, generator) -> (tokens, probs)` where ids is
the whole sequence so far and probs ([len(tokens), V] or None for a deterministic proposal) is the
distribution each token was drawn from. A model drafter keeps its own KV cache in step with the
sequence by prefix matching, so rejected tokens are simply forgotten on the next call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.kv_cache import StaticKVCache
from engine.model import Transformer
from engine.sampling import SamplingParams, probabilities

if TYPE_CHECKING:
    from engine.native import NativeModel

SPEC_MODES = ("off", "ngram", "draft", "auto")


class Drafter(Protocol):
    name: str

    def propose(self, ids: list[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[list[int], Tensor | None]: ...


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens and copy what followed."""

    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, ids: list[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[list[int], Tensor | None]:
        if k <= 0:
            return [], None
        seq = torch.tensor(ids)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            windows = seq.unfold(0, n, 1)[:-1]  # every earlier n-gram (the suffix itself excluded)
            hits = (windows == seq[-n:]).all(dim=1).nonzero()
            if len(hits):
                start = int(hits[-1]) + n
                return ids[start : start + k], None  # deterministic: q is one-hot on each token
        return [], None


class ModelDrafter:
    """A smaller model sharing the tokenizer (or the trained draft) drafts k tokens autoregressively."""

    name = "draft"

    def __init__(self, model: Transformer, max_seq_len: int, native: NativeModel | None = None):
        """native: `model`'s native step (engine.native.build(model)); when set it runs the drafting steps, on this
        drafter's cache."""
        self.model = model
        self.native = native
        self.cache = StaticKVCache(model.cfg, max_seq_len, model.dtype, model.device)

    def _forward(self, ids: list[int]) -> Tensor:
        """Run `ids` after the cached tokens; return the logits after the last one."""
        if self.native is not None:
            return self.native.forward(ids, self.cache, 1)[0]
        hidden = self.model(torch.tensor(ids, device=self.model.device), self.cache.extend(ids), self.cache)
        return self.model.logits(hidden[-1])

    def propose(self, ids: list[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[list[int], Tensor | None]:
        if k <= 0:
            return [], None
        k = min(k, self.cache.max_seq_len - len(ids))
        tokens: list[int] = []
        probs: list[Tensor] = []
        logits = self._forward(ids[self.cache.reuse_prefix(ids) :])  # rejected drafts drop out here
        for i in range(k):
            if params.greedy:
                tok = int(logits.argmax())
            else:
                p = probabilities(logits, params)
                tok = int(torch.multinomial(p, 1, generator=generator))
                probs.append(p)
            tokens.append(tok)
            if i + 1 < k:
                logits = self._forward([tok])
        return tokens, (torch.stack(probs) if probs else None)


def accept_greedy(drafts: list[int], best: list[int]) -> list[int]:
    """Greedy verification: the drafts that match the target's argmax, then the target's next token."""
    out = []
    for d, b in zip(drafts, best):
        if d != b:
            break
        out.append(d)
    return out + [best[len(out)]]


def choose_tokens(drafts: list[int], draft_probs: Tensor | None, logits: Tensor, params: SamplingParams,
                  generator: torch.Generator | None, best: Tensor | None = None) -> list[int]:
    """The tokens one step emits: the accepted drafts plus one correction or bonus token. With no drafts, this is
    plain sampling (or greedy choice) of one token. The one token-choice rule of both modes, on any device.

    logits [len(drafts) + 1, V]: row i is the target's distribution after the i-th draft prefix. Draft i is accepted
    when u_i * q_i(d_i) < p_i(d_i); the first rejected one is replaced by a draw from max(0, p - q) renormalised, and
    if all are accepted a bonus token comes from the last row. Draws are by inverse CDF from uniforms taken from the
    request's own generator (a CPU one: torch cannot draw on CUDA tensors with it), so seeded requests are
    reproducible, and the logits are read back once (no host sync per draft on a GPU).
    best: the logits' argmax when the caller has it already (a CUDA graph computes it).
    """
    if params.greedy:
        return accept_greedy(drafts, (logits.argmax(dim=-1) if best is None else best).tolist())
    dev = logits.device
    k, V = len(drafts), logits.shape[-1]
    p = probabilities(logits, params)  # [k + 1, V]
    u = torch.rand(k + 1, generator=generator).to(dev, non_blocking=True)  # k acceptance tests, then one draw
    d = torch.tensor(drafts, dtype=torch.long, device=dev)
    q = F.one_hot(d, V).to(p.dtype) if draft_probs is None else draft_probs.to(dev, p.dtype)  # prompt lookup: one-hot
    rows = torch.arange(k, device=dev)
    n = (u[:k] * q[rows, d] < p[rows, d]).long().cumprod(0).sum().view(1)  # drafts accepted before the first rejection
    # row n of this is where the draw comes from: the residual after the rejected draft, or the bonus row
    dists = torch.cat([(p[:k] - q).clamp_(min=0), p[k:]])
    dist = dists.index_select(0, n)[0]  # a device index: no host sync
    total = dist.sum()
    dist = torch.where(total > 0, dist / total, p.index_select(0, n)[0])  # total 0 only if p == q: then rejection had p 0
    cdf = dist.cumsum(0)
    # right=True: the first token whose cdf exceeds the draw, so a zero-probability token is never drawn, even at u = 0
    token = torch.searchsorted(cdf, u[k:] * cdf[-1], right=True).clamp_(max=V - 1)
    accepted, tok = torch.cat([n, token]).tolist()
    return drafts[:accepted] + [tok]


@dataclass
class AdaptiveK:
    """Picks the draft length that maximises expected tokens per second from running measurements.

    With acceptance rate a per draft token, a step with k drafts emits (1 - a^(k+1)) / (1 - a) tokens
    on average and costs verify(k) + k * draft_token seconds. k = 0 (no speculation) is chosen whenever
    drafting does not pay; every `probe_every` steps at k = 0 it tries k = 1 again to refresh `a`.
    """

    k_max: int = 6
    alpha: float = 0.5  # running acceptance rate per drafted token
    draft_s: float = 0.0  # running seconds per drafted token
    verify_s: dict[int, float] = field(default_factory=dict)  # running target step seconds per k
    probe_every: int = 16
    _since_probe: int = 0
    smoothing: float = 0.1

    def choose(self) -> int:
        if not self.verify_s:
            return min(3, self.k_max)  # nothing measured yet: try a moderate draft length
        if 0 not in self.verify_s:
            # then time a plain step: how a step's cost grows with its rows is the CPU's (on AVX2 a 4-row verify costs
            # ~3.7 plain steps, on a GPU ~1), and guessed from a verify step it hid that speculation did not pay there
            return 0
        base = self.verify_s[0]
        best_k, best_rate = 0, 1.0 / base
        for k in range(1, self.k_max + 1):
            verify = self.verify_s.get(k, base * (1 + 0.1 * k))
            expected = (1 - self.alpha ** (k + 1)) / (1 - self.alpha) if self.alpha < 1 else k + 1
            rate = expected / (verify + k * self.draft_s)
            if rate > best_rate:
                best_k, best_rate = k, rate
        if best_k == 0:
            self._since_probe += 1
            if self._since_probe >= self.probe_every:
                self._since_probe = 0
                return 1
        return best_k

    def update(self, k: int, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        s = self.smoothing
        if drafted:
            self.alpha = (1 - s) * self.alpha + s * (accepted / drafted)
            self.draft_s = (1 - s) * self.draft_s + s * (draft_s / drafted) if self.draft_s else draft_s / drafted
        old = self.verify_s.get(drafted)
        self.verify_s[drafted] = verify_s if old is None else (1 - s) * old + s * verify_s


class AutoDrafter:
    """Prompt lookup when the sequence repeats itself (free), the draft model otherwise."""

    name = "auto"

    def __init__(self, ngram: NgramDrafter, model: ModelDrafter):
        self.ngram, self.model = ngram, model

    def propose(self, ids: list[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[list[int], Tensor | None]:
        tokens, probs = self.ngram.propose(ids, k, params, generator)
        if len(tokens) >= min(k, 2):
            return tokens, probs
        return self.model.propose(ids, k, params, generator)


def load_draft_model(target: Transformer, target_name: str, draft: str | None) -> Transformer | None:
    """The draft for `target`: `draft` (a trained-draft .safetensors or any model spec sharing the tokenizer),
    else the committed trained draft when the target is the default model, else None."""
    from engine import draft as trained
    from engine.loader import load
    from engine.registry import DEFAULT_MODEL

    if draft is None:
        if target_name != DEFAULT_MODEL or not trained.DEFAULT_DRAFT_PATH.is_file():
            return None
        return trained.load_draft(target, trained.DEFAULT_DRAFT_PATH)
    if draft.endswith(".safetensors"):
        return trained.load_draft(target, draft)
    loaded = load(draft)
    if loaded.config.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"draft {draft}: vocabulary of {loaded.config.vocab_size} tokens, the target has "
                         f"{target.cfg.vocab_size}; a draft model must share the target's tokenizer")
    model = Transformer(loaded.config, dtype=target.dtype, device=target.device)
    model.load_canonical(loaded.weights)
    return model


def build_drafter(spec: str, target: Transformer, target_name: str, draft: str | None, max_seq_len: int,
                  quant: str, native_threads: int | None = None) -> Drafter | None:
    """The drafter for a `--spec` choice: off, ngram, draft (needs a draft model) or auto (both, when a draft exists).
    native_threads: run the draft model's steps on the native kernel, with this many threads (where it can)."""
    from engine.native import build as build_native
    from engine.quant import quantize

    if spec not in SPEC_MODES:
        raise ValueError(f"unknown speculation mode {spec!r} (choose from {', '.join(SPEC_MODES)})")
    if spec == "off":
        return None
    if spec == "ngram":
        return NgramDrafter()
    model = load_draft_model(target, target_name, draft)
    if model is None:
        if spec == "draft":
            raise ValueError(f"--spec draft needs --draft PATH: there is no trained draft for {target_name}")
        return NgramDrafter()
    model = quantize(model, quant)
    native = build_native(model, native_threads)[0] if native_threads else None
    drafter = ModelDrafter(model, max_seq_len, native)
    # auto trusts prompt lookup only on a match of 2+ tokens: a lone repeated token predicts little
    return drafter if spec == "draft" else AutoDrafter(NgramDrafter(min_n=2), drafter)
