"""Structurally pruned models saved as float artifacts load back from the manifest's own ModelConfig:
config.json cannot carry a BERT / GPT-2 / GPT-NeoX head_dim that no longer equals hidden / heads."""
import json

import pytest
import torch

from lmsmith.compress.structured import drop_layers, prune_heads, prune_neurons, structured_prune
from lmsmith.generation import GenerationConfig, iter_tokens
from lmsmith.io.artifact import load_artifact, new_manifest, save_artifact
from lmsmith.io.weights import CheckpointError
from lmsmith.model.config import PRESETS, ModelConfig
from lmsmith.model.transformer import Transformer

IDS = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))
TINY_NEOX = ModelConfig(
    vocab_size=512, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=256, max_position_embeddings=256,
    norm="layernorm", norm_eps=1e-5, activation="gelu", gated_mlp=False, attn_qkv_bias=True, attn_out_bias=True,
    mlp_bias=True, parallel_residual=True, rotary_fraction=0.25, family="gpt_neox", name="tiny-neox",
)
CONFIGS = {
    "bert-mlm": PRESETS["tiny-bert"],
    "bert-classifier": PRESETS["tiny-bert"].replace(task="sequence-classification", labels=("no", "yes"),
                                                    tie_word_embeddings=False),
    "gpt2": PRESETS["tiny-gpt"],
    "gpt-neox": TINY_NEOX,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def model_for(name: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(CONFIGS[name]).eval()


def outputs(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def round_trip(model: Transformer, path) -> Transformer:
    save_artifact(model, path, manifest=new_manifest(model.config, "test"))
    loaded, _ = load_artifact(path)
    return loaded


@pytest.mark.parametrize("name", list(CONFIGS))
def test_head_pruned_model_reloads_with_equal_logits(name, tmp_path):
    model = model_for(name)
    prune_heads(model, 0.5)
    assert model.config.num_heads * model.config.dim_per_head != model.config.hidden_size  # what HF cannot say
    loaded = round_trip(model, tmp_path / "pruned")
    assert loaded.config == model.config and loaded.config.head_dim == 16
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=1e-6)


def test_head_pruned_causal_lm_decodes_the_same_tokens_after_reload(tmp_path):
    model = model_for("gpt-neox")
    prune_heads(model, 0.5)
    loaded = round_trip(model, tmp_path / "pruned")

    def greedy(m):
        return [t.tolist() for t in iter_tokens(m, [[5, 6, 7], [8, 9]], GenerationConfig(max_new_tokens=5), 0)]

    assert greedy(loaded) == greedy(model)


@pytest.mark.parametrize("name,prune", [
    ("gpt2", lambda m: prune_neurons(m, 0.5)),
    ("bert-mlm", lambda m: prune_neurons(m, 0.25)),
    ("gpt-neox", lambda m: drop_layers(m, [1])),
    ("bert-classifier", lambda m: structured_prune(m, heads=0.5, neurons=0.5, layers=[0])),
])
def test_neuron_pruned_and_layer_dropped_models_reload_with_equal_logits(name, prune, tmp_path):
    model = model_for(name)
    prune(model)
    loaded = round_trip(model, tmp_path / "pruned")
    assert loaded.config == model.config
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,tensor", [("gpt-neox", "layers.0.attention.query_key_value.weight"),
                                         ("gpt2", "h.0.attn.c_attn.weight"),
                                         ("bert-mlm", "encoder.layer.0.attention.self.query.weight")])
def test_manifest_config_that_disagrees_with_the_tensors_names_the_tensor(name, tensor, tmp_path):
    model = model_for(name)
    prune_heads(model, 0.5)
    path = save_artifact(model, tmp_path / "pruned")
    manifest = json.loads((path / "lmsmith.json").read_text())
    manifest["config"].update(num_heads=4, num_kv_heads=4)  # the unpruned counts: 4 heads x 16 != the tensors
    (path / "lmsmith.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=tensor) as info:
        load_artifact(path)
    assert "num_heads=4" in str(info.value) and str(path) in str(info.value)


def test_manifest_config_a_family_cannot_lay_out_is_a_checkpoint_error(tmp_path):
    model = model_for("gpt-neox")
    prune_heads(model, 0.5)
    path = save_artifact(model, tmp_path / "pruned")
    manifest = json.loads((path / "lmsmith.json").read_text())
    manifest["config"]["num_heads"] = 4  # 4 query heads over 2 KV heads: NeoX's fused qkv has no such layout
    (path / "lmsmith.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot be laid out in gpt_neox"):
        load_artifact(path)


def test_manifest_config_with_too_many_layers_names_the_missing_tensor(tmp_path):
    model = model_for("gpt2")
    drop_layers(model, [0])
    path = save_artifact(model, tmp_path / "dropped")
    manifest = json.loads((path / "lmsmith.json").read_text())
    manifest["config"]["num_layers"] = 2
    (path / "lmsmith.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"h\.1\."):
        load_artifact(path)


def test_invalid_manifest_config_names_the_manifest(tmp_path):
    path = save_artifact(model_for("gpt2"), tmp_path / "a")
    manifest = json.loads((path / "lmsmith.json").read_text())
    manifest["config"]["num_heads"] = 0
    (path / "lmsmith.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="lmsmith.json.*num_heads"):
        load_artifact(path)


def test_manifest_without_a_config_falls_back_to_config_json(tmp_path):
    model = model_for("gpt2")
    path = save_artifact(model, tmp_path / "a")
    manifest = json.loads((path / "lmsmith.json").read_text())
    del manifest["config"]
    (path / "lmsmith.json").write_text(json.dumps(manifest))
    loaded, _ = load_artifact(path)
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=1e-6)


def test_bare_backbone_names_without_the_task_prefix_are_checked_too(tmp_path):
    """A bare BertModel checkpoint (MiniLM's layout) stores `encoder.…`, not `bert.encoder.…`."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-bert"].replace(task="base", tie_word_embeddings=False)).eval()
    prune_heads(model, 0.5)
    path = save_artifact(model, tmp_path / "bare")
    tensors = load_file(path / "model.safetensors")
    save_file({k.removeprefix("bert."): v for k, v in tensors.items()}, path / "model.safetensors")
    loaded, _ = load_artifact(path)
    torch.testing.assert_close(loaded(IDS).hidden_states, model(IDS).hidden_states, rtol=0, atol=1e-6)
    manifest = json.loads((path / "lmsmith.json").read_text())
    manifest["config"].update(num_heads=4, num_kv_heads=4)
    (path / "lmsmith.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="'encoder.layer.0.attention.self.query.weight'"):
        load_artifact(path)
