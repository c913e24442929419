"""The OpenAI-compatible HTTP layer: FastAPI routes, request validation, SSE streaming, errors, metrics.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``"stream": true`` answers with
server-sent events ``data: {...}`` ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text format). Browsers may call them from other origins (CORS,
``allowed_origins``).

Errors follow OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for bad JSON,
invalid or unsupported parameters and prompts over the limits (``code: "context_length_exceeded"``),
404 for an unknown model (``"model_not_found"``) or route, 408 for a request that ran past the
server's timeout, 429 when the server is at capacity, 503 while it drains (SIGTERM).

Chat prompts: the tokenizer's chat template when it has one; otherwise ``SIMPLE_CHAT_TEMPLATE`` (one
``Role: content`` line per message, then ``Assistant:``), so base models without a template (the
embedded default model) still answer chat requests.

Sampling: the model's ``generation_config`` repetition penalty applies (as ``generate()`` applies it;
``"repetition_penalty"`` in the request overrides it); ``temperature`` (default 1, as OpenAI; 0 is
greedy), ``top_p``, ``seed``, ``stop`` (up to 4 strings) and ``max_tokens`` / ``max_completion_tokens``.
``n`` > 1, ``logprobs``, ``echo`` and nonzero presence/frequency penalties are refused with a 400.

Example::

    app = create_app(model, tokenizer, batcher, model_id="default")
    uvicorn.run(app, port=8000)
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moe_engine.serve.batcher import Batcher, Event, QueueFullError, SamplingParams, ShuttingDownError

SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class APIError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int
    context: int | None  # the model's max_position_embeddings


def render_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat prompt: the tokenizer's chat template, else ``SIMPLE_CHAT_TEMPLATE``."""
    template = None if getattr(tokenizer, "chat_template", None) else SIMPLE_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- validation
def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be a number, got {json.dumps(value)}", param=name)
    if not ((lo < value if lo_open else lo <= value) and value <= hi):
        raise APIError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value}", param=name)
    return float(value)


def _int(body: dict, name: str, default: int | None, lo: int, hi: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {json.dumps(value)}", param=name)
    if value < lo or (hi is not None and value > hi):
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return value


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise APIError(400, f"{where} must be a string or a list of text parts", param="messages")


class Service:
    """Everything a route needs: tokenizer, batcher, limits and the metrics registry."""

    def __init__(self, tokenizer, batcher: Batcher, model_id: str, limits: Limits, repetition_penalty: float,
                 eos_token_ids: frozenset[int]) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.batcher = batcher
        self.model_id = model_id
        self.limits = limits
        self.repetition_penalty = repetition_penalty
        self.eos_token_ids = eos_token_ids
        self.created = int(time.time())
        self.draining = False
        self.http_requests: dict[tuple[str, int], int] = {}

    # ------------------------------------------------------------------ request -> prompt + params
    def params(self, body: dict, default_max: int) -> tuple[SamplingParams, list[str], bool]:
        model = body.get("model")
        if model is None:
            raise APIError(400, "missing required parameter 'model'", param="model")
        if model != self.model_id:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_id}' "
                           "(GET /v1/models)", param="model", code="model_not_found")  # fmt: skip
        if _int(body, "n", 1, 1, None) != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if _number(body, name, 0.0, -2.0, 2.0) != 0:
                raise APIError(400, f"'{name}' is not supported (use 'repetition_penalty')", param=name)
        if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if body.get("echo") not in (None, False):
            raise APIError(400, "echo is not supported", param="echo")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be true or false", param="stream")
        lim = self.limits.max_new_tokens
        max_tokens = _int(body, "max_completion_tokens", None, 1, lim)
        max_tokens = _int(body, "max_tokens", default_max if max_tokens is None else max_tokens, 1, lim)
        stop = body.get("stop")
        if stop is None:
            stops: list[str] = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise APIError(400, "'stop' must be a string or a list of at most 4 strings", param="stop")
        stops = [s for s in stops if s]
        seed = _int(body, "seed", None, -(2**63), 2**63 - 1)
        params = SamplingParams(
            max_new_tokens=int(max_tokens or default_max),
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            repetition_penalty=_number(body, "repetition_penalty", self.repetition_penalty, 0.0, 10.0, lo_open=True),
            seed=None if seed is None else seed % 2**63,
            stop_token_ids=self.eos_token_ids,
        )
        return params, stops, stream

    def check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        n = len(ids)
        if n == 0:
            raise APIError(400, "the prompt is empty; send some text", param="prompt")
        if n > self.limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {n} tokens; this server accepts at most "
                           f"{self.limits.max_prompt_tokens} (--max-prompt-tokens)", code="context_length_exceeded")  # fmt: skip
        ctx = self.limits.context
        if ctx is not None and n + params.max_new_tokens > ctx:
            raise APIError(400, f"the prompt's {n} tokens plus max_tokens {params.max_new_tokens} exceed the "
                           f"model's context of {ctx}; ask for at most {max(ctx - n, 0)} tokens",
                           param="max_tokens", code="context_length_exceeded")  # fmt: skip
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")

    def completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise APIError(400, "'prompt' must be a string, a list of token ids, or a list of one of those", param="prompt")

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
                raise APIError(400, f"messages[{i}] needs a 'role' of system, user, assistant or tool", param="messages")
            clean.append({"role": m["role"], "content": _text(m.get("content", ""), f"messages[{i}].content")})
        return render_chat(self.tokenizer, clean)

    # ------------------------------------------------------------------ generation
    async def generate(self, ids: list[int], params: SamplingParams, stops: list[str],
                       request: Request, incremental: bool = True) -> AsyncIterator[tuple[str, str | None]]:  # fmt: skip
        """Yield ``(text_delta, None)`` as tokens arrive, then ``("", finish_reason)``. The sequence is
        cancelled in the engine whenever this generator stops early (client gone, stop string).

        ``incremental`` False (a non-streaming request): without stop strings the engine thread keeps the
        tokens and wakes this loop only when the sequence ends, and the text is decoded once (this loop
        shares the GIL with the engine thread: at 16 requests a step, a wake-up and a decode per token
        are work taken from the step)."""
        if self.draining:
            raise APIError(503, "the server is shutting down", type_="server_error", code="shutting_down")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        tokens: list[int] = []
        quiet = not incremental and not stops  # nothing to do per token: the loop is woken at the end only

        def sink(ev: Event) -> None:
            if quiet and ev.token is not None and ev.finish_reason is None:
                tokens.append(ev.token)  # the engine thread; read after the finish event, queued after it
                return
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        try:
            seq_id = self.batcher.submit(ids, params, sink)
        except QueueFullError as exc:
            raise APIError(429, str(exc), type_="server_error", code="server_overloaded") from None
        except ShuttingDownError as exc:
            raise APIError(503, str(exc), type_="server_error", code="shutting_down") from None
        finished = False
        sent = ""
        hold = max((len(s) for s in stops), default=1) - 1
        checked = time.monotonic()
        try:
            while True:
                try:
                    ev = queue.get_nowait()  # the common case under load: no waiting task to create
                except asyncio.QueueEmpty:
                    try:
                        ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        ev = None
                if time.monotonic() - checked >= 0.5 or ev is None:
                    # A client gone (non-streaming: nothing else notices) frees its sequence within 0.5 s.
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if ev is None:
                    continue
                if ev.token is not None:
                    tokens.append(ev.token)
                    if not incremental and not stops:
                        continue
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        if cut > len(sent):
                            yield text[len(sent) : cut], None
                        yield "", "stop"
                        return
                    # Hold back an incomplete UTF-8 character and what could be the start of a stop string.
                    ready = len(text) - (hold if stops else 0)
                    if text.endswith("\ufffd"):
                        ready = min(ready, len(text) - 1)
                    if ready > len(sent):
                        yield text[len(sent) : ready], None
                        sent = text[:ready]
                    continue
                finished = True
                if ev.finish_reason == "timeout":
                    raise APIError(408, ev.error or "request timed out", type_="timeout", code="timeout")
                if ev.finish_reason in ("error", "cancelled"):
                    raise APIError(500, ev.error or "the request was cancelled", type_="server_error")
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if len(text) > len(sent):
                    yield text[len(sent) :], None
                yield "", ev.finish_reason
                return
        finally:
            if not finished:
                self.batcher.cancel(seq_id)

    def count(self, path: str, status: int) -> None:
        self.http_requests[(path, status)] = self.http_requests.get((path, status), 0) + 1


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


class _CountRequests:
    """Pure ASGI middleware counting answers by path and status (Starlette's ``BaseHTTPMiddleware``
    would wrap every streamed chunk and get in the way of disconnect detection)."""

    def __init__(self, app, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.service.count(scope["path"], status)


def create_app(service: Service, *, lifespan=None, allowed_origins: Sequence[str] = ("*",)) -> FastAPI:
    """The FastAPI app over ``service`` (``lifespan``: an async context manager run around serving).
    ``allowed_origins``: web origins whose pages may call the API from a browser (CORS, Starlette's
    middleware; ``"*"``: any, as llama.cpp's and vLLM's servers default to; empty: same origin only)."""
    app = FastAPI(title="moe-engine", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        return JSONResponse(err.body(), status_code=exc.status_code)

    app.add_middleware(_CountRequests, service=service)
    if allowed_origins:  # added last: the outermost layer, so it answers preflight OPTIONS requests itself
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])  # fmt: skip

    async def _run(request: Request, chat: bool) -> Response:
        body = await _body(request)
        default_max = service.limits.max_new_tokens if chat else min(16, service.limits.max_new_tokens)
        params, stops, stream = service.params(body, default_max)
        ids = service.chat_prompt(body) if chat else service.completion_prompt(body)
        service.check_prompt(ids, params)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        gen = service.generate(ids, params, stops, request, incremental=stream)
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(
                body.get("stream_options"), dict) else False  # fmt: skip
            try:  # errors before the first token (capacity, shutdown) are plain HTTP errors
                first = await gen.__anext__()
            except StopAsyncIteration:
                first = None

            def chunk(delta: str, finish: str | None) -> dict:
                if chat:
                    choice = {"index": 0, "delta": {"content": delta} if delta or finish is None else {},
                              "finish_reason": finish, "logprobs": None}  # fmt: skip
                    return {"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": service.model_id, "choices": [choice]}  # fmt: skip
                return {"id": rid, "object": "text_completion", "created": created, "model": service.model_id,
                        "choices": [{"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}]}  # fmt: skip

            async def events() -> AsyncIterator[str]:
                streamed: list[str] = []
                try:
                    if chat:
                        head = chunk("", None)
                        head["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                        yield _sse(head)
                    pending = [first] if first is not None else []
                    while True:
                        if pending:
                            delta, finish = pending.pop()
                        else:
                            try:
                                delta, finish = await gen.__anext__()
                            except StopAsyncIteration:
                                break
                        streamed.append(delta)
                        yield _sse(chunk(delta, finish))
                        if finish is not None:
                            break
                    if include_usage:
                        text = "".join(streamed)
                        n = len(service.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
                        usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
                        yield _sse({"id": rid, "object": kind + ".chunk" if chat else kind, "created": created,
                                    "model": service.model_id, "choices": [], "usage": usage})  # fmt: skip
                    yield "data: [DONE]\n\n"
                except APIError as exc:
                    yield _sse(exc.body())
                    yield "data: [DONE]\n\n"
                finally:
                    await gen.aclose()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        parts: list[str] = []
        finish: str | None = None
        try:
            async for delta, fin in gen:
                parts.append(delta)
                finish = fin or finish
        finally:
            await gen.aclose()
        text = "".join(parts)
        n_out = len(service.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
        usage = {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out}
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": finish, "logprobs": None}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return JSONResponse({"id": rid, "object": kind, "created": created, "model": service.model_id,
                             "choices": [choice], "usage": usage})  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _run(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": service.created,
                                            "owned_by": "moe-engine"}]}  # fmt: skip

    @app.get("/health")
    async def health() -> JSONResponse:
        b = service.batcher
        if b.error is not None:
            return JSONResponse({"status": "error", "error": repr(b.error)}, status_code=503)
        status = "draining" if service.draining else "ok"
        return JSONResponse({"status": status, "running": b.metrics.running, "waiting": b.metrics.waiting},
                            status_code=503 if service.draining else 200)  # fmt: skip

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        from moe_engine.serve.metrics import render

        text, content_type = render(service)
        return PlainTextResponse(text, media_type=content_type)

    return app
