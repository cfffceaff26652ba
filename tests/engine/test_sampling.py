"""Sampling filters against a direct reference computation."""

import torch

from engine.sampling import SamplingParams, probabilities, sample


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


def test_greedy_is_argmax_and_sampling_follows_the_distribution():
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0])
    assert sample(logits, SamplingParams(), None) == 1
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample(logits, params, g) for _ in range(4000)]), minlength=4)
    expected = torch.softmax(logits, -1) * 4000
    assert ((counts - expected).abs() < 5 * expected.sqrt() + 5).all(), (counts, expected)
