"""The training loop on a GPU: fp32 there follows the CPU run step for step, bf16 autocast (the
"auto" precision on CUDA) trains, LoRA trains there, and what it saves loads on the CPU."""
import math

import pytest
import torch

from lmsmith.api import load
from lmsmith.train.api import finetune, pretrain
from lmsmith.train.loop import read_metrics
from tests.conftest import cuda_tests

from .conftest import tiny_recipe

pytestmark = [*cuda_tests, pytest.mark.usefixtures("exact_fp32_on_cuda", "one_thread")]


def train_losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir)]


def test_fp32_on_the_gpu_follows_the_cpu_run(tmp_path, corpus):
    cpu = pretrain(tiny_recipe(tmp_path / "cpu", corpus, preset="tiny-llama", max_steps=5, device="cpu",
                               precision="fp32"))
    gpu = pretrain(tiny_recipe(tmp_path / "gpu", corpus, preset="tiny-llama", max_steps=5, device="cuda",
                               precision="fp32"))
    on_cpu, on_gpu = train_losses(cpu.run_dir), train_losses(gpu.run_dir)
    assert len(on_cpu) == len(on_gpu) == 5
    assert on_gpu == pytest.approx(on_cpu, rel=1e-3)
    assert gpu.validation["loss"] == pytest.approx(cpu.validation["loss"], rel=1e-3)


def test_bf16_autocast_trains_and_the_saved_model_loads_on_the_cpu(tmp_path, corpus):
    result = pretrain(tiny_recipe(tmp_path, corpus, preset="tiny-llama", max_steps=12, device="cuda", lr=1e-2))
    losses = train_losses(result.run_dir)
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]  # no NaN, and learning
    model, _ = load(result.model_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, result.model.float()(ids.to("cuda")).logits.cpu(), atol=1e-4)


def test_lora_on_the_gpu_saves_an_adapter_and_a_merged_model(tmp_path, corpus):
    base = pretrain(tiny_recipe(tmp_path / "base", corpus, preset="tiny-llama", max_steps=2, device="cpu"))
    recipe = tiny_recipe(tmp_path / "lora", corpus, max_steps=6, lr=1e-2, device="cuda")
    recipe["model"] = {"source": str(base.model_dir)}
    recipe.pop("tokenizer")
    recipe["peft"] = {"method": "lora", "target_modules": ["q_proj", "v_proj"], "r": 4, "save_merged": True}
    result = finetune(recipe)
    assert (result.adapter_dir / "adapter_config.json").is_file()
    merged, _ = load(result.model_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, result.model(ids.to("cuda")).logits.float().cpu(), atol=1e-3)


@pytest.mark.parametrize("method", ["int4", "int8", "w8a8"])
def test_qlora_on_the_gpu_trains_over_the_quantized_kernels_and_merges(method):
    from lmsmith.compress.quantize import quantize_model
    from lmsmith.model.config import PRESETS
    from lmsmith.model.transformer import Transformer
    from lmsmith.train.peft import LoraConfig, apply_peft, merge_peft

    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-llama"].replace(intermediate_size=128)).to("cuda")
    quantize_model(model, method, group_size=32)
    apply_peft(model, LoraConfig(target_modules=("q_proj", "v_proj", "down_proj"), r=4, lora_alpha=8))
    q_proj = model.layers[0].attn.q_proj
    print(method, "kernel on cuda:", q_proj.base_layer.kernel_name("cuda"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.randint(0, 512, (2, 12), device="cuda")
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and q_proj.lora_B.weight.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
        merge_peft(model)
        merged = model(ids).logits
    assert (merged - adapted).norm() / adapted.norm() < 0.1
