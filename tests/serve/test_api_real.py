"""Loading what `serve` hosts from disk (tiny saved models: fast) and the real embedded models (slow)."""
from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
import torch

from lmsmith.io.checkpoint import save_hf_folder
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer
from lmsmith.serve.api import create_app
from lmsmith.serve.engine import AsyncEngine
from lmsmith.serve.server import ServeOptions, api_config, build_backends, model_names

from .fake_engine import byte_tokenizer, live_server, wait_ready


@pytest.fixture(scope="module")
def tiny_classifier_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = PRESETS["tiny-bert"].replace(task="sequence-classification", labels=("negative", "positive"))
    return save_hf_folder(Transformer(config), tmp_path_factory.mktemp("cls") / "tiny-sentiment",
                          tokenizer=byte_tokenizer())


@pytest.fixture(scope="module")
def tiny_encoder_folder(tmp_path_factory):
    torch.manual_seed(1)
    return save_hf_folder(Transformer(PRESETS["tiny-bert"]), tmp_path_factory.mktemp("enc") / "tiny-encoder",
                          tokenizer=byte_tokenizer())


def test_model_names():
    assert model_names(None, None) == ("smollm2-135m-instruct", ("default", "smollm2"))
    assert model_names("smollm2", "mine") == ("mine", ("default", "smollm2", "smollm2-135m-instruct"))
    assert model_names("/models/my-model/", None) == ("my-model", ("/models/my-model/",))


def test_options_are_checked():
    with pytest.raises(ValueError, match="replicas"):
        ServeOptions(replicas=0)
    with pytest.raises(ValueError, match="generate=False"):
        ServeOptions(generate=False)
    with pytest.raises(ValueError, match="port"):
        ServeOptions(port=70000)


def test_serve_loads_generator_embedder_and_classifier_from_folders(tiny_chat_folder, tiny_encoder_folder,
                                                                     tiny_classifier_folder):
    options = ServeOptions(model=str(tiny_chat_folder), embedding_model=str(tiny_encoder_folder),
                           classifier_model=str(tiny_classifier_folder), max_model_len=64, num_kv_blocks=16,
                           max_num_seqs=2)
    backends = build_backends(options)
    assert isinstance(backends.engine, AsyncEngine) and backends.model_name == "tiny-chat"
    assert backends.max_model_len == 64 and backends.vocab_size == backends.tokenizer.vocab_size
    assert backends.classifier.labels == ("negative", "positive")
    with live_server(create_app(backends, api_config(options))) as url:
        wait_ready(url)
        models = {m["id"]: m["type"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert models == {"tiny-chat": "generate", "tiny-encoder": "embedding", "tiny-sentiment": "classify"}
        body = httpx.post(f"{url}/v1/classify", json={"model": "tiny-sentiment", "input": "great"}).json()
        assert body["data"][0]["label"] in ("negative", "positive")
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}).json()
        assert chat["usage"]["completion_tokens"] <= 3
        stats = backends.engine.stats()
        assert stats["kv_blocks_total"] == 16 and stats["num_requests_total"] == 1


def test_a_generator_as_classifier_is_refused(tiny_chat_folder):
    with pytest.raises(ValueError, match="sequence-classification"):
        build_backends(ServeOptions(generate=False, classifier_model=str(tiny_chat_folder)))


# ============================================================================ real embedded models
@pytest.mark.slow
def test_real_smollm2_chat_and_minilm_embeddings():
    options = ServeOptions(embedding_model="minilm-l6", max_model_len=512, max_num_seqs=4)
    with live_server(create_app(lambda: build_backends(options))) as url:
        wait_ready(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="smollm2", temperature=0, max_tokens=24,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}])
        assert "paris" in reply.choices[0].message.content.lower()
        assert reply.model == "smollm2-135m-instruct"
        streamed = client.chat.completions.create(
            model="smollm2", temperature=0, max_tokens=24, stream=True,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}])
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == reply.choices[0].message.content

        sentences = ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock markets fell sharply today."]
        vectors = np.array([d.embedding for d in client.embeddings.create(model="minilm-l6", input=sentences).data])
        np.testing.assert_allclose(vectors, reference_minilm_embeddings(sentences), atol=1e-4)
        similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
        assert similar > unrelated + 0.2


def reference_minilm_embeddings(sentences: list[str]) -> np.ndarray:
    """sentence-transformers' recipe with `transformers`: mean pooling over real tokens, then L2 norm."""
    from transformers import AutoModel, AutoTokenizer

    from lmsmith.api import resolve

    folder = resolve("minilm-l6")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()
