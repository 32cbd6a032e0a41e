"""int4 quality options: the per-group clip search (optionally importance-weighted), GPTQ with it,
and an output head quantized with a different method from the body (`lm_head_method`)."""
import re

import pytest
import torch

from lmsmith.compress.quantize import (
    LM_HEAD_METHODS,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    QuantizedEmbedding,
    affine_qparams,
    apply_quantization_config,
    clip_search_qparams,
    dequantize_affine,
    dequantize_int4_grouped,
    gptq_quantize,
    input_hessians,
    input_mean_squares,
    load_quantized,
    quantize_affine,
    quantize_int4_clip_search,
    quantize_int4_grouped,
    quantize_model,
    save_quantized,
)
from tests.compress.test_quantize import correlated_inputs, ids, rel_err, tied_toy, toy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: threads only spin


def heavy_tailed(rows: int = 48, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """Weights with a few outliers per row, where shrinking a group's range pays off."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, cols, generator=g).pow(4) * 3


def weighted_error(groups, q, scale, offset, importance) -> torch.Tensor:
    return ((groups - dequantize_affine(q.float(), scale, offset)) ** 2 * importance).sum(-1)


# ---- clip search ----------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_clip_search_never_increases_the_weighted_error_of_any_group(symmetric, weighted):
    groups = heavy_tailed().reshape(48, 4, 32)
    importance = torch.rand(32, generator=torch.Generator().manual_seed(1)) ** 3 if weighted else torch.ones(32)
    scale, offset = affine_qparams(groups, 4, symmetric)
    rtn = weighted_error(groups, quantize_affine(groups, scale, offset, 4), scale, offset, importance)
    q, s, o = clip_search_qparams(groups, 4, symmetric, importance if weighted else None)
    searched = weighted_error(groups, q, s, o, importance)
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7
    assert bool((searched <= rtn * (1 + 1e-6)).all())
    assert searched.sum() < 0.9 * rtn.sum()  # and clearly better overall on heavy-tailed weights


def test_clip_search_returns_consistent_integers_scales_and_offsets():
    weight = heavy_tailed()
    q, scales, offsets = quantize_int4_clip_search(weight, group_size=32)
    assert q.shape == weight.shape and scales.shape == offsets.shape == (48, 4)
    again = quantize_affine(weight.reshape(48, 4, 32), scales, offsets, 4).reshape(weight.shape)
    assert torch.equal(q, again)  # the integers are the nearest ones for the returned parameters
    module = Int4WeightOnlyLinear.from_quantized(q, scales, offsets, 32)
    torch.testing.assert_close(module.dequantize_weight(), dequantize_int4_grouped(q, scales, offsets, 32))


def test_importance_weighting_lowers_the_error_where_it_matters():
    weight = heavy_tailed(seed=2)
    importance = torch.ones(128)
    importance[::16] = 100.0  # a few "outlier activation" channels
    error = {}
    for name, weights in (("plain", None), ("weighted", importance)):
        q, s, o = quantize_int4_clip_search(weight, 32, importance=weights)
        error[name] = (((weight - dequantize_int4_grouped(q, s, o, 32)) ** 2) * importance).sum()
    assert error["weighted"] < error["plain"]


def test_clip_search_keeps_constant_and_zero_groups_exact():
    weight = torch.zeros(4, 64)
    weight[1] = 0.5
    weight[2, :32] = -1.0
    q, s, o = quantize_int4_clip_search(weight, 32)
    assert torch.isfinite(s).all() and torch.isfinite(o).all()
    torch.testing.assert_close(dequantize_int4_grouped(q, s, o, 32), weight)


@pytest.mark.parametrize("factors", [(), (1.2,), (0.0, 0.9)])
def test_clip_factors_out_of_range_are_rejected(factors):
    with pytest.raises(ValueError, match="clip factors"):
        clip_search_qparams(heavy_tailed().reshape(48, 4, 32), 4, False, factors=factors)


def test_input_mean_squares_is_the_hessian_diagonal():
    model = toy()
    calibration = [ids(seed=s) for s in range(3)]
    names = ["layers.0.mlp.up_proj", "layers.1.mlp.down_proj"]
    hessians = input_hessians(model, names, calibration)
    squares = input_mean_squares(model, names, calibration)
    for name in names:
        torch.testing.assert_close(squares[name], hessians[name].diagonal())


def test_gptq_with_clip_search_beats_plain_gptq_on_heavy_tailed_weights():
    weight = heavy_tailed(32, 64, seed=3)
    x = correlated_inputs(512, 64)
    hessian = x.T @ x / x.shape[0]
    errors = {}
    for clip in (False, True):
        result = gptq_quantize(weight, hessian, 4, 32, clip_search=clip)
        w = dequantize_int4_grouped(result.q, result.scales, result.offsets, 32)
        errors[clip] = ((x @ (w - weight).T) ** 2).mean()
    assert errors[True] < errors[False]


# ---- quantize_model options -----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["int4", "gptq-int4"])
def test_clip_search_in_quantize_model_lowers_the_output_error(method):
    calibration = [ids(seed=s) for s in range(3)]
    x = ids(seed=9)
    reference = toy()
    with torch.no_grad():
        expected = reference(x)
    errors = {}
    for clip in (False, True):
        model = toy()
        config = quantize_model(model, method, group_size=32, calibration=calibration, clip_search=clip)
        assert config.clip_search is clip
        with torch.no_grad():
            errors[clip] = rel_err(model(x), expected)
    assert errors[True] < errors[False]


def test_clip_search_uses_calibration_importance_for_rtn():
    calibration = [ids(seed=s) for s in range(3)]
    plain, weighted = toy(), toy()
    quantize_model(plain, "int4", group_size=32, clip_search=True)
    quantize_model(weighted, "int4", group_size=32, clip_search=True, calibration=calibration)
    assert not torch.equal(plain.layers[0].mlp["up_proj"].qweight, weighted.layers[0].mlp["up_proj"].qweight)


@pytest.mark.parametrize("method", ["int8", "w8a8", "gptq-int8"])
def test_clip_search_is_only_for_int4_methods(method):
    with pytest.raises(ValueError, match="clip_search applies to the int4 methods"):
        quantize_model(toy(), method, clip_search=True, calibration=[ids()])


def test_clip_search_must_be_a_bool():
    with pytest.raises(TypeError, match="clip_search"):
        quantize_model(toy(), "int4", group_size=32, clip_search="yes")


@pytest.mark.parametrize("body", ["int4", "gptq-int4"])
def test_int8_head_on_an_int4_body_is_shared_with_the_tied_embedding(body):
    model = tied_toy()
    x = ids()
    calibration = [ids(seed=s) for s in range(2)]
    config = quantize_model(model, body, group_size=32, include_lm_head=True, lm_head_method="int8",
                            calibration=calibration, clip_search=True)
    assert config.method == body and config.module_methods == (("lm_head", "int8"),)
    assert config.method_of("lm_head") == "int8" and config.method_of("layers.0.attn.q_proj") == body
    assert type(model.lm_head) is Int8WeightOnlyLinear
    assert type(model.layers[0].mlp["up_proj"]) is Int4WeightOnlyLinear
    embedding = model.embed["tokens"]
    assert isinstance(embedding, QuantizedEmbedding) and embedding.source is model.lm_head
    assert torch.equal(embedding(x), model.lm_head.dequantize_weight()[x])


def test_int8_head_on_an_int4_body_round_trips_save_and_load(tmp_path):
    model = tied_toy()
    quantize_model(model, "int4", group_size=32, include_lm_head=True, lm_head_method="int8", clip_search=True)
    save_quantized(model, tmp_path / "q.safetensors")
    fresh = tied_toy(seed=7)
    config = load_quantized(fresh, tmp_path / "q.safetensors")  # strict: the keys match exactly
    assert config == model.quantization_config
    assert type(fresh.lm_head) is Int8WeightOnlyLinear and fresh.embed["tokens"].source is fresh.lm_head
    x = ids()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
        # every quantized layer's fast kernel (if any) agrees with the plain dequantize-then-matmul path
        for module in (fresh.lm_head, fresh.layers[0].mlp["down_proj"]):
            h = torch.randn(5, module.in_features)
            assert rel_err(module(h), module.forward_reference(h)) < 0.02


def test_config_round_trips_module_methods_through_a_dict():
    model = tied_toy()
    config = quantize_model(model, "int4", group_size=32, include_lm_head=True, lm_head_method="w8a8")
    fresh = tied_toy(seed=3)
    rebuilt = apply_quantization_config(fresh, config.to_dict())
    assert rebuilt == config and type(fresh.lm_head).__name__ == "DynamicInt8Linear"


def test_head_method_equal_to_the_body_method_is_no_override():
    config = quantize_model(tied_toy(), "int8", include_lm_head=True, lm_head_method="int8")
    assert config.module_methods == ()


def test_unknown_head_method_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="lm_head_method 'int3'.*" + re.escape(str(LM_HEAD_METHODS))):
        quantize_model(tied_toy(), "int4", group_size=32, include_lm_head=True, lm_head_method="int3")


def test_head_method_without_including_the_head_is_an_error():
    with pytest.raises(ValueError, match="include_lm_head=True"):
        quantize_model(tied_toy(), "int4", group_size=32, lm_head_method="int8")


def test_config_with_an_unknown_module_method_is_rejected():
    config = quantize_model(toy(), "int4", group_size=32, include_lm_head=True, lm_head_method="int8").to_dict()
    config["module_methods"] = [["lm_head", "int5"]]
    with pytest.raises(ValueError, match="int5"):
        apply_quantization_config(toy(), config)


def test_recipe_quantize_step_accepts_the_new_options():
    from lmsmith.compress.recipe import QuantizeStep, build_dataclass

    step = build_dataclass(QuantizeStep, {"method": "int4", "include_lm_head": True, "lm_head_method": "int8",
                                          "clip_search": True, "gptq_act_order": True}, "steps[0].quantize")
    assert (step.lm_head_method, step.clip_search, step.gptq_act_order) == ("int8", True, True)
    assert (QuantizeStep().lm_head_method, QuantizeStep().clip_search) == (None, False)


def test_int4_body_with_int8_head_round_trips_through_an_artifact(tmp_path):
    from lmsmith.io.artifact import load_artifact, new_manifest, read_manifest, save_artifact
    from lmsmith.model.config import PRESETS
    from lmsmith.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-llama"].replace(intermediate_size=128, tie_word_embeddings=True)).eval()
    calibration = [{"input_ids": torch.randint(0, 512, (2, 16))}]
    quantize_model(model, "int4", group_size=32, include_lm_head=True, lm_head_method="int8", clip_search=True,
                   calibration=calibration)
    x = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        expected = model(x).logits
    save_artifact(model, tmp_path / "q", manifest=new_manifest(model.config, "test"))
    assert read_manifest(tmp_path / "q")["quantization"]["module_methods"] == [["lm_head", "int8"]]
    loaded, _ = load_artifact(tmp_path / "q")
    assert type(loaded.lm_head) is Int8WeightOnlyLinear and isinstance(loaded.embed.tokens, QuantizedEmbedding)
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, expected, atol=1e-5)
        for module in loaded.modules():  # the kernels agree with the plain dequantize-then-matmul path
            if hasattr(module, "use_kernels"):
                module.use_kernels = False
        assert rel_err(loaded(x).logits, expected) < 0.02


# ---- GPTQ act-order with static groups ------------------------------------------------------------
def importance_skewed_inputs(n: int = 512, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Correlated inputs whose channel scales differ a lot, so the column order matters."""
    scale = torch.linspace(0.1, 3.0, dim)[torch.randperm(dim, generator=torch.Generator().manual_seed(seed))]
    return correlated_inputs(n, dim, seed=seed) * scale


@pytest.mark.parametrize("clip", [False, True])
def test_act_order_keeps_static_groups_fitted_to_the_original_weights(clip):
    weight = heavy_tailed(32, 64, seed=4)
    x = importance_skewed_inputs()
    hessian = x.T @ x / x.shape[0]
    result = gptq_quantize(weight, hessian, 4, 32, clip_search=clip, act_order=True)
    groups = weight.reshape(32, 2, 32)
    if clip:
        _, scales, offsets = clip_search_qparams(groups, 4, False, hessian.diagonal().reshape(2, 32))
    else:
        scales, offsets = affine_qparams(groups, 4, False)
    torch.testing.assert_close(result.scales, scales)
    torch.testing.assert_close(result.offsets, offsets)
    assert result.q.min() >= -8 and result.q.max() <= 7


def test_act_order_gptq_beats_round_to_nearest_on_the_layer_output():
    weight = heavy_tailed(32, 64, seed=5)
    x = importance_skewed_inputs(seed=1)
    hessian = x.T @ x / x.shape[0]
    result = gptq_quantize(weight, hessian, 4, 32, act_order=True)
    gptq_w = dequantize_int4_grouped(result.q, result.scales, result.offsets, 32)
    rtn_w = dequantize_int4_grouped(*quantize_int4_grouped(weight, 32), 32)
    assert ((x @ (gptq_w - weight).T) ** 2).mean() < 0.8 * ((x @ (rtn_w - weight).T) ** 2).mean()


def test_act_order_in_quantize_model_and_its_errors():
    calibration = [ids(seed=s) for s in range(3)]
    model = toy()
    quantize_model(model, "gptq-int4", group_size=32, calibration=calibration, clip_search=True, gptq_act_order=True)
    x = ids(seed=9)
    with torch.no_grad():
        assert rel_err(model(x), toy()(x)) < 0.15
    with pytest.raises(ValueError, match="gptq_act_order applies to the GPTQ methods"):
        quantize_model(toy(), "int4", group_size=32, gptq_act_order=True)


@pytest.mark.parametrize("method", ["int4", "gptq-int4"])
def test_a_tied_head_with_clip_search_is_weighted_by_its_inputs(method):
    calibration = [ids(seed=s) for s in range(3)]
    weighted, plain = tied_toy(), tied_toy()
    quantize_model(weighted, method, group_size=32, include_lm_head=True, clip_search=True, calibration=calibration)
    quantize_model(plain, "int4", group_size=32, include_lm_head=True, clip_search=True)
    assert not torch.equal(weighted.lm_head.qweight, plain.lm_head.qweight)
    head = tied_toy().lm_head.weight.detach()
    importance = input_mean_squares(tied_toy(), ["lm_head"], calibration)["lm_head"]
    q, s, o = quantize_int4_clip_search(head, 32, importance=importance)  # rounded, not GPTQ'd, in both
    torch.testing.assert_close(weighted.lm_head.dequantize_weight(), dequantize_int4_grouped(q, s, o, 32))
