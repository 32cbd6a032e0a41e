import copy
import json

import pytest
import torch
from torch import nn

from lmsmith.compress import quantize as qz
from lmsmith.compress.quantize import (
    QUANT_METHODS,
    DynamicInt8Linear,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    QuantizationConfig,
    QuantizedEmbedding,
    apply_quantization_config,
    dequantize_int4_grouped,
    dequantize_int8_per_channel,
    dequantize_model,
    gptq_quantize,
    input_hessians,
    load_quantized,
    model_size_bytes,
    pack_int4,
    quantize_int4_grouped,
    quantize_int8_per_channel,
    quantize_model,
    quantized_state_dict,
    save_quantized,
    unpack_int4,
)


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(dim, dim), "v_proj": nn.Linear(dim, dim, bias=False)})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(dim, hidden), "down_proj": nn.Linear(hidden, dim)})

    def forward(self, x):
        x = x + self.attn["v_proj"](torch.tanh(self.attn["q_proj"](x)))
        return x + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](x)))


class Toy(nn.Module):
    """Named like the lmsmith Transformer: embed.tokens, layers.{i}.attn.*, layers.{i}.mlp.*, lm_head."""

    def __init__(self, vocab: int = 50, dim: int = 64, hidden: int = 128, n_layers: int = 2):
        super().__init__()
        self.embed = nn.ModuleDict({"tokens": nn.Embedding(vocab, dim)})
        self.layers = nn.ModuleList(Block(dim, hidden) for _ in range(n_layers))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.embed["tokens"](ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().eval()


def ids(seed: int = 1, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def linear(in_f: int, out_f: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


# ---- pure math ------------------------------------------------------------------------------------
def test_int8_per_channel_error_is_at_most_half_a_step():
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different ranges
    q, scales = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    assert q.abs().max() <= 127 and (q.abs().amax(1) == 127).all()  # full range used per row
    err = (dequantize_int8_per_channel(q, scales) - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_grouped_error_is_at_most_half_a_step(group_size, symmetric):
    w = torch.randn(16, 256) + (0.0 if symmetric else 0.5)
    q, scales, offsets = quantize_int4_grouped(w, group_size, symmetric)
    assert q.shape == w.shape and q.min() >= -8 and q.max() <= 7
    assert scales.shape == (16, 256 // group_size)
    assert (offsets is None) == symmetric
    err = (dequantize_int4_grouped(q, scales, offsets, group_size) - w).abs()
    step = scales.repeat_interleave(group_size, dim=1)
    assert (err <= step / 2 * (1 + 1e-4) + 1e-6).all()


def test_asymmetric_int4_is_more_accurate_on_shifted_weights():
    w = torch.rand(32, 128)  # all positive: symmetric wastes half the levels
    sym = dequantize_int4_grouped(*quantize_int4_grouped(w, 64, True), 64)
    asym = dequantize_int4_grouped(*quantize_int4_grouped(w, 64, False), 64)
    assert rel_err(asym, w) < 0.6 * rel_err(sym, w)


def test_pack_int4_round_trips_and_puts_even_column_low():
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32)
    assert torch.equal(unpack_int4(packed), q)
    assert int(packed[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)


def test_pack_int4_rejects_odd_columns():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


# ---- GPTQ -----------------------------------------------------------------------------------------
def correlated_inputs(n: int, dim: int, rank: int = 8, seed: int = 0) -> torch.Tensor:
    """Samples near one fixed rank-`rank` subspace (the same for every seed), plus a little noise."""
    mixing = torch.randn(rank, dim, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ mixing + 0.05 * torch.randn(n, dim, generator=g)


@pytest.mark.parametrize("group_size,symmetric", [(32, False), (64, True), (None, False)])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(group_size, symmetric):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x_cal, x_test = correlated_inputs(512, 128, seed=1), correlated_inputs(256, 128, seed=2)
    h = x_cal.T @ x_cal / x_cal.shape[0]
    gptq = gptq_quantize(w, h, bits=4, group_size=group_size, symmetric=symmetric, block_size=64)
    group = group_size or 128
    rtn = quantize_int4_grouped(w, group, symmetric)
    err_gptq = rel_err(
        x_test @ dequantize_int4_grouped(gptq.q, gptq.scales, gptq.offsets, group).T, x_test @ w.T
    )
    err_rtn = rel_err(x_test @ dequantize_int4_grouped(*rtn, group).T, x_test @ w.T)
    assert err_gptq < 0.7 * err_rtn


def test_gptq_handles_dead_inputs_and_checks_shapes():
    w = torch.randn(8, 32)
    x = correlated_inputs(64, 32)
    x[:, 5] = 0.0  # an input that is never active: zero Hessian row/column
    result = gptq_quantize(w, x.T @ x / 64, bits=8, group_size=None, symmetric=True)
    assert (result.q[:, 5] == 0).all() and torch.isfinite(result.scales).all()
    with pytest.raises(ValueError, match="hessian shape"):
        gptq_quantize(w, torch.eye(16))
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(w, torch.eye(32), group_size=24)


def test_gptq_model_beats_rtn_model_on_calibration_like_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 64))
    calibration = [correlated_inputs(64, 128, seed=s) for s in range(8)]
    x_test = correlated_inputs(128, 128, seed=99)
    with torch.no_grad():
        reference = model(x_test)
        rtn, gptq = copy.deepcopy(model), copy.deepcopy(model)
        quantize_model(rtn, "int4", group_size=32, exclude=())
        config = quantize_model(gptq, "gptq-int4", group_size=32, exclude=(), calibration=calibration)
        assert config.method == "gptq-int4" and isinstance(gptq[0], Int4WeightOnlyLinear)
        assert rel_err(gptq(x_test), reference) < 0.8 * rel_err(rtn(x_test), reference)


def test_input_hessians_is_mean_outer_product_of_layer_inputs():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    batches = [torch.randn(5, 4), torch.randn(2, 6, 4)]
    hessians = input_hessians(model, ["0", "1"], batches)
    x = torch.cat([batches[0], batches[1].reshape(-1, 4)])
    torch.testing.assert_close(hessians["0"], x.T @ x / 17)
    with torch.no_grad():
        h1 = model[0](x)
    torch.testing.assert_close(hessians["1"], h1.T @ h1 / 17)


def test_gptq_without_calibration_is_rejected():
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(toy(), "gptq-int4")


# ---- modules: fast path vs reference --------------------------------------------------------------
def kernel_available(cls) -> bool:
    return any(k.device_type == "cpu" and k.available() for k in cls.kernels)


def check_fast_matches_reference(module, x, tolerance: float) -> None:
    if not kernel_available(type(module)):
        pytest.skip(f"no CPU kernel for {type(module).__name__} in this torch build")
    assert module.kernel_name("cpu") != "reference"
    with torch.no_grad():
        fast, reference = module(x), module.forward_reference(x)
    assert fast.shape == reference.shape == (*x.shape[:-1], module.out_features)
    assert rel_err(fast, reference) < tolerance


def test_int8_weight_only_fast_path_matches_reference():
    lin = linear(192, 96)
    module = Int8WeightOnlyLinear.from_linear(lin)
    x = torch.randn(2, 5, 192)
    check_fast_matches_reference(module, x, tolerance=0.01)
    with torch.no_grad():
        assert rel_err(module(x), lin(x)) < 0.02


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_fast_path_matches_reference(group_size, symmetric):
    lin = linear(256, 64)
    module = Int4WeightOnlyLinear.from_linear(lin, group_size, symmetric)
    assert (module.zeros is None) == symmetric
    x = torch.randn(3, 4, 256)
    check_fast_matches_reference(module, x, tolerance=0.01)
    with torch.no_grad():
        assert rel_err(module(x), lin(x)) < 0.2


def test_w8a8_fast_path_matches_reference_per_token():
    lin = linear(128, 64)
    module = DynamicInt8Linear.from_linear(lin)
    # tokens of very different size: a per-tensor activation scale would wipe out the small ones
    x = torch.randn(6, 128) * torch.logspace(-3, 1, 6)[:, None]
    check_fast_matches_reference(module, x, tolerance=0.05)
    with torch.no_grad():
        fast, exact = module(x), lin(x) - lin.bias
        per_row = ((fast - lin.bias) - exact).norm(dim=1) / exact.norm(dim=1)
    assert per_row.max() < 0.06


@pytest.mark.skipif(not qz.native.native_int8_available(), reason="native int8 kernel not built here")
def test_w8a8_small_batches_run_the_int8_weight_only_kernel_and_large_ones_fbgemm():
    lin = linear(128, 64)
    w8a8, weight_only = DynamicInt8Linear.from_linear(lin), Int8WeightOnlyLinear.from_linear(lin)
    assert torch.equal(w8a8.qweight, weight_only.qweight)  # one storage format: the same int8 weights
    small = torch.randn(qz.W8A8_NATIVE_MAX_ROWS, 128)
    large = torch.randn(qz.W8A8_NATIVE_MAX_ROWS + 1, 128)
    with torch.no_grad():
        torch.testing.assert_close(w8a8(small), weight_only(small))  # float activations: exact same path
        assert not torch.allclose(w8a8(large), weight_only(large), atol=1e-5)  # int8 activations
    check_fast_matches_reference(w8a8, large, tolerance=0.05)


def test_a_kernel_broken_only_for_many_rows_is_not_used(monkeypatch):
    def broken_when_large(state, x, f=qz._w8a8_cpu_mm):
        y = f(state, x)
        return y.flip(-1) if x.shape[0] > qz.W8A8_NATIVE_MAX_ROWS else y

    kernels = tuple(qz._Kernel(k.name, k.device_type, k.ops, k.pack, broken_when_large) if k.device_type == "cpu"
                    else k for k in DynamicInt8Linear.kernels)
    monkeypatch.setattr(DynamicInt8Linear, "kernels", kernels)
    assert DynamicInt8Linear.from_linear(linear(64, 32)).kernel_name() == "reference"


def test_kernel_that_disagrees_with_reference_is_not_used(monkeypatch):
    broken = [
        qz._Kernel(k.name, k.device_type, k.ops, k.pack, lambda state, x, f=k.matmul: f(state, x).flip(-1))
        for k in Int8WeightOnlyLinear.kernels
    ]
    monkeypatch.setattr(Int8WeightOnlyLinear, "kernels", tuple(broken))
    module = Int8WeightOnlyLinear.from_linear(linear(64, 32))
    x = torch.randn(2, 64)
    assert module.kernel_name() == "reference"
    with torch.no_grad():
        torch.testing.assert_close(module(x), module.forward_reference(x))


def test_inputs_that_need_grad_use_the_differentiable_reference():
    module = Int4WeightOnlyLinear.from_linear(linear(64, 32), 32)
    x = torch.randn(3, 64, requires_grad=True)
    module(x).sum().backward()
    expected = module.dequantize_weight().sum(0).expand(3, 64)
    torch.testing.assert_close(x.grad, expected)


def test_bfloat16_inputs_keep_their_dtype():
    module = Int4WeightOnlyLinear.from_linear(linear(64, 32), 64)
    x = torch.randn(2, 64).to(torch.bfloat16)
    with torch.no_grad():
        y = module(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, module.forward_reference(x.float())) < 0.02


# ---- whole model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["int8", "int4", "w8a8"])
def test_quantize_model_replaces_linears_and_stays_close(method):
    model = toy()
    x = ids()
    with torch.no_grad():
        reference = model(x)
        config = quantize_model(model, method, group_size=32)
        out = model(x)
    assert model.quantization_config == config and config.method == method
    assert "lm_head" not in config.modules and type(model.lm_head) is nn.Linear  # default exclude
    assert len(config.modules) == 8
    assert rel_err(out, reference) < (0.1 if method == "int4" else 0.03)


def test_exclude_and_target_patterns_are_honoured():
    model = toy()
    config = quantize_model(
        model, "int8", targets=["layers.*"], exclude=["re:layers\\.\\d+\\.attn\\.v_proj", "layers.1.mlp.*"]
    )
    assert config.modules == (
        "layers.0.attn.q_proj",
        "layers.0.mlp.up_proj",
        "layers.0.mlp.down_proj",
        "layers.1.attn.q_proj",
    )
    assert type(model.layers[0].attn["v_proj"]) is nn.Linear
    assert type(model.layers[1].mlp["up_proj"]) is nn.Linear
    assert isinstance(model.layers[1].attn["q_proj"], Int8WeightOnlyLinear)


def test_patterns_matching_nothing_raise_with_available_names():
    with pytest.raises(ValueError, match="layers.0.attn.q_proj"):
        quantize_model(toy(), "int8", targets=["decoder.*"])


def test_group_size_not_dividing_in_features_names_the_layer():
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 8))
    with pytest.raises(ValueError, match="layer '1'.*group_size 64.*96"):
        quantize_model(model, "int4", group_size=64, exclude=())
    assert all(type(m) is nn.Linear for m in model)  # nothing half-done


def test_unsupported_group_size_lists_allowed():
    with pytest.raises(ValueError, match="32, 64, 128, 256"):
        quantize_model(toy(), "int4", group_size=16)


def test_unknown_method_lists_allowed_ones():
    with pytest.raises(ValueError, match="int8, int4, w8a8, gptq-int4, gptq-int8"):
        quantize_model(toy(), "int3")


def test_int8_asymmetric_and_double_quantization_are_rejected():
    with pytest.raises(ValueError, match="only symmetric"):
        quantize_model(toy(), "int8", symmetric=False)
    model = toy()
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int4")


@pytest.mark.parametrize("method", QUANT_METHODS)
def test_save_load_round_trip_gives_identical_outputs(method, tmp_path):
    model = toy()
    calibration = [ids(seed=s) for s in range(3)] if method.startswith("gptq") else None
    quantize_model(model, method, group_size=32, calibration=calibration)
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    fresh = toy(seed=123)  # different float weights: everything must come from the file
    config = load_quantized(fresh, path)
    assert config == model.quantization_config
    x = ids()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_quantized_state_dict_has_portable_keys_and_json_config():
    model = toy()
    quantize_model(model, "int4", group_size=32, symmetric=False)
    tensors, config = quantized_state_dict(model)
    assert tensors["layers.0.mlp.up_proj.qweight"].dtype == torch.uint8
    assert tensors["layers.0.mlp.up_proj.qweight"].shape == (128, 32)
    assert tensors["layers.0.mlp.up_proj.scales"].shape == (128, 2)
    assert tensors["layers.0.mlp.up_proj.zeros"].shape == (128, 2)
    assert "layers.0.mlp.up_proj.bias" in tensors and "layers.0.mlp.up_proj.weight" not in tensors
    assert "lm_head.weight" in tensors and "embed.tokens.weight" in tensors
    config = json.loads(json.dumps(config))
    assert config["method"] == "int4" and config["bits"] == 4 and config["group_size"] == 32
    assert config["symmetric"] is False and "layers.1.attn.v_proj" in config["modules"]

    fresh = toy(seed=5)
    apply_quantization_config(fresh, config)
    fresh.load_state_dict(tensors)
    x = ids()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_loading_new_weights_invalidates_packed_kernels():
    a, b = toy(seed=0), toy(seed=1)
    for model in (a, b):
        quantize_model(model, "int4", group_size=32)
    x = ids()
    with torch.no_grad():
        before = a(x)  # packs kernels for a's weights
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), b(x)) and not torch.equal(a(x), before)


def test_apply_config_rejects_layers_missing_from_model():
    config = QuantizationConfig("int8", 8, None, True, ("layers.9.attn.q_proj",))
    with pytest.raises(ValueError, match="layers.9.attn.q_proj"):
        apply_quantization_config(toy(), config)
    with pytest.raises(ValueError, match="format"):
        QuantizationConfig.from_dict({**config.to_dict(), "format": "other"})


def test_dequantize_model_restores_float_linears():
    model = toy()
    quantize_model(model, "int4", group_size=64)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model.layers[0].mlp["up_proj"].forward_reference(x)
        assert dequantize_model(model) == 8
        got = model.layers[0].mlp["up_proj"](x)
    assert all(type(m) is nn.Linear for m in model.modules() if hasattr(m, "in_features"))
    assert not hasattr(model, "quantization_config")
    torch.testing.assert_close(got, expected)


def test_model_size_shrinks_with_fewer_bits():
    sizes = {}
    for method in ("int8", "int4"):
        model = toy()
        float_size = model_size_bytes(model)
        quantize_model(model, method, group_size=64, symmetric=True, targets=["layers.*"])
        sizes[method] = model_size_bytes(model)
    linear_bytes = 2 * (64 * 64 * 2 + 64 * 128 * 2) * 4  # float32 weights of the quantized layers
    assert float_size - sizes["int8"] == pytest.approx(linear_bytes * 3 / 4, rel=0.05)
    assert float_size - sizes["int4"] == pytest.approx(linear_bytes * 7 / 8, rel=0.05)


def test_model_size_counts_tied_weights_once():
    model = toy()
    untied = model_size_bytes(model)
    model.lm_head.weight = model.embed["tokens"].weight
    assert model_size_bytes(model) == untied - 50 * 64 * 4


# ---- the output head and tied embeddings ----------------------------------------------------------
def tied_toy(seed: int = 0) -> Toy:
    model = toy(seed)
    model.lm_head.weight = model.embed["tokens"].weight  # like SmolLM2: one matrix for input and output
    return model


@pytest.mark.parametrize("cls,kwargs", [(Int8WeightOnlyLinear, {}), (DynamicInt8Linear, {}),
                                        (Int4WeightOnlyLinear, {"group_size": 32, "symmetric": False}),
                                        (Int4WeightOnlyLinear, {"group_size": 32, "symmetric": True})])
def test_dequantize_rows_equals_rows_of_the_dequantized_weight(cls, kwargs):
    module = cls.from_linear(linear(64, 50), **kwargs)
    rows = torch.tensor([[3, 0, 49], [7, 7, 1]])
    got = module.dequantize_rows(rows)
    assert got.shape == (2, 3, 64)
    assert torch.equal(got, module.dequantize_weight()[rows])


@pytest.mark.parametrize("method", ["int8", "int4", "w8a8"])
def test_include_lm_head_quantizes_a_tied_head_and_the_embedding_reads_its_rows(method):
    model = tied_toy()
    x = ids()
    with torch.no_grad():
        reference = model(x)
    config = quantize_model(model, method, group_size=32, include_lm_head=True)
    assert "lm_head" in config.modules and config.tied_embeddings == (("embed.tokens", "lm_head"),)
    embedding = model.embed["tokens"]
    assert isinstance(embedding, QuantizedEmbedding) and embedding.source is model.lm_head
    assert torch.equal(embedding(x), model.lm_head.dequantize_weight()[x])
    keys = set(model.state_dict())
    assert "lm_head.qweight" in keys and not any(k.startswith("embed.") for k in keys)  # stored once
    with torch.no_grad():
        assert rel_err(model(x), reference) < (0.15 if method == "int4" else 0.03)


def test_include_lm_head_overrides_targets_and_default_exclude_only():
    model = toy()  # untied: the embedding is a separate matrix and stays float
    config = quantize_model(model, "int8", targets=["layers.0.*"], exclude=["layers.0.mlp.*"], include_lm_head=True)
    assert config.modules == ("layers.0.attn.q_proj", "layers.0.attn.v_proj", "lm_head")
    assert config.tied_embeddings == () and type(model.embed["tokens"]) is nn.Embedding


def test_include_lm_head_without_a_head_is_an_error():
    model = toy()
    del model.lm_head
    with pytest.raises(ValueError, match="include_lm_head"):
        quantize_model(model, "int8", include_lm_head=True)


def test_tied_layer_is_found_even_when_excluding_nothing():
    model = tied_toy()
    config = quantize_model(model, "int8", exclude=())
    assert config.tied_embeddings == (("embed.tokens", "lm_head"),)
    assert isinstance(model.embed["tokens"], QuantizedEmbedding)


def test_gptq_rounds_a_tied_head_to_nearest():
    model = tied_toy()
    head_rtn, _, _ = quantize_int4_grouped(model.lm_head.weight.detach(), 32, False)
    up_rtn, _, _ = quantize_int4_grouped(model.layers[0].mlp["up_proj"].weight.detach(), 32, False)
    quantize_model(model, "gptq-int4", group_size=32, include_lm_head=True, calibration=[ids(seed=s) for s in range(2)])
    assert torch.equal(unpack_int4(model.lm_head.qweight), head_rtn)
    # untied layers still get GPTQ's error feedback
    assert not torch.equal(unpack_int4(model.layers[0].mlp["up_proj"].qweight), up_rtn)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_tied_quantized_head_round_trips_through_save_and_load(method, tmp_path):
    model = tied_toy()
    quantize_model(model, method, group_size=32, include_lm_head=True)
    save_quantized(model, tmp_path / "q.safetensors")
    fresh = tied_toy(seed=7)
    config = load_quantized(fresh, tmp_path / "q.safetensors")  # strict: the keys match exactly
    assert config == model.quantization_config
    assert isinstance(fresh.embed["tokens"], QuantizedEmbedding) and fresh.embed["tokens"].source is fresh.lm_head
    x = ids()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_configs_written_before_tied_embeddings_still_load():
    model = toy()
    config = quantize_model(model, "int8")
    old = {k: v for k, v in config.to_dict().items() if k != "tied_embeddings"}
    fresh = toy(seed=3)
    assert apply_quantization_config(fresh, old).tied_embeddings == ()
    fresh.load_state_dict(model.state_dict())
    x = ids()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_tied_embedding_must_be_an_embedding():
    model = toy()
    config = QuantizationConfig("int8", 8, None, True, ("lm_head",), (("layers.0.attn.q_proj", "lm_head"),))
    with pytest.raises(ValueError, match="layers.0.attn.q_proj"):
        apply_quantization_config(model, config)


def test_dequantize_model_ties_the_embedding_again():
    model = tied_toy()
    quantize_model(model, "int8", include_lm_head=True)
    x = ids()
    with torch.no_grad():
        expected = model.embed["tokens"](x)
    dequantize_model(model)
    assert type(model.embed["tokens"]) is nn.Embedding and model.embed["tokens"].weight is model.lm_head.weight
    torch.testing.assert_close(model.embed["tokens"](x), expected)


def test_quantizing_a_tied_head_shrinks_the_model_further():
    sizes = {}
    for head in (False, True):
        model = tied_toy()
        quantize_model(model, "int8", include_lm_head=head)
        sizes[head] = model_size_bytes(model)
    assert sizes[False] - sizes[True] == 50 * 64 * 4 - (50 * 64 + 50 * 4)  # fp32 table → int8 + row scales


def test_int4_prefill_sized_inputs_take_the_dequantize_path_and_agree():
    torch.manual_seed(0)
    layer = Int4WeightOnlyLinear.from_linear(nn.Linear(128, 96), group_size=32)
    with torch.no_grad():
        for rows in (qz._INT4_DEQUANTIZE_MIN_ROWS - 1, qz._INT4_DEQUANTIZE_MIN_ROWS + 5):
            x = torch.randn(rows, 128)
            reference = layer.forward_reference(x)
            assert (layer(x) - reference).norm() / reference.norm() < 1e-2, rows
