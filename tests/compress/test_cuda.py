"""Compression on a GPU: the CUDA kernels (int4 tinygemm, int8 GEMM for W8A8) agree with the plain
dequantize-then-matmul reference, quantized models generate there and reload on the CPU, and a
recipe with `device: cuda` measures on the GPU."""
import json

import pytest
import torch
from torch import nn

from lmsmith.api import load
from lmsmith.compress.quantize import QuantizedLinear, quantize_model
from lmsmith.compress.recipe import parse_recipe, run_recipe
from lmsmith.generation import generate
from lmsmith.io.artifact import save_artifact
from tests.conftest import cuda_tests

from .test_recipe import lm_recipe

pytestmark = [*cuda_tests, pytest.mark.usefixtures("exact_fp32_on_cuda")]
CUDA = torch.device("cuda")
# method, options, the kernel the GPU should use (None: only the reference path is expected)
CASES = [
    ("int4", {"group_size": 32}, "int4pack_mm"),
    ("int4", {"group_size": 64, "symmetric": True}, "int4pack_mm"),
    ("int4", {"group_size": 128}, "int4pack_mm"),
    ("w8a8", {}, "int_mm"),
    ("int8", {}, None),
]


def two_linears() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 384), nn.Linear(384, 256, bias=False))


@pytest.mark.parametrize("method,options,kernel", CASES, ids=[f"{m}-{o}" for m, o, _ in CASES])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_gpu_kernels_agree_with_the_reference(method, options, kernel, rows):
    model = two_linears().to(CUDA)
    quantize_model(model, method, targets=("*",), exclude=(), **options)
    layer = model[0]
    assert isinstance(layer, QuantizedLinear) and layer.qweight.device.type == "cuda"
    name = layer.kernel_name(CUDA)
    print(f"{method} {options}: kernel on cuda = {name}")
    if kernel is not None:
        assert name == kernel
    x = torch.randn(rows, 256, device=CUDA)
    with torch.no_grad():
        fast, reference = layer(x), layer.forward_reference(x)
    assert fast.device.type == "cuda" and fast.shape == (rows, 384)
    assert (fast - reference).norm() / reference.norm() < 2e-2


@pytest.mark.parametrize("method", ["int8", "int4", "w8a8"])
def test_a_model_quantized_on_the_gpu_generates_and_reloads_on_the_cpu(tiny_lm_folder, tmp_path, method):
    model, tok = load(tiny_lm_folder, device="cuda")
    quantize_model(model, method, group_size=32)
    out = generate(model, tok, ["good happy table"], max_new_tokens=8, temperature=0, stop_token_ids=())[0]
    assert len(out.token_ids) == 8
    folder = save_artifact(model, tmp_path / method, tokenizer=tok)
    on_cpu, _ = load(folder)
    ids = torch.tensor([tok.encode("good happy table")])
    with torch.no_grad():
        gpu_logits = model(ids.to(CUDA)).logits.cpu()
        cpu_logits = on_cpu(ids).logits
    assert (gpu_logits - cpu_logits).norm() / cpu_logits.norm() < 2e-2


def test_a_recipe_on_the_gpu_prunes_quantizes_and_measures(tiny_lm_folder, tmp_path):
    steps = [{"prune": {"method": "wanda", "sparsity": 0.5}}, {"quantize": {"method": "int4", "group_size": 32}}]
    recipe = lm_recipe(tiny_lm_folder, tmp_path / "out", steps) | {"device": "cuda"}
    result = run_recipe(parse_recipe(recipe), log=lambda _: None)
    history = json.loads((result.final / "lmsmith.json").read_text())["history"]
    assert [h["step"] for h in history] == ["source", "prune", "quantize"]
    for entry in history:
        measured = entry["measured"]
        assert measured["quality"]["perplexity"] > 1
        print(entry["step"], json.dumps(measured)[:400])
