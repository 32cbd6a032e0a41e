"""OpenAI-compatible request models, response builders and errors: plain data, no web framework.

Requests are Pydantic models (FastAPI validates bodies against them and publishes them in
/openapi.json). Fields OpenAI defines but we cannot honour (n > 1, logprobs, echo, tools, ...) are
accepted in the schema and rejected with a 400 that says so, rather than silently ignored.
Extension fields (vLLM's names where they exist): top_k, min_p, repetition_penalty, stop_token_ids,
ignore_eos, priority (lower = more important), normalize (embeddings).
"""
from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .request import SamplingParams

INT64_MAX = 2**63 - 1
PRIORITY_LIMIT = 1_000_000


# ============================================================================ errors
@dataclass
class APIError(Exception):
    """An error the client sees as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str = "invalid_request"
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str, available: list[str]) -> APIError:
    listed = ", ".join(available) or "none"
    return APIError(404, f"The model `{name}` does not exist or is not served by this endpoint "
                         f"(available: {listed}).", param="model", code="model_not_found")


def unavailable(message: str, retry_after_s: int, code: str) -> APIError:
    return APIError(503, message, type="server_error", code=code, headers={"Retry-After": str(retry_after_s)})


def queue_full(message: str, retry_after_s: int) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(retry_after_s)})


# ============================================================================ requests
class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers commonly do (clients send extras).
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _GenerationRequest(_Request):
    """The sampling and streaming fields shared by completions and chat completions."""

    model: str | None = Field(None, description="served model id; omitted = the generative model")
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX, description="extension; 0 or -1 = off")
    min_p: float | None = Field(None, ge=0, lt=1, description="extension")
    repetition_penalty: float | None = Field(None, gt=0, le=100, description="extension; 1 = off")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is supported")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is supported")
    seed: int | None = Field(None, ge=-(2**63), le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, description="extension")
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-sequence tokens")
    n: int = Field(1, ge=1, le=128, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = Field(0, ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT,
                          description="extension: scheduling priority, lower = more important")
    logit_bias: dict[str, float] | None = Field(None, description="not supported")
    user: str | None = None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = Field(False, description="not supported")
    logprobs: int | None = Field(None, ge=0, le=20, description="not supported")
    best_of: int | None = Field(None, ge=1, le=128, description="only 1 is supported")
    suffix: str | None = Field(None, description="not supported")


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ResponseFormat(_Request):
    type: str = "text"


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX, description="alias of max_tokens")
    logprobs: bool | None = Field(None, description="not supported")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="not supported")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported")
    tool_choice: str | dict[str, Any] | None = Field(None, description="only 'none' is supported")
    response_format: ResponseFormat | None = Field(None, description="only type 'text' is supported")
    add_generation_prompt: bool = Field(True, description="extension")


class EmbeddingRequest(_Request):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=INT64_MAX, description="only the model's own size")
    normalize: bool = Field(True, description="extension: L2-normalise each embedding")
    user: str | None = None


class ClassifyRequest(_Request):
    model: str | None = None
    input: str | list[str]


# ============================================================================ request checks
def _unsupported(request: _Request) -> list[tuple[str, str]]:
    """(param, message) for every field set to something we do not implement."""
    r = request
    found = []
    if r.n != 1:
        found.append(("n", f"n={r.n} is not supported: this server returns exactly one choice (n=1)"))
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(r, name) not in (None, 0):
            found.append((name, f"{name} is not supported (use repetition_penalty)"))
    if r.logit_bias:
        found.append(("logit_bias", "logit_bias is not supported"))
    if isinstance(r, CompletionRequest):
        found += _unsupported_completion(r)
    if isinstance(r, ChatCompletionRequest):
        found += _unsupported_chat(r)
    return found


def _unsupported_completion(r: CompletionRequest) -> list[tuple[str, str]]:
    found = []
    if r.echo:
        found.append(("echo", "echo is not supported"))
    if r.logprobs is not None:
        found.append(("logprobs", "logprobs is not supported"))
    if r.best_of not in (None, 1):
        found.append(("best_of", f"best_of={r.best_of} is not supported (only 1)"))
    if r.suffix:
        found.append(("suffix", "suffix is not supported"))
    return found


def _unsupported_chat(r: ChatCompletionRequest) -> list[tuple[str, str]]:
    found = []
    if r.logprobs or r.top_logprobs:
        found.append(("logprobs", "logprobs is not supported"))
    if r.tools:
        found.append(("tools", "tools (function calling) are not supported"))
    if r.tool_choice not in (None, "none"):
        found.append(("tool_choice", "tool_choice other than 'none' is not supported"))
    if r.response_format is not None and r.response_format.type != "text":
        found.append(("response_format", (f"response_format type {r.response_format.type!r} is not supported "
                                         "(only 'text')")))
    return found


def check_supported(request: _Request) -> None:
    problems = _unsupported(request)
    if problems:
        param, message = problems[0]
        raise bad_request(message, param=param, code="unsupported_parameter")


def requested_max_tokens(request: _GenerationRequest) -> int | None:
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        return request.max_completion_tokens
    return request.max_tokens


def sampling_params(request: _GenerationRequest, max_tokens: int) -> SamplingParams:
    """The engine's SamplingParams; its own range checks become 400s."""
    stop = request.stop
    values = {
        "max_tokens": max_tokens, "seed": request.seed, "ignore_eos": request.ignore_eos,
        "stop": () if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop)),
        "stop_token_ids": tuple(request.stop_token_ids or ()),
    }
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if getattr(request, name) is not None:
            values[name] = getattr(request, name)
    try:
        return SamplingParams(**values)
    except (ValueError, TypeError) as err:
        raise bad_request(str(err), code="invalid_sampling_params") from err


def chat_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as {role, content} dicts with text parts joined; non-text parts are a 400."""
    if not request.messages:
        raise bad_request("messages is empty; send at least one message", param="messages", code="empty_prompt")
    return [{"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(request.messages)]


def _message_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"messages[{index}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                              f"supported, got type {part.get('type')!r}", param=f"messages.{index}.content")
        texts.append(part["text"])
    return "".join(texts)


def single_prompt(prompt: str | list) -> str | list[int]:
    """The one prompt of a completion request: a string or a list of token ids."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise bad_request(f"a list of {len(prompt)} prompts is not supported; send one prompt per request",
                              param="prompt", code="unsupported_parameter")
        prompt = prompt[0]
    if len(prompt) == 0:
        raise bad_request("prompt is empty; send at least one character or token", param="prompt",
                          code="empty_prompt")
    return prompt


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"{param} contains token id {bad[0]}, outside the vocabulary [0, {vocab_size})",
                          param=param, code="invalid_token_id")


def check_context(num_prompt: int, max_tokens: int, max_model_len: int, param: str) -> None:
    """400s that state the numbers: the prompt alone, or prompt + max_tokens, does not fit."""
    if num_prompt >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, but the {param} has "
            f"{num_prompt} tokens (at least one token must be left for the completion).",
            param=param, code="context_length_exceeded")
    if num_prompt + max_tokens > max_model_len:
        raise bad_request(
            f"max_tokens={max_tokens} is too large: this model's maximum context length is {max_model_len} "
            f"tokens and the {param} has {num_prompt} tokens, so at most {max_model_len - num_prompt} "
            "can be generated.", param="max_tokens", code="max_tokens_too_large")


def embedding_inputs(value: str | list) -> list[str] | list[list[int]]:
    """Normalise the four input shapes to a list of strings or a list of token-id lists."""
    if isinstance(value, str):
        items: list = [value]
    elif value and isinstance(value[0], int):
        items = [value]
    else:
        items = list(value)
    if not items:
        raise bad_request("input is empty; send at least one string or token list", param="input",
                          code="empty_prompt")
    for i, item in enumerate(items):
        if len(item) == 0:
            raise bad_request(f"input[{i}] is empty", param="input", code="empty_prompt")
    return items


# ============================================================================ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


def completion_body(rid: str, model: str, text: str, finish_reason: str | None, created: int,
                    chunk: bool, use: dict | None = None) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    body = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, text: str, finish_reason: str | None, created: int,
              use: dict | None) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None, created: int,
               with_usage_field: bool) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    if with_usage_field:
        body["usage"] = None  # OpenAI: null on every chunk but the last when include_usage is set
    return body


def usage_chunk(rid: str, model: str, obj: str, created: int, use: dict) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def embedding_item(index: int, vector: np.ndarray, encoding_format: str) -> dict[str, Any]:
    if encoding_format == "base64":  # what the openai client asks for by default: float32 little-endian
        data: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    else:
        data = vector.astype(np.float32).tolist()
    return {"object": "embedding", "index": index, "embedding": data}


def now_s() -> int:
    return int(time.time())
