"""The engine and the server on a GPU: paged KV cache on the device, the same tokens as `generate`
there, every block back after aborts, and `serve --device cuda` (also quantized) answering over HTTP."""
import httpx
import pytest
import torch

from lmsmith.generation import generate
from lmsmith.serve.api import create_app
from lmsmith.serve.engine import Engine, EngineConfig
from lmsmith.serve.request import SamplingParams
from lmsmith.serve.server import ServeOptions, api_config, build_backends
from tests.conftest import cuda_tests

from .fake_engine import live_server, wait_ready
from .test_engine import PROMPTS, LetterTokenizer, assert_all_blocks_free, run_engine, tiny_model, tokens_of

pytestmark = [*cuda_tests, pytest.mark.usefixtures("exact_fp32_on_cuda")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("config", [EngineConfig(block_size=4), EngineConfig(block_size=4, max_num_batched_tokens=8)],
                         ids=["default", "chunked"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.9}],
                         ids=["greedy", "seeded"])
def test_engine_on_the_gpu_matches_generate_there(config, sampling):
    model, tok = tiny_model().to(CUDA), LetterTokenizer()
    engine = Engine(model, tok, config)
    assert engine.runner.cache.k[0].device.type == "cuda"
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=10, seed=7 + i, ignore_eos=True, **sampling))
    outs = run_engine(engine)
    for i, prompt in enumerate(PROMPTS):
        want = generate(model, tok, [prompt], max_new_tokens=10, seed=7 + i, stop_token_ids=(), **sampling)[0]
        assert tokens_of(outs[f"r{i}"]) == want.token_ids, f"request r{i}"
    assert_all_blocks_free(engine)


def test_aborts_on_the_gpu_free_every_block():
    engine = Engine(tiny_model().to(CUDA), LetterTokenizer(), EngineConfig(block_size=4, num_blocks=64))
    for i in range(12):
        engine.add_request(f"r{i}", list(range(10 + i, 30 + i)), SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats()["kv_blocks_free"] < engine.stats()["kv_blocks_total"]
    assert engine.abort_all() == 12
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("quantize", [None, "int8", "w8a8"])
def test_serve_on_the_gpu_answers_like_generate(tiny_chat_folder, quantize):
    options = ServeOptions(model=str(tiny_chat_folder), device="cuda", quantize=quantize, max_model_len=64,
                           num_kv_blocks=16, max_num_seqs=2)
    backends = build_backends(options)
    model, tok = backends.engine.engine.runner.model, backends.tokenizer
    assert next(model.parameters(), next(model.buffers())).device.type == "cuda"
    with live_server(create_app(backends, api_config(options))) as url:
        wait_ready(url)
        response = httpx.post(f"{url}/v1/completions", timeout=60, trust_env=False, json={
            "prompt": "Hello world", "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    want = generate(model, tok, ["Hello world"], max_new_tokens=6, temperature=0, stop_token_ids=())[0]
    assert response.json()["choices"][0]["text"] == want.text


def test_serve_refuses_a_gpu_this_machine_lacks():
    with pytest.raises(ValueError, match="cuda:99"):
        ServeOptions(device="cuda:99")
