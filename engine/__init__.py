"""The LLM engine core: models, loading, quantization, KV caches, scheduling, speculative decoding, metrics.

Everything outside talks to it through `engine.backend.Backend` (implemented by `Engine`), with live state as a
`engine.snapshot.Snapshot`. It imports torch, numpy, the model-format libraries (gguf, safetensors, tokenizers,
jinja2) and `kernels` only: no web library (the serving layer is `serve/`), and never serve, voice, tui or bench.
"""

from engine.backend import Backend, Controls
from engine.engine import Completion, ContextLengthError, Engine, EngineError, OverloadedError, Request, TokenEvent
from engine.loader import ModelLoadError
from engine.sampling import SamplingParams
from engine.snapshot import Snapshot

__all__ = [
    "Backend", "Completion", "ContextLengthError", "Controls", "Engine", "EngineError", "ModelLoadError",
    "OverloadedError", "Request", "SamplingParams", "Snapshot", "TokenEvent",
]
