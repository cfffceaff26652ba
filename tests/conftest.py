"""Shared fixtures and helpers: the default model, loaded once per test session (fetched by `make setup`), a tiny
random-weight model in its canonical layout, and `wait_until`, which waits on a condition (never a fixed sleep).

Without a GPU, the Triton kernels that tests call (tests/tradeoff_kernels, and the engine's fused path) run under Triton's
interpreter on CPU tensors: TRITON_INTERPRET=1 must be set before any kernel is defined, so it is set here, before
any test module imports one."""

import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `tradeoff` command does (tui/__init__.py): set before torch loads

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.model import ModelConfig  # noqa: E402

TINY = ModelConfig(arch="llama", vocab_size=49152, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64,
                   rope_theta=1e4, norm_eps=1e-5, max_seq_len=4096, tie_embeddings=True, qkv_bias=False)


def wait_until(condition, timeout: float = 60.0, what: str = "") -> None:
    """Return once `condition()` holds; fail after `timeout` seconds (generous: the suite must pass on a busy machine)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what or condition}")
        time.sleep(0.01)


def idle(backend) -> bool:
    """Nothing running or waiting, by the state the engine last published."""
    state = backend.snapshot().state
    return state.running == state.waiting == 0


# The loader is imported in the fixtures that need it: tests/tradeoff_kernels then run where only torch, triton and pytest are
# installed (bench/gpu.sh on the GPU machine).


@pytest.fixture(scope="session")
def default_model():
    from engine.loader import load
    from engine.registry import DEFAULT_MODEL

    return load(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def default_gguf():
    from engine.registry import DEFAULT_MODEL, fetch

    return fetch(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_loaded(default_model):
    """Random weights in the canonical layout, with the default model's tokenizer and vocabulary size."""
    from engine.loader import LoadedModel

    g = torch.Generator().manual_seed(0)
    weights = {"model.embed_tokens.weight": torch.randn(TINY.vocab_size, TINY.dim, generator=g) * 0.3,
               "model.norm.weight": torch.ones(TINY.dim)}
    shapes = {"self_attn.q_proj": (TINY.q_size, TINY.dim), "self_attn.k_proj": (TINY.kv_size, TINY.dim),
              "self_attn.v_proj": (TINY.kv_size, TINY.dim), "self_attn.o_proj": (TINY.dim, TINY.q_size),
              "mlp.gate_proj": (TINY.ffn_dim, TINY.dim), "mlp.up_proj": (TINY.ffn_dim, TINY.dim),
              "mlp.down_proj": (TINY.dim, TINY.ffn_dim)}
    for i in range(TINY.n_layers):
        p = f"model.layers.{i}."
        weights |= {p + name + ".weight": torch.randn(*shape, generator=g) * 0.3 for name, shape in shapes.items()}
        weights |= {p + norm + ".weight": torch.ones(TINY.dim) for norm in ("input_layernorm", "post_attention_layernorm")}
    return LoadedModel("tiny-random", TINY, weights, default_model.tokenizer, None)
