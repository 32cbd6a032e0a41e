"""OpenAI-compatible HTTP API (FastAPI) over the serving engine and optional encoder models.

Endpoints: POST /v1/completions, /v1/chat/completions (SSE streaming or not), /v1/embeddings,
/v1/classify; GET /v1/models, /health (liveness), /ready (readiness), /metrics (Prometheus).

Lifecycle. `create_app(load)` returns at once; `load()` (which loads the models and builds the
engine) runs in a worker thread after the server starts listening, so /health answers at once and
/ready says 503 until the models are in. `drain(app, timeout_s)` (called on SIGTERM by the server)
makes every new API request a 503 while the requests in flight finish.

Errors always have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for every
validation failure (FastAPI's 422 is turned into 400), 401 without a valid key when keys are set,
404 for an unknown model, 413 for a body over the limit, 429 when the queue is full and 503 while
loading or draining (both with Retry-After). An error in the middle of a stream is sent as a final
`data: {"error": ...}` frame followed by `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as p
from .encoders import Classifier, Embedder
from .engine import EngineDrainingError
from .metrics import ServingMetrics
from .protocol import APIError
from .scheduler import QueueFullError

logger = logging.getLogger(__name__)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class APIConfig:
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    max_body_bytes: int = 4 * 1024 * 1024
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes={self.max_body_bytes} must be >= 1")
        if any(not isinstance(k, str) or not k for k in self.api_keys):
            raise ValueError("api_keys must be non-empty strings")


@dataclass
class Backends:
    """What the server hosts once loaded: a generative engine and/or encoder models."""

    engine: Any = None  # AsyncEngine (or anything with its interface)
    tokenizer: Any = None  # the generative model's tokenizer
    model_name: str | None = None  # id of the generative model in /v1/models
    max_model_len: int | None = None  # prompt + completion tokens; None = read from the engine
    vocab_size: int | None = None
    aliases: tuple[str, ...] = ()  # other names accepted for the generative model
    embedder: Embedder | None = None
    classifier: Classifier | None = None

    def __post_init__(self) -> None:
        if self.engine is not None and (self.tokenizer is None or not self.model_name):
            raise ValueError("a generative engine needs its tokenizer and a model_name")
        if self.engine is None and self.embedder is None and self.classifier is None:
            raise ValueError("Backends needs at least one of engine, embedder, classifier")
        inner = getattr(self.engine, "engine", self.engine)  # AsyncEngine wraps an Engine
        if self.max_model_len is None:
            self.max_model_len = getattr(inner, "max_model_len", None)
        if self.vocab_size is None and self.tokenizer is not None:
            self.vocab_size = getattr(inner, "vocab_size", None) or self.tokenizer.vocab_size

    def generative_names(self) -> list[str]:
        return [self.model_name, *self.aliases] if self.engine is not None else []


class ServerState:
    """Mutable server-wide state: the loading phase, the backends and the requests in flight."""

    def __init__(self, config: APIConfig) -> None:
        self.config = config
        self.phase = "loading"  # loading → ready → draining; or failed
        self.error: str | None = None
        self.backends: Backends | None = None
        self.in_flight = 0
        self.metrics = ServingMetrics(self._engine_stats)

    def _engine_stats(self) -> dict | None:
        engine = self.backends.engine if self.backends else None
        return engine.stats() if engine is not None else None

    @property
    def ready(self) -> bool:
        engine = self.backends.engine if self.backends else None
        return self.phase == "ready" and (engine is None or getattr(engine, "is_ready", True))


# ============================================================================ app factory
def create_app(load: Callable[[], Backends] | Backends, config: APIConfig | None = None) -> FastAPI:
    """The API app. `load` is a Backends or a function building one (run in a thread at startup)."""
    state = ServerState(config or APIConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(_load(state, load))
        yield
        loading.cancel()
        if state.backends is not None and state.backends.engine is not None:
            state.backends.engine.shutdown()

    app = FastAPI(title="lmsmith", version="0.1.0", lifespan=lifespan)
    app.state.lmsmith = state
    app.add_middleware(GuardMiddleware, state=state)
    _add_error_handlers(app, state)
    _add_probe_routes(app, state)
    app.include_router(_v1_router(state), dependencies=[Depends(_auth_dependency(state))])
    return app


async def _load(state: ServerState, load: Callable[[], Backends] | Backends) -> None:
    try:
        backends = load if isinstance(load, Backends) else await asyncio.to_thread(load)
        if backends.engine is not None:
            state.metrics.attach(backends.engine)
            backends.engine.start()
    except Exception as err:  # the server stays up to report it: /health says 500, /ready 503
        logger.exception("loading the models failed")
        state.phase, state.error = "failed", f"{type(err).__name__}: {err}"
        return
    state.backends = backends
    if state.phase == "loading":
        state.phase = "ready"
    logger.info("models loaded; ready")


async def drain(app: FastAPI, timeout_s: float) -> None:
    """Refuse new API requests (503), let those in flight finish for up to timeout_s, abort the rest."""
    state: ServerState = app.state.lmsmith
    state.phase = "draining" if state.phase != "failed" else state.phase
    deadline = time.monotonic() + timeout_s
    engine = state.backends.engine if state.backends else None
    if engine is not None:
        await engine.drain(timeout_s)
    # Responses still sending their last bytes (or encoder requests) get a short grace period.
    while state.in_flight > 0 and time.monotonic() < deadline + 2.0:
        await asyncio.sleep(0.02)


# ============================================================================ middleware
class GuardMiddleware:
    """Body-size limit (413) and the in-flight count, as plain ASGI so streams are not buffered.

    The body is read up front (bounded by the limit) and replayed; after it, `receive` is the
    server's again, so a handler can still see the client's `http.disconnect`.
    """

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.state.config.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(send, _too_large(limit))
        body, complete = await _read_body(receive, limit)
        if not complete:
            return await _send_error(send, _too_large(limit))
        counted = scope["path"].startswith("/v1/")
        self._count(+1 if counted else 0)
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self._count(-1 if counted else 0)

    def _count(self, delta: int) -> None:
        self.state.in_flight += delta
        self.state.metrics.requests_in_flight.set(self.state.in_flight)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large")


async def _read_body(receive, limit: int) -> tuple[bytes, bool]:
    """The whole body, or (partial, False) as soon as it exceeds `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), True  # disconnected: let the app see an empty body
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", False
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_error(send, err: APIError) -> None:
    payload = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# ============================================================================ errors
def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        if err.status in (429, 503):
            state.metrics.requests_rejected.labels(err.code).inc()
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return error_response(validation_to_api_error(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return error_response(APIError(err.status_code, str(err.detail), code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        logger.exception("unhandled error in %s", request.url.path)
        return error_response(APIError(500, f"internal server error: {type(err).__name__}",
                                       type="server_error", code="internal_error"))


def validation_to_api_error(errors: list[dict]) -> APIError:
    """FastAPI's validation errors as one OpenAI-style 400 naming the first bad parameter."""
    if not errors:
        return p.bad_request("invalid request")
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return p.bad_request(f"request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    if not loc:
        return p.bad_request(f"request body: {first.get('msg', 'invalid')} (expected a JSON object)",
                             code="invalid_body")
    param = ".".join(loc)
    return p.bad_request(f"{param}: {first.get('msg', 'invalid value')}", param=loc[0], code="invalid_value")


# ============================================================================ probes and metrics
def _add_probe_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", include_in_schema=True)
    async def health():
        if state.phase == "failed":
            return JSONResponse({"status": "failed", "error": state.error}, status_code=500)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.ready:
            return {"status": "ready"}
        status = state.phase if state.phase != "ready" else "engine_not_running"
        headers = {"Retry-After": str(state.config.retry_after_s)}
        return JSONResponse({"status": status, "error": state.error}, status_code=503, headers=headers)

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)


def _auth_dependency(state: ServerState):
    keys = [k.encode() for k in state.config.api_keys]

    async def check_api_key(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # compare with every key (no early exit), each in constant time
        matches = [hmac.compare_digest(given, key) for key in keys]
        if not any(matches):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    return check_api_key


def _ready_backends(state: ServerState) -> Backends:
    if state.phase == "draining":
        raise p.unavailable("the server is shutting down; retry on another instance",
                            state.config.retry_after_s, "server_draining")
    if state.phase == "failed":
        raise p.unavailable(f"model loading failed: {state.error}", state.config.retry_after_s, "load_failed")
    if not state.ready:
        raise p.unavailable("the model is still loading; retry shortly", state.config.retry_after_s,
                            "model_loading")
    return state.backends


# ============================================================================ /v1 routes
def _v1_router(state: ServerState) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def list_models():
        return _models_body(_ready_backends(state))

    @router.post("/completions")
    async def completions(body: p.CompletionRequest, request: Request):
        return await _completion(state, body, request)

    @router.post("/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        return await _chat(state, body, request)

    @router.post("/embeddings")
    async def embeddings(body: p.EmbeddingRequest):
        return await _embeddings(state, body)

    @router.post("/classify")
    async def classify(body: p.ClassifyRequest):
        return await _classify(state, body)

    return router


def _models_body(b: Backends) -> dict:
    created = p.now_s()
    entries = []
    if b.engine is not None:
        entries.append({"id": b.model_name, "object": "model", "created": created, "owned_by": "lmsmith",
                        "type": "generate", "max_model_len": b.max_model_len})
    if b.embedder is not None:
        entries.append({"id": b.embedder.name, "object": "model", "created": created, "owned_by": "lmsmith",
                        "type": "embedding", "dimensions": b.embedder.dimensions})
    if b.classifier is not None:
        entries.append({"id": b.classifier.name, "object": "model", "created": created, "owned_by": "lmsmith",
                        "type": "classify", "labels": list(b.classifier.labels)})
    return {"object": "list", "data": entries}


def _check_model(requested: str | None, served: list[str], kind: str) -> str:
    """The served name the request addresses (404 when it names another model or none is served)."""
    if not served:
        raise APIError(404, f"no {kind} model is served by this server", param="model", code="model_not_found")
    if requested is None or requested in served:
        return served[0]
    raise p.model_not_found(requested, served[:1])


# ---------------------------------------------------------------------------- generation
@dataclass
class _Job:
    """One submitted generation: its id, output stream and what the response needs to say."""

    request_id: str
    outputs: Any  # async iterator of RequestOutput
    model: str
    created: int
    prompt_tokens: int


def _prepare(state: ServerState, body: p._GenerationRequest, prompt_ids: list[int], prefix: str,
             default_max_tokens: int | None, b: Backends, model: str) -> _Job:
    """Check limits, build SamplingParams and enqueue; errors are APIErrors with the right status."""
    p.check_token_ids(prompt_ids, b.vocab_size, "prompt")
    limit = b.max_model_len
    max_tokens = p.requested_max_tokens(body) or default_max_tokens
    if max_tokens is None:  # chat without max_tokens: up to the end of the context
        max_tokens = max(limit - len(prompt_ids), 1) if limit else 256
    if limit is not None:
        p.check_context(len(prompt_ids), max_tokens, limit, "prompt")
    params = p.sampling_params(body, max_tokens)
    rid = p.new_id(prefix)
    outputs = _submit(state, b.engine, prompt_ids, params, body.priority, rid)
    return _Job(rid, outputs, model, p.now_s(), len(prompt_ids))


def _submit(state: ServerState, engine, prompt_ids, params, priority: int, rid: str):
    retry = state.config.retry_after_s
    try:
        return engine.generate(prompt_ids, params, priority=priority, request_id=rid)
    except QueueFullError as err:
        raise p.queue_full(f"the server is at capacity ({err}); retry later", retry) from err
    except EngineDrainingError as err:
        raise p.unavailable(f"the server is shutting down ({err})", retry, "server_draining") from err
    except ValueError as err:
        code = "context_length_exceeded" if "exceeds" in str(err) else "invalid_request"
        raise p.bad_request(str(err), code=code) from err


async def _completion(state: ServerState, body: p.CompletionRequest, request: Request):
    b = _ready_backends(state)
    model = _check_model(body.model, b.generative_names(), "generative")
    p.check_supported(body)
    prompt = p.single_prompt(body.prompt)
    ids = b.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise p.bad_request("prompt encodes to no tokens", param="prompt", code="empty_prompt")
    job = _prepare(state, body, ids, "cmpl", DEFAULT_COMPLETION_MAX_TOKENS, b, model)
    if body.stream:
        return _sse(job, _completion_events(job, _include_usage(body)))
    final = await _collect(job, request)
    return p.completion_body(job.request_id, model, final.text, final.finish_reason, job.created,
                             chunk=False, use=_usage_of(final))


async def _chat(state: ServerState, body: p.ChatCompletionRequest, request: Request):
    b = _ready_backends(state)
    model = _check_model(body.model, b.generative_names(), "generative")
    p.check_supported(body)
    messages = p.chat_messages(body)
    try:
        text = b.tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
    except ValueError as err:  # no template, or the template's raise_exception()
        raise p.bad_request(f"cannot render the chat: {err}", param="messages") from err
    ids = b.tokenizer.encode(text, add_special_tokens=False)
    job = _prepare(state, body, ids, "chatcmpl", None, b, model)
    if body.stream:
        return _sse(job, _chat_events(job, _include_usage(body)))
    final = await _collect(job, request)
    return p.chat_body(job.request_id, model, final.text, final.finish_reason, job.created, _usage_of(final))


def _include_usage(body: p._GenerationRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _usage_of(output) -> dict:
    return p.usage(output.prompt_tokens, output.completion_tokens, output.cached_tokens)


def _raise_if_failed(output) -> None:
    """An output that ended without a result ("abort": shutdown; "error": the forward failed)."""
    if output.finish_reason == "abort":
        raise p.unavailable("the request was aborted (the server is shutting down)", 1, "request_aborted")
    if output.finish_reason == "error":
        detail = getattr(output, "error", None) or "model forward failed"
        raise APIError(500, f"generation failed: {detail}", type="server_error", code="generation_failed")


async def _collect(job: _Job, request: Request):
    """The final output of a non-streamed request; aborts it if the client disconnects first."""
    async def consume():
        async for output in job.outputs:
            if output.finished:
                return output
        raise APIError(500, "the engine ended the request without a final output", type="server_error",
                       code="internal_error")

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():  # the client left (or we were cancelled): abort the generation
            consumer.cancel()
            await _close_stream(job.outputs)
    if consumer.cancelled():
        raise APIError(499, "client disconnected", code="client_disconnected")
    final = consumer.result()
    _raise_if_failed(final)
    return final


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _close_stream(outputs) -> None:
    """Close the engine's stream (which aborts an unfinished request), even while being cancelled."""
    with anyio.CancelScope(shield=True):
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            await aclose()


# ---------------------------------------------------------------------------- streaming
class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always runs `on_close` when it ends: finished, failed, or cancelled
    because the client went away, even before the body iterator was first entered."""

    def __init__(self, content, on_close: Callable[[], Awaitable[None]], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


def _sse(job: _Job, events: AsyncIterator[str]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return ClosingStreamingResponse(events, on_close=lambda: _close_stream(job.outputs),
                                    media_type="text/event-stream", headers=headers)


def sse_frame(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


async def _guarded(job: _Job, events: AsyncIterator[dict]) -> AsyncIterator[str]:
    """SSE frames for `events`; any failure becomes an error frame; always ends with [DONE].

    A client that disconnects cancels this generator (Starlette); the response's on_close then
    closes the engine stream, which aborts the request and frees its KV blocks.
    """
    try:
        async for event in events:
            yield sse_frame(event)
    except APIError as err:
        yield sse_frame(err.body())
    except Exception as err:  # the stream has started: report the error in it, do not drop the connection
        logger.exception("error during stream %s", job.request_id)
        yield sse_frame(APIError(500, f"internal error during streaming: {type(err).__name__}",
                                 type="server_error", code="internal_error").body())
    yield sse_frame("[DONE]")


async def _stream_outputs(job: _Job):
    async for output in job.outputs:
        if output.finished:
            _raise_if_failed(output)
        yield output
        if output.finished:
            return


def _completion_events(job: _Job, include_usage: bool) -> AsyncIterator[str]:
    async def events():
        final = None
        async for output in _stream_outputs(job):
            final = output
            if output.new_text or output.finished:
                yield p.completion_body(job.request_id, job.model, output.new_text,
                                        output.finish_reason if output.finished else None, job.created, chunk=True)
        if include_usage and final is not None:
            yield p.usage_chunk(job.request_id, job.model, "text_completion", job.created, _usage_of(final))

    return _guarded(job, events())


def _chat_events(job: _Job, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish_reason: str | None) -> dict:
        return p.chat_chunk(job.request_id, job.model, delta, finish_reason, job.created, include_usage)

    async def events():
        yield chunk({"role": "assistant", "content": ""}, None)
        final = None
        async for output in _stream_outputs(job):
            final = output
            if output.new_text:
                yield chunk({"content": output.new_text}, None)
            if output.finished:
                yield chunk({}, output.finish_reason)
        if include_usage and final is not None:
            yield p.usage_chunk(job.request_id, job.model, "chat.completion.chunk", job.created, _usage_of(final))

    return _guarded(job, events())


# ---------------------------------------------------------------------------- encoders
async def _embeddings(state: ServerState, body: p.EmbeddingRequest) -> dict:
    b = _ready_backends(state)
    embedder = b.embedder
    name = _check_model(body.model, [embedder.name] if embedder else [], "embedding")
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise p.bad_request(f"dimensions={body.dimensions} is not supported: {name} embeddings have "
                            f"{embedder.dimensions} dimensions", param="dimensions", code="unsupported_parameter")
    batch = _encode(embedder, p.embedding_inputs(body.input))
    vectors = (await asyncio.to_thread(embedder.embed, batch.token_ids, body.normalize)).numpy()
    data = [p.embedding_item(i, v, body.encoding_format) for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": name,
            "usage": {"prompt_tokens": batch.num_tokens, "total_tokens": batch.num_tokens}}


async def _classify(state: ServerState, body: p.ClassifyRequest) -> dict:
    b = _ready_backends(state)
    classifier = b.classifier
    name = _check_model(body.model, [classifier.name] if classifier else [], "classifier")
    batch = _encode(classifier, p.embedding_inputs(body.input))
    probs = (await asyncio.to_thread(classifier.probabilities, batch.token_ids)).tolist()
    labels = classifier.labels
    data = []
    for i, row in enumerate(probs):
        best = max(range(len(row)), key=row.__getitem__)
        data.append({"index": i, "label": labels[best], "score": row[best],
                     "probs": dict(zip(labels, row)), "num_classes": len(labels)})
    return {"id": p.new_id("classify"), "object": "list", "created": p.now_s(), "model": name,
            "labels": list(labels), "data": data,
            "usage": {"prompt_tokens": batch.num_tokens, "total_tokens": batch.num_tokens}}


def _encode(encoder, inputs):
    try:
        return encoder.encode(inputs)
    except ValueError as err:
        code = "context_length_exceeded" if "at most" in str(err) else "invalid_request"
        raise p.bad_request(str(err), param="input", code=code) from err
