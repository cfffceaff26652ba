"""The LLM engine: model loading, KV caches, sampling, decoding and per-request metrics.

Also its OpenAI-compatible HTTP API (openai_api.py, on Starlette) and the client for a remote one (remote.py, on
httpx). It imports torch, `kernels` and those libraries only. It must not import voice, tui or bench: it knows
nothing of audio or screens.
"""

from engine.engine import Completion, ContextLengthError, Engine, EngineError, OverloadedError, Request, TokenEvent
from engine.loader import ModelLoadError
from engine.sampling import SamplingParams

__all__ = [
    "Completion", "ContextLengthError", "Engine", "EngineError", "ModelLoadError", "OverloadedError",
    "Request", "SamplingParams", "TokenEvent",
]
