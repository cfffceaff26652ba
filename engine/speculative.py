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
from typing import Protocol

import torch
from torch import Tensor

from engine.kv_cache import StaticKVCache
from engine.model import Transformer
from engine.sampling import SamplingParams, probabilities

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

    def __init__(self, model: Transformer, max_seq_len: int):
        self.model = model
        self.cache = StaticKVCache(model.cfg, max_seq_len, model.dtype, model.device)

    def _forward(self, ids: list[int]) -> Tensor:
        """Run `ids` after the cached tokens; return the logits after the last one."""
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


def verify(drafts: list[int], draft_probs: Tensor | None, target_logits: Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> list[int]:
    """Tokens to emit: the accepted drafts plus one correction or bonus token.

    target_logits: [len(drafts) + 1, V], row i = the target's distribution after the i-th draft prefix.
    """
    if params.greedy:
        return accept_greedy(drafts, target_logits.argmax(dim=-1).tolist())
    p = probabilities(target_logits, params)
    out = []
    for i, d in enumerate(drafts):
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        if torch.rand((), generator=generator).item() * q_d < float(p[i, d]):  # accept with prob min(1, p/q)
            out.append(d)
            continue
        q = torch.zeros_like(p[i]) if draft_probs is None else draft_probs[i]
        if draft_probs is None:
            q[d] = 1.0
        residual = (p[i] - q).clamp(min=0)
        total = residual.sum()
        # total == 0 only if p == q exactly, in which case rejection had probability zero; guard anyway
        resample = residual / total if total > 0 else p[i]
        return out + [int(torch.multinomial(resample, 1, generator=generator))]
    return out + [int(torch.multinomial(p[len(drafts)], 1, generator=generator))]


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
        # a step's cost grows a little with k; estimate k = 0 from the cheapest measured k until it is measured
        base = self.verify_s.get(0) or min(t / (1 + 0.1 * k) for k, t in self.verify_s.items())
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


@dataclass
class SpecStats:
    """Running speculation counters, per request and for the engine."""

    steps: int = 0  # target forwards in decode
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    draft_s: float = 0.0
    step_s: float = 0.0

    def add(self, drafted: int, accepted: int, emitted: int, draft_s: float, step_s: float) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.emitted += emitted
        self.draft_s += draft_s
        self.step_s += step_s

    def merge(self, other: SpecStats) -> None:
        self.steps += other.steps
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.emitted += other.emitted
        self.draft_s += other.draft_s
        self.step_s += other.step_s

    def summary(self) -> dict:
        return {
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            "mean_accepted_length": self.accepted / self.steps if self.steps else None,
            "tokens_per_target_forward": self.emitted / self.steps if self.steps else None,
            "draft_time_share": self.draft_s / self.step_s if self.step_s else None,
        }



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
                  quant: str) -> Drafter | None:
    """The drafter for a `--spec` choice: off, ngram, draft (needs a draft model) or auto (both, when a draft exists)."""
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
    drafter = ModelDrafter(quantize(model, quant), max_seq_len)
    # auto trusts prompt lookup only on a match of 2+ tokens: a lone repeated token predicts little
    return drafter if spec == "draft" else AutoDrafter(NgramDrafter(min_n=2), drafter)
