"""Structured pruning removes heads, neurons and layers for real: smaller config, smaller tensors, and
exactly the same outputs when what is removed contributed nothing."""
import pytest
import torch

from lmsmith.compress.quantize import quantize_model
from lmsmith.compress.structured import (
    drop_layers,
    head_importance,
    kept_heads,
    layer_importance,
    neuron_importance,
    prune_heads,
    prune_layers,
    prune_neurons,
    structured_prune,
)
from lmsmith.generation import GenerationConfig, iter_tokens
from lmsmith.io.artifact import load_artifact, new_manifest, save_artifact
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))


def gqa_model(**changes) -> Transformer:
    """8 query heads in 2 KV groups of 4, head_dim 16, 3 layers."""
    torch.manual_seed(0)
    config = PRESETS["tiny-llama"].replace(num_heads=8, num_kv_heads=2, head_dim=16, num_layers=3, **changes)
    return Transformer(config).eval()


def bert_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(PRESETS["tiny-bert"]).eval()


def zero_heads(model: Transformer, heads: list[int]) -> None:
    """Make query heads contribute nothing: their o_proj input columns become zero."""
    d = model.config.dim_per_head
    with torch.no_grad():
        for block in model.layers:
            for h in heads:
                block.attn.o_proj.weight[:, h * d:(h + 1) * d] = 0


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_query_heads_with_zero_importance_are_removed_without_changing_outputs():
    model = gqa_model()
    zero_heads(model, [1, 6])  # one in each KV group
    before = logits(model)
    record = prune_heads(model, 0.25)  # 1 of 4 query heads per group
    c = model.config
    assert (c.num_heads, c.kv_heads, c.dim_per_head) == (6, 2, 16)
    assert record["kept_heads"][0] == [0, 2, 3, 4, 5, 7]
    assert model.layers[0].attn.q_proj.weight.shape == (96, 64)
    assert model.layers[0].attn.o_proj.weight.shape == (64, 96)
    assert model.layers[0].attn.k_proj.weight.shape == (32, 64)  # KV heads stay with unit="query"
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)


def test_whole_kv_groups_are_removed_with_unit_group():
    model = gqa_model()
    zero_heads(model, [4, 5, 6, 7])  # all of group 1
    before = logits(model)
    record = prune_heads(model, 0.5, unit="group")
    assert (model.config.num_heads, model.config.kv_heads) == (4, 1)
    assert record["kept_heads"][2] == [0, 1, 2, 3]
    assert model.layers[1].attn.k_proj.weight.shape == (16, 64)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)


def test_multi_head_attention_removes_kv_heads_too():
    model = bert_model()
    zero_heads(model, [2])
    before = logits(model)
    record = prune_heads(model, 0.25, unit="query")  # MHA: each head is its own group
    assert record["unit"] == "group"
    assert (model.config.num_heads, model.config.kv_heads, model.config.dim_per_head) == (3, 3, 16)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("make", [gqa_model, bert_model], ids=["gated-llama", "bert"])
def test_neurons_with_zero_importance_are_removed_without_changing_outputs(make):
    model = make()
    size = model.config.intermediate_size
    dead = torch.arange(0, size, 4)  # every 4th neuron: its down_proj column is zero
    with torch.no_grad():
        for block in model.layers:
            block.mlp.down_proj.weight[:, dead] = 0
    before = logits(model)
    prune_neurons(model, 0.25)
    assert model.config.intermediate_size == size - len(dead)
    assert model.layers[0].mlp.up_proj.weight.shape[0] == size - len(dead)
    assert model.layers[0].mlp.down_proj.weight.shape[1] == size - len(dead)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)


def make_layer_identity(model: Transformer, index: int) -> None:
    """A pre-norm block whose o_proj and down_proj are zero adds nothing to the residual stream."""
    with torch.no_grad():
        model.layers[index].attn.o_proj.weight.zero_()
        model.layers[index].mlp.down_proj.weight.zero_()


def test_dropping_an_identity_layer_keeps_outputs_and_the_kv_cache_works():
    model = gqa_model()
    make_layer_identity(model, 1)
    before = logits(model)
    record = drop_layers(model, [1])
    assert record["kept_layers"] == [0, 2] and model.config.num_layers == 2
    assert [block.attn.layer_idx for block in model.layers] == [0, 1]
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    steps = list(iter_tokens(model, [[5, 6, 7]], GenerationConfig(max_new_tokens=3), 0))
    assert len(steps) == 3  # decoding through the static KV cache indexes layers 0..1


def test_block_influence_picks_the_layer_that_changes_nothing():
    model = gqa_model()
    make_layer_identity(model, 2)
    calibration = [IDS, IDS[:, :4]]
    scores = layer_importance(model, calibration)
    assert scores.shape == (3,) and scores[2] < 1e-6 < scores[0]
    record = prune_layers(model, 1, calibration)
    assert record["dropped_layers"] == [2]


def test_calibration_importance_needs_data_and_uses_it():
    model = gqa_model()
    with pytest.raises(ValueError, match="calibration"):
        head_importance(model, "calibration")
    zero_heads(model, [3])
    scores = head_importance(model, "calibration", [IDS])
    assert all(s.shape == (8,) and s[3] == 0 and (s[[0, 1, 2]] > 0).all() for s in scores)
    assert neuron_importance(model, "calibration", [IDS])[0].shape == (model.config.intermediate_size,)


def test_structured_prune_combines_parts_and_round_trips_as_an_artifact(tmp_path):
    model = gqa_model()
    record = structured_prune(model, heads=0.5, neurons=0.5, layers=[0])
    assert record["before"]["num_layers"] == 3
    assert record["after"] == {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
                               "intermediate_size": 86}
    expected = logits(model)
    save_artifact(model, tmp_path / "pruned", manifest=new_manifest(model.config, "test"))
    loaded, _ = load_artifact(tmp_path / "pruned")
    assert loaded.config.num_heads == 4 and loaded.config.intermediate_size == 86
    torch.testing.assert_close(logits(loaded), expected)


def test_pruned_then_quantized_model_round_trips(tmp_path):
    model = gqa_model()
    prune_heads(model, 0.5)
    quantize_model(model, "int8")
    expected = logits(model)
    save_artifact(model, tmp_path / "q", manifest=new_manifest(model.config, "test"))
    loaded, _ = load_artifact(tmp_path / "q")
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-5)


def test_kept_heads_keeps_group_order():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2])  # 2 groups of 3
    heads, kv = kept_heads(scores, 2, 2, "query")
    assert heads.tolist() == [1, 2, 3, 4] and kv.tolist() == [0, 1]
    heads, kv = kept_heads(scores, 2, 1, "group")
    assert heads.tolist() == [0, 1, 2] and kv.tolist() == [0]


@pytest.mark.parametrize("call, message", [
    (lambda m: prune_heads(m, 1.0), "fraction"),
    (lambda m: prune_heads(m, 0.9), "leave none"),
    (lambda m: prune_heads(m, 0.25, unit="neuron"), "head_unit"),
    (lambda m: prune_neurons(m, -0.1), "fraction"),
    (lambda m: prune_neurons(m, 0.5, importance="random"), "importance"),
    (lambda m: drop_layers(m, [0, 1, 2]), "at least one layer"),
    (lambda m: drop_layers(m, [3]), r"\[0, 3\)"),
    (lambda m: drop_layers(m, [1, 1]), "distinct"),
    (lambda m: prune_layers(m, 1, None), "calibration"),
    (lambda m: prune_layers(m, 3, [IDS]), "integer"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(gqa_model())


def test_quantized_models_are_refused():
    model = gqa_model()
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match="float model"):
        prune_neurons(model, 0.5)
