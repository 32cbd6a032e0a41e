"""The HTTP API on the fake engine (fast, deterministic): shapes, streaming, errors, lifecycle, metrics."""
from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from lmsmith.model.config import PRESETS
from lmsmith.model.heads import pool
from lmsmith.model.transformer import Transformer
from lmsmith.serve.api import APIConfig, Backends, create_app, drain
from lmsmith.serve.encoders import Classifier, Embedder

from .fake_engine import REPLY, FakeAsyncEngine, byte_tokenizer

TOKENIZER = byte_tokenizer()
MESSAGES = [{"role": "user", "content": "Hi there"}]


def tiny_encoder(task: str = "base", labels: tuple[str, ...] = ()) -> Transformer:
    torch.manual_seed(0)
    config = PRESETS["tiny-bert"].replace(task=task, labels=labels, max_position_embeddings=64,
                                          classifier_pooler="cls")
    return Transformer(config).eval()


def make_app(config: APIConfig | None = None, with_encoders: bool = False, **engine_kwargs):
    engine = FakeAsyncEngine(TOKENIZER, **engine_kwargs)
    extra = {}
    if with_encoders:
        extra["embedder"] = Embedder(tiny_encoder(), TOKENIZER, "tiny-embed")
        extra["classifier"] = Classifier(tiny_encoder("sequence-classification", ("neg", "pos")), TOKENIZER,
                                         "tiny-cls")
    backends = Backends(engine=engine, tokenizer=TOKENIZER, model_name="fake", aliases=("fake-alias",), **extra)
    return create_app(backends, config), engine


def wait_ready(client: TestClient, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.01)


@pytest.fixture
def client():
    app, _ = make_app(with_encoders=True)
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def sse_events(response) -> list:
    """The `data:` payloads of an SSE response, parsed (the final "[DONE]" kept as a string)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def assert_openai_error(response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["code"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


# ============================================================================ happy paths
def test_models_lists_every_served_model(client):
    data = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["type"]) for m in data] == [("fake", "generate"), ("tiny-embed", "embedding"),
                                                    ("tiny-cls", "classify")]
    assert data[0]["max_model_len"] == 256 and data[1]["dimensions"] == 64 and data[2]["labels"] == ["neg", "pos"]


def test_completion_non_streaming(client):
    body = client.post("/v1/completions", json={"model": "fake", "prompt": "Hello", "max_tokens": 5}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "fake"
    choice = body["choices"][0]
    assert choice["text"] == REPLY[:5] and choice["finish_reason"] == "length" and choice["index"] == 0
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_completion_defaults_and_alias_and_token_prompt(client):
    body = client.post("/v1/completions", json={"model": "fake-alias", "prompt": [72, 105]}).json()
    assert body["model"] == "fake"  # an alias answers as the canonical name
    assert body["usage"]["prompt_tokens"] == 2 and body["usage"]["completion_tokens"] == 16  # OpenAI's default
    one = client.post("/v1/completions", json={"prompt": ["Hi"], "max_tokens": 100}).json()
    assert one["choices"][0] == {"index": 0, "text": REPLY, "logprobs": None, "finish_reason": "stop"}


def test_chat_non_streaming(client):
    body = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 100}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    assert body["choices"][0]["finish_reason"] == "stop"
    expected_prompt = TOKENIZER.encode(TOKENIZER.apply_chat_template(MESSAGES), add_special_tokens=False)
    assert body["usage"]["prompt_tokens"] == len(expected_prompt)


def test_chat_text_parts_are_joined_and_other_parts_rejected(client):
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    joined = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}]}).json()
    plain = client.post("/v1/chat/completions", json={"messages": MESSAGES}).json()
    assert joined["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": image}]})
    assert "only text parts" in assert_openai_error(response, 400)["message"]


def test_chat_stream_with_usage(client):
    request = {"messages": MESSAGES, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == REPLY[:8]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 8


def test_completion_stream_without_usage(client):
    request = {"prompt": "Hi", "max_tokens": 100, "stream": True}
    with client.stream("POST", "/v1/completions", json=request) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == REPLY
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_stop_string_ends_the_completion(client):
    body = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 100, "stop": ["!"]}).json()
    assert body["choices"][0]["text"] == "Hello from the fake engine" and body["choices"][0]["finish_reason"] == "stop"


# ============================================================================ validation errors → 400
TOO_LONG = "x" * 300  # 300 byte tokens > max_model_len 256


@pytest.mark.parametrize("path, payload, param, code", [
    ("/v1/completions", {"prompt": "Hi", "temperature": 3}, "temperature", "invalid_value"),
    ("/v1/completions", {"prompt": "Hi", "temperature": -0.5}, "temperature", "invalid_value"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 0}, "top_p", "invalid_value"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 1.5}, "top_p", "invalid_value"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, "max_tokens", "invalid_value"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 10_000}, "max_tokens", "max_tokens_too_large"),
    ("/v1/completions", {"prompt": TOO_LONG}, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": ""}, "prompt", "empty_prompt"),
    ("/v1/completions", {"prompt": []}, "prompt", "empty_prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt", "unsupported_parameter"),
    ("/v1/completions", {"prompt": [5, 100_000]}, "prompt", "invalid_token_id"),
    ("/v1/completions", {"prompt": "Hi", "n": 2}, "n", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "Hi", "echo": True}, "echo", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 2}, "logprobs", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "Hi", "presence_penalty": 1}, "presence_penalty", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "Hi", "stop": [""]}, None, "invalid_sampling_params"),
    ("/v1/completions", {"prompt": "Hi", "stop_token_ids": [-1]}, None, "invalid_sampling_params"),
    ("/v1/completions", {"max_tokens": 4}, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": {"not": "a prompt"}}, "prompt", "invalid_value"),
    ("/v1/chat/completions", {"messages": []}, "messages", "empty_prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 3}, "n", "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools",
     "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_object"}},
     "response_format", "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 1000}, "max_tokens",
     "max_tokens_too_large"),
    ("/v1/embeddings", {"input": ""}, "input", "empty_prompt"),
    ("/v1/embeddings", {"input": "hi", "dimensions": 8}, "dimensions", "unsupported_parameter"),
    ("/v1/embeddings", {"input": "x" * 100}, "input", "context_length_exceeded"),
    ("/v1/classify", {"input": []}, "input", "empty_prompt"),
])
def test_validation_failures_are_400_in_openai_shape(client, path, payload, param, code):
    assert_openai_error(client.post(path, json=payload), 400, code=code, param=param)


def test_context_errors_state_the_numbers(client):
    long_prompt = assert_openai_error(client.post("/v1/completions", json={"prompt": TOO_LONG}), 400)
    assert "256" in long_prompt["message"] and "300" in long_prompt["message"]
    too_many = assert_openai_error(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 300}), 400)
    assert all(n in too_many["message"] for n in ("300", "256", "2 tokens", "254"))


@pytest.mark.parametrize("body, headers", [
    (b"{not json", {"content-type": "application/json"}),
    (b"[1, 2]", {"content-type": "application/json"}),
    (b"", {"content-type": "application/json"}),
    (b"prompt=hi", {"content-type": "application/x-www-form-urlencoded"}),
])
def test_malformed_bodies_are_400_not_422(client, body, headers):
    assert_openai_error(client.post("/v1/completions", content=body, headers=headers), 400)


# ============================================================================ other statuses
def test_unknown_model_is_404(client):
    error = assert_openai_error(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "Hi"}), 404,
                                code="model_not_found", param="model")
    assert "gpt-9" in error["message"]
    assert_openai_error(client.post("/v1/embeddings", json={"model": "fake", "input": "hi"}), 404,
                        code="model_not_found")


def test_unknown_route_and_method_keep_the_error_shape(client):
    assert_openai_error(client.get("/v1/nope"), 404, code="not_found")
    assert_openai_error(client.get("/v1/completions"), 405, code="method_not_allowed")


def test_encoder_endpoints_404_when_not_served():
    app, _ = make_app()
    with TestClient(app) as c:
        wait_ready(c)
        assert_openai_error(c.post("/v1/embeddings", json={"input": "hi"}), 404, code="model_not_found")
        assert_openai_error(c.post("/v1/classify", json={"input": "hi"}), 404, code="model_not_found")


def test_body_over_the_limit_is_413():
    app, engine = make_app(APIConfig(max_body_bytes=1000))
    with TestClient(app) as c:
        wait_ready(c)
        payload = json.dumps({"prompt": "x" * 2000}).encode()
        assert_openai_error(c.post("/v1/completions", content=payload), 413, code="request_too_large")

        def chunked():  # no Content-Length: counted while reading
            yield payload[:600]
            yield payload[600:]

        assert_openai_error(c.post("/v1/completions", content=chunked()), 413, code="request_too_large")
        assert c.post("/v1/completions", json={"prompt": "x" * 100, "max_tokens": 2}).status_code == 200
    assert engine.generate_calls == 1


def test_api_keys_are_required_when_configured():
    app, _ = make_app(APIConfig(api_keys=("secret-1", "secret-2")))
    with TestClient(app) as c:
        wait_ready(c)
        request = {"prompt": "Hi", "max_tokens": 2}
        assert_openai_error(c.post("/v1/completions", json=request), 401, code="invalid_api_key")
        bad = {"Authorization": "Bearer wrong"}
        assert_openai_error(c.post("/v1/completions", json=request, headers=bad), 401)
        assert_openai_error(c.get("/v1/models", headers={"Authorization": "Basic secret-1"}), 401)
        for key in ("secret-1", "secret-2"):
            ok = c.post("/v1/completions", json=request, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_full_queue_is_429_with_retry_after():
    app, _ = make_app(max_waiting_requests=0)
    with TestClient(app) as c:
        wait_ready(c)
        response = c.post("/v1/completions", json={"prompt": "Hi"})
        assert_openai_error(response, 429, code="queue_full")
        assert int(response.headers["retry-after"]) >= 1
        assert 'lmsmith:requests_rejected_total{reason="queue_full"} 1.0' in c.get("/metrics").text


def test_503_while_loading_then_ready():
    release = threading.Event()
    engine = FakeAsyncEngine(TOKENIZER)

    def slow_load() -> Backends:
        release.wait(10)
        return Backends(engine=engine, tokenizer=TOKENIZER, model_name="fake")

    with TestClient(create_app(slow_load)) as c:
        assert c.get("/health").json() == {"status": "ok"}
        not_ready = c.get("/ready")
        assert not_ready.status_code == 503 and not_ready.json()["status"] == "loading"
        response = c.post("/v1/completions", json={"prompt": "Hi"})
        assert_openai_error(response, 503, code="model_loading")
        assert response.headers["retry-after"] == "1"
        release.set()
        wait_ready(c)
        assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_failed_load_is_reported():
    def broken_load() -> Backends:
        raise FileNotFoundError("no such model")

    with TestClient(create_app(broken_load)) as c:
        deadline = time.monotonic() + 5
        while c.get("/health").status_code != 500:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "no such model" in c.get("/health").json()["error"]
        assert c.get("/ready").status_code == 503
        assert_openai_error(c.post("/v1/completions", json={"prompt": "Hi"}), 503, code="load_failed")


def test_draining_refuses_new_requests_with_503():
    app, engine = make_app()
    with TestClient(app) as c:
        wait_ready(c)
        c.portal.call(drain, app, 1.0)
        response = c.post("/v1/completions", json={"prompt": "Hi"})
        assert_openai_error(response, 503, code="server_draining")
        assert "retry-after" in response.headers
        assert c.get("/ready").json()["status"] == "draining" and c.get("/health").status_code == 200
    assert engine.generate_calls == 0


# ============================================================================ failures during generation
class FailingEngine(FakeAsyncEngine):
    """The first output is a token, the second an engine failure (finish_reason "error") or an exception."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(TOKENIZER, **kwargs)
        self.mode = mode

    def _decode(self, request) -> None:
        if not request.output_ids:
            return super()._decode(request)
        if self.mode == "raise":
            request.queue.put_nowait(RuntimeError("boom"))
            del self.running[request.request_id]
            return None
        return self._end(request, [], "", "error")


class RaisingStream:
    def __init__(self, inner):
        self.inner = inner

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.inner.__anext__()
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self):
        await self.inner.aclose()


@pytest.mark.parametrize("mode, code", [("error", "generation_failed"), ("raise", "internal_error")])
def test_error_mid_stream_sends_an_error_frame_then_done(mode, code):
    engine = FailingEngine(mode)
    if mode == "raise":
        original = engine.generate
        engine.generate = lambda *a, **k: RaisingStream(original(*a, **k))
    app = create_app(Backends(engine=engine, tokenizer=TOKENIZER, model_name="fake"))
    with TestClient(app) as c:
        wait_ready(c)
        with c.stream("POST", "/v1/completions", json={"prompt": "Hi", "stream": True, "max_tokens": 9}) as r:
            events = sse_events(r)
        assert events[0]["choices"][0]["text"] == "H"
        assert events[-2]["error"]["code"] == code and events[-1] == "[DONE]"
        if mode == "error":
            response = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 9})
            assert_openai_error(response, 500, code="generation_failed")


# ============================================================================ encoders
def test_embeddings_mean_pooled_and_normalised(client):
    texts = ["hello world", "a much longer sentence here"]
    body = client.post("/v1/embeddings", json={"input": texts}).json()
    assert body["object"] == "list" and body["model"] == "tiny-embed"
    vectors = np.array([d["embedding"] for d in body["data"]])
    assert [d["index"] for d in body["data"]] == [0, 1] and vectors.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    ids = TOKENIZER.encode(texts[1])
    model = client.app.state.lmsmith.backends.embedder.model
    with torch.no_grad():
        hidden = model(torch.tensor([ids])).hidden_states
    expected = torch.nn.functional.normalize(pool(hidden, None, "mean"), dim=-1)[0].numpy()
    np.testing.assert_allclose(vectors[1], expected, atol=1e-5)  # padding in the batch changes nothing
    assert body["usage"]["prompt_tokens"] == len(TOKENIZER.encode(texts[0])) + len(ids)


def test_embeddings_base64_tokens_and_unnormalised(client):
    floats = client.post("/v1/embeddings", json={"input": "hello"}).json()["data"][0]["embedding"]
    b64 = client.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, floats, rtol=1e-6)
    by_ids = client.post("/v1/embeddings", json={"input": TOKENIZER.encode("hello")}).json()
    np.testing.assert_allclose(by_ids["data"][0]["embedding"], floats, rtol=1e-6)
    raw = client.post("/v1/embeddings", json={"input": "hello", "normalize": False}).json()["data"][0]["embedding"]
    assert abs(np.linalg.norm(raw) - 1.0) > 1e-3
    np.testing.assert_allclose(np.array(raw) / np.linalg.norm(raw), floats, rtol=1e-5)


def test_classify_returns_labels_and_probabilities(client):
    body = client.post("/v1/classify", json={"input": ["good", "bad movie"]}).json()
    assert body["model"] == "tiny-cls" and body["labels"] == ["neg", "pos"]
    for item in body["data"]:
        assert set(item["probs"]) == {"neg", "pos"} and item["num_classes"] == 2
        assert sum(item["probs"].values()) == pytest.approx(1.0)
        assert item["label"] == max(item["probs"], key=item["probs"].get)
        assert item["score"] == item["probs"][item["label"]]
    alone = client.post("/v1/classify", json={"input": "good"}).json()["data"][0]  # batch padding changes nothing
    assert alone["label"] == body["data"][0]["label"]
    assert alone["probs"]["pos"] == pytest.approx(body["data"][0]["probs"]["pos"], abs=1e-6)


# ============================================================================ metrics
def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_metrics_have_vllm_like_names(client):
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "priority": 3})
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 100})
    text = client.get("/metrics").text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert metric_value(text, f'lmsmith:{name}_count{{priority="3"}}') >= 1
        assert metric_value(text, f'lmsmith:{name}_count{{priority="0"}}') >= 1
    assert metric_value(text, 'lmsmith:request_success_total{finished_reason="length"}') == 1
    assert metric_value(text, 'lmsmith:request_success_total{finished_reason="stop"}') == 1
    assert metric_value(text, "lmsmith:prompt_tokens_total") == 4
    assert metric_value(text, "lmsmith:generation_tokens_total") == 3 + len(TOKENIZER.encode(REPLY)) + 1
    assert metric_value(text, "lmsmith:kv_blocks_total") == 64
    assert metric_value(text, "lmsmith:kv_blocks_free") == 64
    assert metric_value(text, "lmsmith:kv_cache_usage_perc") == 0
    for name in ("num_requests_running", "num_requests_waiting", "prefix_cache_hits_total",
                 "prefix_cache_queries_total", "num_preemptions_total"):
        assert metric_value(text, f"lmsmith:{name}") == 0


def test_each_app_has_its_own_registry():
    apps = [make_app()[0] for _ in range(2)]
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        wait_ready(a)
        wait_ready(b)
        a.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert 'lmsmith:request_success_total{finished_reason="length"} 1.0' in a.get("/metrics").text
        assert "request_success_total{" not in b.get("/metrics").text


def test_huge_priorities_share_a_label(client):
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "priority": 999})
    text = client.get("/metrics").text
    assert 'lmsmith:e2e_request_latency_seconds_count{priority=">10"} 1.0' in text
