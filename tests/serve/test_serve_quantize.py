"""Serving quantized models: `quantize=` at load (int8 / int4 / w8a8), and saved quantized artifacts."""
from __future__ import annotations

import httpx
import pytest
import torch

from lmsmith.api import load
from lmsmith.compress.quantize import (
    DynamicInt8Linear,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    quantize_model,
)
from lmsmith.generation import generate
from lmsmith.io.artifact import save_artifact
from lmsmith.io.checkpoint import save_hf_folder
from lmsmith.model.transformer import Transformer
from lmsmith.serve import cli_verbs
from lmsmith.serve.api import create_app
from lmsmith.serve.server import (
    SERVE_QUANT_METHODS,
    ServeOptions,
    api_config,
    build_backends,
    int4_group_size,
    serve,
)

from .fake_engine import live_server, wait_ready

PROMPT = "Hello world"
MODULE_OF = {"int8": Int8WeightOnlyLinear, "int4": Int4WeightOnlyLinear, "w8a8": DynamicInt8Linear}


@pytest.fixture(scope="module")
def int4_ready_folder(tiny_chat_folder, tmp_path_factory):
    """tiny-chat with an MLP width int4 groups divide (tiny-llama's 172 is not a multiple of 32)."""
    model, tok = load(tiny_chat_folder)
    torch.manual_seed(0)
    return save_hf_folder(Transformer(model.config.replace(intermediate_size=128)),
                          tmp_path_factory.mktemp("int4") / "tiny-chat-128", tokenizer=tok)


@pytest.fixture(scope="module")
def quantized_artifact(tiny_chat_folder, tmp_path_factory):
    model, tok = load(tiny_chat_folder)
    quantize_model(model, "int8")
    return save_artifact(model, tmp_path_factory.mktemp("artifact") / "tiny-chat-int8", tokenizer=tok)


def served_model(backends):
    return backends.engine.engine.runner.model


def completion(options: ServeOptions) -> tuple[dict, object, object]:
    """(the /v1/completions body for PROMPT, the served model, its tokenizer), greedy, 6 tokens."""
    backends = build_backends(options)
    with live_server(create_app(backends, api_config(options))) as url:
        wait_ready(url)
        response = httpx.post(f"{url}/v1/completions", timeout=60, trust_env=False, json={
            "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json(), served_model(backends), backends.tokenizer


def check_answer(body: dict, model, tok) -> None:
    """The server's text is what `generate` gives with the same (quantized) model."""
    want = generate(model, tok, [PROMPT], max_new_tokens=6, temperature=0, stop_token_ids=())[0]
    assert body["usage"]["completion_tokens"] == 6
    assert body["choices"][0]["text"] == want.text


@pytest.mark.parametrize("method", ["w8a8", "int8", "int4"])
def test_served_with_quantize_answers_completions(method, tiny_chat_folder, int4_ready_folder):
    folder = int4_ready_folder if method == "int4" else tiny_chat_folder
    options = ServeOptions(model=str(folder), quantize=method, max_model_len=64, num_kv_blocks=16, max_num_seqs=2)
    body, model, tok = completion(options)
    q_proj = model.layers[0].attn.q_proj
    assert type(q_proj) is MODULE_OF[method] and model.quantization_config.method == method
    # every method puts the head (tied: the embedding too) in weight-only int8
    assert type(model.lm_head).__name__ == "Int8WeightOnlyLinear"
    assert dict(model.quantization_config.module_methods).get("lm_head", method) == "int8"
    assert model.quantization_config.clip_search == (method == "int4")
    check_answer(body, model, tok)


def test_a_saved_quantized_artifact_is_served_as_saved(quantized_artifact):
    options = ServeOptions(model=str(quantized_artifact), max_model_len=64, num_kv_blocks=16, max_num_seqs=2)
    body, model, tok = completion(options)
    assert body["model"] == "tiny-chat-int8"
    assert type(model.layers[0].mlp.down_proj) is Int8WeightOnlyLinear
    check_answer(body, model, tok)


def test_quantizing_a_quantized_artifact_again_is_refused(quantized_artifact):
    with pytest.raises(ValueError, match=r"already quantized \(int8\)"):
        build_backends(ServeOptions(model=str(quantized_artifact), quantize="w8a8", num_kv_blocks=16))


@pytest.mark.parametrize("bad", ["fp8", "gptq-int4", "INT8", ""])
def test_an_unknown_method_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="allowed: int8, int4, w8a8"):
        ServeOptions(quantize=bad)
    with pytest.raises(ValueError, match=f"quantize={bad!r} is not supported"):
        serve(quantize=bad)  # refused before any model loads or any socket opens


def test_cli_accepts_the_methods_and_refuses_others(capsys):
    from lmsmith.cli import build_parser

    parser = build_parser()
    options = cli_verbs.serve_options_from(parser.parse_args(["serve", "tiny", "--quantize", "w8a8"]))
    assert options.quantize == "w8a8" and options.model == "tiny"
    assert cli_verbs.serve_options_from(parser.parse_args(["serve"])).quantize is None
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["serve", "--quantize", "fp8"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    assert cli_verbs.SERVE_QUANT_METHODS == SERVE_QUANT_METHODS  # the CLI's copy of the list


def test_int4_group_size_prefers_64_and_explains_when_nothing_fits():
    assert int4_group_size([576, 1536]) == 64  # SmolLM2-135M
    assert int4_group_size([96, 160]) == 32
    with pytest.raises(ValueError, match=r"\[64, 172\]: use int8 or w8a8"):
        int4_group_size([64, 172, 64])


def test_int4_on_a_model_no_group_size_fits_fails_at_load(tiny_chat_folder):
    with pytest.raises(ValueError, match="use int8 or w8a8"):
        build_backends(ServeOptions(model=str(tiny_chat_folder), quantize="int4", num_kv_blocks=16))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["w8a8", "int4"])
def test_real_smollm2_quantized_at_load_answers_as_generate_does(method):
    from lmsmith.api import chat

    options = ServeOptions(quantize=method, max_model_len=256, max_num_seqs=2)
    backends = build_backends(options)
    model = served_model(backends)
    assert model.quantization_config.method == method
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    with live_server(create_app(backends, api_config(options))) as url:
        wait_ready(url)
        response = httpx.post(f"{url}/v1/chat/completions", timeout=120, trust_env=False, json={
            "model": "smollm2", "temperature": 0, "max_tokens": 16, "messages": messages})
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["message"]["content"]
    assert text == chat(model, backends.tokenizer, messages, temperature=0, max_new_tokens=16).text
    if method == "w8a8":  # int8 activations and weights keep the answer; int4 (ppl x1.26) may not
        assert "paris" in text.lower()
