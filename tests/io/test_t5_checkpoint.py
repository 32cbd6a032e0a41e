"""T5 folders in and out of lmsmith (no transformers here: tests/parity/test_t5.py checks against it)."""
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmsmith import api
from lmsmith.io.artifact import load_artifact, save_artifact
from lmsmith.io.checkpoint import load_hf_folder, save_hf_folder
from lmsmith.io.weights import CheckpointError, module_name_map
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer


def _model(**changes):
    torch.manual_seed(0)
    return Transformer(PRESETS["tiny-t5"].replace(**changes)).eval()


def _logits(model):
    torch.manual_seed(1)
    ids, dec = torch.randint(2, 512, (2, 9)), torch.randint(2, 512, (2, 5))
    with torch.no_grad():
        return model(ids, decoder_input_ids=dec).logits


@pytest.mark.parametrize("changes", [{}, {"tie_word_embeddings": True, "scale_lm_head_input": True,
                                          "activation": "relu", "gated_mlp": False, "num_decoder_layers": 3}])
def test_round_trip_is_exact(tmp_path, changes):
    model = _model(**changes)
    path = save_hf_folder(model, tmp_path / "t5")
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("t5", ["T5ForConditionalGeneration"])
    assert config["feed_forward_proj"] == ("relu" if changes else "gated-gelu")
    names = set(load_file(path / "model.safetensors"))
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in names
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in names
    assert ("lm_head.weight" in names) == (not changes)  # a tied head is stored once, as `shared`
    again = load_hf_folder(path)
    c = model.config
    assert again.config.replace(name=c.name, num_decoder_layers=c.num_decoder_layers) == c
    assert torch.equal(_logits(again), _logits(model))


def test_api_load_and_info_report_the_family(tmp_path):
    path = save_hf_folder(_model(num_decoder_layers=3), tmp_path / "t5")
    model, tokenizer = api.load(path)
    assert model.config.family == "t5" and tokenizer is None
    info = api.info(str(path))
    assert (info["family"], info["task"], info["layers"], info["context_length"]) == ("t5", "seq2seq-lm", 2, 256)
    assert info["decoder_layers"] == 3
    assert info["parameters"] == model.num_parameters()


def test_serving_an_encoder_decoder_model_is_refused_with_the_reason():
    from lmsmith.serve.runner import ModelRunner

    with pytest.raises(ValueError, match="encoder-decoder model: the serving engine runs decoder-only"):
        ModelRunner(_model(), num_blocks=4, block_size=16)


def test_checkpoint_without_lm_head_ties_it_to_shared(tmp_path, caplog):
    path = save_hf_folder(_model(), tmp_path / "t5")
    tensors = load_file(path / "model.safetensors")
    shared = tensors["shared.weight"]
    del tensors["lm_head.weight"]
    # older checkpoints also carry copies of the shared embedding; they are expected, not "unused"
    tensors["encoder.embed_tokens.weight"], tensors["decoder.embed_tokens.weight"] = shared.clone(), shared.clone()
    save_file(tensors, str(path / "model.safetensors"))
    with caplog.at_level(logging.WARNING):
        model = load_hf_folder(path)
    assert "not used" not in caplog.text
    assert torch.equal(model.lm_head.weight, shared)
    assert model.lm_head.weight.data_ptr() != model.embed.tokens.weight.data_ptr()  # untied, as configured
    save_hf_folder(model, tmp_path / "again")  # no shared storage for safetensors to refuse


def test_missing_cross_attention_tensor_is_named(tmp_path):
    path = save_hf_folder(_model(), tmp_path / "t5")
    tensors = load_file(path / "model.safetensors")
    del tensors["decoder.block.1.layer.1.EncDecAttention.k.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="decoder.block.1.layer.1.EncDecAttention.k.weight.*cross_attn.k_proj"):
        load_hf_folder(path)


def test_unsupported_t5_architectures_and_tasks_are_named(tmp_path):
    path = save_hf_folder(_model(), tmp_path / "t5")
    with pytest.raises(ValueError, match="encoder-decoder model supports task"):
        load_hf_folder(path, task="causal-lm")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["T5EncoderModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported T5 architecture 'T5EncoderModel'"):
        load_hf_folder(path)


def test_a_layout_t5_cannot_hold_is_refused_at_save(tmp_path):
    with pytest.raises(ValueError, match="T5 checkpoint cannot hold this model.*attn_qkv_bias"):
        save_hf_folder(_model(attn_qkv_bias=True), tmp_path / "t5")
    with pytest.raises(ValueError, match="gated exact-GELU"):
        save_hf_folder(_model(activation="gelu"), tmp_path / "t5")
    assert not (tmp_path / "t5").exists()


def test_artifact_round_trip(tmp_path):
    model = _model()
    save_artifact(model, tmp_path / "art")
    again, _ = load_artifact(tmp_path / "art")
    assert torch.equal(_logits(again), _logits(model))


def test_module_name_map_covers_cross_attention_for_adapters():
    names = module_name_map(PRESETS["tiny-t5"])
    assert names["decoder.layers.1.cross_attn.q_proj"] == "decoder.block.1.layer.1.EncDecAttention.q"
    assert names["encoder.layers.0.mlp.gate_proj"] == "encoder.block.0.layer.1.DenseReluDense.wi_0"
