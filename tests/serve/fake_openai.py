"""A stand-in for an OpenAI-compatible server that is not tradeoff (a vLLM, say), with no model behind it:
`/v1/models`, a streamed `/v1/chat/completions` that answers a fixed reply, and `/metrics` serving whatever text
the test sets (None: no such route, as a server without Prometheus). Serve `FakeOpenAI(...).app` with APIServer."""

import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

DATA = Path(__file__).with_name("data")
MODEL = "smollm2-135m"  # the name the recorded vLLM served the model under (--served-model-name)
REPLY = ("Two", " plus", " two", " is", " four", ".")


class FakeOpenAI:
    def __init__(self, metrics: str | None, model: str = MODEL):
        self.metrics = metrics
        self.model = model
        self.app = Starlette(routes=[Route("/v1/models", self.models), Route("/metrics", self.prometheus),
                                     Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model", "max_model_len": 2048}]})

    async def prometheus(self, request: Request) -> Response:
        if self.metrics is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return PlainTextResponse(self.metrics, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def chat(self, request: Request) -> Response:
        async def events():
            for text in REPLY:
                yield sse({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
            yield sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            yield sse({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": len(REPLY),
                                                "total_tokens": 12 + len(REPLY)}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def recorded(name: str) -> str:
    """A recorded /metrics text in tests/serve/data (its header says from which server and version)."""
    return (DATA / name).read_text()
