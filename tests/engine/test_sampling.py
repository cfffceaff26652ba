"""Sampling filters against a direct reference computation (the draws themselves: tests/engine/test_speculative.py)."""

import pytest
import torch

from engine.sampling import SamplingParams, probabilities
from engine.speculative import choose_tokens


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True).tolist()
    keep = order[:top_k] if top_k else order
    kept, mass = [], 0.0
    for i in keep:  # nucleus: smallest prefix of the ranking whose mass reaches top_p
        kept.append(i)
        mass += p[i].item()
        if mass >= top_p:
            break
    out = torch.zeros_like(p)
    out[kept] = p[kept]
    return (out / out.sum()).float()


def test_probabilities_match_reference():
    g = torch.Generator().manual_seed(0)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 10, 0.5), (0.5, 1, 1.0)]:
        logits = torch.randn(50, generator=g) * 3
        ours = probabilities(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
        torch.testing.assert_close(ours, reference_probs(logits, temperature, top_k, top_p), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("temperature, top_p", [(1e-300, 1.0), (5e-324, 1.0), (1.0, 1e-300), (1e-6, 1e-300)])
def test_extreme_but_valid_values_act_as_their_limits(temperature, top_p):
    """A tiny temperature is greedy, a tiny top_p keeps only the top token: no inf or NaN on the way."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 4
    params = SamplingParams(temperature=temperature, top_p=top_p)
    top = logits.argmax(-1)
    if params.greedy:
        assert temperature < 1e-5 and choose_tokens([], None, logits[:1], params, None) == [int(top[0])]
    else:
        probs = probabilities(logits, params)
        assert torch.isfinite(probs).all()
        assert torch.equal(probs, torch.nn.functional.one_hot(top, 50).float())
    # through a draw, too: the generator path never meets a NaN either
    g = torch.Generator().manual_seed(0)
    assert choose_tokens([], None, logits[:1], params, g) == [int(top[0])]


def test_nan_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))
