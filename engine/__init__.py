"""The LLM engine core: models, loading, quantization, KV caches, scheduling, speculative decoding, metrics.

Everything outside talks to it through `engine.backend.Backend` (implemented by `Engine`), with live state as a
`engine.snapshot.Snapshot`. It imports torch, numpy, the model-format libraries (gguf, safetensors, tokenizers,
jinja2) and `tradeoff_kernels` only: no web library (the serving layer is `serve/`), and never serve, voice, tui or bench.

The names below load on first use, so that the model path (engine.model, engine.kv_cache, engine.cuda_graph,
engine.quant) imports with torch alone: the GPU benchmark (bench/gpu_decode.py) runs where no model-format library
is installed.
"""

import importlib

_HOMES = {
    "Backend": "engine.backend", "Controls": "engine.backend", "Completion": "engine.engine",
    "ContextLengthError": "engine.engine", "Engine": "engine.engine", "EngineError": "engine.engine",
    "OverloadedError": "engine.engine", "Request": "engine.engine", "TokenEvent": "engine.engine",
    "ModelLoadError": "engine.loader", "SamplingParams": "engine.sampling", "Snapshot": "engine.snapshot",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
