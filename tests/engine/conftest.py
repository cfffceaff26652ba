"""Fixtures shared by the engine tests: a tiny random-weight model for tests that need a model but not a good one."""

import threading
import time

import pytest
import torch

from engine.loader import LoadedModel
from engine.model import ModelConfig

TINY = ModelConfig(arch="llama", vocab_size=49152, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64,
                   rope_theta=1e4, norm_eps=1e-5, max_seq_len=4096, tie_embeddings=True, qkv_bias=False)


@pytest.fixture(scope="session")
def tiny_loaded(default_model) -> LoadedModel:
    """Random weights in the canonical layout, with the default model's tokenizer and vocabulary size."""
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


class APIServer:
    """An ASGI app served by uvicorn on a free loopback port, in a background thread (so sync clients can call it)."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "APIServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the API server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def api_app(engine, token=None, tradeoff_routes=True):
    """The OpenAI API over `engine` as an app; without tradeoff's own routes it looks like any OpenAI-compatible server."""
    from starlette.applications import Starlette

    from engine.openai_api import OpenAIAPI

    api = OpenAIAPI(engine, token=token)
    routes = [r for r in api.routes if tradeoff_routes or not r.path.startswith("/v1/tradeoff")]
    return Starlette(routes=routes)


@pytest.fixture(scope="module")
def served_engine(default_model):
    """The engine behind a module's HTTP API tests (module scope: later tests check that no engine thread is left)."""
    from engine import Engine

    # Speculation off: its k adapts to measured step times, and with int4 weights verifying k + 1 rows at once is not
    # bitwise equal to single steps, so a near-tie could flip between two greedy runs (test_speculative checks that
    # path in fp32). These tests compare the API's text with the engine's, so they need the same text every run.
    e = Engine(default_model, spec="off")
    yield e
    e.close()


@pytest.fixture(scope="module")
def api_server(served_engine):
    with APIServer(api_app(served_engine)) as s:
        yield s
