"""Adapters over a quantized, frozen base (QLoRA-style): keys, gradients, memory, merge → requantize,
unmerge, and the recipe path (`model.quantize` or a quantized artifact as the source)."""
import copy
import json

import pytest
import torch
from torch import nn

from lmsmith.compress.quantize import (
    DynamicInt8Linear,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    QuantizedLinear,
    quantize_model,
    requantize_,
)
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer
from lmsmith.train.peft import IA3Config, LoraConfig, apply_peft, merge_peft, unload_peft, unmerge_peft

from .conftest import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = {"int8": Int8WeightOnlyLinear, "int4": Int4WeightOnlyLinear, "w8a8": DynamicInt8Linear}


def quantized_llama(method: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-llama"].replace(intermediate_size=128)).eval()
    quantize_model(model, method, group_size=32)
    return model


def trained_lora(model: nn.Module) -> nn.Module:
    apply_peft(model, LoraConfig(target_modules=("q_proj", "v_proj", "down_proj"), r=4, lora_alpha=8))
    return train_steps(model)


def train_steps(model: nn.Module, steps: int = 3) -> nn.Module:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = model(ids).logits.logsumexp(-1).mean()  # any differentiable function of the logits
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_lora_over_a_quantized_base_keeps_its_keys_and_trains_only_the_adapter(method):
    model = quantized_llama(method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        base_logits = model(ids).logits
    apply_peft(model, LoraConfig(target_modules=("q_proj", "v_proj"), r=4))
    q_proj = model.layers[0].attn.q_proj
    assert type(q_proj.base_layer) is METHODS[method]
    keys = set(model.state_dict())
    assert set(before) <= keys and keys - set(before) == {k for k in keys if ".lora_" in k}
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, base_logits, atol=1e-5)  # B = 0: the base's output
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    train_steps(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the quantized base is untouched
    assert any(not torch.equal(after[k], 0 * after[k]) for k in keys if "lora_B" in k)  # B learned


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_input_gradient_through_a_quantized_layer_is_the_dequantized_one(method):
    torch.manual_seed(0)
    layer = {"int8": Int8WeightOnlyLinear, "w8a8": DynamicInt8Linear}.get(method)
    layer = (layer.from_linear(nn.Linear(64, 48)) if layer else
             Int4WeightOnlyLinear.from_linear(nn.Linear(64, 48), group_size=32))
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    reference_x = x.detach().clone().requires_grad_()
    out = layer.forward_reference(reference_x) if method != "w8a8" else \
        nn.functional.linear(reference_x, layer.dequantize_weight(), layer.bias)  # straight-through
    out.pow(2).sum().backward()
    assert torch.allclose(x.grad, reference_x.grad, rtol=0.05, atol=0.05 * reference_x.grad.abs().mean())


def test_backward_keeps_no_float_copy_of_the_weight():
    layer = Int4WeightOnlyLinear.from_linear(nn.Linear(256, 512), group_size=64)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(3, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert y.requires_grad and max(saved, default=0) < 256 * 512  # the plain path would save W (512x256)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merge_dequantizes_adds_and_requantizes_and_unmerge_restores_exactly(method):
    model = trained_lora(quantized_llama(method))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        adapted = model(ids).logits
        merge_peft(model)
        merged = model(ids).logits
    assert type(model.layers[0].attn.q_proj.base_layer) is METHODS[method]
    changed = [k for k in original if k.endswith("q_proj.qweight") and not torch.equal(model.state_dict()[k], original[k])]
    assert changed  # the delta went into the quantized weights
    relative = (merged - adapted).norm() / adapted.norm()
    assert relative < 0.1, relative  # requantization costs a little, not the adapter's effect
    unmerge_peft(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, adapted, atol=1e-5)


def test_unload_leaves_quantized_layers_with_the_plain_models_keys():
    model = trained_lora(quantized_llama("int4"))
    plain_keys = set(quantized_llama("int4").state_dict())
    unloaded = unload_peft(copy.deepcopy(model), merge=True)
    assert isinstance(unloaded.layers[0].attn.q_proj, QuantizedLinear)
    assert set(unloaded.state_dict()) == plain_keys


def test_a_wrapped_quantized_model_round_trips_its_state_dict():
    model = trained_lora(quantized_llama("int8"))
    fresh = quantized_llama("int8")
    apply_peft(fresh, LoraConfig(target_modules=("q_proj", "v_proj", "down_proj"), r=4, lora_alpha=8))
    fresh.load_state_dict(model.state_dict())
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids).logits, model(ids).logits)


def test_ia3_works_over_a_quantized_base_and_dora_is_refused():
    model = quantized_llama("int8")
    apply_peft(model, IA3Config(target_modules=("k_proj", "down_proj"), feedforward_modules=("down_proj",)))
    ids = torch.randint(0, 512, (1, 7))
    model(ids).logits.sum().backward()
    assert model.layers[0].mlp.down_proj.ia3_l.grad is not None
    with pytest.raises(ValueError, match="DoRA needs the float base weight"):
        apply_peft(quantized_llama("int8"), LoraConfig(target_modules=("q_proj",), use_dora=True))


def test_requantize_checks_the_shape():
    layer = Int8WeightOnlyLinear.from_linear(nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"\(8, 4\) does not fit 4x8"):
        requantize_(layer, torch.zeros(8, 4))


# -- through the recipe --

def test_qlora_recipe_quantizes_at_load_and_reports_the_merge(tmp_path, corpus):
    from lmsmith.api import load
    from lmsmith.train.api import finetune, pretrain

    base = pretrain(tiny_recipe(tmp_path / "base", corpus, preset="tiny-llama", max_steps=2, device="cpu"))
    recipe = tiny_recipe(tmp_path / "qlora", corpus, max_steps=4, lr=1e-2, device="cpu")
    recipe["model"] = {"source": str(base.model_dir), "quantize": "int8"}
    recipe.pop("tokenizer")
    recipe["peft"] = {"method": "lora", "target_modules": ["q_proj", "v_proj"], "r": 4, "save_merged": True}
    result = finetune(recipe)
    manifest = json.loads((result.model_dir / "lmsmith.json").read_text())
    assert manifest["quantization"]["method"] == "int8"
    merge = manifest["history"][-1]["merge"]
    assert merge["relative_logit_diff"] < 0.05 and 0.9 <= merge["top1_agreement"] <= 1.0
    merged, _ = load(result.model_dir)
    assert isinstance(merged.layers[0].attn.q_proj, Int8WeightOnlyLinear)
    assert (result.adapter_dir / "adapter_config.json").is_file()


def test_model_quantize_without_peft_is_refused(tmp_path, corpus):
    from lmsmith.train.recipes import load_recipe

    recipe = tiny_recipe(tmp_path, corpus)
    recipe["model"] = {"source": "somewhere", "quantize": "int4"}
    with pytest.raises(ValueError, match="needs a peft method"):
        load_recipe(recipe)
    recipe["model"]["quantize"] = "nf4"
    with pytest.raises(ValueError, match="model.quantize='nf4' is not one of"):
        load_recipe(recipe)


def test_quantizing_an_already_quantized_source_is_refused():
    from lmsmith.train.build import quantize_base

    with pytest.raises(ValueError, match=r"already quantized \(int8\); drop model.quantize"):
        quantize_base(quantized_llama("int8"), "int4", 64)
