"""The official `openai` client against a live uvicorn server on 127.0.0.1 running the real engine
(a tiny random llama), plus error mapping to openai's exception types."""
from __future__ import annotations

import threading

import numpy as np
import openai
import pytest

from lmsmith.api import load
from lmsmith.serve.api import APIConfig, Backends, create_app
from lmsmith.serve.encoders import Embedder
from lmsmith.serve.engine import AsyncEngine, Engine, EngineConfig

from .fake_engine import FakeAsyncEngine, byte_tokenizer, live_server
from .test_api import tiny_encoder

KEY = "test-key"
MESSAGES = [{"role": "user", "content": "Say hello"}]


def real_backends(folder, **config) -> Backends:
    model, tokenizer = load(folder)
    settings = {"num_blocks": 64, "max_num_seqs": 4, "max_model_len": 128, **config}
    engine = AsyncEngine(Engine(model, tokenizer, EngineConfig(**settings)))
    embedder = Embedder(tiny_encoder(), byte_tokenizer(), "tiny-embed")
    return Backends(engine=engine, tokenizer=tokenizer, model_name="tiny-chat", embedder=embedder)


@pytest.fixture(scope="module")
def server(tiny_chat_folder):
    backends = real_backends(tiny_chat_folder)
    with live_server(create_app(backends, APIConfig(api_keys=(KEY,)))) as url:
        yield url, backends


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=30)


def wait_ready(client: openai.OpenAI) -> None:
    import time
    deadline = time.monotonic() + 10
    while True:
        try:
            client.models.list()
            return
        except openai.InternalServerError:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_models(client):
    wait_ready(client)
    assert [m.id for m in client.models.list()] == ["tiny-chat", "tiny-embed"]


def test_chat_completion(client):
    reply = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and 1 <= reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion_with_ignore_eos_hits_length(client):
    reply = client.completions.create(model="tiny-chat", prompt="The quick brown fox", max_tokens=5,
                                      temperature=0, extra_body={"ignore_eos": True, "priority": -1})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    assert reply.object == "text_completion"


def test_streamed_chat_equals_the_non_streamed_reply(client):
    kwargs = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 8, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_streamed_completion(client):
    chunks = list(client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=4, stream=True,
                                            temperature=0, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


def test_embeddings_through_the_client_decode_base64(client, server):
    reply = client.embeddings.create(model="tiny-embed", input=["hello", "world"])  # the client asks for base64
    vectors = np.array([d.embedding for d in reply.data])
    assert vectors.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    floats = client.embeddings.create(model="tiny-embed", input="hello", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, vectors[0], atol=1e-6)  # batched vs alone


@pytest.mark.parametrize("kwargs, code", [
    ({"max_tokens": 500}, "max_tokens_too_large"),
    ({"temperature": 2.5}, "invalid_value"),
    ({"top_p": 0.0}, "invalid_value"),
    ({"n": 2}, "unsupported_parameter"),
])
def test_bad_requests_raise_bad_request_error(client, kwargs, code):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, **kwargs)
    assert info.value.status_code == 400 and info.value.code == code


def test_context_overflow_states_the_numbers(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-chat", prompt=[5] * 200, max_tokens=4)
    assert info.value.code == "context_length_exceeded" and "128" in info.value.message


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-99", messages=MESSAGES)
    assert info.value.code == "model_not_found"


def test_wrong_key_raises_authentication_error(server):
    bad = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.code == "invalid_api_key"


def test_full_queue_raises_rate_limit_and_loading_raises_server_error():
    tok = byte_tokenizer()
    full = Backends(engine=FakeAsyncEngine(tok, max_waiting_requests=0), tokenizer=tok, model_name="fake")
    with live_server(create_app(full)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        wait_ready(client)
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="fake", prompt="Hi")
        assert info.value.response.headers["retry-after"] == "1"
    release = threading.Event()

    def slow_load():
        release.wait(10)
        return Backends(engine=FakeAsyncEngine(tok), tokenizer=tok, model_name="fake")

    with live_server(create_app(slow_load)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model="fake", prompt="Hi")
        assert info.value.status_code == 503 and info.value.code == "model_loading"
        release.set()
        wait_ready(client)
        assert client.completions.create(model="fake", prompt="Hi", max_tokens=2).choices[0].text == "He"


def test_error_frame_mid_stream_raises_api_error():
    from .test_api import FailingEngine

    tok = byte_tokenizer()
    with live_server(create_app(Backends(engine=FailingEngine("error"), tokenizer=tok, model_name="fake"))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        wait_ready(client)
        stream = client.completions.create(model="fake", prompt="Hi", max_tokens=9, stream=True)
        with pytest.raises(openai.APIError) as info:
            list(stream)
        assert "generation failed" in info.value.message
