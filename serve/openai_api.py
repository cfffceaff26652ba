"""The OpenAI-compatible HTTP API over an engine (in-process, or remote: serve/remote.py).

`/v1/chat/completions` and `/v1/completions` (streamed as server-sent events or whole), `/v1/models`, `/health`,
`/metrics` (Prometheus text), and tradeoff's own `/v1/tradeoff/metrics` (the live numbers the dashboard shows)
and `/v1/tradeoff/control` (mode, speculation, batching policy). These are Starlette routes only: the voice server
mounts them beside the realtime WebSocket, so one port serves both, as OpenAI's API does.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and status: 400 bad request,
401 missing key, 404 unknown model or path, 405 wrong method, 408 body too slow, 413 body too large, 429 overloaded
(with `Retry-After`), 500 a fault of ours, 503 still loading. A request is admitted before any byte of the response is
sent, so an overloaded engine answers 429 even to a streaming request. A client that disconnects, while uploading,
waiting or streaming, cancels its request at once.

What a client sends is checked before it reaches the engine: the body's size, JSON that Python can read (no
5,000-digit numbers, no nesting past the parser's depth), text that is valid UTF-8 (no lone surrogates), strict
types (a bool is not a number), and only known parameters, as OpenAI's API does. Parsing a large body and
tokenizing a prompt run on a worker thread, and tokenizing stops once a prompt is past the context, so one huge
request does not stall the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.backend import Backend, Controls
from engine.engine import ContextLengthError, OverloadedError
from engine.metrics import SpecStats
from engine.sampling import SamplingParams
from engine.sequence import Request, Stream, TokenEvent
from serve.prometheus import EngineMetrics

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_BODY_BYTES = 4 << 20  # default request body limit (`tradeoff serve --max-body-kb`)
BODY_TIMEOUT_S = 60.0  # the whole body must arrive within this
RETRY_AFTER_S = 1  # told to an overloaded client (the queue drains in about a request's time)
THREAD_PARSE_BYTES = 64 << 10  # bodies larger than this are parsed on a worker thread

log = logging.getLogger("serve.openai_api")

# Parameters of OpenAI's API that change nothing here: accepted so that stock clients can send them.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
# Parameters of OpenAI's API this server does not implement: accepted only at a value that means "not used".
UNSUPPORTED_CHAT = {
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False), "logprobs": (None, False), "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,), "verbosity": (None,),
}
UNSUPPORTED_COMPLETIONS = {
    "echo": (None, False), "suffix": (None, ""), "logprobs": (None,), "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
}
COMMON = frozenset({"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                    "ignore_eos", "min_tokens", "n"})  # top_k, ignore_eos and min_tokens are vLLM's extensions
KNOWN_CHAT = COMMON | {"messages", "max_completion_tokens", "response_format"} | IGNORED | set(UNSUPPORTED_CHAT)
KNOWN_COMPLETIONS = COMMON | {"prompt", "best_of"} | IGNORED | set(UNSUPPORTED_COMPLETIONS)
# Keys a chat message may carry besides role and content, each only at a value that means "not used" (a client that
# sends a reply back as history sends them as null); `name` may be any string and is ignored.
MESSAGE_KEYS = {"name": None, "refusal": (None,), "audio": (None,), "function_call": (None,), "tool_calls": (None, []),
                "annotations": (None, [])}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


@dataclass
class Call:
    """One parsed completion call."""

    request: Request
    stream: bool
    include_usage: bool
    chat: bool


class OpenAIAPI:
    """The routes over `engine`, which may be set later (`attach`): until then they answer 503."""

    def __init__(self, engine: Backend | None = None, token: str | None = None, max_body_bytes: int = MAX_BODY_BYTES):
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.engine: Backend | None = None
        self.metrics: EngineMetrics | None = None
        if engine is not None:
            self.attach(engine)
        self.routes = [
            Route("/health", self.health),
            Route("/metrics", self.prometheus),
            Route("/v1/models", self.guarded(self.models)),
            Route("/v1/chat/completions", self.guarded(self.chat_completions), methods=["POST"]),
            Route("/v1/completions", self.guarded(self.completions), methods=["POST"]),
            Route("/v1/tradeoff/metrics", self.guarded(self.engine_metrics)),
            Route("/v1/tradeoff/control", self.guarded(self.control), methods=["POST"]),
        ]

    def attach(self, engine: Backend) -> None:
        self.engine = engine
        self.metrics = EngineMetrics(engine)

    def guarded(self, endpoint: Callable) -> Callable:
        """The key check, the loading check and the error shape, around an endpoint."""

        async def run(request: HTTPRequest) -> Response:
            try:
                if self.token is not None:
                    given = request.headers.get("authorization", "")
                    if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                       code="invalid_api_key")
                if self.engine is None:
                    raise APIError(503, "the model is still loading; retry shortly", "service_unavailable")
                return await endpoint(request, self.engine)
            except APIError as e:
                return e.response()
            except ClientGone:
                return Response(status_code=499)  # nobody reads it; the request was cancelled
            except ClientDisconnect:  # gone while sending its body: nothing was started, nobody reads an answer
                log.info("client %s left while sending its request to %s", _peer(request), request.url.path)
                return Response(status_code=499)

        return run

    # ---- plain endpoints --------------------------------------------------------------------

    async def health(self, request: HTTPRequest) -> Response:
        if self.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.engine.name})

    async def prometheus(self, request: HTTPRequest) -> Response:
        if self.metrics is None:
            return PlainTextResponse("# the model is still loading\n", status_code=503)
        body, content_type = await asyncio.to_thread(self.metrics.render)  # a remote engine's gauges take a round trip
        return Response(body, media_type=content_type)

    async def models(self, request: HTTPRequest, engine: Backend) -> Response:
        model = {"id": engine.name, "object": "model", "created": 0, "owned_by": "tradeoff"}
        if engine.max_seq_len is not None:
            model["max_model_len"] = engine.max_seq_len
        return JSONResponse({"object": "list", "data": [model]})

    async def engine_metrics(self, request: HTTPRequest, engine: Backend) -> Response:
        """The engine's `Snapshot` as JSON; `?window_s=S` covers the last S seconds (as the dashboard asks)."""
        window_s = None
        if (raw := request.query_params.get("window_s")) is not None:
            try:
                window_s = float(raw)
            except ValueError:
                raise APIError(400, "window_s must be a number of seconds", param="window_s") from None
            if not window_s > 0:  # also refuses NaN
                raise APIError(400, "window_s must be a positive number of seconds", param="window_s")
        snapshot = await asyncio.to_thread(engine.snapshot, window_s)
        return JSONResponse(snapshot.to_json())

    async def control(self, request: HTTPRequest, engine: Backend) -> Response:
        """{"mode": "latency"|"batched", "speculation": bool, "chunked_prefill": bool, "max_batch_size": int}, any
        subset, applied all or nothing."""
        body = await self.json_body(request)
        try:
            controls = Controls.from_json(body)
            await asyncio.to_thread(engine.control, controls)  # on a thread: a remote engine's take a round trip
        except ValueError as e:
            raise APIError(400, str(e), param=getattr(e, "name", None)) from None
        return JSONResponse({"ok": True, "applied": controls.to_json()})

    # ---- completions ------------------------------------------------------------------------

    async def chat_completions(self, request: HTTPRequest, engine: Backend) -> Response:
        return await self.complete(request, parse_call(await self.json_body(request), engine, chat=True))

    async def completions(self, request: HTTPRequest, engine: Backend) -> Response:
        return await self.complete(request, parse_call(await self.json_body(request), engine, chat=False))

    async def json_body(self, request: HTTPRequest) -> dict:
        """The body as a JSON object, read within the size and time limits and checked to be valid text."""
        try:
            raw = await asyncio.wait_for(read_body(request, self.max_body_bytes), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s",
                           code="request_timeout") from None
        if len(raw) > THREAD_PARSE_BYTES:
            return await asyncio.to_thread(parse_json, raw)
        return parse_json(raw)

    async def complete(self, http: HTTPRequest, call: Call) -> Response:
        engine = self.engine
        try:
            # on a thread: the engine renders the template and tokenizes here, which takes a while for a long prompt
            stream = await asyncio.to_thread(engine.submit, call.request, asyncio.get_running_loop())
        except Exception as e:
            raise engine_error(e) from None
        events = aiter(stream)
        try:
            # admit before answering: a refusal that comes through the stream (a remote backend) gets its status
            first = await until_disconnect(http, anext(events, None))
        except ClientGone:
            stream.cancel()
            raise
        except Exception as e:
            stream.cancel()
            raise engine_error(e) from None
        reply = Reply(call, engine.name, stream)
        if call.stream:
            return StreamingResponse(reply.sse(first, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            text = await until_disconnect(http, reply.collect(first, events))
        except ClientGone:
            stream.cancel()
            raise
        except Exception as e:
            raise engine_error(e) from None
        return JSONResponse(reply.whole(text))


class Reply:
    """Renders one request's events as OpenAI objects."""

    def __init__(self, call: Call, model: str, stream: Stream):
        self.call, self.model, self.stream = call, model, stream
        self.id = ("chatcmpl-" if call.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    async def collect(self, first: TokenEvent | None, events: AsyncIterator[TokenEvent]) -> str:
        parts = [first.text] if first is not None else []
        async for ev in events:
            parts.append(ev.text)
        return "".join(parts)

    def whole(self, text: str) -> dict:
        if self.call.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": self.finish_reason()}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish_reason()}
        body = {"id": self.id, "object": "chat.completion" if self.call.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": self.usage()}
        return body | self.metrics()

    async def sse(self, first: TokenEvent | None, events: AsyncIterator[TokenEvent]) -> AsyncIterator[str]:
        """The chunks; the stream is cancelled if the client goes (Starlette cancels this generator)."""
        try:
            if self.call.chat:
                yield self.chunk({"role": "assistant", "content": ""})
            if first is not None and first.text:
                yield self.chunk({"content": first.text})
            try:
                async for ev in events:
                    if ev.text:
                        yield self.chunk({"content": ev.text})
            except Exception as e:  # failed mid-stream: headers are out, so the error goes in the stream
                yield sse_data(engine_error(e).body())
                return
            yield self.chunk({}, self.finish_reason())
            if self.call.include_usage:  # vLLM sends the request's metrics in this chunk, and only when it is sent
                yield sse_data({**self.base(), "choices": [], "usage": self.usage()} | self.metrics())
            yield "data: [DONE]\n\n"
        finally:
            self.stream.cancel()

    def chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        if self.call.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish_reason}
        body = {**self.base(), "choices": [choice]}
        if self.call.include_usage:
            body["usage"] = None
        return sse_data(body)

    def base(self) -> dict:
        obj = "chat.completion.chunk" if self.call.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def finish_reason(self) -> str | None:
        reason = self.stream.metrics.finish_reason
        return reason if reason in ("stop", "length") else None

    def usage(self) -> dict:
        m = self.stream.metrics
        return {"prompt_tokens": m.prompt_tokens, "completion_tokens": m.output_tokens,
                "total_tokens": m.prompt_tokens + m.output_tokens,
                "prompt_tokens_details": {"cached_tokens": m.cached_tokens}}

    def metrics(self) -> dict:
        """vLLM's per-request `metrics` (as with `--per-request-spec-decode-metrics summary`): speculation's counts
        when the request ran with speculation on, else nothing (as vLLM, launched without a speculative config)."""
        spec = self.stream.metrics.spec
        return {"metrics": {"speculative_decoding": speculative_decoding(spec)}} if spec.max_drafts else {}


def speculative_decoding(spec: SpecStats) -> dict:
    """vLLM's SpeculativeDecodingMetrics of one request: its verify steps with drafts, counted by how many drafts
    each accepted (`acceptance_histogram[j]`); the mean acceptance length counts the target's own token too."""
    steps = spec.draft_steps
    return {"mean_acceptance_length": 1.0 + spec.accepted / steps if steps else 1.0,
            "draft_acceptance_rate": spec.accepted / spec.drafted if spec.drafted else 0.0,
            "acceptance_histogram": list(spec.accepted_hist), "num_spec_steps": steps,
            "num_accepted_draft_tokens": spec.accepted, "num_draft_tokens": spec.drafted,
            "num_spec_tokens": spec.max_drafts}


# ---- parsing --------------------------------------------------------------------------------------

def parse_call(body: dict, engine: Backend, chat: bool) -> Call:
    known, unsupported = (KNOWN_CHAT, UNSUPPORTED_CHAT) if chat else (KNOWN_COMPLETIONS, UNSUPPORTED_COMPLETIONS)
    for name in body:
        if name not in known:  # as OpenAI's API: a misspelt parameter is a mistake, not a default
            raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "'model' is required: a string (GET /v1/models lists the one served)", param="model")
    if model != engine.name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{engine.name}'",
                       param="model", code="model_not_found")
    for name, off in unsupported.items():
        if not is_one_of(body.get(name), off):
            raise APIError(400, f"'{name}' is not supported by this server (send {_spell(off)})", param=name)
    for name in ("n", "best_of"):
        if not is_one_of(body.get(name), (None, 1)):
            raise APIError(400, f"only {name} = 1 is supported", param=name)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    stream = get(body, "stream", bool, False)
    options = get(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise APIError(400, "stream_options needs stream: true", param="stream_options")
    options = options or {}
    for name in options:
        if name not in ("include_usage", "include_obfuscation"):
            raise APIError(400, f"Unrecognized request argument supplied: stream_options.{name}",
                           param=f"stream_options.{name}", code="unknown_parameter")
    include_usage = get(options, "include_usage", bool, False, "stream_options.")
    get(options, "include_obfuscation", bool, False, "stream_options.")  # no obfuscation is sent either way
    sampling = parse_sampling(body, engine.max_seq_len)
    if chat:
        request = Request(messages=parse_messages(body.get("messages")), sampling=sampling)
    else:
        request = parse_prompt(body.get("prompt"), sampling)
    return Call(request, stream, include_usage, chat)


def parse_sampling(body: dict, context: int) -> SamplingParams:
    max_tokens = get(body, "max_completion_tokens", int, None)
    if max_tokens is None:
        max_tokens = get(body, "max_tokens", int, None)
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    temperature = get(body, "temperature", float, 1.0)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be in [0, 2], got {temperature}", param="temperature")
    top_p = get(body, "top_p", float, 1.0)
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    top_k = get(body, "top_k", int, 0)  # vLLM's extension; -1 also means off there
    seed = get(body, "seed", int, None)
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise APIError(400, "seed must be a 64-bit integer", param="seed")
    min_tokens = get(body, "min_tokens", int, 0)
    if min_tokens < 0 or min_tokens > (max_tokens or context or min_tokens):
        raise APIError(400, f"min_tokens must be in [0, max_tokens = {max_tokens or context}], got {min_tokens}",
                       param="min_tokens")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else stop if stop is not None else ()
    if not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP} of them", param="stop")
    return SamplingParams(max_tokens=max_tokens or context, temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
                          seed=seed, ignore_eos=get(body, "ignore_eos", bool, False), stop=tuple(stops),
                          min_tokens=min_tokens)


def parse_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"{where} needs a role of system, developer, user or assistant", param=where)
        for key, value in m.items():
            if key in ("role", "content"):
                continue
            if key not in MESSAGE_KEYS:
                raise APIError(400, f"Unrecognized request argument supplied: {where}.{key}", param=f"{where}.{key}",
                               code="unknown_parameter")
            if key == "name":
                get(m, "name", str, None, where + ".")
            elif not is_one_of(value, MESSAGE_KEYS[key]):
                raise APIError(400, f"{where}.{key} is not supported by this server", param=f"{where}.{key}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"{where}.content: only text parts are supported", param=where + ".content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string or a list of text parts", param=where + ".content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def parse_prompt(prompt: Any, sampling: SamplingParams) -> Request:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return Request(prompt=prompt, sampling=sampling)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return Request(prompt_ids=prompt, sampling=sampling)  # the engine checks that they are in its vocabulary
    raise APIError(400, "'prompt' must be a non-empty string or a list of token ids (one prompt per request)", param="prompt")


def get(body: dict, name: str, kind: type, default: Any, where: str = "") -> Any:
    """body[name] checked against `kind` (an int is a float too; a bool is neither); null means the default."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
        try:
            value = float(value)
        except OverflowError:  # an integer past a float's range: surely out of range, so say which
            value = float("inf")
    if not ok:
        raise APIError(400, f"'{where}{name}' must be {_KINDS[kind]}, got {_kind_of(value)}", param=where + name)
    return value


_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "an object", list: "an array"}


def _kind_of(value: Any) -> str:
    """The JSON type of a parsed value, in words."""
    return next((name for kind, name in _KINDS.items() if isinstance(value, kind)), "null")


def is_one_of(value: Any, allowed: tuple) -> bool:
    """`value in allowed`, types included: 0 is not False and 1 is not True here."""
    return any(type(value) is type(a) and value == a for a in allowed)


def _spell(values: tuple) -> str:
    return " or ".join(json.dumps(v) for v in values)


async def read_body(request: HTTPRequest, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it passes `limit` bytes (by its Content-Length, or as it streams)."""
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is larger than this server takes ({limit} bytes)", code="request_too_large")
    if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object whose every string is valid text; APIError(400) otherwise."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON or bytes, a number too long for Python, nesting too deep
        raise APIError(400, f"the body is not valid JSON that this server can read: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    if (where := invalid_text(body)) is not None:
        raise APIError(400, f"{where or 'a key'} is not valid text: it holds a lone surrogate (half of a UTF-16 pair), "
                            "which UTF-8 cannot encode", param=where or None)
    return body


def invalid_text(value: Any) -> str | None:
    """The path ('messages[0].content') of the first string in a parsed JSON value, key or value, that is not valid
    Unicode text (a lone surrogate, which JSON's \\ud800 escapes can carry); '' for a bad top-level key; else None."""
    todo = [("", value)]
    while todo:  # by hand: a recursive walk could meet nesting as deep as the parser allows
        where, v = todo.pop()
        if isinstance(v, str):
            if not _encodes(v):
                return where
        elif isinstance(v, dict):
            for k, item in v.items():
                if not _encodes(k):
                    return where  # the key itself cannot be named in a valid message
                todo.append((f"{where}.{k}" if where else k, item))
        elif isinstance(v, list):
            todo += [(f"{where}[{i}]", item) for i, item in enumerate(v)]
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def engine_error(e: Exception) -> APIError:
    """The HTTP error for an exception from submitting or running a request."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, OverloadedError):
        return APIError(429, str(e), "rate_limit_exceeded", code="rate_limit_exceeded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    return APIError(500, f"{type(e).__name__}: {e}", "server_error")


def sse_data(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def until_disconnect(http: HTTPRequest, work: Any) -> Any:
    """Await `work`, or raise ClientGone (cancelling it) as soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(wait_disconnect(http))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone
    return task.result()


async def wait_disconnect(http: HTTPRequest) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _peer(request: HTTPRequest) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "?"


# ---- 404, 405 and 500 in OpenAI's shape ------------------------------------------------------------

STATUS_TYPES = {404: "not_found_error", 405: "invalid_request_error", 500: "server_error"}


async def http_error(request: HTTPRequest, exc: HTTPException) -> Response:
    """Starlette's own errors (no such route, wrong method) as OpenAI error objects."""
    messages = {404: f"no route {request.url.path}: the API is under /v1, the realtime WebSocket at /v1/realtime",
                405: f"{request.method} is not allowed on {request.url.path}"}
    error = APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                     STATUS_TYPES.get(exc.status_code, "invalid_request_error"), headers=exc.headers)
    return error.response()


async def server_error(request: HTTPRequest, exc: Exception) -> Response:
    """A fault of ours, as an OpenAI error object (Starlette still logs the traceback)."""
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()


EXCEPTION_HANDLERS = {HTTPException: http_error, Exception: server_error}  # for Starlette(exception_handlers=...)
