"""The LLM engine: model loading, KV caches, sampling, decoding and per-request metrics.

Imports torch and `kernels` only. It must not import voice, tui or bench: it knows nothing of audio or screens.
"""

from engine.engine import Completion, ContextLengthError, Engine, EngineError, OverloadedError, Request, TokenEvent
from engine.loader import ModelLoadError
from engine.sampling import SamplingParams

__all__ = [
    "Completion", "ContextLengthError", "Engine", "EngineError", "ModelLoadError", "OverloadedError",
    "Request", "SamplingParams", "TokenEvent",
]
