"""SmoothQuant: the rescaling keeps the float model's function and makes W8A8 more accurate."""
import json

import pytest
import torch

from lmsmith.compress.quantize import quantize_model
from lmsmith.compress.recipe import parse_recipe, run_recipe
from lmsmith.compress.smooth import (
    expand_to_query_heads,
    input_absmax,
    share_over_query_heads,
    smooth_groups,
    smooth_model,
    smoothing_scales,
)
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer

from .test_recipe import lm_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(preset: str = "tiny-llama", seed: int = 0, **changes) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(PRESETS[preset].replace(vocab_size=64, **changes)).eval()


def calibration(seed: int = 1, batches: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (2, 12), generator=g)} for _ in range(batches)]


def plant_outliers(model: Transformer, channel: int = 3, factor: float = 40.0) -> None:
    """Same function, but the norms' outputs carry one huge channel (as real LLMs do)."""
    with torch.no_grad():
        for block in model.layers:
            for norm, linears in ((block.attn_norm, (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj)),
                                  (block.mlp_norm, (block.mlp.gate_proj, block.mlp.up_proj))):
                norm.weight[channel] *= factor
                for linear in linears:
                    linear.weight[:, channel] /= factor


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches])


def test_scales_follow_the_formula_and_alpha_is_checked():
    act, weight = torch.tensor([8.0, 1.0, 0.0]), torch.tensor([2.0, 4.0, 1.0])
    expected = torch.tensor([8.0 ** 0.5 / 2.0 ** 0.5, 1.0 / 4.0 ** 0.5, 1e-5 ** 0.5])
    assert torch.allclose(smoothing_scales(act, weight, 0.5), expected)
    assert torch.allclose(smoothing_scales(act, weight, 0.0), 1 / weight)
    with pytest.raises(ValueError, match="alpha must be in"):
        smoothing_scales(act, weight, 1.5)


def test_query_heads_sharing_a_value_head_share_its_scale():
    heads, kv_heads, dim = 4, 2, 3
    scales = torch.arange(1.0, 1.0 + heads * dim)
    kv = share_over_query_heads(scales, heads, kv_heads, dim)
    assert kv.tolist() == [4.0, 5.0, 6.0, 10.0, 11.0, 12.0]  # max over heads (0, 1) and (2, 3)
    assert expand_to_query_heads(kv, heads, kv_heads, dim).tolist() == [4, 5, 6, 4, 5, 6, 10, 11, 12, 10, 11, 12]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt"])
def test_smoothing_keeps_the_float_model_function(preset):
    model, batches = tiny(preset), calibration()
    before = logits(model, batches)
    summary = smooth_model(model, batches, alpha=0.7)
    assert torch.allclose(logits(model, batches), before, atol=1e-4, rtol=1e-4)
    assert summary["groups"] == len(smooth_groups(model)) and summary["largest_scale"] > 0


def test_smoothing_flattens_the_planted_outlier_channel():
    model, batches = tiny(), calibration()
    plant_outliers(model)
    name = "layers.0.attn.q_proj"
    spread = input_absmax(model, [name], batches)[name]
    smooth_model(model, batches, alpha=0.5)
    flat = input_absmax(model, [name], batches)[name]
    assert flat.max() / flat.median() < 0.5 * spread.max() / spread.median()


def test_w8a8_after_smoothing_is_closer_to_float():
    reference_model, batches = tiny(), calibration()
    plant_outliers(reference_model)
    reference = logits(reference_model, batches)
    errors = {}
    for smooth in (False, True):
        model = tiny()
        plant_outliers(model)
        if smooth:
            smooth_model(model, calibration(seed=2), alpha=0.7)  # calibrated on other inputs
        quantize_model(model, "w8a8")
        errors[smooth] = (logits(model, batches) - reference).abs().mean().item()
    assert errors[True] < 0.5 * errors[False]


def test_bad_models_and_data_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="pre-norm"):
        smooth_model(tiny("tiny-bert"), calibration())
    quantized = tiny()
    quantize_model(quantized, "int8")
    with pytest.raises(ValueError, match="smooth before quantizing"):
        smooth_model(quantized, calibration())
    with pytest.raises(ValueError, match="calibration data never reached"):
        smooth_model(tiny(), [])
    with pytest.raises(ValueError, match="lmsmith Transformer"):
        smooth_model(torch.nn.Linear(2, 2), calibration())


def test_recipe_smooth_step_then_w8a8_records_the_step(tiny_lm_folder, tmp_path):
    steps = [{"smooth": {"alpha": 0.7}}, {"quantize": {"method": "w8a8"}}]
    result = run_recipe(parse_recipe(lm_recipe(tiny_lm_folder, tmp_path / "out", steps)), log=lambda _: None)
    history = json.loads((result.final / "lmsmith.json").read_text())["history"]
    assert [h["step"] for h in history] == ["source", "smooth", "quantize"]
    assert history[1]["settings"]["alpha"] == 0.7 and history[1]["result"]["groups"] > 0
    # the smoothed float model measures like the source (same function)
    ppl = [h["measured"]["quality"]["perplexity"] for h in history]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-3)
